# -*- coding: utf-8 -*-
"""Shared helpers for the project's PostgreSQL modules (dbops_migrate, dbops_run_lock).

Connection options use the same names as community.postgresql, so one ``module_defaults``
entry (``scanner_db_login``) serves both. Secrets: ``login_password`` is ``no_log``; errors
never include the DSN.
"""
from __future__ import annotations

import re
import time

try:
    import psycopg2
    import psycopg2.extensions
    HAS_PSYCOPG2 = True
except ImportError:  # pragma: no cover - reported by the module
    HAS_PSYCOPG2 = False

LOCK_NOT_AVAILABLE = "55P03"
DEADLOCK_DETECTED = "40P01"
SERIALIZATION_FAILURE = "40001"
RETRYABLE = {LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED, SERIALIZATION_FAILURE}

CONNECTION_ARGSPEC = dict(
    login_host=dict(type="str", default=""),
    login_port=dict(type="int", default=5432),
    login_user=dict(type="str", default="postgres"),
    login_password=dict(type="str", default="", no_log=True),
    login_db=dict(type="str", default="", aliases=["db"]),
    ssl_mode=dict(type="str", default="prefer",
                  choices=["allow", "disable", "prefer", "require", "verify-ca", "verify-full"]),
    ca_cert=dict(type="str", aliases=["ssl_rootcert"]),
    ssl_cert=dict(type="path"),
    ssl_key=dict(type="path"),
    connect_params=dict(type="dict", default={}),
)


def connect(params: dict, application_name: str):
    """Open an autocommit connection; raise a clean RuntimeError without the password."""
    kw = dict(host=params["login_host"] or None, port=params["login_port"],
              user=params["login_user"], dbname=params["login_db"] or None,
              sslmode=params["ssl_mode"], application_name=application_name,
              connect_timeout=10)
    if params.get("login_password"):
        kw["password"] = params["login_password"]
    if params.get("ca_cert"):
        kw["sslrootcert"] = params["ca_cert"]
    if params.get("ssl_cert"):
        kw["sslcert"] = params["ssl_cert"]
    if params.get("ssl_key"):
        kw["sslkey"] = params["ssl_key"]
    kw.update(params.get("connect_params") or {})
    # Our sessions keep their own name (visible in pg_stat_activity), whatever connect_params says.
    kw["application_name"] = application_name
    try:
        conn = psycopg2.connect(**kw)
    except psycopg2.Error as exc:
        msg = str(exc).strip()
        if params.get("login_password"):
            msg = msg.replace(params["login_password"], "********")
        raise RuntimeError(
            "cannot connect to PostgreSQL at %s:%s database %s as %s: %s"
            % (params["login_host"] or "local socket", params["login_port"],
               params["login_db"], params["login_user"], msg)) from None
    conn.autocommit = True
    conn.notices = NoticeSink()
    return conn


class NoticeSink(list):
    """psycopg2 keeps only the last 50 notices by default: keep them all, cleaned."""

    def append(self, item):  # noqa: D401 - psycopg2 calls append()
        text = str(item).strip()
        text = re.sub(r"^(NOTICE|WARNING|INFO):\s+", "", text)
        super().append(text)

    def drain(self) -> list:
        out = list(self)
        del self[:]
        return out


def sqlstate(exc) -> str | None:
    return getattr(exc, "pgcode", None)


def with_retries(fn, retries: int, delay: float, max_delay: float = 30.0, on_retry=None):
    """Run fn(); on lock_timeout (55P03), deadlock or serialization failure, back off and retry.

    Exponential backoff (delay, 2*delay, ... capped at max_delay). Returns (result, attempts).
    Re-raises the last error when retries are exhausted: never waits unbounded."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn(), attempt
        except psycopg2.Error as exc:
            if sqlstate(exc) not in RETRYABLE or attempt > retries:
                raise
            wait = min(max_delay, delay * (2 ** (attempt - 1)))
            if on_retry:
                on_retry(attempt, wait, exc)
            time.sleep(wait)


def pg_error_text(exc) -> str:
    """A one-paragraph description of a psycopg2 error: SQLSTATE, message, detail, hint."""
    diag = getattr(exc, "diag", None)
    parts = []
    code = sqlstate(exc)
    primary = getattr(diag, "message_primary", None) or str(exc).strip().splitlines()[0]
    parts.append("%s%s" % ("[%s] " % code if code else "", primary))
    for label, attr in (("detail", "message_detail"), ("hint", "message_hint"), ("context", "context")):
        val = getattr(diag, attr, None) if diag else None
        if val:
            parts.append("%s: %s" % (label, val.strip()))
    return "; ".join(parts)
