"""Phase 3 (state columns, CHECKs, pipeline monitoring) through the real playbooks, on a real server.

Two databases, each seeded with 3000 demo calls:
- plain: Phase 1 only (bcfy_calls_raw stays a plain table: an operator who skipped Phase 2), with
  some of the Phase 3 columns already there (as on some production copies): --check changes
  nothing, phase3.yml applies, the guide 3.3 statements work, rollback_phase3.yml keeps the
  columns, Phase 3 re-applies.
- site: the server's pg_cron database through playbooks/site.yml (Phase 1, Phase 2 step 0,
  Phase 2, Phase 3): bcfy_calls_raw partitioned and swapped (old copy kept in sync by the reverse
  trigger); Phase 3's columns and CHECKs on every partition, on new partitions made by
  maintain_partitions(), reverse sync still working, pruning in the monitoring view, a second
  phase3.yml run changes nothing; rollback with rollback_phase3_drop_columns=true then re-apply.
Playbook runs are the cost (~1 min each on a loaded 2-core box): re-applies after a rollback go
through the same ledger runner in process (migrate_direct).
And a third, small one: Phase 3 refuses, before changing anything, while a Phase 2 conversion is
mid-flight.
"""
from __future__ import annotations

import psycopg2
import pytest

import shutil
import subprocess

from conftest import create_db, drop_db, phase_rollback_sql, phase_sql
from playbook_runner import REPO, ROLLBACK, db_state, ledger, lookup_migrations, migrate_direct, run_playbook

SEED_CALLS = 3000
SQL_DIR = REPO / "files" / "sql"
FAST = {"partition_round_seconds": 3, "partition_upsert_probe_seconds": 2}
PHASE3_FILES = ["003_01", "003_02", "003_03", "003/01_pipeline_monitoring"]   # versioned, then the code
CONSTRAINTS = {
    "bcfy_playlists": ["bcfy_playlists_last_pos_check", "bcfy_playlists_sync_error_count_check"],
    "bcfy_calls_raw": ["bcfy_calls_raw_processing_stage_check", "bcfy_calls_raw_retry_count_check"],
    "processing_state": ["processing_state_max_retries_check", "processing_state_retry_count_check"],
}
NEW_COLUMNS = {
    "bcfy_playlists": {"last_synced_at", "sync_error_count", "last_error_message"},
    "bcfy_calls_raw": {"processing_stage", "retry_count"},
    "processing_state": {"created_at", "retry_count", "max_retries"},
}
VIEWS = ["monitoring.pipeline_stats", "monitoring.processing_pipeline_status", "monitoring.playlist_sync_health"]


def columns(db, table: str) -> dict:
    return {name: (dtype, nullable, default) for name, dtype, nullable, default in db.query(
        "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = %s", (table,))}


def schema_state(db) -> dict:
    """db_state (indexes, constraints, views, ledger, run lock) plus the columns and functions."""
    state = db_state(db)
    state["columns"] = {t: columns(db, t) for t in
                        ("bcfy_playlists", "bcfy_calls_raw", "bcfy_calls_raw_nonpartitioned", "processing_state")}
    state["functions"] = db.query("SELECT p.oid::regprocedure::text FROM pg_proc p "
                                  "WHERE p.proname IN ('get_pipeline_stats', 'get_stuck_processing_items') ORDER BY 1")
    return state


def constraint_state(db, table: str) -> dict:
    return dict(db.query("SELECT conname, convalidated FROM pg_constraint WHERE conrelid = %s::regclass "
                         "AND conname = ANY(%s)", (table, CONSTRAINTS.get(table, CONSTRAINTS["bcfy_calls_raw"]))))


def assert_phase3_present(db):
    for table, cols in NEW_COLUMNS.items():
        assert cols <= set(columns(db, table)), (table, columns(db, table))
        assert constraint_state(db, table) == {c: True for c in CONSTRAINTS[table]}, table
    for view in VIEWS:
        assert db.scalar("SELECT to_regclass(%s) IS NOT NULL", (view,)), view
    assert db.scalar("SELECT to_regprocedure('get_stuck_processing_items(interval,interval,integer)') IS NOT NULL")
    assert ledger(db, "003") == PHASE3_FILES[:3]   # the versioned files; the code is in schema_repeatables


def check_violation(db, sql, params):
    with pytest.raises(psycopg2.errors.CheckViolation):
        db.query(sql, params)


def guide_app_statements(db, recent_call: str) -> None:
    """Guide 3.3: the statements the application switches to after Phase 3."""
    playlist = db.scalar("SELECT uuid::text FROM bcfy_playlists ORDER BY uuid LIMIT 1")
    for _ in range(2):   # get_calls.py: a sync fails (twice)
        db.query("UPDATE bcfy_playlists SET sync_error_count = sync_error_count + 1, last_error_message = %s "
                 "WHERE uuid = %s", ("HTTP 503 from Broadcastify", playlist))
    # audio_worker.py
    db.query("UPDATE bcfy_calls_raw SET processing_stage = 'downloading' WHERE call_uid = %s", (recent_call,))
    assert db.scalar("SELECT processing_stage FROM bcfy_calls_raw WHERE call_uid = %s", (recent_call,)) == "downloading"
    # health check endpoint
    stats = db.query("SELECT * FROM monitoring.pipeline_stats")
    assert ("bcfy_calls_raw", "downloading") in {(r[0], r[1]) for r in stats}, stats
    sync = db.query("SELECT uuid::text, sync_error_count, last_error_message, status FROM monitoring.playlist_sync_health "
                    "WHERE sync_error_count > 0")
    assert sync == [(playlist, 2, "HTTP 503 from Broadcastify", "ERRORS")], sync
    # The CHECKs reject what the application must never write.
    check_violation(db, "UPDATE bcfy_calls_raw SET processing_stage = 'downloadin' WHERE call_uid = %s", (recent_call,))
    check_violation(db, "UPDATE bcfy_calls_raw SET retry_count = -1 WHERE call_uid = %s", (recent_call,))
    check_violation(db, "UPDATE bcfy_playlists SET sync_error_count = -1 WHERE uuid = %s", (playlist,))
    check_violation(db, "UPDATE bcfy_playlists SET last_pos = -5 WHERE uuid = %s", (playlist,))
    check_violation(db, "UPDATE processing_state SET max_retries = -1 WHERE id = (SELECT min(id) FROM processing_state)",
                    None)


def stuck_items(db, recent_call: str) -> None:
    """A call left in 'downloading' for 2 hours, a processing_state row queued for 3 hours."""
    db.query("UPDATE bcfy_calls_raw SET processing_stage = 'downloading', last_attempt = now() - interval '2 hours', "
             "retry_count = 1 WHERE call_uid = %s", (recent_call,))
    # updated_at is kept current by a BEFORE UPDATE trigger: a stuck row is one inserted long ago.
    sid = db.scalar("INSERT INTO processing_state (call_uid, status, updated_at) "
                    "VALUES (NULL, 'queued', now() - interval '3 hours') RETURNING id")
    rows = db.query("SELECT source, call_uid, item_id, stage, retry_count FROM get_stuck_processing_items() "
                    "WHERE call_uid = %s OR item_id = %s", (recent_call, sid))
    assert ("bcfy_calls_raw", recent_call, None, "downloading", 1) in rows, rows
    assert ("processing_state", None, sid, "queued", 0) in rows, rows
    # not stuck yet with a 3-hour threshold; the view counts both as stuck
    assert db.query("SELECT 1 FROM get_stuck_processing_items(interval '3 hours 30 minutes') WHERE call_uid = %s",
                    (recent_call,)) == []
    status = {(r[0], r[1]): r[2] for r in db.query(
        "SELECT source, stage, stuck_items FROM monitoring.processing_pipeline_status")}
    assert status[("bcfy_calls_raw", "downloading")] >= 1 and status[("processing_state", "queued")] >= 1, status
    db.query("DELETE FROM processing_state WHERE id = %s", (sid,))


def recent_call(db) -> str:
    return db.scalar("SELECT call_uid FROM bcfy_calls_raw WHERE started_at > now() - interval '2 days' "
                     "ORDER BY started_at DESC LIMIT 1")


def test_files_paired_and_squawk_clean():
    migs = lookup_migrations("003")
    assert [m["path"] for m in migs] == [
        "files/sql/003_01_columns.sql", "files/sql/003_02_constraints.sql", "files/sql/003_03_pipeline_monitoring.sql",
        "files/sql/repeatable/003/01_pipeline_monitoring.sql"]
    assert all(m["rollback_sql"] for m in migs), "every Phase 3 file has its rollback"
    files = phase_sql("003") + phase_rollback_sql("003")
    squawk = shutil.which("squawk", path=str(REPO / ".venv" / "bin"))
    if squawk:
        r = subprocess.run([squawk, *map(str, files)], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stdout + r.stderr


# ---- plain bcfy_calls_raw (Phase 2 skipped), some columns already there ----------------------
@pytest.fixture(scope="module")
def plain_db(pg_server):
    db = create_db(pg_server, baseline=True, seed_calls=SEED_CALLS)
    res = migrate_direct(db, "001")
    assert [m["version"] for m in res["applied"]] == ["001_01", "001_02", "001_03", "001/01_monitoring_views"], res
    # A production copy where the application already added three of the columns itself.
    db.query("ALTER TABLE bcfy_playlists ADD COLUMN sync_error_count integer NOT NULL DEFAULT 0; "
             "ALTER TABLE bcfy_calls_raw ADD COLUMN retry_count integer NOT NULL DEFAULT 0; "
             "ALTER TABLE processing_state ADD COLUMN created_at timestamptz")
    db.query("UPDATE bcfy_calls_raw SET retry_count = 2 WHERE call_uid = (SELECT min(call_uid) FROM bcfy_calls_raw)")
    yield db
    drop_db(pg_server, db.name)


def test_plain_check_mode_changes_nothing(plain_db):
    before = schema_state(plain_db)
    res = run_playbook(plain_db, "phase3", check=True)
    assert res.ok, res.text
    assert schema_state(plain_db) == before
    assert "processing_stage" not in columns(plain_db, "bcfy_calls_raw")


def test_plain_apply_with_preexisting_columns(plain_db):
    db = plain_db
    res = run_playbook(db, "phase3")
    assert res.ok, res.text
    assert res.shows("Phase 3 Schema Improvements Complete! ✓"), res.text
    assert_phase3_present(db)
    assert db.scalar("SELECT relkind::text FROM pg_class WHERE oid = 'bcfy_calls_raw'::regclass") == "r"
    # only what Phase 3 really added is recorded (and would be dropped by a drop-columns rollback)
    added = set(db.query("SELECT table_name, column_name FROM dbops.p3_added_columns"))
    assert ("bcfy_calls_raw", "retry_count") not in added and ("bcfy_calls_raw", "processing_stage") in added
    assert ("bcfy_playlists", "sync_error_count") not in added and ("processing_state", "created_at") not in added
    assert len(added) == 5, added
    # catalog-only adds: defaults and NOT NULL as specified; existing rows read the default
    calls = columns(db, "bcfy_calls_raw")
    assert calls["processing_stage"] == ("text", "YES", "'pending'::text"), calls
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE processing_stage IS DISTINCT FROM 'pending'") == 0
    assert db.scalar("SELECT max(retry_count) FROM bcfy_calls_raw") == 2    # pre-existing values untouched
    ps = columns(db, "processing_state")
    assert ps["max_retries"][2] == "3" and ps["retry_count"][2] == "0"
    assert ps["created_at"][2] is None   # the operator's own column is left exactly as it was
    # the verify role ran the guide's 3.2 / Monitoring Queries files
    assert res.task("Run each check", "ok"), res.task_names()
    # (a second run changing nothing is tested on the partitioned database, to keep the file fast)


def test_plain_guide_statements_and_stuck_items(plain_db):
    uid = recent_call(plain_db)
    guide_app_statements(plain_db, uid)
    stuck_items(plain_db, uid)
    # 'pending' legacy rows with processed = true are reported as completed
    stats = dict(((r[0], r[1]), r[2]) for r in plain_db.query("SELECT source, stage, items FROM get_pipeline_stats('400 days')"))
    assert stats.get(("bcfy_calls_raw", "completed"), 0) == plain_db.scalar(
        "SELECT count(*) FROM bcfy_calls_raw WHERE processed AND processing_stage = 'pending' "
        "AND started_at >= now() - interval '400 days'")


def test_plain_rollback_keeps_columns_then_reapply(plain_db):
    db = plain_db
    res = run_playbook(db, "rollback_phase3", extra_vars=ROLLBACK)
    assert res.ok, res.text
    assert ledger(db, "003") == []
    for table, cols in NEW_COLUMNS.items():
        assert cols <= set(columns(db, table)), table     # kept: the application may write them
        assert constraint_state(db, table) == {}, table
    for view in VIEWS:
        assert db.scalar("SELECT to_regclass(%s)", (view,)) is None
    assert db.scalar("SELECT to_regprocedure('get_pipeline_stats(interval)')") is None
    assert db.scalar("SELECT to_regclass('monitoring.table_health') IS NOT NULL")    # Phase 1's stay
    assert res.shows("Phase 3 columns kept"), res.text
    # the application's data in the kept columns survives, and Phase 3 re-applies
    assert db.scalar("SELECT max(sync_error_count) FROM bcfy_playlists") == 2
    # (re-applied in process, through the same ledger runner the playbook uses: a playbook run
    # costs ~1 min on a loaded box, and phase3.yml itself is exercised by the other tests)
    res = migrate_direct(db, "003")
    assert [m["version"] for m in res["applied"]] == PHASE3_FILES, res
    assert_phase3_present(db)
    assert db.scalar("SELECT count(*) FROM dbops.p3_added_columns") == 5   # the record survived


# ---- refusal while Phase 2 is mid-flight -----------------------------------------------------
def test_refuses_while_phase2_conversion_in_flight(pg_server):
    db = create_db(pg_server, baseline=True, seed_calls=300)
    try:
        migrate_direct(db, "001")
        migrate_direct(db, "002")
        res = db.scalar("SELECT dbops.p2_prepare('system_logs')")
        assert res["status"] == "prepared", res
        before = schema_state(db)
        res = run_playbook(db, "phase3")
        assert not res.ok
        assert res.failures and "conversions" in res.failures[0].task, res.text
        msg = res.failure_text
        assert "system_logs (prepared)" in msg and "phase2.yml" in msg and "rollback_phase2.yml" in msg, msg
        assert schema_state(db) == before          # nothing changed, lock released
        if db.scalar("SELECT to_regclass('dbops.run_lock') IS NOT NULL"):
            assert db.scalar("SELECT count(*) FROM dbops.run_lock") == 0
        # the SQL refuses too (psql -f, no playbook)
        with pytest.raises(Exception, match="Phase 2 conversion is in progress"):
            migrate_direct(db, "003")
        assert "processing_stage" not in columns(db, "bcfy_calls_raw")
    finally:
        drop_db(pg_server, db.name)


# ---- the whole guide through site.yml; partitioned bcfy_calls_raw ----------------------------
@pytest.fixture(scope="module")
def site_run(pg_server):
    db = create_db(pg_server, baseline=True, seed_calls=SEED_CALLS, cron=True)
    res = run_playbook(db, "site", extra_vars=FAST, timeout=1500)
    yield db, res
    drop_db(pg_server, db.name)


def test_site_runs_all_phases(site_run):
    db, res = site_run
    assert res.ok, res.text
    for phase in ("001", "002"):   # every file of the phase, recorded in the ledger
        assert ledger(db, phase) == [f.name[:6] for f in sorted(SQL_DIR.glob(phase + "_*.sql"))], phase
    assert_phase3_present(db)
    for t in ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs"):
        assert db.scalar("SELECT step FROM dbops.p2_status() WHERE table_name = %s", (t,)) == "swapped", t
    assert res.shows("Phase 3 Schema Improvements Complete! ✓")
    plays = [e["name"] for e in res.events if e["event"] == "play"]
    firsts = [next(i for i, p in enumerate(plays) if p.startswith(k)) for k in
              ("(1/5) Preflight", "(1/7) Preflight")]
    assert plays.count("(1/5) Preflight: check the target before anything changes") == 3   # 1, 2-prepare, 3
    assert firsts[0] < firsts[1], plays


def test_partitioned_columns_constraints_everywhere(site_run):
    db, _ = site_run
    assert db.scalar("SELECT relkind::text FROM pg_class WHERE oid = 'bcfy_calls_raw'::regclass") == "p"
    parts = [p for (p,) in db.query("SELECT relid::regclass::text FROM pg_partition_tree('bcfy_calls_raw') "
                                    "WHERE relid <> 'bcfy_calls_raw'::regclass")]
    assert len(parts) > 10
    bad = db.query("SELECT relid::regclass::text FROM pg_partition_tree('bcfy_calls_raw') p WHERE "
                   "(SELECT count(*) FROM pg_constraint k WHERE k.conrelid = p.relid AND k.convalidated "
                   " AND k.conname IN ('bcfy_calls_raw_processing_stage_check', 'bcfy_calls_raw_retry_count_check')) <> 2")
    assert bad == []
    # the old copy got the columns and constraints too (a Phase 2 rollback keeps a writable table)
    assert {"processing_stage", "retry_count"} <= set(columns(db, "bcfy_calls_raw_nonpartitioned"))
    assert constraint_state(db, "bcfy_calls_raw_nonpartitioned") == {
        "bcfy_calls_raw_processing_stage_check": True, "bcfy_calls_raw_retry_count_check": True}
    # the monitoring view reads only recent partitions (pruning at executor start-up: now() is stable)
    plan = "\n".join(r[0] for r in db.query(
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT * FROM monitoring.processing_pipeline_status"))
    assert "Subplans Removed" in plan, plan


def test_partitioned_reverse_sync_after_phase3(site_run):
    db, _ = site_run
    uid = "p3-test-" + db.name
    db.query("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, feed_id, started_at, ended_at, duration_ms, fetched_at) "
             "VALUES (%s, 'p3-test', 1, 1, now(), now(), 1000, now()) ON CONFLICT (call_uid, started_at) DO NOTHING",
             (uid,))
    db.query("UPDATE bcfy_calls_raw SET processed = true, processing_stage = 'completed' WHERE call_uid = %s", (uid,))
    assert db.query("SELECT processed, processing_stage FROM bcfy_calls_raw WHERE call_uid = %s", (uid,)) == [
        (True, "completed")]
    # the reverse-sync trigger copies the columns both copies share now, Phase 3's included (a
    # rollback of Phase 2 keeps them; it once left them at their defaults)
    db.query("UPDATE bcfy_calls_raw SET retry_count = 2 WHERE call_uid = %s", (uid,))
    assert db.query("SELECT processed, processing_stage, retry_count FROM bcfy_calls_raw_nonpartitioned "
                    "WHERE call_uid = %s", (uid,)) == [(True, "completed", 2)]
    assert db.scalar("SELECT dbops.p2_verify('bcfy_calls_raw')")["status"] == "ok"


def test_partitioned_guide_statements_and_stuck_items(site_run):
    db, _ = site_run
    uid = recent_call(db)
    guide_app_statements(db, uid)
    stuck_items(db, uid)


def test_new_partitions_inherit_phase3(site_run):
    db, _ = site_run
    last = db.scalar("SELECT partition FROM monitoring.partition_health WHERE parent = 'bcfy_calls_raw' "
                     "AND NOT is_default ORDER BY range_start DESC LIMIT 1")
    assert db.scalar(f"SELECT count(*) FROM {last}") == 0
    db.query(f"DROP TABLE {last}")
    res = db.scalar("CALL maintain_partitions()")
    assert last in res["created"] and res["errors"] == [], res
    cols = columns(db, last)
    assert cols["processing_stage"][2] == "'pending'::text" and cols["retry_count"][1:] == ("NO", "0"), cols
    assert constraint_state(db, last) == {"bcfy_calls_raw_processing_stage_check": True,
                                          "bcfy_calls_raw_retry_count_check": True}
    with pytest.raises(psycopg2.errors.CheckViolation, match="bcfy_calls_raw_processing_stage_check"):
        db.query("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at, processing_stage) "
                 "SELECT 'p3-new', 'p3-new', 2, range_start + interval '1 hour', 'bogus' "
                 "FROM monitoring.partition_health WHERE partition = %s", (last,))


def test_partitioned_second_run_changes_nothing(site_run):
    db, _ = site_run
    res = run_playbook(db, "phase3")
    assert res.ok, res.text
    assert res.changed == 0, res.task_names("changed")


def test_partitioned_rollback_drop_columns_then_reapply(site_run):
    db, _ = site_run
    res = run_playbook(db, "rollback_phase3", extra_vars={**ROLLBACK, "rollback_phase3_drop_columns": True})
    assert res.ok, res.text
    assert ledger(db, "003") == []
    for table, cols in NEW_COLUMNS.items():
        assert not cols & set(columns(db, table)), table
    assert not {"processing_stage", "retry_count"} & set(columns(db, "bcfy_calls_raw_nonpartitioned"))
    assert db.scalar("SELECT to_regclass('dbops.p3_added_columns')") is None
    # the application's old statements and the reverse sync still work
    db.query("UPDATE bcfy_calls_raw SET processed = false WHERE call_uid = %s", (recent_call(db),))
    assert db.scalar("SELECT dbops.p2_verify('bcfy_calls_raw')")["status"] == "ok"
    res = migrate_direct(db, "003")   # re-apply (in process: same runner, same ledger)
    assert [m["version"] for m in res["applied"]] == PHASE3_FILES, res
    assert_phase3_present(db)
    assert "processing_stage" in columns(db, "bcfy_calls_raw_nonpartitioned")
