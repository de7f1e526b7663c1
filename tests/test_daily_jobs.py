"""The daily jobs (files/sql/repeatable/002/08_daily_jobs.sql: CALL cleanup_old_data(), CALL
maintain_partitions()) under concurrent application sessions, against a real PostgreSQL 15, as `scan`.

Issue 9, item 6: retention no longer blocks the busy tables: while it drops hundreds of expired
partitions, a session inserting into / reading the parents never waits 500 ms; unexpired rows are all
kept, references into dropped partitions cleared; a run killed after a DETACH (or failing on a lock)
leaves a recorded detached table that the next run finishes.
Item 7: moving rows out of a DEFAULT partition loses no concurrent UPDATE (the UPDATE waiting on the
moved row applies its change in the new partition) and fires no application trigger.
Item 11 (daily jobs): a failing step makes the job fail (an error listing it, so pg_cron records the
run as failed), after the other tables were handled.
"""
from __future__ import annotations

import re
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from conftest import PSQL, wait_for
from test_phase2_engine import _engine_db, call, convert

pytestmark = pytest.mark.skipif(PSQL is None, reason="psql not installed")

MARKER = "dbops:retention-detached "


@pytest.fixture
def engine_db_full(make_db):
    """Baseline + 3000 demo calls over 13 months (~400 daily system_logs partitions) + Phase 1 + 2."""
    return _engine_db(make_db, None)


@pytest.fixture
def engine_db(make_db):
    return _engine_db(make_db, 40)


def convert_finalized(db, tables):
    for t in tables:
        convert(db, t)
    for t in tables:
        assert call(db, "SELECT dbops.p2_finalize(%s)", (t,))["status"] == "finalized"


def expired(db, table: str) -> set:
    return {r[0] for r in db.query("SELECT partition FROM monitoring.partition_health WHERE parent = %s "
                                   "AND status = 'EXPIRED'", (table,))}


def detached_marked(db) -> set:
    """The tables cleanup_old_data() detached and has not dropped yet (its register, dbops.p2_detached)."""
    return {r[0] for r in db.query("SELECT relname FROM dbops.p2_detached")}


def dangling_refs(db) -> int:
    return db.scalar("SELECT (SELECT count(*) FROM transcripts t WHERE t.call_uid IS NOT NULL AND NOT EXISTS "
                     "(SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = t.call_uid)) + "
                     "(SELECT count(*) FROM processing_state ps WHERE ps.call_uid IS NOT NULL AND NOT EXISTS "
                     "(SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = ps.call_uid))")


class Timed(threading.Thread):
    """An application session (autocommit): inserts into and reads the parents in a loop, and
    records how long each statement took."""

    STATEMENTS = [
        ("insert system_logs", "INSERT INTO system_logs (component, event_type) VALUES ('app', 'tick')"),
        ("read system_logs", "SELECT count(*) FROM system_logs WHERE created_at > now() - interval '1 hour'"),
        ("insert call", "INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) "
                        "VALUES ('t-' || %(n)s, 'timed', 4400000000 + %(n)s, now())"),
        ("insert transcript", "INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) "
                              "VALUES ('t-' || %(n)s, 'timed', 1, 1)"),
        ("read calls", "SELECT count(*) FROM bcfy_calls_raw WHERE started_at > now() - interval '1 day'"),
    ]

    def __init__(self, db):
        super().__init__(daemon=True)
        self.db = db
        self.stop = threading.Event()
        self.worst: dict[str, float] = {}
        self.errors: list[str] = []
        self.n = 0

    def run(self):
        conn = self.db.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self.stop.is_set():
                    self.n += 1
                    for name, sql in self.STATEMENTS:
                        t0 = time.monotonic()
                        try:
                            cur.execute(sql, {"n": self.n})
                        except Exception as e:  # noqa: BLE001 - every failure is a test failure
                            self.errors.append(f"{name}: {type(e).__name__}: {e}")
                        self.worst[name] = max(self.worst.get(name, 0.0), time.monotonic() - t0)
                    time.sleep(0.005)
        finally:
            conn.close()


def test_cleanup_does_not_block_a_concurrent_writer(engine_db_full):
    """Item 6: the first cleanup after a conversion (hundreds of expired partitions, references to
    clear) while a session writes and reads the parents: no statement of it waits 500 ms."""
    db = engine_db_full
    convert_finalized(db, ["bcfy_calls_raw", "transcripts", "system_logs"])
    gone = {t: expired(db, t) for t in ("bcfy_calls_raw", "transcripts", "system_logs")}
    # a year of daily logs: the history older than the retention is in monthly partitions (issue 11)
    # (issue 11: all of it, the first cleanup drops them whole) instead of ~370 daily ones
    assert len(gone["system_logs"]) >= 12 and gone["bcfy_calls_raw"], gone
    assert all(re.search(r"_h\d{4}_\d{2}$", p) for p in gone["system_logs"]), gone
    kept = {t: db.scalar(f"SELECT count(*) FROM {t} WHERE {c} >= now() - %s::interval", (keep,))
            for t, c, keep in (("bcfy_calls_raw", "started_at", "90 days"), ("transcripts", "created_at", "180 days"),
                               ("system_logs", "created_at", "30 days"))}
    refs = db.scalar("SELECT count(*) FROM transcripts t JOIN bcfy_calls_raw c USING (call_uid) "
                     "WHERE c.started_at < now() - interval '90 days'")
    assert refs > 0
    app = Timed(db)
    app.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    res = call(db, "CALL cleanup_old_data(max_partitions => 1000)")
    took = time.monotonic() - t0
    time.sleep(0.3)
    app.stop.set()
    app.join()
    assert res["errors"] == [] and app.errors == [], (res["errors"], app.errors)
    assert {d["partition"] for d in res["dropped"]} == set().union(*gone.values())
    # each partition's own time (detach, references, proof, drop), within the call's
    assert all(0 <= d["seconds"] <= took for d in res["dropped"]), res["dropped"]
    print(f"\ncleanup: {len(res['dropped'])} partitions in {took:.1f} s; slowest statement of the session (ms):",
          {k: round(v * 1000) for k, v in app.worst.items()})
    assert max(app.worst.values()) < 0.5, (app.worst, f"cleanup took {took:.1f} s")
    assert app.n > 20   # the session really ran during the cleanup
    for t in gone:
        assert expired(db, t) == set(), t
        assert db.scalar("SELECT count(*) FROM pg_class WHERE relname = ANY(%s)", (list(gone[t]),)) == 0
    # nothing unexpired lost (the session only added rows), references into dropped rows cleared
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE started_at >= now() - interval '90 days' "
                     "AND group_id <> 'timed'") >= kept["bcfy_calls_raw"] - 0
    assert db.scalar("SELECT count(*) FROM system_logs WHERE created_at >= now() - interval '30 days' "
                     "AND component <> 'app'") == kept["system_logs"]
    assert db.scalar("SELECT count(*) FROM transcripts WHERE created_at >= now() - interval '180 days' "
                     "AND text <> 'timed'") == kept["transcripts"]
    assert sum(d["references_cleared"] for d in res["dropped"] if d["table"] == "bcfy_calls_raw") >= refs
    assert dangling_refs(db) == 0
    assert detached_marked(db) == set()
    again = call(db, "CALL cleanup_old_data()")
    assert again["dropped"] == [] and again["errors"] == [] and again["changed"] is False


def test_cleanup_killed_or_failing_midway_is_finished_next_run(engine_db):
    """Item 6 + 11: a run killed right after a DETACH leaves a marked, detached table; a run whose
    step fails (lock timeout on a referencing row) raises an error naming it after dropping the
    others; the next run finishes the detached table."""
    db = engine_db
    convert_finalized(db, ["bcfy_calls_raw", "transcripts"])
    # transcripts' own retention off here: the blocker below (FOR UPDATE on transcripts) would make
    # every DETACH of a transcripts partition time out too
    db.query("UPDATE app_retention_policies SET enabled = false WHERE table_name = 'transcripts'")
    parts = sorted(expired(db, "bcfy_calls_raw"))
    assert len(parts) >= 3, parts
    first = parts[0]
    uid = db.scalar(f"SELECT t.call_uid FROM transcripts t JOIN {first} c USING (call_uid) LIMIT 1")
    if uid is None:   # the demo data depend on the day: the oldest partition may have no transcript
        uid = db.scalar(f"SELECT call_uid FROM {first} ORDER BY call_uid LIMIT 1")
        assert uid, f"{first} is empty"
        db.query("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) VALUES (%s, 'x', 1, 1)", (uid,))
    blocker = db.connect()   # an application transaction holding a transcript of the oldest partition
    with blocker.cursor() as cur:
        cur.execute("SELECT id FROM transcripts WHERE call_uid = %s FOR UPDATE", (uid,))
    conn = db.connect()
    conn.autocommit = True
    pid = conn.get_backend_pid()
    out: list = []

    def run():
        try:
            with conn.cursor() as cur:
                cur.execute("CALL cleanup_old_data(lock_wait => '50ms', lock_retries => 100000)")
        except psycopg2.Error as e:
            out.append(e)
    th = threading.Thread(target=run)
    th.start()
    wait_for(lambda: first in detached_marked(db), timeout=60, what="first partition detached")
    time.sleep(0.3)
    db.query("SELECT pg_terminate_backend(%s)", (pid,))
    th.join(30)
    assert out and isinstance(out[0], psycopg2.OperationalError), out
    assert db.scalar("SELECT relispartition FROM pg_class WHERE relname = %s", (first,)) is False
    # the blocker still holds its row: this run fails visibly, after dropping the other partitions
    c2 = db.connect()
    c2.autocommit = True
    with c2.cursor() as cur, pytest.raises(psycopg2.errors.RaiseException) as err:
        cur.execute("CALL cleanup_old_data(lock_wait => '50ms', lock_retries => 2)")
    c2.close()
    msg = str(err.value)
    assert "cleanup_old_data: 1 step(s) failed" in msg and first in msg and "stays detached" in msg, msg
    assert "lock timeout" in msg, msg
    assert expired(db, "bcfy_calls_raw") == set()
    assert db.scalar("SELECT count(*) FROM pg_class WHERE relname = ANY(%s)", (parts[1:],)) == 0
    assert detached_marked(db) == {first}
    blocker.rollback()
    blocker.close()
    res = call(db, "CALL cleanup_old_data()")
    assert res["errors"] == [] and res["resumed"] == [first], res
    assert [d["partition"] for d in res["dropped"] if d["table"] == "bcfy_calls_raw"] == [first]
    assert next(d for d in res["dropped"] if d["partition"] == first)["references_cleared"] >= 1
    assert db.scalar("SELECT to_regclass(%s)", (first,)) is None
    assert detached_marked(db) == set() and dangling_refs(db) == 0
    assert db.scalar("SELECT call_uid FROM transcripts WHERE call_uid = %s", (uid,)) is None


def test_cleanup_keeps_a_detached_table_not_expired_under_the_policy(engine_db):
    """Nothing lost: a detached table is dropped only when its bounds are older than the current
    retention cutoff; a longer retention set meanwhile keeps it (error names how to re-attach)."""
    db = engine_db
    convert_finalized(db, ["system_logs"])
    part = sorted(expired(db, "system_logs"))[-1]
    rng = db.query("SELECT range_start, range_end FROM monitoring.partition_health WHERE partition = %s", (part,))[0]
    rows = db.scalar(f"SELECT count(*) FROM {part}")
    # what a run of the former code killed after its DETACH left behind (a comment mark, adopted)
    db.query(f"ALTER TABLE system_logs DETACH PARTITION {part}")
    db.query(f"COMMENT ON TABLE {part} IS %s",
             (MARKER + '{"table": "system_logs", "time_column": "created_at", "range_start": "%s", "range_end": "%s"}'
              % (rng[0].isoformat(), rng[1].isoformat()),))
    db.query("UPDATE app_retention_policies SET retention = interval '400 days' WHERE table_name = 'system_logs'")
    res = call(db, "CALL cleanup_old_data(raise_on_error => false)")
    assert [e["partition"] for e in res["errors"]] == [part] and "not expired" in res["errors"][0]["error"], res
    assert [a["partition"] for a in res["adopted"]] == [part] and detached_marked(db) == {part}, res
    assert "ATTACH PARTITION" in res["errors"][0]["error"]
    assert db.scalar(f"SELECT count(*) FROM {part}") == rows
    db.query("UPDATE app_retention_policies SET retention = interval '30 days' WHERE table_name = 'system_logs'")
    res = call(db, "CALL cleanup_old_data()")
    assert part in {d["partition"] for d in res["dropped"]} and res["errors"] == [], res


def test_maintain_partitions_failing_table_fails_the_job_after_the_others(engine_db):
    """Item 11: one table's step fails (a table of the name its next partition needs exists); the
    other table still gets its partition, then the job raises an error naming the failure."""
    db = engine_db
    for t in ("system_logs", "api_call_metrics"):
        convert(db, t)
    last = {t: db.scalar("SELECT partition FROM monitoring.partition_health WHERE parent = %s "
                         "AND NOT is_default ORDER BY range_start DESC LIMIT 1", (t,))
            for t in ("system_logs", "api_call_metrics")}
    for p in last.values():
        db.query(f"DROP TABLE {p}")
    db.query(f"CREATE TABLE {last['system_logs']} (unrelated int)")
    conn = db.connect()
    conn.autocommit = True
    with conn.cursor() as cur, pytest.raises(psycopg2.errors.RaiseException) as err:
        cur.execute("CALL maintain_partitions()")
    conn.close()
    msg = str(err.value)
    assert "maintain_partitions: 1 step(s) failed" in msg and last["system_logs"] in msg and "already exists" in msg, msg
    assert db.scalar("SELECT parent FROM monitoring.partition_health WHERE partition = %s",
                     (last["api_call_metrics"],)) == "api_call_metrics"
    res = call(db, "CALL maintain_partitions(raise_on_error => false)")   # how the maintenance role calls it
    assert [e["partition"] for e in res["errors"]] == [last["system_logs"]] and res["created"] == [], res
    db.query(f"DROP TABLE {last['system_logs']}")
    res = call(db, "CALL maintain_partitions()")
    assert res["created"] == [last["system_logs"]] and res["errors"] == [], res


SLOW_CHECK = """
CREATE FUNCTION public.t_slow(ev text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF ev = 'slow-move' THEN PERFORM pg_sleep(1.5); END IF;
    RETURN true;
END $$;
CREATE TABLE public.t_fired (op text, id bigint, tbl text);
CREATE FUNCTION public.t_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.t_fired VALUES (TG_OP, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END, TG_TABLE_NAME);
    RETURN NULL;
END $$;
"""


def test_move_out_of_default_loses_no_concurrent_update(engine_db):
    """Item 7: an UPDATE that arrives while maintain_partitions() moves its row out of the DEFAULT
    partition waits and then applies its change to the row in its new partition (it used to report
    UPDATE 0 and lose it); an application trigger does not fire on the move (only on the UPDATE)."""
    db = engine_db
    convert(db, "system_logs")   # swapped: the reverse sync (engine triggers) is on DEFAULT too
    rid = db.scalar("INSERT INTO system_logs (created_at, component, event_type) "
                    "VALUES ('2031-05-17 10:00+00', 'orig', 'slow-move') RETURNING id")
    assert db.scalar("SELECT tableoid::regclass::text FROM system_logs WHERE id = %s", (rid,)) == "system_logs_default"
    for stmt in SLOW_CHECK.split("\n\n"):   # the move's INSERT into the new table takes 1.5 s (a CHECK)
        db.query(stmt)
    db.query("ALTER TABLE system_logs ADD CONSTRAINT t_slow_move CHECK (public.t_slow(event_type))")
    db.query("CREATE TRIGGER t_app_audit AFTER INSERT OR UPDATE OR DELETE ON system_logs "
             "FOR EACH ROW EXECUTE FUNCTION public.t_audit()")
    mover = db.connect()
    mover.autocommit = True
    out: dict = {}

    def move():
        with mover.cursor() as cur:
            cur.execute("CALL maintain_partitions()")
            out["move"] = cur.fetchone()[0]
    th = threading.Thread(target=move)
    th.start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.pid = %s "
                               "AND l.granted AND l.relation = 'system_logs_default'::regclass AND a.wait_event = 'PgSleep' "
                               "AND l.mode IN ('ExclusiveLock', 'ShareRowExclusiveLock', 'AccessExclusiveLock')",
                               (mover.get_backend_pid(),)) >= 1,
             timeout=30, what="the move holding DEFAULT (in its slow INSERT)")
    time.sleep(0.2)
    upd = db.connect()
    upd.autocommit = True
    with upd.cursor() as cur:
        cur.execute("UPDATE system_logs SET component = 'updated', event_type = 'after-move' WHERE id = %s", (rid,))
        out["updated"] = cur.rowcount
    upd.close()
    th.join(60)
    mover.close()
    assert out["move"]["errors"] == [] and out["move"]["moved_from_default"] == [
        {"partition": "system_logs_p2031_05_17", "rows": 1}], out
    assert out["updated"] == 1, "UPDATE 0: the concurrent change was lost"
    assert db.query("SELECT tableoid::regclass::text, component, event_type FROM system_logs WHERE id = %s", (rid,)) == [
        ("system_logs_p2031_05_17", "updated", "after-move")]
    # the old copy (reverse sync) saw the UPDATE, not a delete by the move
    assert db.query("SELECT component FROM system_logs_nonpartitioned WHERE id = %s", (rid,)) == [("updated",)]
    assert call(db, "SELECT dbops.p2_verify('system_logs')")["status"] == "ok"
    # the application trigger fired for the UPDATE only, and is on on DEFAULT and the new partition
    assert db.query("SELECT op, id, tbl FROM t_fired ORDER BY op") == [("UPDATE", rid, "system_logs_p2031_05_17")]
    modes = dict(db.query("SELECT tgrelid::regclass::text, tgenabled FROM pg_trigger WHERE tgname = 't_app_audit'"))
    assert modes["system_logs_default"] == "O" and modes["system_logs_p2031_05_17"] == "O", modes


def test_move_waits_for_a_writer_holding_the_row(engine_db):
    """Item 7: a transaction that already updated a DEFAULT row when the move starts: the move waits
    (short lock_timeout, retried) and moves the row with its new values."""
    db = engine_db
    convert(db, "system_logs")
    rid = db.scalar("INSERT INTO system_logs (created_at, component, event_type) "
                    "VALUES ('2031-06-17 10:00+00', 'orig', 'x') RETURNING id")
    writer = db.connect()
    with writer.cursor() as cur:
        cur.execute("UPDATE system_logs SET component = 'in-flight' WHERE id = %s", (rid,))
        assert cur.rowcount == 1
    threading.Timer(1.0, writer.commit).start()
    t0 = time.monotonic()
    res = call(db, "CALL maintain_partitions(lock_wait => '50ms')")
    assert time.monotonic() - t0 >= 0.9 and res["errors"] == [], res
    writer.close()
    assert db.query("SELECT tableoid::regclass::text, component FROM system_logs WHERE id = %s", (rid,)) == [
        ("system_logs_p2031_06_17", "in-flight")]


def test_move_of_a_large_bucket_is_refused_with_a_message(engine_db):
    """Item 7: writes to the table wait for a move, so a bucket with more than max_move_rows rows in
    DEFAULT is not moved (error naming the bucket and what to run); the small bucket is moved."""
    db = engine_db
    convert(db, "system_logs")
    db.query("INSERT INTO system_logs (created_at, component, event_type) SELECT '2031-08-01 10:00+00', 'big', 'x' "
             "FROM generate_series(1, 3)")
    db.query("INSERT INTO system_logs (created_at, component, event_type) VALUES ('2031-09-01 10:00+00', 'small', 'x')")
    res = call(db, "CALL maintain_partitions(max_move_rows => 2, raise_on_error => false)")
    assert res["moved_from_default"] == [{"partition": "system_logs_p2031_09_01", "rows": 1}], res
    assert [e["partition"] for e in res["errors"]] == ["system_logs_p2031_08_01"], res
    assert "max_move_rows" in res["errors"][0]["error"] and "max_move_rows => 3" in res["errors"][0]["error"], res
    assert db.scalar("SELECT count(*) FROM system_logs_default") == 3
    res = call(db, "CALL maintain_partitions(max_move_rows => 3)")
    assert res["moved_from_default"] == [{"partition": "system_logs_p2031_08_01", "rows": 3}], res
