#!/usr/bin/env python3
"""scanner-workload: simulate the police-scanner application against PostgreSQL while a
migration runs, and measure what the application experiences.

"Zero downtime is measured, not claimed": every statement the simulated application sends is
timed and its outcome (ok / SQLSTATE) recorded; every write that COMMITTED is journaled to a
JSON-lines keys file so that `check` can prove afterwards that nothing was lost.

Roles (one thread each, own connection, autocommit or short transactions like the real app):
  ingest       INSERT INTO bcfy_calls_raw ... ON CONFLICT <target> DO NOTHING RETURNING ...
               (+ occasional duplicates of already committed calls: exercises the conflict path)
  worker       audio worker: SELECT ... FOR UPDATE SKIP LOCKED, UPDATE ... SET processed = true
  transcriber  INSERT INTO transcripts ... RETURNING id; upsert processing_state by call_uid
  api          reads: list by feed_id / tg_id, transcripts JOIN calls, FTS, dashboard counts
  metrics      INSERT INTO api_call_metrics ... RETURNING id
  logs         INSERT INTO system_logs ... RETURNING id

The SQL lives in the STATEMENTS table below; API_READS lists the read statements the api role
picks from (later phases may add entries, or pass --extra-read NAME=SQL on the command line).

CLI
  workload.py run   [conn] [--duration S | --until-file PATH] [--rate N] [--upsert call_uid|call_uid_started_at]
                    [--keys out.jsonl] [--summary out.json] [--max-duration 3600] ...
  workload.py check [conn] --keys out.jsonl [--json out.json]
  conn: --dsn 'host=... dbname=...'  and/or  --host --port --dbname --user;
        password from --password-file FILE, PGPASSFILE / ~/.pgpass or PGPASSWORD (never printed)
  exit codes: run 0 = no failed statement, 1 = some statements failed, 2 = usage/setup error;
              check 0 = nothing lost, 1 = committed rows/updates missing, 2 = error.

Library
  wl = Workload(conn_kwargs={"host": ..., "port": ..., "dbname": ..., "user": ..., "password": ...},
                rate=200, upsert="call_uid", keys_path="keys.jsonl", duration=None)
  wl.start(); ...migration...; wl.stop(); s = wl.summary()       # or: with Workload(...) as wl:
  report = check_keys(conn_kwargs, "keys.jsonl")                   # report["missing_total"] == 0

Only the standard library and psycopg2 are used.
"""
from __future__ import annotations

import argparse
import array
import collections
import csv
import dataclasses
import datetime as dt
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from typing import Callable

import psycopg2
import psycopg2.extensions
import psycopg2.extras

APP_NAME = "scanner-workload"
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
DEFAULT_HARD_MAX_S = 3600.0
MAX_FAILURE_SAMPLES = 200          # failures kept verbatim in the summary
SAMPLES_PER_KEY = 5                # ... at most this many per (kind, sqlstate)

# ---------------------------------------------------------------------------------------------
# The statement table. {conflict} is filled from --upsert. Parameters are pyformat (%(name)s).
# ---------------------------------------------------------------------------------------------

UPSERT_TARGETS = {
    "call_uid": "(call_uid)",                          # today's application
    "call_uid_started_at": "(call_uid, started_at)",   # after partitioning on started_at
}

CALL_COLUMNS = ("call_uid", "group_id", "ts", "feed_id", "tg_id", "tag_id", "node_id", "sid",
                "site_id", "freq", "src", "url", "started_at", "ended_at", "duration_ms",
                "size_bytes", "fetched_at", "raw_json")


@dataclasses.dataclass(frozen=True)
class Statement:
    role: str
    sql: str
    table: str | None = None     # table written (for documentation / summary)
    doc: str = ""


_INGEST_SQL = (
    "INSERT INTO bcfy_calls_raw (" + ", ".join(CALL_COLUMNS) + ") VALUES ("
    + ", ".join(f"%({c})s" for c in CALL_COLUMNS)
    + ") ON CONFLICT {conflict} DO NOTHING RETURNING call_uid, started_at")

STATEMENTS: dict[str, Statement] = {
    "ingest": Statement("ingest", _INGEST_SQL, "bcfy_calls_raw", "new call"),
    "ingest_dup": Statement("ingest", _INGEST_SQL, "bcfy_calls_raw",
                            "re-insert of an already committed call: must do nothing"),
    "worker_pick": Statement(
        "worker",
        "SELECT call_uid FROM bcfy_calls_raw WHERE processed = false "
        "ORDER BY started_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED"),
    "worker_update": Statement(
        "worker",
        "UPDATE bcfy_calls_raw SET processed = true, last_attempt = now(), error = NULL "
        "WHERE call_uid = %(call_uid)s", "bcfy_calls_raw"),
    "worker_commit": Statement("worker", "COMMIT"),
    "transcript_insert": Statement(
        "transcriber",
        "INSERT INTO transcripts (call_uid, text, words, language, model_name, duration_seconds, confidence) "
        "VALUES (%(call_uid)s, %(text)s, %(words)s, %(language)s, %(model_name)s, %(duration_seconds)s, "
        "%(confidence)s) RETURNING id", "transcripts"),
    "state_upsert": Statement(
        "transcriber",
        "INSERT INTO processing_state (call_uid, status) VALUES (%(call_uid)s, 'transcribed') "
        "ON CONFLICT (call_uid) DO UPDATE SET status = EXCLUDED.status RETURNING id", "processing_state"),
    "api_list_feed": Statement(
        "api",
        "SELECT call_uid, group_id, feed_id, tg_id, started_at, duration_ms, url FROM bcfy_calls_raw "
        "WHERE feed_id = %(feed_id)s ORDER BY started_at DESC LIMIT 50 OFFSET %(offset)s"),
    "api_list_tg": Statement(
        "api",
        "SELECT call_uid, group_id, feed_id, tg_id, started_at, duration_ms, url FROM bcfy_calls_raw "
        "WHERE tg_id = %(tg_id)s ORDER BY started_at DESC LIMIT 50 OFFSET %(offset)s"),
    "api_join_recent": Statement(
        "api",
        "SELECT t.id, t.call_uid, t.text, t.language, c.feed_id, c.tg_id, c.started_at "
        "FROM transcripts t JOIN bcfy_calls_raw c ON t.call_uid = c.call_uid "
        "WHERE c.started_at > now() - interval '1 hour' ORDER BY c.started_at DESC LIMIT 50"),
    "api_fts": Statement(
        "api",
        "SELECT id, call_uid, left(text, 120) FROM transcripts "
        "WHERE tsv @@ plainto_tsquery('english', %(term)s) LIMIT 10"),
    "api_dashboard": Statement(
        "api",
        "SELECT count(*) FILTER (WHERE started_at > now() - interval '1 hour') AS last_1h, "
        "count(*) AS last_24h FROM bcfy_calls_raw WHERE started_at > now() - interval '24 hours'"),
    "metrics_insert": Statement(
        "metrics",
        "INSERT INTO api_call_metrics (endpoint, method, status_code, duration_ms, response_size, cache_hit) "
        "VALUES (%(endpoint)s, %(method)s, %(status_code)s, %(duration_ms)s, %(response_size)s, %(cache_hit)s) "
        "RETURNING id", "api_call_metrics"),
    "logs_insert": Statement(
        "logs",
        "INSERT INTO system_logs (component, event_type, message, metadata, duration_ms) "
        "VALUES (%(component)s, %(event_type)s, %(message)s, %(metadata)s, %(duration_ms)s) RETURNING id",
        "system_logs"),
}

FEED_IDS = list(range(9001, 9013))
TG_IDS = list(range(70001, 70041))
FTS_TERMS = ["police", "police", "fire", "ambulance", "traffic", "suspect", "vehicle"]
VOCAB = ("police unit responding to a traffic stop on main street suspect vehicle northbound "
         "fire engine ambulance dispatch copy that en route medical call structure fire "
         "all units be advised shots fired officer needs assistance clear code four").split()
ENDPOINTS = ["/calls/playlist", "/calls/group", "/calls/live", "/playlists", "/feeds/info"]
COMPONENTS = [("ingester", "poll"), ("audio-worker", "download"), ("transcriber", "transcribe"),
              ("api", "request"), ("scheduler", "tick")]


def _api_params(kind: str, rng: random.Random) -> dict:
    if kind == "api_list_feed":
        return {"feed_id": rng.choice(FEED_IDS), "offset": rng.choice((0, 0, 0, 50, 100))}
    if kind == "api_list_tg":
        return {"tg_id": rng.choice(TG_IDS), "offset": rng.choice((0, 0, 50))}
    if kind == "api_fts":
        return {"term": rng.choice(FTS_TERMS)}
    return {}


# Read statements the api role picks from: (kind, weight, params(kind, rng) -> dict).
API_READS: list[tuple[str, float, Callable[[str, random.Random], dict]]] = [
    ("api_list_feed", 3, _api_params),
    ("api_list_tg", 1, _api_params),
    ("api_join_recent", 2, _api_params),
    ("api_fts", 2, _api_params),
    ("api_dashboard", 1, _api_params),
]

# Share of the overall statement rate taken by each role.
ROLE_WEIGHTS = {"ingest": 0.25, "worker": 0.15, "transcriber": 0.10, "api": 0.25,
                "metrics": 0.125, "logs": 0.125}

# Keys-file record types checked by `check`.
KEY_TABLES = ("bcfy_calls_raw", "bcfy_calls_raw.processed", "transcripts", "processing_state",
              "api_call_metrics", "system_logs")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(ts: dt.datetime | None = None) -> str:
    return (ts or _utcnow()).isoformat(timespec="milliseconds")


def _percentile(sorted_vals, q: float) -> float | None:
    n = len(sorted_vals)
    if n == 0:
        return None
    k = max(0, min(n - 1, int(math.ceil(q * n)) - 1))   # nearest-rank
    return sorted_vals[k]


def _r(v: float | None, nd: int = 3):
    return None if v is None else round(v, nd)


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


# ---------------------------------------------------------------------------------------------
# recording
# ---------------------------------------------------------------------------------------------

class _KindStats:
    __slots__ = ("ok", "failed", "lat")

    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.lat = array.array("d")   # ms, every attempt (ok or failed)


class Recorder:
    """Thread-safe statement outcome + latency recorder."""

    def __init__(self):
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.kinds: dict[str, _KindStats] = collections.defaultdict(_KindStats)
        self.failures: list[dict] = []
        self.failure_counts: dict[str, int] = collections.Counter()
        self.max_stall = (0.0, None, None)       # (ms, kind, at)
        self.timeline: dict[int, list] = {}      # second -> [ok, failed, max_ms]
        self.writes: dict[str, int] = collections.Counter()
        self.anomalies: dict[str, int] = collections.Counter()
        self.conn = collections.Counter()        # connects, connect_failures, lost, reconnects
        self.connect_lat = array.array("d")
        self.cancelled_at_stop = 0
        self.internal_errors: list[str] = []
        self.role_ops: dict[str, int] = collections.Counter()
        self.role_stmts: dict[str, int] = collections.Counter()
        self.role_last_ok: dict[str, float] = {}
        self.role_max_gap: dict[str, float] = collections.defaultdict(float)

    def _tl(self, now: float, failed: bool, ms: float):
        sec = int(now - self.t0)
        b = self.timeline.get(sec)
        if b is None:
            b = self.timeline[sec] = [0, 0, 0.0]
        b[1 if failed else 0] += 1
        if ms > b[2]:
            b[2] = ms

    def ok(self, kind: str, ms: float):
        now = time.monotonic()
        with self.lock:
            ks = self.kinds[kind]
            ks.ok += 1
            ks.lat.append(ms)
            if ms > self.max_stall[0]:
                self.max_stall = (ms, kind, _iso())
            self._tl(now, False, ms)

    def failed(self, kind: str, exc: BaseException, ms: float):
        code, msg = _err_info(exc)
        now = time.monotonic()
        with self.lock:
            ks = self.kinds[kind]
            ks.failed += 1
            ks.lat.append(ms)
            if ms > self.max_stall[0]:
                self.max_stall = (ms, kind, _iso())
            self._tl(now, True, ms)
            key = f"{kind}/{code}"
            self.failure_counts[key] += 1
            if len(self.failures) < MAX_FAILURE_SAMPLES and self.failure_counts[key] <= SAMPLES_PER_KEY:
                self.failures.append({"kind": kind, "sqlstate": code, "message": msg, "at": _iso(),
                                      "t_s": round(now - self.t0, 3), "latency_ms": round(ms, 3)})

    def cancelled(self, kind: str, ms: float):
        """A statement cancelled by our own stop(): its wait counts as a stall, not as a failure."""
        with self.lock:
            self.cancelled_at_stop += 1
            self.kinds[kind].lat.append(ms)
            if ms > self.max_stall[0]:
                self.max_stall = (ms, kind, _iso())

    def role_ok(self, role: str, statements: int = 1):
        now = time.monotonic()
        with self.lock:
            self.role_ops[role] += 1
            self.role_stmts[role] += statements
            last = self.role_last_ok.get(role, self.t0)
            gap = (now - last) * 1000.0
            if gap > self.role_max_gap[role]:
                self.role_max_gap[role] = gap
            self.role_last_ok[role] = now

    def bump(self, counter: dict, key: str, n: int = 1):
        with self.lock:
            counter[key] += n


class KeyLog:
    """JSON-lines journal of committed writes (written only after the commit returned)."""

    def __init__(self, path: str | None, meta: dict):
        self.path = path
        self.lock = threading.Lock()
        self.fh = open(path, "w", encoding="utf-8") if path else None
        self.write({"t": "meta", **meta})

    def write(self, rec: dict):
        if self.fh is None:
            return
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        with self.lock:
            if self.fh is not None:
                self.fh.write(line)

    def flush(self):
        with self.lock:
            if self.fh is not None:
                self.fh.flush()

    def close(self):
        with self.lock:
            if self.fh is not None:
                self.fh.flush()
                os.fsync(self.fh.fileno())
                self.fh.close()
                self.fh = None


# ---------------------------------------------------------------------------------------------
# sessions and roles
# ---------------------------------------------------------------------------------------------

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


def _role_ingest(wl: "Workload", s: _Session) -> int:
    rng = s.rng
    if s.recent_calls and rng.random() < wl.dup_ratio:
        params = rng.choice(s.recent_calls)
        rows = s.execute("ingest_dup", params)
        if rows:   # a duplicate of a committed call was inserted: the conflict arbiter is missing
            wl.rec.bump(wl.rec.anomalies, "duplicate_inserted")
            for call_uid, started_at in rows:
                wl.keys.write({"t": "bcfy_calls_raw", "call_uid": call_uid, "started_at": started_at})
        return 1
    s.seq += 1
    now = _utcnow()
    ts = int(now.timestamp()) - (rng.randint(0, wl.spread_s) if wl.spread_s > 0 else 0)
    group_id = f"wl{wl.run_tag}{s.idx}n{s.seq}"
    started = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    dur_ms = rng.randint(1500, 45000)
    feed = rng.choice(FEED_IDS)
    tg = rng.choice(TG_IDS)
    params = {
        "call_uid": f"{group_id}-{ts}", "group_id": group_id, "ts": ts, "feed_id": feed, "tg_id": tg,
        "tag_id": rng.randint(1, 30), "node_id": rng.randint(1, 500), "sid": rng.randint(1, 200),
        "site_id": rng.randint(1, 80), "freq": round(rng.uniform(150.0, 860.0), 4),
        "src": rng.randint(100000, 999999), "url": f"https://calls.example.invalid/{group_id}-{ts}.m4a",
        "started_at": started, "ended_at": started + dt.timedelta(milliseconds=dur_ms),
        "duration_ms": dur_ms, "size_bytes": dur_ms * 4, "fetched_at": now,
        "raw_json": psycopg2.extras.Json({"groupId": group_id, "ts": ts, "tg": tg, "feed": feed,
                                          "src": "workload"}),
    }
    rows = s.execute("ingest", params)
    if rows:
        for call_uid, started_at in rows:
            wl.keys.write({"t": "bcfy_calls_raw", "call_uid": call_uid, "started_at": started_at})
            wl.rec.bump(wl.rec.writes, "bcfy_calls_raw")
            wl.transcribe_queue.append(call_uid)
        s.recent_calls.append(params)
    else:      # a brand-new call_uid conflicted: should never happen
        wl.rec.bump(wl.rec.anomalies, "fresh_insert_skipped")
    return 1


def _role_worker(wl: "Workload", s: _Session) -> int:
    rows = s.execute("worker_pick", {"batch": 10})
    n = 1
    done = []
    for (call_uid,) in rows or ():
        s.execute("worker_update", {"call_uid": call_uid})
        done.append(call_uid)
        n += 1
    s.execute("worker_commit")
    for call_uid in done:
        wl.keys.write({"t": "bcfy_calls_raw.processed", "call_uid": call_uid, "processed": True})
    if done:
        wl.rec.bump(wl.rec.writes, "bcfy_calls_raw.processed", len(done))
    return n + 1


def _role_transcriber(wl: "Workload", s: _Session) -> int:
    try:
        call_uid = wl.transcribe_queue.popleft()
    except IndexError:
        return 0
    rng = s.rng
    words = [rng.choice(VOCAB) for _ in range(rng.randint(6, 24))]
    if "police" not in words and rng.random() < 0.5:
        words.insert(rng.randrange(len(words) + 1), "police")
    t = 0.0
    wj = []
    for w in words:
        wj.append({"w": w, "s": round(t, 2), "e": round(t + 0.3, 2), "p": round(rng.uniform(0.7, 1.0), 3)})
        t += 0.35
    rows = s.execute("transcript_insert", {
        "call_uid": call_uid, "text": " ".join(words), "words": psycopg2.extras.Json(wj),
        "language": "en", "model_name": rng.choice(("whisper-small", "whisper-medium")),
        "duration_seconds": round(t, 2), "confidence": round(rng.uniform(0.6, 0.99), 3)})
    if rows:
        wl.keys.write({"t": "transcripts", "id": rows[0][0], "call_uid": call_uid})
        wl.rec.bump(wl.rec.writes, "transcripts")
    s.execute("state_upsert", {"call_uid": call_uid})
    wl.keys.write({"t": "processing_state", "call_uid": call_uid, "status": "transcribed"})
    wl.rec.bump(wl.rec.writes, "processing_state")
    return 2


def _discover_ids(s: _Session):
    """Once per api session (not timed): also list by feed_ids / tg_ids that exist in the data
    (e.g. demo.seed()'s), taken from the newest calls through the started_at index."""
    s.discovered = True
    try:
        with s.conn.cursor() as cur:
            cur.execute("SELECT array_agg(DISTINCT feed_id) FILTER (WHERE feed_id IS NOT NULL), "
                        "array_agg(DISTINCT tg_id) FILTER (WHERE tg_id IS NOT NULL) FROM "
                        "(SELECT feed_id, tg_id FROM bcfy_calls_raw WHERE started_at IS NOT NULL "
                        "ORDER BY started_at DESC LIMIT 2000) r")
            feeds, tgs = cur.fetchone()
        s.feed_ids = FEED_IDS + list(feeds or [])[:50]
        s.tg_ids = TG_IDS + list(tgs or [])[:200]
    except psycopg2.Error:
        s.recover()


def _role_api(wl: "Workload", s: _Session) -> int:
    if not s.discovered:
        _discover_ids(s)
    kind, _w, pfn = s.rng.choices(wl.api_reads, weights=[w for _k, w, _p in wl.api_reads])[0]
    params = pfn(kind, s.rng)
    if "feed_id" in params:
        params["feed_id"] = s.rng.choice(s.feed_ids)
    if "tg_id" in params:
        params["tg_id"] = s.rng.choice(s.tg_ids)
    s.execute(kind, params)
    return 1


def _role_metrics(wl: "Workload", s: _Session) -> int:
    rng = s.rng
    status = 200 if rng.random() < 0.95 else rng.choice((429, 500, 503))
    rows = s.execute("metrics_insert", {
        "endpoint": rng.choice(ENDPOINTS), "method": "GET", "status_code": status,
        "duration_ms": rng.randint(20, 900), "response_size": rng.randint(200, 90000),
        "cache_hit": rng.random() < 0.3})
    if rows:
        wl.keys.write({"t": "api_call_metrics", "id": rows[0][0]})
        wl.rec.bump(wl.rec.writes, "api_call_metrics")
    return 1


def _role_logs(wl: "Workload", s: _Session) -> int:
    rng = s.rng
    comp, ev = rng.choice(COMPONENTS)
    rows = s.execute("logs_insert", {
        "component": comp, "event_type": ev, "message": f"{comp} {ev} ok",
        "metadata": psycopg2.extras.Json({"run": wl.run_tag, "n": rng.randint(1, 1000)}),
        "duration_ms": rng.randint(1, 5000)})
    if rows:
        wl.keys.write({"t": "system_logs", "id": rows[0][0]})
        wl.rec.bump(wl.rec.writes, "system_logs")
    return 1


ROLES: dict[str, tuple[Callable[["Workload", _Session], int], bool]] = {
    # role: (function returning the number of statements it ran, autocommit?)
    "ingest": (_role_ingest, True),
    "worker": (_role_worker, False),        # short explicit transaction
    "transcriber": (_role_transcriber, True),
    "api": (_role_api, True),
    "metrics": (_role_metrics, True),
    "logs": (_role_logs, True),
}


# ---------------------------------------------------------------------------------------------
# the workload
# ---------------------------------------------------------------------------------------------

class Workload:
    """In-process workload: start() / stop() / summary() (also a context manager)."""

    def __init__(self, conn_kwargs: dict, *, rate: float = 200.0, upsert: str = "call_uid",
                 keys_path: str | None = None, duration: float | None = None,
                 until_file: str | None = None, max_duration: float = DEFAULT_HARD_MAX_S,
                 statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS, threads_per_role: int = 1,
                 roles: list[str] | None = None, dup_ratio: float = 0.05, spread_s: int = 3600,
                 extra_reads: dict[str, str] | None = None, application_name: str = APP_NAME,
                 stop_grace_s: float = 2.0):
        if upsert not in UPSERT_TARGETS:
            raise ValueError(f"upsert must be one of {sorted(UPSERT_TARGETS)}")
        self.conn_kwargs = dict(conn_kwargs)
        self.rate = float(rate)
        self.upsert = upsert
        self.keys_path = keys_path
        self.duration = duration
        self.until_file = until_file
        self.max_duration = float(max_duration)
        self.statement_timeout_ms = statement_timeout_ms
        self.threads_per_role = max(1, int(threads_per_role))
        self.roles = list(roles or ROLES)
        for r in self.roles:
            if r not in ROLES:
                raise ValueError(f"unknown role {r!r} (known: {', '.join(ROLES)})")
        self.dup_ratio = dup_ratio
        self.spread_s = int(spread_s)
        self.application_name = application_name
        self.stop_grace_s = stop_grace_s
        self.run_tag = uuid.uuid4().hex[:8]
        self.sql = {k: st.sql.replace("{conflict}", UPSERT_TARGETS[upsert]) for k, st in STATEMENTS.items()}
        self.api_reads = list(API_READS)
        for name, sql in (extra_reads or {}).items():
            self.sql[name] = sql
            self.api_reads.append((name, 1.0, lambda _k, _r: {}))
        self.transcribe_queue: collections.deque = collections.deque(maxlen=100_000)
        self.rec = Recorder()
        self.keys: KeyLog | None = None
        self._stop_evt = threading.Event()
        self._done_evt = threading.Event()
        self._cancelling = False
        self._threads: list[threading.Thread] = []
        self._sessions: list[_Session] = []
        self._controller: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stop_reason: str | None = None
        self.started_wall: dt.datetime | None = None
        self.ended_wall: dt.datetime | None = None
        self._t_start = None
        self._t_end = None
        self._t_stop_req = None
        self._stopped = False
        self._role_rate: dict[str, float] = {}

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> "Workload":
        if self._t_start is not None:
            raise RuntimeError("workload already started")
        self.keys = KeyLog(self.keys_path, {
            "tool": APP_NAME, "run_tag": self.run_tag, "upsert": self.upsert,
            "target": describe_target(self.conn_kwargs), "started": _iso()})
        self.rec = Recorder()
        self.started_wall = _utcnow()
        self._t_start = time.monotonic()
        total_w = sum(ROLE_WEIGHTS.get(r, 0.1) for r in self.roles)
        for role in self.roles:
            fn, autocommit = ROLES[role]
            per_thread = (self.rate * ROLE_WEIGHTS.get(role, 0.1) / total_w / self.threads_per_role
                          if self.rate > 0 else 0.0)
            self._role_rate[role] = per_thread
            for i in range(self.threads_per_role):
                s = _Session(self, role, i, autocommit)
                self._sessions.append(s)
                t = threading.Thread(target=self._thread_main, args=(s, fn, per_thread),
                                     name=f"wl-{role}-{i}", daemon=True)
                self._threads.append(t)
        for t in self._threads:
            t.start()
        self._controller = threading.Thread(target=self._control, name="wl-control", daemon=True)
        self._controller.start()
        return self

    def _deadline_reason(self) -> str | None:
        el = time.monotonic() - self._t_start
        if el >= self.max_duration:
            return "max-duration"
        if self.duration is not None and el >= self.duration:
            return "duration"
        if self.until_file and os.path.exists(self.until_file):
            return "until-file"
        return None

    def _control(self):
        last_flush = time.monotonic()
        while not self._stop_evt.is_set():
            reason = self._deadline_reason()
            if reason:
                self.request_stop(reason)
                break
            if time.monotonic() - last_flush > 0.5 and self.keys:
                self.keys.flush()
                last_flush = time.monotonic()
            self._stop_evt.wait(0.05)

    def request_stop(self, reason: str = "stop()"):
        """Ask the threads to stop (non-blocking; safe from a signal handler)."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
                self._t_stop_req = time.monotonic()
        self._stop_evt.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop condition (duration, until-file, max-duration, request_stop)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop_evt.is_set():
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                return False
            self._stop_evt.wait(left)
        return True

    def stop(self) -> dict:
        """Stop all threads (cancelling statements still running after the grace period),
        close the keys file and return the summary."""
        if self._t_start is None:
            raise RuntimeError("workload not started")
        if self._stopped:
            return self.summary()
        self.request_stop("stop()")
        grace_end = time.monotonic() + self.stop_grace_s
        for t in self._threads:
            t.join(max(0.0, grace_end - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._cancelling = True
            for s in self._sessions:
                s.cancel()
            for t in self._threads:
                t.join(5.0)
        self._t_end = time.monotonic()
        self.ended_wall = _utcnow()
        if self._controller:
            self._controller.join(1.0)
        if self.keys:
            self.keys.close()
        self._stopped = True
        return self.summary()

    def run(self) -> dict:
        """Blocking: start, wait for a stop condition, stop; returns the summary."""
        self.start()
        try:
            self.wait()
        finally:
            summ = self.stop()
        return summ

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # thread body ---------------------------------------------------------------------------
    def _thread_main(self, s: _Session, fn, rate: float):
        next_t = time.monotonic()
        try:
            while not self._stop_evt.is_set():
                if not s.ensure_connected():
                    break
                n = 0
                try:
                    n = fn(self, s)
                    if n:
                        self.rec.role_ok(s.role, n)
                except _StmtFailed:
                    n = 1
                    s.recover()
                except psycopg2.Error as exc:          # e.g. rollback on a dead connection
                    self.rec.failed(f"{s.role}_other", exc, 0.0)
                    s.recover()
                except Exception as exc:               # a bug in a role: never crash the run
                    with self.rec.lock:
                        if len(self.rec.internal_errors) < 20:
                            self.rec.internal_errors.append(f"{s.role}: {exc!r}")
                    s.recover()
                    self._stop_evt.wait(0.1)
                if n == 0:
                    self._stop_evt.wait(0.02)       # nothing to do (e.g. transcriber queue empty)
                    continue
                if rate > 0:
                    next_t += n / rate
                    now = time.monotonic()
                    if next_t < now - 1.0:           # fell behind (a stall): do not burst to catch up
                        next_t = now
                    if next_t > now:
                        self._stop_evt.wait(next_t - now)
        finally:
            s.close()

    # results -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """The measured window: start() until the stop was requested (or now)."""
        if self._t_start is None:
            return 0.0
        end = self._t_stop_req if self._t_stop_req is not None else time.monotonic()
        return end - self._t_start

    def summary(self) -> dict:
        rec = self.rec
        with rec.lock:
            kinds = {k: (v.ok, v.failed, sorted(v.lat)) for k, v in rec.kinds.items()}
            failures = list(rec.failures)
            failure_counts = dict(rec.failure_counts)
            max_stall = rec.max_stall
            timeline = sorted(rec.timeline.items())
            writes = dict(rec.writes)
            anomalies = dict(rec.anomalies)
            conn = dict(rec.conn)
            connect_lat = sorted(rec.connect_lat)
            cancelled = rec.cancelled_at_stop
            internal = list(rec.internal_errors)
            role_ops = dict(rec.role_ops)
            role_stmts = dict(rec.role_stmts)
            role_gap = dict(rec.role_max_gap)
            role_last = dict(rec.role_last_ok)
        dur = self.elapsed()
        per_kind = {}
        all_lat = array.array("d")
        tot_ok = tot_failed = 0
        for k in sorted(kinds):
            ok, failed, lat = kinds[k]
            tot_ok += ok
            tot_failed += failed
            all_lat.extend(lat)
            per_kind[k] = {"ok": ok, "failed": failed, "p50_ms": _r(_percentile(lat, 0.50)),
                           "p95_ms": _r(_percentile(lat, 0.95)), "p99_ms": _r(_percentile(lat, 0.99)),
                           "max_ms": _r(lat[-1] if lat else None)}
        all_sorted = sorted(all_lat)
        total = tot_ok + tot_failed
        end_mono = self._t_stop_req if self._t_stop_req is not None else time.monotonic()
        roles = {}
        for r in self.roles:
            gap = role_gap.get(r, 0.0)
            last = role_last.get(r, rec.t0)
            gap = max(gap, (end_mono - last) * 1000.0)   # the tail counts too
            roles[r] = {"ops": role_ops.get(r, 0), "max_gap_ms": round(gap, 3),
                        "target_stmts_per_s": round(self._role_rate.get(r, 0.0) * self.threads_per_role, 1),
                        "ok_stmts_per_s": round(role_stmts.get(r, 0) / dur, 1) if dur > 0 else 0.0}
        return {
            "tool": APP_NAME,
            "run_tag": self.run_tag,
            "target": describe_target(self.conn_kwargs),
            "upsert": self.upsert,
            "rate_target": self.rate,
            "started_at": _iso(self.started_wall) if self.started_wall else None,
            "ended_at": _iso(self.ended_wall) if self.ended_wall else None,
            "stop_reason": self.stop_reason,
            "duration_s": round(dur, 3),
            "shutdown_s": (round(self._t_end - self._t_stop_req, 3)
                           if self._t_end is not None and self._t_stop_req is not None else None),
            "statements": total,
            "ok": tot_ok,
            "failed": tot_failed,
            "statements_per_s": round(total / dur, 1) if dur > 0 else 0.0,
            "latency_ms": {"p50": _r(_percentile(all_sorted, 0.50)), "p95": _r(_percentile(all_sorted, 0.95)),
                           "p99": _r(_percentile(all_sorted, 0.99)),
                           "max": _r(all_sorted[-1] if all_sorted else None)},
            "max_stall_ms": round(max_stall[0], 3),
            "max_stall": {"ms": round(max_stall[0], 3), "kind": max_stall[1], "at": max_stall[2]},
            "kinds": per_kind,
            "failures": failures,
            "failure_counts": failure_counts,
            "connections": {"connects": conn.get("connects", 0), "connect_failures": conn.get("connect_failures", 0),
                            "lost": conn.get("lost", 0), "reconnects": conn.get("reconnects", 0),
                            "connect_max_ms": _r(connect_lat[-1] if connect_lat else None)},
            "writes": {t: writes.get(t, 0) for t in KEY_TABLES},
            "anomalies": anomalies,
            "cancelled_at_stop": cancelled,
            "internal_errors": internal,
            "roles": roles,
            "timeline": [{"t": t, "ok": b[0], "failed": b[1], "max_ms": round(b[2], 3)} for t, b in timeline],
            "keys_file": self.keys_path,
        }


def human_line(s: dict) -> str:
    lat = s.get("latency_ms") or {}

    def f(v):
        return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")
    line = (f"workload: {s['statements']} statements, {s['failed']} failed, p50 {f(lat.get('p50'))} ms, "
            f"p99 {f(lat.get('p99'))} ms, max {f(lat.get('max'))} ms")
    extra = [f"{s['statements_per_s']}/s over {s['duration_s']:.1f} s",
             f"{s['connections']['reconnects']} reconnects"]
    if s.get("anomalies"):
        extra.append("anomalies " + ", ".join(f"{k}={v}" for k, v in sorted(s["anomalies"].items())))
    if s.get("internal_errors"):
        extra.append(f"{len(s['internal_errors'])} internal errors")
    return line + " (" + "; ".join(extra) + ")"


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------

_CHECKS = {
    # record type: (temp-table columns, anti-join SQL returning the missing keys)
    "bcfy_calls_raw": (
        "call_uid text, started_at timestamptz",
        "SELECT k.call_uid, k.started_at::text FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM bcfy_calls_raw c "
        "WHERE c.call_uid = k.call_uid AND c.started_at IS NOT DISTINCT FROM k.started_at)"),
    "bcfy_calls_raw.processed": (
        "call_uid text",
        "SELECT k.call_uid FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM bcfy_calls_raw c "
        "WHERE c.call_uid = k.call_uid AND c.processed IS TRUE)"),
    "transcripts": (
        "id bigint, call_uid text",
        "SELECT k.id::text, k.call_uid FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM transcripts t "
        "WHERE t.id = k.id AND t.call_uid IS NOT DISTINCT FROM k.call_uid)"),
    "processing_state": (
        "call_uid text, status text",
        "SELECT k.call_uid, k.status FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM processing_state p "
        "WHERE p.call_uid = k.call_uid AND p.status = k.status)"),
    "api_call_metrics": (
        "id bigint",
        "SELECT k.id::text FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM api_call_metrics m WHERE m.id = k.id)"),
    "system_logs": (
        "id bigint",
        "SELECT k.id::text FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM system_logs l WHERE l.id = k.id)"),
}
_CHECK_FIELDS = {
    "bcfy_calls_raw": ("call_uid", "started_at"),
    "bcfy_calls_raw.processed": ("call_uid",),
    "transcripts": ("id", "call_uid"),
    "processing_state": ("call_uid", "status"),
    "api_call_metrics": ("id",),
    "system_logs": ("id",),
}


def load_keys(paths: list[str]) -> tuple[dict[str, dict], int, list[dict]]:
    """-> ({record type: {key tuple: None}}, unreadable line count, meta records).
    For processing_state the last recorded status of a call wins (it is an upsert)."""
    keys: dict[str, dict] = {t: {} for t in _CHECKS}
    bad = 0
    metas = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                    t = rec["t"]
                except (ValueError, KeyError, TypeError):
                    bad += 1          # e.g. a last line cut by a kill -9
                    continue
                if t == "meta":
                    metas.append(rec)
                    continue
                if t not in _CHECKS:
                    bad += 1
                    continue
                fields = _CHECK_FIELDS[t]
                try:
                    if t == "processing_state":
                        keys[t][rec["call_uid"]] = rec["status"]
                    else:
                        keys[t][tuple(rec[f] for f in fields)] = None
                except KeyError:
                    bad += 1
    keys["processing_state"] = {(k, v): None for k, v in keys["processing_state"].items()}
    return keys, bad, metas


def check_keys(conn_kwargs: dict, keys_paths, sample: int = 5) -> dict:
    """Verify that every committed write journaled in keys file(s) is still in the database."""
    if isinstance(keys_paths, (str, os.PathLike)):
        keys_paths = [str(keys_paths)]
    keys, bad, metas = load_keys(list(keys_paths))
    conn = connect(conn_kwargs, APP_NAME + "-check")
    report = {"target": describe_target(conn_kwargs), "keys_files": list(keys_paths),
              "unreadable_lines": bad, "runs": [m.get("run_tag") for m in metas], "tables": {}}
    try:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = 0")
            for t, (cols, sql) in _CHECKS.items():
                entries = list(keys[t])
                res = {"expected": len(entries), "missing": 0, "missing_sample": []}
                if entries:
                    cur.execute(f"CREATE TEMP TABLE wl_check_keys ({cols}) ON COMMIT DROP")
                    buf = io.StringIO()
                    w = csv.writer(buf, lineterminator="\n")
                    for e in entries:
                        w.writerow(["" if v is None else v for v in e])
                    buf.seek(0)
                    cur.copy_expert("COPY pg_temp.wl_check_keys FROM STDIN WITH (FORMAT csv)", buf)
                    cur.execute("ANALYZE pg_temp.wl_check_keys")
                    cur.execute(sql)
                    missing = cur.fetchall()
                    res["missing"] = len(missing)
                    res["missing_sample"] = [list(m) for m in missing[:sample]]
                    cur.execute("DROP TABLE pg_temp.wl_check_keys")
                report["tables"][t] = res
        conn.rollback()
    finally:
        conn.close()
    report["missing_total"] = sum(r["missing"] for r in report["tables"].values())
    report["ok"] = report["missing_total"] == 0
    return report


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _add_conn_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("connection (password: --password-file, PGPASSFILE/~/.pgpass or PGPASSWORD)")
    g.add_argument("--dsn", help="libpq conninfo or URI (a password inside it is never printed)")
    g.add_argument("--host")
    g.add_argument("--port", type=int)
    g.add_argument("--dbname")
    g.add_argument("--user")
    g.add_argument("--password-file", help="file whose first line is the password")


def _conn_kwargs(args) -> dict:
    kw = {"dsn": args.dsn, "host": args.host, "port": args.port, "dbname": args.dbname, "user": args.user}
    if args.password_file:
        kw["password"] = read_password_file(args.password_file)
    return {k: v for k, v in kw.items() if v is not None}


def _write_json(path: str, data: dict):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def _cmd_run(args) -> int:
    extra = {}
    for item in args.extra_read or []:
        name, sep, sql = item.partition("=")
        if not sep or not name.strip() or not sql.strip():
            print(f"workload: --extra-read expects NAME=SQL, got {item!r}", file=sys.stderr)
            return 2
        extra[name.strip()] = sql.strip()
    try:
        conn_kwargs = _conn_kwargs(args)
    except OSError as exc:
        print(f"workload: cannot read password file: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        wl = Workload(conn_kwargs, rate=args.rate, upsert=args.upsert, keys_path=args.keys,
                      duration=args.duration, until_file=args.until_file, max_duration=args.max_duration,
                      statement_timeout_ms=int(args.statement_timeout * 1000),
                      threads_per_role=args.threads, roles=args.roles.split(",") if args.roles else None,
                      dup_ratio=args.dup_ratio, spread_s=args.spread, extra_reads=extra)
    except ValueError as exc:
        print(f"workload: {exc}", file=sys.stderr)
        return 2

    def _on_signal(signum, _frame):
        wl.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if not args.quiet:
        print(f"workload: target {describe_target(conn_kwargs)}, rate {args.rate:g}/s, "
              f"upsert ON CONFLICT {UPSERT_TARGETS[args.upsert]}, run {wl.run_tag}", file=sys.stderr, flush=True)
    summ = wl.run()
    if args.summary:
        _write_json(args.summary, summ)
    print(human_line(summ), flush=True)
    if summ["failed"] and not args.quiet:
        for key, n in sorted(summ["failure_counts"].items()):
            print(f"workload:   failed {key}: {n}", file=sys.stderr)
    return 1 if summ["failed"] else 0


def _cmd_check(args) -> int:
    try:
        conn_kwargs = _conn_kwargs(args)
        report = check_keys(conn_kwargs, args.keys)
    except OSError as exc:
        print(f"check: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except psycopg2.Error as exc:
        code, msg = _err_info(exc)
        print(f"check: database error {code}: {msg}", file=sys.stderr)
        return 2
    for t, r in report["tables"].items():
        line = f"check: {t}: {r['expected']} committed, {r['missing']} missing"
        if r["missing"]:
            line += f" e.g. {r['missing_sample']}"
        print(line)
    if report["unreadable_lines"]:
        print(f"check: {report['unreadable_lines']} unreadable key lines ignored", file=sys.stderr)
    if args.json:
        _write_json(args.json, report)
    if report["ok"]:
        print("check: OK: every committed write is present")
        return 0
    print(f"check: FAILED: {report['missing_total']} committed writes missing")
    return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="workload.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the simulated application")
    _add_conn_args(r)
    r.add_argument("--duration", type=float, help="seconds to run")
    r.add_argument("--until-file", help="stop when this file exists")
    r.add_argument("--max-duration", type=float, default=DEFAULT_HARD_MAX_S,
                   help="hard stop after this many seconds whatever happens (default 3600)")
    r.add_argument("--rate", type=float, default=200.0, help="target statements/s overall (0 = as fast as possible)")
    r.add_argument("--upsert", choices=sorted(UPSERT_TARGETS), default="call_uid",
                   help="ingest conflict target: (call_uid) today, (call_uid, started_at) once partitioned")
    r.add_argument("--keys", help="JSON-lines journal of committed writes (for `check`)")
    r.add_argument("--summary", help="write the JSON summary here")
    r.add_argument("--statement-timeout", type=float, default=DEFAULT_STATEMENT_TIMEOUT_MS / 1000,
                   help="per-session statement_timeout in seconds (default 30)")
    r.add_argument("--threads", type=int, default=1, help="threads (connections) per role")
    r.add_argument("--roles", help=f"comma list of roles (default all: {','.join(ROLES)})")
    r.add_argument("--dup-ratio", type=float, default=0.05, help="share of ingests that re-send a committed call")
    r.add_argument("--spread", type=int, default=3600, help="new calls start up to this many seconds in the past")
    r.add_argument("--extra-read", action="append", metavar="NAME=SQL", help="extra read statement for the api role")
    r.add_argument("--quiet", action="store_true")
    c = sub.add_parser("check", help="verify every committed write is still present")
    _add_conn_args(c)
    c.add_argument("--keys", required=True, action="append", help="keys file (repeatable)")
    c.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        if args.duration is None and not args.until_file:
            print(f"workload: no --duration/--until-file: stops after --max-duration {args.max_duration:g} s "
                  "or on SIGTERM/SIGINT", file=sys.stderr)
        return _cmd_run(args)
    return _cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
