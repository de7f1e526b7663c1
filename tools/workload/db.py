"""Connecting to the database under test: libpq keywords and/or a DSN, the target as reports name
it (never its password), the SQLSTATE of an error (client-side ones included), and the UTC
timestamps the journal and the summary write."""
from __future__ import annotations

import datetime as dt
import os

import psycopg2
import psycopg2.extensions

APP_NAME = "scanner-workload"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(ts: dt.datetime | None = None) -> str:
    return (ts or _utcnow()).isoformat(timespec="milliseconds")



def read_password_file(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.readline().rstrip("\r\n")


def describe_target(conn_kwargs: dict) -> str:
    """host:port/dbname user=... (never the password)."""
    kw = {}
    if conn_kwargs.get("dsn"):
        try:
            kw.update(psycopg2.extensions.parse_dsn(conn_kwargs["dsn"]))
        except psycopg2.Error:
            pass
    kw.update({k: v for k, v in conn_kwargs.items() if k != "dsn" and v is not None})
    host = kw.get("host") or os.environ.get("PGHOST") or "(default)"
    port = kw.get("port") or os.environ.get("PGPORT") or 5432
    db = kw.get("dbname") or os.environ.get("PGDATABASE") or "(default)"
    user = kw.get("user") or os.environ.get("PGUSER") or "(default)"
    return f"{host}:{port}/{db} user={user}"


def connect(conn_kwargs: dict, application_name: str = APP_NAME, connect_timeout: int = 5):
    kw = dict(conn_kwargs)
    dsn = kw.pop("dsn", None) or ""
    kw = {k: v for k, v in kw.items() if v is not None}
    kw.setdefault("application_name", application_name)
    kw.setdefault("connect_timeout", connect_timeout)
    return psycopg2.connect(dsn, **kw)


def _err_info(exc: BaseException) -> tuple[str, str]:
    code = getattr(exc, "pgcode", None)
    msg = (getattr(exc, "pgerror", None) or str(exc) or exc.__class__.__name__).strip()
    if not code:   # client-side: connection lost (08006) / already closed (08003)
        if isinstance(exc, psycopg2.InterfaceError):
            code = "08003"
        elif isinstance(exc, psycopg2.OperationalError):
            code = "08006"
        else:
            code = exc.__class__.__name__
    msg = msg.splitlines()[0] if msg else ""
    return code, msg[:300]
