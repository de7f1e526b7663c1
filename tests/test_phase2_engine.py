"""Phase 2 engine (files/sql/002_*.sql): online conversion of the four big tables to RANGE
partitions, against a real PostgreSQL 15, as the non-superuser `scan`.

Files are applied the way the migration runner applies them (psql: one transaction, or statement
by statement when the file starts with `-- dbops:no-transaction`), after Phase 1. The steps are
called the way Ansible calls them: one short call per step on a fresh autocommit connection,
retried on lock_not_available.

Checked: full conversion of the four tables while writer threads insert / update / delete on all
of them (no writer error, every committed write present, counts and checksums equal, sequences
continue, tsv still generated, references enforced, pruning), backfill resumed after a cancel,
swap idempotent, lossless rollback after writes, finalize, maintain_partitions (premake,
idempotent, DEFAULT rows moved, references kept by the move), integrity not switched off by a
session setting (SET dbops.p2_internal_move = on), cleanup_old_data (drops expired partitions, clears references,
harmless on unconverted tables), NULL partition keys, abort, the guide's phase-2 queries, squawk,
idempotent install and the rollback files.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import random
import shutil
import subprocess
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from conftest import NO_TX_MARKER, PSQL, apply, phase_rollback_sql, phase_sql, psql

REPO = pathlib.Path(__file__).resolve().parents[1]
SQL_DIR = REPO / "files" / "sql"
PHASE1 = phase_sql("001")
PHASE2 = phase_sql("002")
ROLLBACK2 = phase_rollback_sql("002")
# Read-only checks also run by the verify role (roles/verify/files/checks/002) + stage-specific / writing ones (tests only).
GUIDE2 = sorted([*(REPO / "roles" / "verify" / "files" / "checks" / "002").glob("*.sql"),
                 *(REPO / "tests" / "guide_queries" / "phase2").glob("*.sql")], key=lambda p: p.name)
SQUAWK = next((p for p in (str(REPO / ".venv" / "bin" / "squawk"), shutil.which("squawk")) if p and os.path.exists(p)), None)
TABLES = ["bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs"]

pytestmark = pytest.mark.skipif(PSQL is None, reason="psql not installed")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def call(db, sql: str, params=None, lock_timeout: str = "300ms", retries: int = 60):
    """One engine step on a fresh autocommit connection (like an Ansible task); retried with
    backoff on lock_not_available. Returns the first column of the first row."""
    for attempt in range(retries):
        conn = db.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = %s", (lock_timeout,))
                cur.execute(sql, params)
                row = cur.fetchone() if cur.description else None
                return row[0] if row else None
        except psycopg2.errors.LockNotAvailable:
            time.sleep(0.05 * (1 + attempt % 5))
        finally:
            conn.close()
    raise AssertionError(f"{sql}: still lock_not_available after {retries} attempts")


def prepare(db, tbl: str) -> dict:
    for _ in range(60):
        res = call(db, "SELECT dbops.p2_prepare(%s)", (tbl,))
        if res["status"] != "retry":
            assert res["status"] in ("prepared", "already prepared"), res
            return res
        time.sleep(0.1)
    raise AssertionError(f"prepare {tbl}: no lock")


def backfill(db, tbl: str, batch: int = 500, max_seconds: int = 1) -> list[dict]:
    out = []
    while True:
        res = call(db, "CALL dbops.p2_backfill(%s, %s, %s)", (tbl, batch, max_seconds))
        out.append(res)
        if res["status"] == "done":
            return out


def convert(db, tbl: str, batch: int = 500) -> dict:
    """prepare -> backfill -> verify -> swap; returns the step results."""
    res = {"prepare": prepare(db, tbl), "backfill": backfill(db, tbl, batch)}
    res["verify"] = call(db, "SELECT dbops.p2_verify(%s)", (tbl,))
    res["swap"] = call(db, "SELECT dbops.p2_swap(%s)", (tbl,))
    assert res["swap"]["status"] == "swapped", res["swap"]
    return res


def run_guide(db, stage: str, names=None) -> list[str]:
    """Run the guide queries of a stage with plain psql -f (as an operator would)."""
    failures = []
    for f in GUIDE2:
        lines = f.read_text().splitlines()
        when = next((ln.split(":", 1)[1].strip() for ln in lines[:3] if ln.startswith("-- when:")), "any")
        if when != stage or (names and f.name not in names):
            continue
        r = psql(db, f, runner_mode=False)
        if r.returncode != 0 or "ERROR" in r.stderr:
            failures.append(f"{f.name}: {r.stderr.strip()}")
    return failures


def _engine_db(make_db, logs_days: int | None):
    db = make_db(baseline=True, seed_calls=3000)
    if logs_days:   # fewer daily partitions for tests that do not need 13 months of system_logs
        db.query("DELETE FROM system_logs WHERE created_at < now() - make_interval(days => %s)", (logs_days,))
    apply(db, PHASE1)
    db.install_output = apply(db, PHASE2)
    db.query("ANALYZE")
    return db


@pytest.fixture
def engine_db_full(make_db):
    """Baseline + demo data (3000 calls, 13 months of history: ~400 daily system_logs partitions,
    3 NULL started_at) + Phase 1 + Phase 2 files."""
    return _engine_db(make_db, None)


@pytest.fixture
def engine_db(make_db):
    """As engine_db_full, system_logs trimmed to its last 40 days."""
    return _engine_db(make_db, 40)


# ---------------------------------------------------------------------------------------------
# concurrent application writers
# ---------------------------------------------------------------------------------------------
class Writer(threading.Thread):
    """One application session: small transactions in a loop, each committed one recorded."""

    def __init__(self, db, seed: int):
        super().__init__(daemon=True)
        self.db = db
        self.rnd = random.Random(seed)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.commits = 0

    def run(self):
        conn = self.db.connect()
        conn.autocommit = False
        try:
            while not self.stop.is_set():
                try:
                    with conn.cursor() as cur:
                        after = self.op(cur)
                    conn.commit()
                    if after:
                        after()
                    self.commits += 1
                except Exception as e:  # noqa: BLE001 - every failure is a test failure
                    conn.rollback()
                    self.errors.append(f"{type(self).__name__}: {type(e).__name__}: {e}")
                time.sleep(0.003)
        finally:
            conn.close()

    def op(self, cur):
        raise NotImplementedError


class CallsWriter(Writer):
    """Ingester (new ON CONFLICT (call_uid, started_at) form) + audio worker + deletes + moves."""

    def __init__(self, db, seed, baseline_uids):
        super().__init__(db, seed)
        self.baseline = baseline_uids
        self.own: dict[str, dict] = {}
        self.baseline_err: dict[str, str] = {}
        self.n = 0

    def _ts(self):
        return dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=self.rnd.randint(0, 330 * 86400))

    def op(self, cur):
        self.n += 1
        live = [u for u, v in self.own.items() if not v["deleted"]]
        r = self.rnd.random()
        if r < 0.45 or not live:
            ts = 4_000_000_000 + self.n
            uid = f"wgroup-{ts}"
            started = self._ts().replace(microsecond=0)
            cur.execute(
                "INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, feed_id, tg_id, started_at, duration_ms, "
                "fetched_at, raw_json) VALUES (%s, 'wgroup', %s, 1, 1, %s, 1000, now(), '{}') "
                "ON CONFLICT (call_uid, started_at) DO NOTHING", (uid, ts, started))
            assert cur.rowcount == 1
            return lambda: self.own.__setitem__(uid, {"started_at": started, "error": None, "deleted": False})
        if r < 0.55:   # the ingester sees the same call again
            uid = self.rnd.choice(live)
            cur.execute(
                "INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) "
                "VALUES (%s, 'wgroup', %s, %s) ON CONFLICT (call_uid, started_at) DO NOTHING",
                (uid, int(uid.split("-")[1]), self.own[uid]["started_at"]))
            assert cur.rowcount == 0
            return None
        if r < 0.75:   # audio worker on an old call
            uid = self.rnd.choice(self.baseline)
            val = f"e{self.n}"
            cur.execute("UPDATE bcfy_calls_raw SET processed = true, last_attempt = now(), error = %s "
                        "WHERE call_uid = %s", (val, uid))
            assert cur.rowcount == 1
            return lambda: self.baseline_err.__setitem__(uid, val)
        uid = self.rnd.choice(live)
        if r < 0.85:
            val = f"o{self.n}"
            cur.execute("UPDATE bcfy_calls_raw SET error = %s WHERE call_uid = %s", (val, uid))
            assert cur.rowcount == 1
            return lambda: self.own[uid].__setitem__("error", val)
        if r < 0.93:   # a row moving to another partition
            started = self._ts().replace(microsecond=0)
            cur.execute("UPDATE bcfy_calls_raw SET started_at = %s WHERE call_uid = %s", (started, uid))
            assert cur.rowcount == 1
            return lambda: self.own[uid].__setitem__("started_at", started)
        cur.execute("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        assert cur.rowcount == 1
        return lambda: self.own[uid].__setitem__("deleted", True)


class TranscriptsWriter(Writer):
    """Transcriber: a transcript + processing_state upsert per call; edits and deletes."""

    def __init__(self, db, seed, free_uids):
        super().__init__(db, seed)
        self.free = list(free_uids)
        self.own: dict[int, dict] = {}
        self.n = 0

    def op(self, cur):
        self.n += 1
        live = [i for i, v in self.own.items() if not v["deleted"]]
        r = self.rnd.random()
        if (r < 0.6 or not live) and self.free:
            uid = self.free.pop()
            text = f"unit {self.n} responding code{self.n}x"
            cur.execute(
                "INSERT INTO transcripts (call_uid, text, words, language, model_name, duration_seconds, confidence) "
                "VALUES (%s, %s, '[]', 'en', 'whisper', 4.2, 0.9) RETURNING id", (uid, text))
            tid = cur.fetchone()[0]
            cur.execute("INSERT INTO processing_state (call_uid, status) VALUES (%s, 'transcribed') "
                        "ON CONFLICT (call_uid) DO UPDATE SET status = EXCLUDED.status", (uid,))
            return lambda: self.own.__setitem__(tid, {"text": text, "call_uid": uid, "deleted": False})
        if not live:
            return None
        tid = self.rnd.choice(live)
        if r < 0.9:
            text = f"update {self.n} word{self.n}y"
            cur.execute("UPDATE transcripts SET text = %s WHERE id = %s", (text, tid))
            assert cur.rowcount == 1
            return lambda: self.own[tid].__setitem__("text", text)
        cur.execute("DELETE FROM transcripts WHERE id = %s", (tid,))
        assert cur.rowcount == 1
        return lambda: self.own[tid].__setitem__("deleted", True)


class RowsWriter(Writer):
    """api_call_metrics / system_logs: inserts (default timestamps), updates, deletes."""

    def __init__(self, db, seed, table):
        super().__init__(db, seed)
        self.table = table
        self.own: dict[int, dict] = {}
        self.n = 0

    def op(self, cur):
        self.n += 1
        live = [i for i, v in self.own.items() if not v["deleted"]]
        r = self.rnd.random()
        if r < 0.6 or not live:
            if self.table == "api_call_metrics":
                cur.execute("INSERT INTO api_call_metrics (endpoint, status_code, duration_ms) "
                            "VALUES (%s, 200, %s) RETURNING id", (f"/w/{self.n}", self.n))
            else:
                cur.execute("INSERT INTO system_logs (component, event_type, message, duration_ms) "
                            "VALUES ('writer', 'tick', %s, %s) RETURNING id", (f"m{self.n}", self.n))
            rid = cur.fetchone()[0]
            return lambda: self.own.__setitem__(rid, {"val": self.n, "deleted": False})
        rid = self.rnd.choice(live)
        if r < 0.85:
            cur.execute(f"UPDATE {self.table} SET duration_ms = %s WHERE id = %s", (self.n, rid))
            assert cur.rowcount == 1
            val = self.n
            return lambda: self.own[rid].__setitem__("val", val)
        cur.execute(f"DELETE FROM {self.table} WHERE id = %s", (rid,))
        assert cur.rowcount == 1
        return lambda: self.own[rid].__setitem__("deleted", True)


def start_writers(db):
    baseline = [r[0] for r in db.query("SELECT call_uid FROM bcfy_calls_raw ORDER BY call_uid")]
    free = [r[0] for r in db.query(
        "SELECT c.call_uid FROM bcfy_calls_raw c WHERE NOT EXISTS (SELECT 1 FROM transcripts t "
        "WHERE t.call_uid = c.call_uid) ORDER BY c.call_uid DESC")]
    ws = [CallsWriter(db, 1, baseline), TranscriptsWriter(db, 2, free),
          RowsWriter(db, 3, "api_call_metrics"), RowsWriter(db, 4, "system_logs")]
    for w in ws:
        w.start()
    return ws


def stop_writers(ws):
    for w in ws:
        w.stop.set()
    for w in ws:
        w.join(30)


def check_writes(db, ws):
    calls, trans, metrics, logs = ws
    rows = {r[0]: r[1:] for r in db.query(
        "SELECT call_uid, started_at, error FROM bcfy_calls_raw WHERE group_id = 'wgroup'")}
    for uid, v in calls.own.items():
        if v["deleted"]:
            assert uid not in rows, uid
        else:
            assert rows[uid] == (v["started_at"], v["error"]), uid
    got = dict(db.query("SELECT call_uid, error FROM bcfy_calls_raw WHERE call_uid = ANY(%s)",
                        (list(calls.baseline_err),)))
    assert got == calls.baseline_err
    rows = {r[0]: r[1:] for r in db.query("SELECT id, text, call_uid FROM transcripts WHERE id = ANY(%s)",
                                          (list(trans.own),))}
    for tid, v in trans.own.items():
        if v["deleted"]:
            assert tid not in rows
        else:
            assert rows[tid] == (v["text"], v["call_uid"])
    for w in (metrics, logs):
        rows = dict(db.query(f"SELECT id, duration_ms FROM {w.table} WHERE id = ANY(%s)", (list(w.own),)))
        for rid, v in w.own.items():
            if v["deleted"]:
                assert rid not in rows
            else:
                assert rows[rid] == v["val"]


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_files_and_rollbacks_pair():
    assert [f.name for f in PHASE2 if f.parent == SQL_DIR] == ["002_01_partition_engine.sql",
                                                               "002_02_calls_app_key.sql",
                                                               "002_04_key_touches.sql",
                                                               "002_05_detached_partitions.sql"]
    assert sorted(f.relative_to(SQL_DIR / "rollback").as_posix() for f in ROLLBACK2) == sorted(
        [f.relative_to(SQL_DIR).as_posix() for f in PHASE2] + ["002_preconditions.sql"])
    for f in PHASE2 + ROLLBACK2:
        text = f.read_text()
        assert ("CONCURRENTLY" in text) <= text.startswith(NO_TX_MARKER), f.name


@pytest.mark.skipif(SQUAWK is None, reason="squawk not installed")
def test_squawk_clean():
    # from the repo root, where .squawk.toml is
    r = subprocess.run([SQUAWK, *map(str, PHASE2 + ROLLBACK2)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_full_conversion_under_concurrent_writes(engine_db_full):
    db = engine_db_full
    failures = run_guide(db, "any", {"01_precheck_table_sizes.sql"})
    ws = start_writers(db)
    try:
        time.sleep(0.5)
        results = {t: convert(db, t, batch=b) for t, b in zip(TABLES, (100, 100, 1000, 500))}
        time.sleep(0.5)
        # the guide's checks between swap and finalize
        failures += run_guide(db, "swapped") + run_guide(db, "after_swap")
    finally:
        stop_writers(ws)
    errors = [e for w in ws for e in w.errors]
    assert not errors, errors[:10]
    assert all(w.commits > 20 for w in ws), [w.commits for w in ws]
    assert not failures, failures

    # null partition keys: derived, counted, reported
    assert results["bcfy_calls_raw"]["verify"]["null_key_rows"] >= 3
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw_nonpartitioned WHERE started_at IS NULL") >= 3
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE started_at IS NULL") == 0
    assert db.scalar(
        "SELECT bool_and(n.started_at = to_timestamp(n.ts)) FROM bcfy_calls_raw n JOIN bcfy_calls_raw_nonpartitioned o "
        "USING (call_uid) WHERE o.started_at IS NULL")

    # after the swaps: old and new still equal (counts + checksums per range, one snapshot)
    for t in TABLES:
        v = call(db, "SELECT dbops.p2_verify(%s)", (t,))
        assert v["status"] == "ok" and v["source_rows"] == v["target_rows"] > 0, v
        assert db.scalar("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (t,)) == "p"
    check_writes(db, ws)

    # finalize (the guide's 2.6 drop, corrected) drops the old tables; every committed write still there
    assert run_guide(db, "finalize") == []
    for t in TABLES:
        assert db.scalar("SELECT step FROM dbops.p2_state WHERE table_name = %s", (t,)) == "finalized"
        assert db.scalar("SELECT to_regclass(%s)", (t + "_nonpartitioned",)) is None
    assert call(db, "SELECT dbops.p2_finalize('transcripts')")["status"] == "already finalized"
    check_writes(db, ws)

    # names, columns, defaults, generated column, comments as before
    idx = {r[0] for r in db.query("SELECT indexname FROM pg_indexes WHERE tablename = 'bcfy_calls_raw'")}
    assert {"bcfy_calls_raw_pkey", "bcfy_calls_raw_feed_id_idx", "bcfy_calls_raw_pending_idx",
            "bcfy_calls_raw_group_id_ts_key", "bcfy_calls_raw_tg_started_idx"} <= idx
    assert db.scalar("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'bcfy_calls_raw_pkey'") \
        == "PRIMARY KEY (call_uid, started_at)"
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conrelid = 'bcfy_calls_raw'::regclass "
                     "AND contype = 'c'") == 3   # Phase 1 CHECKs copied
    assert "transcripts_tsv_gin_idx" in {r[0] for r in db.query(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'transcripts'")}
    assert db.scalar(
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid "
        "AND a.attnum = d.adnum WHERE d.adrelid = 'transcripts'::regclass AND a.attname = 'tsv' AND a.attgenerated = 's'"
    ) == "to_tsvector('english'::regconfig, COALESCE(text, ''::text))"
    assert [r[0] for r in db.query("SELECT column_name FROM information_schema.columns WHERE table_name = "
                                   "'api_call_metrics' ORDER BY ordinal_position")] == [
        "id", "timestamp", "endpoint", "method", "status_code", "duration_ms", "response_size", "cache_hit", "error"]

    # sequences: same sequences, owned by the new tables, ids continue
    for t in ("transcripts", "api_call_metrics", "system_logs"):
        assert db.scalar("SELECT pg_get_serial_sequence(%s, 'id')", (t,)) == f"public.{t}_id_seq"
    max_id = db.scalar("SELECT max(id) FROM transcripts")
    uid = db.scalar("SELECT c.call_uid FROM bcfy_calls_raw c WHERE NOT EXISTS (SELECT 1 FROM transcripts t "
                    "WHERE t.call_uid = c.call_uid) AND c.started_at > now() - interval '30 days' LIMIT 1")
    new_id = db.scalar("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) "
                       "VALUES (%s, 'police pursuit northbound', 1, 0.5) RETURNING id", (uid,))
    assert new_id > max_id
    # tsv still generated, full-text search finds it
    assert db.scalar("SELECT id FROM transcripts WHERE tsv @@ plainto_tsquery('english', 'pursuit northbound')") == new_id

    # references: a transcript of an unknown call is refused, deleting a call nulls references
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        db.query("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) VALUES ('nope-1', 'x', 1, 1)")
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        db.query("INSERT INTO processing_state (call_uid, status) VALUES ('nope-1', 'queued')")
    db.query("INSERT INTO processing_state (call_uid, status) VALUES (%s, 'transcribed') "
             "ON CONFLICT (call_uid) DO UPDATE SET status = EXCLUDED.status", (uid,))
    db.query("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
    assert db.scalar("SELECT call_uid FROM transcripts WHERE id = %s", (new_id,)) is None
    assert db.scalar("SELECT count(*) FROM processing_state WHERE call_uid = %s", (uid,)) == 0
    assert db.scalar("SELECT COUNT(*) FROM transcripts WHERE call_uid NOT IN (SELECT call_uid FROM bcfy_calls_raw)") == 0

    # the application's upsert; call_uid stays globally unique (guard trigger)
    row = db.query("SELECT call_uid, group_id, ts, started_at FROM bcfy_calls_raw ORDER BY started_at DESC LIMIT 1")[0]
    db.query("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) VALUES (%s, %s, %s, %s) "
             "ON CONFLICT (call_uid, started_at) DO NOTHING", row)
    with pytest.raises(psycopg2.errors.UniqueViolation):
        db.query("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) VALUES (%s, 'other', 1, %s) "
                 "ON CONFLICT (call_uid, started_at) DO NOTHING", (row[0], row[3] - dt.timedelta(days=40)))
    with pytest.raises(psycopg2.errors.UniqueViolation):
        db.query("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence, created_at) "
                 "SELECT call_uid, 'dup', 1, 1, now() - interval '60 days' FROM transcripts "
                 "WHERE call_uid IS NOT NULL LIMIT 1")

    # partition pruning for the guide's time-range query
    plan = db.scalar("EXPLAIN (FORMAT JSON) SELECT * FROM bcfy_calls_raw WHERE started_at > now() - interval '7 days'")
    plan = plan[0]["Plan"] if isinstance(plan, list) else json.loads(plan)[0]["Plan"]
    nparts = db.scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = 'bcfy_calls_raw'::regclass")
    assert plan.get("Subplans Removed", 0) > 0 and len(plan.get("Plans", [])) < nparts, plan

    # status, partition health, the guide's checks after finalize
    st = {r[0]: r[1] for r in db.query("SELECT table_name, step FROM dbops.p2_status()")}
    assert st == {t: "finalized" for t in TABLES}
    assert db.scalar("SELECT count(*) FROM monitoring.partition_health WHERE status = 'DEFAULT_HAS_ROWS'") == 0
    assert not run_guide(db, "any") + run_guide(db, "after_swap")


def test_backfill_resumes_after_cancel(engine_db):
    db = engine_db
    prepare(db, "api_call_metrics")
    # Each batch is slowed down (a test-only statement trigger on the shadow) so that the cancel
    # below lands mid-copy whatever the speed of the machine: the fast path copies the whole
    # table in ~100 ms on an idle box, which made a fixed statement_timeout flaky.
    db.query("CREATE FUNCTION public.t_slow_batch() RETURNS trigger LANGUAGE plpgsql AS "
             "$$BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END$$")
    db.query("CREATE TRIGGER t_slow_batch AFTER INSERT ON api_call_metrics_p "
             "FOR EACH STATEMENT EXECUTE FUNCTION public.t_slow_batch()")
    conn = db.connect()
    conn.autocommit = True
    pid = conn.get_backend_pid()
    failure: list[BaseException] = []

    def run():
        try:
            with conn.cursor() as cur:
                cur.execute("CALL dbops.p2_backfill('api_call_metrics', 50, 60)")
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while db.scalar("SELECT rows_done FROM dbops.p2_state WHERE table_name = 'api_call_metrics'") == 0:
        assert time.monotonic() < deadline, "no batch committed in 60 s"
        time.sleep(0.02)
    assert db.scalar("SELECT pg_cancel_backend(%s)", (pid,)) is True
    worker.join(30)
    assert not worker.is_alive()
    conn.close()
    assert len(failure) == 1 and isinstance(failure[0], psycopg2.errors.QueryCanceled), failure
    db.query("DROP TRIGGER t_slow_batch ON api_call_metrics_p")
    db.query("DROP FUNCTION public.t_slow_batch()")
    done, copied, step = db.query(
        "SELECT rows_done, rows_copied, step FROM dbops.p2_state WHERE table_name = 'api_call_metrics'")[0]
    assert step == "backfilling" and 0 < done < 12000
    # committed batches only: the shadow holds exactly what the state says
    assert db.scalar("SELECT count(*) FROM api_call_metrics_p") == copied
    # max_seconds = 0: one batch per call, progress reported
    res = call(db, "CALL dbops.p2_backfill('api_call_metrics', 100, 0)")
    assert res["status"] == "in progress" and res["batches_this_call"] == 1 and res["rows_done"] == done + 100
    assert res["changed"] is True
    assert backfill(db, "api_call_metrics", 20000)[-1]["changed"] is True   # the call that finishes
    assert call(db, "CALL dbops.p2_backfill('api_call_metrics', 100, 0)")["changed"] is False
    v = call(db, "SELECT dbops.p2_verify('api_call_metrics')")
    assert v["source_rows"] == v["target_rows"] == 12000
    st = db.query("SELECT step, pct, rows_done FROM dbops.p2_status() WHERE table_name = 'api_call_metrics'")[0]
    assert st[0] == "verified" and st[1] == 100 and st[2] == 12000


def test_backfill_fast_path_and_its_fallback(engine_db):
    """Batches go through a plain INSERT ... SELECT; when the capture trigger already wrote a row of
    the batch (the application updated it), the batch is redone with ON CONFLICT DO NOTHING and the
    rest of that call stays on that path. Either way the copy verifies equal."""
    db = engine_db
    prepare(db, "system_logs")
    first = call(db, "CALL dbops.p2_backfill('system_logs', 200, 0)")
    assert first["fast_path"] is True and first["fast_path_fallbacks"] == 0 and first["rows_this_call"] == 200
    # the application touches rows the backfill has not reached: the trigger copies them now
    lo = int(first["last_key"])
    db.query("UPDATE system_logs SET message = message || ' (edited)' WHERE id IN "
             "(SELECT id FROM system_logs WHERE id > %s ORDER BY id LIMIT 3 OFFSET 50)", (lo,))
    second = call(db, "CALL dbops.p2_backfill('system_logs', 200, 0)")
    assert second["fast_path"] is False and second["fast_path_fallbacks"] == 1, second
    assert second["rows_this_call"] == 200, second
    rest = backfill(db, "system_logs", 1000)
    v = call(db, "SELECT dbops.p2_verify('system_logs')")
    assert v["status"] == "ok" and v["source_rows"] == v["target_rows"], v
    assert db.scalar("SELECT sum(rows_copied) = max(rows_done) - 3 FROM dbops.p2_state WHERE table_name = 'system_logs'"), \
        (rest[-1], db.query("SELECT rows_done, rows_copied FROM dbops.p2_state WHERE table_name = 'system_logs'"))


def test_verify_detects_divergence(engine_db):
    db = engine_db
    prepare(db, "system_logs")
    backfill(db, "system_logs", 5000)
    # a write that bypasses the sync trigger (here: straight into the shadow)
    db.query("UPDATE system_logs_p SET message = 'tampered' WHERE id = (SELECT min(id) FROM system_logs_p)")
    with pytest.raises(psycopg2.errors.RaiseException, match=r"system_logs differs in 1 range"):
        db.query("SELECT dbops.p2_verify('system_logs')")
    with pytest.raises(psycopg2.errors.RaiseException, match="must be verified"):
        db.query("SELECT dbops.p2_swap('system_logs')")


def depends_on(db, view: str) -> set[str]:
    return {r[0] for r in db.query(
        "SELECT DISTINCT d.refobjid::regclass::text FROM pg_depend d JOIN pg_rewrite rw ON rw.oid = d.objid "
        "WHERE rw.ev_class = %s::regclass AND d.refobjid <> %s::regclass AND d.refclassid = 'pg_class'::regclass",
        (view, view))}


def test_swap_idempotent_rollback_lossless(engine_db):
    db = engine_db
    # objects that must follow the table: a view, comments, grants, a user trigger
    db.query("CREATE VIEW public.p2_recent_calls AS SELECT call_uid, started_at FROM bcfy_calls_raw "
             "WHERE started_at > now() - interval '1 day'")
    db.query("COMMENT ON TABLE bcfy_calls_raw IS 'one row per radio call'")
    db.query("COMMENT ON COLUMN bcfy_calls_raw.call_uid IS 'group_id-ts'")
    db.query("GRANT SELECT ON bcfy_calls_raw, transcripts TO PUBLIC")
    db.query("CREATE FUNCTION public.p2t_touch() RETURNS trigger LANGUAGE plpgsql AS "
             "$$ BEGIN NEW.s3_bucket := 'touched'; RETURN NEW; END $$")
    db.query("CREATE TRIGGER transcripts_touch BEFORE UPDATE ON transcripts FOR EACH ROW "
             "EXECUTE FUNCTION public.p2t_touch()")
    convert(db, "bcfy_calls_raw")
    convert(db, "transcripts")
    again = call(db, "SELECT dbops.p2_swap('bcfy_calls_raw')")
    assert again["status"] == "already swapped" and again["changed"] is False
    assert run_guide(db, "swapped") == []
    assert depends_on(db, "p2_recent_calls") == {"bcfy_calls_raw"}
    assert db.scalar("SELECT relkind FROM pg_class WHERE oid = 'bcfy_calls_raw'::regclass") == "p"
    assert db.scalar("SELECT obj_description('bcfy_calls_raw'::regclass, 'pg_class')") == "one row per radio call"
    assert db.scalar("SELECT col_description('bcfy_calls_raw'::regclass, 1)") == "group_id-ts"
    assert db.scalar("SELECT has_table_privilege('public', 'bcfy_calls_raw', 'SELECT')") is None or \
        "=r/" in db.scalar("SELECT relacl::text FROM pg_class WHERE oid = 'bcfy_calls_raw'::regclass")
    assert db.scalar("SELECT tgenabled FROM pg_trigger WHERE tgname = 'transcripts_touch' "
                     "AND tgrelid = 'transcripts'::regclass") == "O"
    assert db.scalar("SELECT tgenabled FROM pg_trigger WHERE tgname = 'transcripts_touch' "
                     "AND tgrelid = 'transcripts_nonpartitioned'::regclass") == "D"
    touched = db.scalar("SELECT min(id) FROM transcripts")
    db.query("UPDATE transcripts SET language = 'fr' WHERE id = %s", (touched,))
    assert db.scalar("SELECT s3_bucket FROM transcripts_nonpartitioned WHERE id = %s", (touched,)) == "touched"

    # writes after the swap
    uid = "after-4100000001"
    db.query("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) VALUES (%s, 'after', 4100000001, now()) "
             "ON CONFLICT (call_uid, started_at) DO NOTHING", (uid,))
    tid = db.scalar("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) "
                    "VALUES (%s, 'after the swap', 1, 1) RETURNING id", (uid,))
    victim = db.scalar("SELECT call_uid FROM transcripts WHERE call_uid IS NOT NULL AND id <> %s LIMIT 1", (tid,))
    victim_tid = db.scalar("SELECT id FROM transcripts WHERE call_uid = %s", (victim,))
    db.query("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (victim,))
    db.query("UPDATE bcfy_calls_raw SET error = 'post-swap' WHERE call_uid = %s", (uid,))
    n_calls = db.scalar("SELECT count(*) FROM bcfy_calls_raw")

    # rollback, transcripts first (its old copy references calls), then calls
    for t in ("transcripts", "bcfy_calls_raw"):
        res = call(db, "SELECT dbops.p2_rollback(%s)", (t,))
        assert res["status"] == "rolled back", res
        assert db.scalar("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (t,)) == "r"
        assert db.scalar("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (t + "_p",)) == "p"
    assert call(db, "SELECT dbops.p2_rollback('transcripts')")["status"] == "not swapped"
    assert call(db, "SELECT dbops.p2_validate_refs()")["validated"] == [
        "processing_state_call_uid_fkey", "transcripts_call_fk"]
    # nothing written after the swap is lost
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw") == n_calls
    assert db.scalar("SELECT error FROM bcfy_calls_raw WHERE call_uid = %s", (uid,)) == "post-swap"
    assert db.scalar("SELECT call_uid FROM transcripts WHERE id = %s", (tid,)) == uid
    assert db.scalar("SELECT call_uid FROM transcripts WHERE id = %s", (victim_tid,)) is None
    # the original objects are back: names, FK with ON DELETE SET NULL, sequence ownership
    assert db.scalar("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'transcripts_call_fk' "
                     "AND contype = 'f' AND convalidated") == \
        "FOREIGN KEY (call_uid) REFERENCES bcfy_calls_raw(call_uid) ON DELETE SET NULL"
    assert db.scalar("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'bcfy_calls_raw_pkey'") \
        == "PRIMARY KEY (call_uid)"
    assert db.scalar("SELECT indrelid::regclass::text FROM pg_index WHERE indexrelid = "
                     "'bcfy_calls_raw_feed_id_idx'::regclass") == "bcfy_calls_raw"
    assert db.scalar("SELECT pg_get_serial_sequence('transcripts', 'id')") == "public.transcripts_id_seq"
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'bcfy_calls_raw'::regclass "
                     "AND NOT tgisinternal") == 2   # p2_sync_fwd + p2_block_truncate: the shadow stays in sync
    assert depends_on(db, "p2_recent_calls") == {"bcfy_calls_raw"}
    assert db.scalar("SELECT relkind FROM pg_class WHERE oid = 'bcfy_calls_raw'::regclass") == "r"
    assert db.scalar("SELECT tgenabled FROM pg_trigger WHERE tgname = 'transcripts_touch' "
                     "AND tgrelid = 'transcripts'::regclass") == "O"
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname = 'transcripts_touch'") == 1
    # the old app statement form works again; and the shadow kept up
    db.query("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) VALUES (%s, 'after', 4100000002, now()) "
             "ON CONFLICT (call_uid) DO NOTHING", ("after-4100000002",))
    db.query("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
    assert db.scalar("SELECT call_uid FROM transcripts WHERE id = %s", (tid,)) is None   # native ON DELETE SET NULL
    for t in ("bcfy_calls_raw", "transcripts"):
        assert call(db, "SELECT dbops.p2_verify(%s)", (t,))["status"] == "ok"
    # and it can be swapped again, then finalized
    for t in ("bcfy_calls_raw", "transcripts"):
        assert call(db, "SELECT dbops.p2_swap(%s)", (t,))["status"] == "swapped"
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw") == n_calls   # +1 insert, -1 delete
    for t in ("transcripts", "bcfy_calls_raw"):
        assert call(db, "SELECT dbops.p2_finalize(%s)", (t,))["status"] == "finalized"
    assert db.scalar("SELECT to_regclass('bcfy_calls_raw_nonpartitioned')") is None
    with pytest.raises(psycopg2.errors.RaiseException, match="finalized"):
        db.query("SELECT dbops.p2_rollback('bcfy_calls_raw')")


def test_guide_rollback_query(engine_db):
    db = engine_db
    convert(db, "bcfy_calls_raw")
    assert run_guide(db, "rollback") == []
    assert db.scalar("SELECT relkind FROM pg_class WHERE oid = 'bcfy_calls_raw'::regclass") == "r"
    assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = 'transcripts_call_fk'")


def test_abort_before_swap(engine_db):
    db = engine_db
    prepare(db, "transcripts")
    backfill(db, "transcripts", 200)
    res = call(db, "SELECT dbops.p2_abort('transcripts')")
    assert res["status"] == "aborted" and res["was"] == "backfilled"
    assert db.scalar("SELECT to_regclass('transcripts_p')") is None
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'transcripts'::regclass AND NOT tgisinternal") == 0
    assert db.scalar("SELECT count(*) FROM dbops.p2_state") == 0
    # and it can start over
    assert prepare(db, "transcripts")["status"] == "prepared"


def test_truncate_blocked_during_conversion(engine_db):
    db = engine_db
    prepare(db, "transcripts")
    with pytest.raises(psycopg2.errors.RaiseException, match="TRUNCATE of transcripts is blocked"):
        db.query("TRUNCATE transcripts")


def test_prepare_requires_app_key_index(make_db):
    db = make_db(baseline=True, seed_calls=200)
    app_key = [f for f in PHASE2 if f.name == "002_02_calls_app_key.sql"]
    apply(db, [f for f in PHASE2 if f not in app_key])
    with pytest.raises(psycopg2.errors.RaiseException, match="bcfy_calls_raw_call_uid_started_at_key"):
        db.query("SELECT dbops.p2_prepare('bcfy_calls_raw')")
    apply(db, app_key)
    assert prepare(db, "bcfy_calls_raw")["status"] == "prepared"
    assert prepare(db, "bcfy_calls_raw")["status"] == "already prepared"


def test_maintain_partitions(engine_db):
    db = engine_db
    convert(db, "system_logs")
    prepare(db, "api_call_metrics")   # a shadow being backfilled is maintained too
    res = call(db, "CALL maintain_partitions()")
    assert res["errors"] == [] and res["created"] == []   # prepare already made now + premake
    assert set(res["tables"]) == {"public.system_logs", "public.api_call_metrics_p"}
    # premake: drop the last future partitions, maintain recreates them
    last = db.query("SELECT partition FROM monitoring.partition_health WHERE parent = 'system_logs' "
                    "AND NOT is_default ORDER BY range_start DESC LIMIT 2")
    for (p,) in last:
        db.query(f"DROP TABLE {p}")
    res = call(db, "CALL maintain_partitions()")
    assert sorted(res["created"]) == sorted(p for (p,) in last) and res["errors"] == []
    again = call(db, "CALL maintain_partitions()")
    assert again["created"] == [] and again["changed"] is False   # idempotent
    conn = db.connect()   # boundaries are UTC whatever the session's TimeZone
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET TimeZone = 'Pacific/Chatham'")   # UTC+12:45 / +13:45
        cur.execute("CALL maintain_partitions()")
        res = cur.fetchone()[0]
    conn.close()
    assert res["created"] == [] and res["errors"] == [], res
    premake = db.scalar("SELECT premake FROM app_retention_policies WHERE table_name = 'system_logs'")
    assert db.scalar("SELECT count(*) FROM monitoring.partition_health WHERE parent = 'system_logs' "
                     "AND range_start > now()") == premake
    # a row far in the future lands in the DEFAULT partition: flagged, then given its own partition
    rid = db.scalar("INSERT INTO system_logs (created_at, component, event_type) "
                    "VALUES ('2031-05-17 10:00+00', 'x', 'future') RETURNING id")
    assert db.scalar("SELECT tableoid::regclass::text FROM system_logs WHERE id = %s", (rid,)) == "system_logs_default"
    assert db.query("SELECT partition, status FROM monitoring.partition_health WHERE status = 'DEFAULT_HAS_ROWS'") == [
        ("system_logs_default", "DEFAULT_HAS_ROWS")]
    res = call(db, "CALL maintain_partitions()")
    assert res["moved_from_default"] == [{"partition": "system_logs_p2031_05_17", "rows": 1}], res
    assert db.scalar("SELECT tableoid::regclass::text FROM system_logs WHERE id = %s", (rid,)) == "system_logs_p2031_05_17"
    # the move is not a logical change: the old copy (reverse trigger) still has the row, verify agrees
    assert db.scalar("SELECT count(*) FROM system_logs_nonpartitioned WHERE id = %s", (rid,)) == 1
    assert call(db, "SELECT dbops.p2_verify('system_logs')")["status"] == "ok"
    assert db.scalar("SELECT count(*) FROM monitoring.partition_health WHERE status = 'DEFAULT_HAS_ROWS'") == 0
    # ISO week names and boundaries for the weekly table
    # (issue 11) the history older than the retention is in monthly partitions <table>_hYYYY_MM that the
    # first cleanup drops whole; from the week of the retention cutoff on, one partition per ISO week
    allp = db.query("SELECT partition, range_start, range_end, status FROM monitoring.partition_health "
                    "WHERE parent = 'api_call_metrics_p' AND NOT is_default ORDER BY range_start")
    hist = [r for r in allp if r[0].startswith("api_call_metrics_h")]
    wk = [r for r in allp if r[0].startswith("api_call_metrics_p")]
    assert len(hist) == len(allp) - len(wk) and 10 <= len(hist) <= 14 and 5 <= len(wk) <= 12, allp
    keep = db.scalar("SELECT retention FROM app_retention_policies WHERE table_name = 'api_call_metrics'")
    for (name, lo, hi, status), nxt in zip(allp, allp[1:]):
        assert hi == nxt[1], (name, nxt[0])   # contiguous
    for name, lo, hi, status in hist:
        lo_utc, hi_utc = lo.astimezone(dt.timezone.utc), hi.astimezone(dt.timezone.utc)
        assert name == f"api_call_metrics_h{lo_utc.year}_{lo_utc.month:02d}" and status == "EXPIRED", (name, status)
        assert (hi_utc.day == 1 and hi_utc.time() == dt.time(0)) or hi == wk[0][1], name  # month ends, or the cut
        assert hi <= dt.datetime.now(dt.timezone.utc) - keep
    for name, lo, hi, status in wk:
        lo_utc = lo.astimezone(dt.timezone.utc)
        assert lo_utc.weekday() == 0 and lo_utc.time() == dt.time(0) and hi - lo == dt.timedelta(days=7)
        iso = lo_utc.isocalendar()
        assert name == f"api_call_metrics_p{iso[0]}_{iso[1]:02d}"
    # the cut is the start of the week holding now() - retention: nothing the retention keeps is in history
    cut = wk[0][1].astimezone(dt.timezone.utc)
    assert cut <= dt.datetime.now(dt.timezone.utc) - keep < cut + dt.timedelta(days=7)



def engine_triggers_on(db, rel: str) -> list[tuple]:
    """(name, tgenabled) of the engine's triggers (functions in schema dbops) on a relation."""
    return db.query("SELECT tg.tgname::text, tg.tgenabled::text FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid "
                    "WHERE tg.tgrelid = %s::regclass AND p.pronamespace = 'dbops'::regnamespace ORDER BY 1", (rel,))


def checks_despite_session_setting(db, n: int, swapped: bool):
    """A plain application session that sets the engine's former bypass itself
    (SET dbops.p2_internal_move = on) still gets every check the triggers make."""
    conn = db.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SET dbops.p2_internal_move = on")
            cur.execute("SHOW dbops.p2_internal_move")
            assert cur.fetchone()[0] == "on"
            # (1) a reference to a call that does not exist is refused
            with pytest.raises(psycopg2.errors.ForeignKeyViolation):
                cur.execute("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) "
                            "VALUES (%s, 'x', 1, 1)", (f"nope-guc-{n}",))
            with pytest.raises(psycopg2.errors.ForeignKeyViolation):
                cur.execute("INSERT INTO processing_state (call_uid, status) VALUES (%s, 'queued')", (f"nope-guc-{n}",))
            # (2) deleting a call: ON DELETE SET NULL runs on its transcript and processing state
            cur.execute("SELECT t.id, t.call_uid FROM transcripts t JOIN bcfy_calls_raw c USING (call_uid) "
                        "WHERE c.started_at < now() ORDER BY t.id DESC LIMIT 1")
            tid, uid = cur.fetchone()
            cur.execute("INSERT INTO processing_state (call_uid, status) VALUES (%s, 'transcribed') "
                        "ON CONFLICT (call_uid) DO UPDATE SET status = EXCLUDED.status RETURNING id", (uid,))
            psid = cur.fetchone()[0]
            cur.execute("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
            assert cur.rowcount == 1
            cur.execute("SELECT call_uid FROM transcripts WHERE id = %s", (tid,))
            assert cur.fetchone() == (None,)
            cur.execute("SELECT call_uid FROM processing_state WHERE id = %s", (psid,))
            assert cur.fetchone() == (None,)
            # (3) a duplicate key in another partition is refused (global uniqueness guards)
            cur.execute("SELECT call_uid, started_at FROM bcfy_calls_raw WHERE started_at < now() "
                        "ORDER BY started_at DESC LIMIT 1")
            dup_uid, started = cur.fetchone()
            with pytest.raises(psycopg2.errors.UniqueViolation):
                cur.execute("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) VALUES (%s, 'guc', %s, %s) "
                            "ON CONFLICT (call_uid, started_at) DO NOTHING",
                            (dup_uid, 4_200_000_000 + n, started - dt.timedelta(days=40)))
            cur.execute("SELECT call_uid FROM transcripts WHERE call_uid IS NOT NULL LIMIT 1")
            with pytest.raises(psycopg2.errors.UniqueViolation):
                cur.execute("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence, created_at) "
                            "VALUES (%s, 'dup', 1, 1, now() - interval '60 days')", cur.fetchone())
            # a valid write in the same session works (and, while swapped, reaches the old copy)
            new_uid = f"guc-{4_200_000_000 + n}"
            cur.execute("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) VALUES (%s, 'guc', %s, now()) "
                        "ON CONFLICT (call_uid, started_at) DO NOTHING", (new_uid, 4_200_000_000 + n))
    finally:
        conn.close()
    if swapped:   # the reverse sync ran for every write of that session: the old copies agree
        assert db.scalar("SELECT count(*) FROM bcfy_calls_raw_nonpartitioned WHERE call_uid = %s", (new_uid,)) == 1
        assert db.scalar("SELECT count(*) FROM bcfy_calls_raw_nonpartitioned WHERE call_uid = %s", (uid,)) == 0
        assert db.scalar("SELECT call_uid FROM transcripts_nonpartitioned WHERE id = %s", (tid,)) is None
        for t in ("bcfy_calls_raw", "transcripts"):
            assert call(db, "SELECT dbops.p2_verify(%s)", (t,))["status"] == "ok", t


def move_keeps_references(db, started: str, partition: str, swapped: bool):
    """A call (with a transcript and a processing state) in the DEFAULT partition, moved out by
    maintain_partitions(): the move is not a logical change, so no reference is cleared."""
    uid = "future-" + partition
    db.query("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) VALUES (%s, 'future', %s, %s)",
             (uid, 4_300_000_000 + int(partition[-7:].replace("_", "")), started))
    assert db.scalar("SELECT tableoid::regclass::text FROM bcfy_calls_raw WHERE call_uid = %s", (uid,)) \
        == "bcfy_calls_raw_default"
    tid = db.scalar("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) "
                    "VALUES (%s, 'future call', 1, 1) RETURNING id", (uid,))
    db.query("INSERT INTO processing_state (call_uid, status) VALUES (%s, 'queued')", (uid,))
    before = engine_triggers_on(db, "bcfy_calls_raw_default")
    assert before and all(mode == "O" for _, mode in before), before
    res = call(db, "CALL maintain_partitions()")
    assert res["errors"] == [] and {"partition": partition, "rows": 1} in res["moved_from_default"], res
    assert db.scalar("SELECT tableoid::regclass::text FROM bcfy_calls_raw WHERE call_uid = %s", (uid,)) == partition
    assert db.scalar("SELECT call_uid FROM transcripts WHERE id = %s", (tid,)) == uid
    assert db.scalar("SELECT count(*) FROM processing_state WHERE call_uid = %s", (uid,)) == 1
    # the engine's triggers are back on, on DEFAULT, and present and on on the new partition
    assert engine_triggers_on(db, "bcfy_calls_raw_default") == before
    assert engine_triggers_on(db, partition) == before
    if swapped:   # the old copies still hold the call and its reference; verify agrees
        assert db.scalar("SELECT count(*) FROM bcfy_calls_raw_nonpartitioned WHERE call_uid = %s", (uid,)) == 1
        assert db.scalar("SELECT call_uid FROM transcripts_nonpartitioned WHERE id = %s", (tid,)) == uid
        for t in ("bcfy_calls_raw", "transcripts"):
            assert call(db, "SELECT dbops.p2_verify(%s)", (t,))["status"] == "ok", t


def test_integrity_not_switched_off_by_a_session_setting(engine_db):
    """Issue 9, item 8: the reference checks and actions, the uniqueness guards and the reverse sync
    honour no session setting; only maintain_partitions' own move of DEFAULT rows bypasses them."""
    db = engine_db
    convert(db, "bcfy_calls_raw")
    convert(db, "transcripts")
    checks_despite_session_setting(db, 1, swapped=True)
    move_keeps_references(db, "2031-05-17 10:00+00", "bcfy_calls_raw_p2031_05", swapped=True)
    for t in ("transcripts", "bcfy_calls_raw"):
        assert call(db, "SELECT dbops.p2_finalize(%s)", (t,))["status"] == "finalized"
    checks_despite_session_setting(db, 2, swapped=False)
    move_keeps_references(db, "2032-07-04 10:00+00", "bcfy_calls_raw_p2032_07", swapped=False)
    assert db.scalar("SELECT count(*) FROM transcripts WHERE call_uid NOT IN (SELECT call_uid FROM bcfy_calls_raw)") == 0


def test_cleanup_old_data(engine_db):
    db = engine_db
    # nothing converted: nothing dropped, the poll log trimmed by DELETE
    old_polls = db.scalar("SELECT count(*) FROM bcfy_playlist_poll_log WHERE poll_started_at < now() - interval '30 days'")
    counts = {t: db.scalar(f"SELECT count(*) FROM {t}") for t in TABLES}
    res = call(db, "CALL cleanup_old_data()")
    assert res["dropped"] == [] and res["errors"] == []
    assert res["deleted"] == {"bcfy_playlist_poll_log": old_polls}
    assert {s["table"] for s in res["skipped"]} == set(TABLES)
    assert counts == {t: db.scalar(f"SELECT count(*) FROM {t}") for t in TABLES}

    for t in TABLES:
        convert(db, t)
    res = call(db, "CALL cleanup_old_data()")   # swapped, not finalized: skipped (old copy would diverge)
    assert res["dropped"] == [] and all("in progress" in s["reason"] for s in res["skipped"])
    for t in TABLES:
        call(db, "SELECT dbops.p2_finalize(%s)", (t,))
    cutoff_refs = db.scalar(
        "SELECT count(*) FROM transcripts t JOIN bcfy_calls_raw c USING (call_uid) "
        "WHERE c.started_at < date_trunc('month', now() - interval '90 days', 'UTC')")
    assert cutoff_refs > 0
    res = call(db, "CALL cleanup_old_data(max_partitions => 5)")
    assert res["errors"] == [], res
    assert max(sum(d["table"] == t for d in res["dropped"]) for t in TABLES) == 5   # capped per table and run
    while True:   # the backlog after a conversion: run again until nothing is left
        more = call(db, "CALL cleanup_old_data()")
        assert more["errors"] == [], more
        if not more["dropped"]:
            break
        res["dropped"] += more["dropped"]
    dropped = {d["partition"] for d in res["dropped"]}
    assert any(p.startswith("bcfy_calls_raw_p") for p in dropped) and any(p.startswith("system_logs_h") for p in dropped)
    assert sum(d["references_cleared"] for d in res["dropped"] if d["table"] == "bcfy_calls_raw") >= cutoff_refs
    for t in TABLES:
        keep = db.scalar("SELECT retention FROM app_retention_policies WHERE table_name = %s", (t,))
        assert db.scalar("SELECT count(*) FROM monitoring.partition_health WHERE parent = %s AND status = 'EXPIRED'",
                         (t,)) == 0, (t, keep)
    # references into dropped partitions were cleared; none dangling
    assert db.scalar("SELECT count(*) FROM transcripts WHERE call_uid NOT IN (SELECT call_uid FROM bcfy_calls_raw)") == 0
    assert db.scalar("SELECT count(*) FROM processing_state ps WHERE call_uid IS NOT NULL AND NOT EXISTS "
                     "(SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = ps.call_uid)") == 0


def test_install_idempotent_and_rollback_files(engine_db):
    db = engine_db
    assert "ERROR" not in apply(db, PHASE2[2:])   # second run of the engine's code
    rb = {f.name: f for f in ROLLBACK2}
    prepare(db, "bcfy_calls_raw")
    r = psql(db, rb["002_02_calls_app_key.sql"])   # the ingester's arbiter stays while calls convert
    assert r.returncode != 0 and "being converted" in r.stderr
    call(db, "SELECT dbops.p2_abort('bcfy_calls_raw')")
    convert(db, "api_call_metrics")
    r = psql(db, rb["002_preconditions.sql"])
    assert r.returncode != 0 and "refused" in r.stderr
    call(db, "SELECT dbops.p2_rollback('api_call_metrics')")
    call(db, "SELECT dbops.p2_abort('api_call_metrics')")
    apply(db, ROLLBACK2)
    assert db.scalar("SELECT count(*) FROM pg_proc WHERE pronamespace = 'dbops'::regnamespace AND proname LIKE 'p2%'") == 0
    assert db.scalar("SELECT to_regclass('app_retention_policies')") is None
    assert db.scalar("SELECT to_regclass('monitoring.partition_health')") is None
    assert db.scalar("SELECT to_regclass('bcfy_calls_raw_call_uid_started_at_key')") is None
    assert db.scalar("SELECT to_regnamespace('dbops')") is not None
    apply(db, PHASE2)   # and back
    assert db.scalar("SELECT count(*) FROM app_retention_policies") == 5


def test_guide_cron_schedule(make_db):
    db = make_db(baseline=True, cron=True)
    apply(db, PHASE2)
    assert run_guide(db, "cron") == []
    assert {r[0] for r in db.query("SELECT jobname FROM cron.job")} >= {"maintain-partitions", "cleanup-old-data"}
    # the engine's rollback drops the procedures those jobs call: it unschedules them (else they fail
    # every night), and only them
    db.query("SELECT cron.schedule('someone-elses', '0 3 * * *', 'SELECT 1')")
    apply(db, ROLLBACK2)
    assert {r[0] for r in db.query("SELECT jobname FROM cron.job")} == {"someone-elses"}


def test_lock_taking_steps_give_up_quickly(engine_db):
    """prepare and swap never queue behind a busy table for longer than lock_timeout."""
    db = engine_db
    blocker = db.connect()
    with blocker.cursor() as cur:   # an application transaction in flight on the source
        cur.execute("INSERT INTO system_logs (component, event_type) VALUES ('app', 'open')")
    t0 = time.monotonic()
    res = call(db, "SELECT dbops.p2_prepare('system_logs')")
    assert res["status"] == "retry" and time.monotonic() - t0 < 5
    assert db.scalar("SELECT step FROM dbops.p2_state") == "shadow_created"
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'system_logs'::regclass AND NOT tgisinternal") == 0
    blocker.commit()
    assert prepare(db, "system_logs")["status"] == "prepared"
    backfill(db, "system_logs", 5000)
    call(db, "SELECT dbops.p2_verify('system_logs')")
    with blocker.cursor() as cur:   # a long read
        cur.execute("SELECT count(*) FROM system_logs")
    conn = db.connect()
    conn.autocommit = True
    with conn.cursor() as cur, pytest.raises(psycopg2.errors.LockNotAvailable):
        cur.execute("SET lock_timeout = '200ms'")
        cur.execute("SELECT dbops.p2_swap('system_logs')")
    conn.close()
    assert db.scalar("SELECT step FROM dbops.p2_state") == "verified"
    assert db.scalar("SELECT relkind FROM pg_class WHERE oid = 'system_logs'::regclass") == "r"
    blocker.rollback()
    blocker.close()
    assert call(db, "SELECT dbops.p2_swap('system_logs')")["status"] == "swapped"


def test_maintain_partitions_concurrent_calls(engine_db):
    db = engine_db
    convert(db, "api_call_metrics")
    db.query("DROP TABLE " + db.scalar("SELECT partition FROM monitoring.partition_health WHERE parent = "
                                       "'api_call_metrics' AND NOT is_default ORDER BY range_start DESC LIMIT 1"))
    out, errs = [], []

    def run():
        try:
            out.append(call(db, "CALL maintain_partitions()", lock_timeout="5s"))
        except Exception as e:  # noqa: BLE001
            errs.append(e)
    ts = [threading.Thread(target=run) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs and all(o["errors"] == [] for o in out)
    assert sum(len(o["created"]) for o in out) == 1


def test_transcripts_first_and_null_created_at(engine_db):
    """The other order (transcripts converted while calls is still plain), NULL partition keys in
    transcripts, then calls, finalize calls before transcripts."""
    db = engine_db
    ids = [r[0] for r in db.query("SELECT id FROM transcripts ORDER BY id LIMIT 2")]
    db.query("UPDATE transcripts SET created_at = NULL WHERE id = ANY(%s)", (ids,))
    res = convert(db, "transcripts")
    assert res["verify"]["null_key_rows"] == 2
    fallback = db.scalar("SELECT null_key_fallback FROM dbops.p2_state WHERE table_name = 'transcripts'")
    assert db.scalar("SELECT count(*) FROM transcripts WHERE id = ANY(%s) AND created_at = %s", (ids, fallback)) == 2
    assert db.scalar("SELECT count(*) FROM transcripts_nonpartitioned WHERE id = ANY(%s) AND created_at IS NULL",
                     (ids,)) == 2
    # child partitioned, parent plain: the reference is a trigger pair, still enforced both ways
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        db.query("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) VALUES ('nope-2', 'x', 1, 1)")
    tid, uid = db.query("SELECT id, call_uid FROM transcripts WHERE call_uid IS NOT NULL ORDER BY id DESC LIMIT 1")[0]
    db.query("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
    assert db.scalar("SELECT call_uid FROM transcripts WHERE id = %s", (tid,)) is None
    assert db.scalar("SELECT call_uid FROM transcripts_nonpartitioned WHERE id = %s", (tid,)) is None
    convert(db, "bcfy_calls_raw")
    for t in ("bcfy_calls_raw", "transcripts"):
        assert call(db, "SELECT dbops.p2_finalize(%s)", (t,))["status"] == "finalized"
    assert db.scalar("SELECT count(*) FROM transcripts WHERE call_uid NOT IN (SELECT call_uid FROM bcfy_calls_raw)") == 0
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        db.query("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) VALUES ('nope-3', 'x', 1, 1)")
    # a call moved to another partition keeps its transcript
    tid, uid = db.query("SELECT id, call_uid FROM transcripts WHERE call_uid IS NOT NULL ORDER BY id DESC LIMIT 1")[0]
    db.query("UPDATE bcfy_calls_raw SET started_at = started_at - interval '45 days', ended_at = NULL "
             "WHERE call_uid = %s", (uid,))
    assert db.scalar("SELECT call_uid FROM transcripts WHERE id = %s", (tid,)) == uid
