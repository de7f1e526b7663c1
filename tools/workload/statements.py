"""The application's statements and the operations that send them.

STATEMENTS is the SQL the simulated application runs; API_READS lists the read statements the api
role picks from (later phases may add entries, or pass --extra-read NAME=SQL on the command line).
ROLES maps each role to its operation: one call runs a few statements on the role's session and
journals what committed.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import random
from typing import TYPE_CHECKING, Callable

import psycopg2
import psycopg2.extras

from .db import _utcnow

if TYPE_CHECKING:
    from .runner import Workload
    from .session import _Session

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


# ---------------------------------------------------------------------------------------------
# The operations: one call runs one operation of a role on its session (s.execute times and
# records each statement) and returns the number of statements it ran (0: nothing to do).
# ---------------------------------------------------------------------------------------------

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
