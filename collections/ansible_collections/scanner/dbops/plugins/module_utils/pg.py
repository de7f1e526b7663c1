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


# ---- the run lock's fencing token ----------------------------------------------------------------
# A run holds the migration lock while the row <schema>.run_lock (lock_name 'migration') carries its run
# id. Every write step of a locked run (scanner.dbops.step, scanner.dbops.migrate; the action plugins pass
# run_lock_id from the run's facts) first renews that row for its own run id, and keeps renewing it from a
# second connection while it runs: a step whose run lost the lock (its lease expired and the maintenance
# job or another run took it, or an operator forced it) does not start, and one that is running is
# cancelled within a third of the lease.
LEASE_RENEW_SQL = """
UPDATE {schema}.run_lock
   SET renewed_at = now(), expires_at = now() + (expires_at - renewed_at)
 WHERE lock_name = 'migration' AND run_id = %s
RETURNING GREATEST(extract(epoch FROM expires_at - renewed_at), 1)::float8"""
LEASE_HOLDER_SQL = """
SELECT run_id, holder, acquired_at::text, expires_at::text FROM {schema}.run_lock WHERE lock_name = 'migration'"""


class LeaseLost(Exception):
    """This run no longer holds the migration run lock."""


def _q(schema: str, text: str):
    from psycopg2 import sql as pgsql
    return pgsql.SQL(text).format(schema=pgsql.Identifier(schema))


def renew_lease(conn, schema: str, run_id: str, what: str) -> float:
    """Renew this run's lease (same length as before); return its length in seconds.

    Raises LeaseLost naming the run that holds the lock now when run_id no longer holds it."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", ("%s.run_lock" % _q(schema, "{schema}").as_string(conn),))
        if cur.fetchone()[0]:
            cur.execute(_q(schema, LEASE_RENEW_SQL), (run_id,))
            row = cur.fetchone()
            if row:
                return float(row[0])
            cur.execute(_q(schema, LEASE_HOLDER_SQL))
            holder = cur.fetchone()
        else:
            holder = None
    if holder:
        now_held = "it is now held by %s (run %s), who took it at %s" % (holder[1], holder[0], holder[2])
    else:
        now_held = "nobody holds it now (it was released)"
    raise LeaseLost(
        "this run (run %s) no longer holds the migration run lock: %s. Stopped %s; this run changes nothing "
        "more. Wait for that run to finish (or check why the lease of this run was not renewed), then re-run "
        "to continue." % (run_id, now_held, what))


class LeaseKeeper:
    """Renews this run's lease from its own connection every third of the lease while a step runs.

    start() checks the lease first (raises LeaseLost: the step must not start). When a renewal finds
    the lock lost, on_lost() is called once (the step module cancels its statement) and lost holds
    the message."""

    def __init__(self, params: dict, schema: str, run_id: str, what: str, on_lost=None, during="during "):
        self.params, self.schema, self.run_id, self.what, self.during = params, schema, run_id, what, during
        self.on_lost = on_lost
        self.lost = None
        self.renewals = 0
        self._conn = None
        self._thread = None
        self._stop = None

    def start(self):
        import threading
        self._conn = connect(self.params, "scanner-dbops run-lock lease")
        try:
            lease = renew_lease(self._conn, self.schema, self.run_id, "before " + self.what)
        except Exception:
            self._conn.close()
            raise
        self.renewals = 1
        self.interval = max(0.5, lease / 3.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            try:
                renew_lease(self._conn, self.schema, self.run_id, self.during + self.what
                            + (" (it was cancelled)" if self.on_lost else ""))
                self.renewals += 1
            except LeaseLost as exc:
                self.lost = str(exc)
                if self.on_lost:
                    try:
                        self.on_lost()
                    except Exception:  # pylint: disable=broad-except
                        pass
                return
            except Exception:  # pylint: disable=broad-except
                # A failed renewal (a network blip) is retried at the next beat; the lease is three beats long.
                try:
                    if self._conn.closed:
                        self._conn = connect(self.params, "scanner-dbops run-lock lease")
                except RuntimeError:
                    pass

    def stop(self):
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=30)
        if self._conn is not None:
            self._conn.close()
        return self.lost
