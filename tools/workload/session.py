"""One application connection (one thread): connecting with backoff, reconnecting after a lost
connection, rolling back after a failed statement, and running statements timed and recorded."""
from __future__ import annotations

import collections
import random
import time
from typing import TYPE_CHECKING

import psycopg2
import psycopg2.extensions

from .db import _err_info, _iso, connect
from .recorder import MAX_FAILURE_SAMPLES, SAMPLES_PER_KEY
from .statements import FEED_IDS, TG_IDS

if TYPE_CHECKING:
    from .runner import Workload


class _StmtFailed(Exception):
    pass


class _Session:
    """One application connection (one thread)."""

    def __init__(self, wl: "Workload", role: str, idx: int, autocommit: bool):
        self.wl = wl
        self.role = role
        self.idx = idx
        self.autocommit = autocommit
        self.conn = None
        self.ever_connected = False
        self.rng = random.Random(f"{wl.run_tag}-{role}-{idx}")
        self.seq = 0
        self.recent_calls: collections.deque = collections.deque(maxlen=200)
        self.in_flight = False
        self.discovered = False
        self.feed_ids = list(FEED_IDS)
        self.tg_ids = list(TG_IDS)

    # connection management -----------------------------------------------------------------
    def ensure_connected(self) -> bool:
        if self.conn is not None and not self.conn.closed:
            return True
        rec = self.wl.rec
        backoff = 0.1
        while not self.wl._stop_evt.is_set():
            t0 = time.perf_counter()
            conn = None
            try:
                conn = connect(self.wl.conn_kwargs, self.wl.application_name)
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("SET statement_timeout = %s", (f"{int(self.wl.statement_timeout_ms)}ms",))
                conn.autocommit = self.autocommit
                self.conn = conn
                with rec.lock:
                    rec.connect_lat.append((time.perf_counter() - t0) * 1000.0)
                    rec.conn["connects"] += 1
                    if self.ever_connected:
                        rec.conn["reconnects"] += 1
                self.ever_connected = True
                return True
            except psycopg2.Error as exc:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
                code, msg = _err_info(exc)
                with rec.lock:
                    rec.conn["connect_failures"] += 1
                    k = f"connect/{code}"
                    rec.failure_counts[k] += 1
                    if len(rec.failures) < MAX_FAILURE_SAMPLES and rec.failure_counts[k] <= SAMPLES_PER_KEY:
                        rec.failures.append({"kind": "connect", "sqlstate": code, "message": msg,
                                             "at": _iso(), "t_s": round(time.monotonic() - rec.t0, 3)})
                self.wl._stop_evt.wait(backoff)
                backoff = min(2.0, backoff * 2)
        return False

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None

    def cancel(self):
        conn = self.conn
        if conn is not None and not conn.closed and self.in_flight:
            try:
                conn.cancel()
            except Exception:
                pass

    def recover(self):
        """After a failed statement: reconnect on connection loss, else roll back."""
        conn = self.conn
        if conn is None:
            return
        if conn.closed:
            self.wl.rec.bump(self.wl.rec.conn, "lost")
            self.close()
            return
        try:
            if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                conn.rollback()
        except psycopg2.Error:
            self.wl.rec.bump(self.wl.rec.conn, "lost")
            self.close()

    # statements ----------------------------------------------------------------------------
    def execute(self, kind: str, params: dict | None = None, sql: str | None = None):
        """Run one statement of STATEMENTS (timed, recorded). Returns fetched rows or None."""
        sql = sql if sql is not None else self.wl.sql[kind]
        rec = self.wl.rec
        self.in_flight = True
        t0 = time.perf_counter()
        try:
            if sql == "COMMIT":
                self.conn.commit()
                rows = None
            else:
                with self.conn.cursor() as cur:
                    cur.execute(sql, params)
                    rows = cur.fetchall() if cur.description else None
        except psycopg2.Error as exc:
            ms = (time.perf_counter() - t0) * 1000.0
            self.in_flight = False
            if self.wl._cancelling and getattr(exc, "pgcode", None) == "57014":
                rec.cancelled(kind, ms)
            else:
                rec.failed(kind, exc, ms)
            raise _StmtFailed(kind) from exc
        ms = (time.perf_counter() - t0) * 1000.0
        self.in_flight = False
        rec.ok(kind, ms)
        return rows
