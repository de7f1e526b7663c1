"""Phase 2 through the real playbooks while the application's workload runs, measured.

The story an operator lives through:
1. phase2.yml with the ingester still on ON CONFLICT (call_uid): the run refuses in its preflight
   (before the run lock and the backup), naming the statement to switch to and phase2_prepare.yml,
   which installs the new unique key that statement needs. Nothing converted, no backup taken, the
   application saw no failure. phase2_prepare.yml then installs the engine and the unique key.
2. The ingester switches to ON CONFLICT (call_uid, started_at) (it works on today's table now);
   phase2.yml converts all four tables while the workload runs: 0 failed statements, no statement
   stalled beyond the bound, every committed row present afterwards, pruning proven.
3. A second run changes nothing.
4. rollback_phase2.yml without -e rollback_confirm=ROLLBACK stops before changing anything.
5. rollback_phase2.yml under the same workload: rows written after the swap are in the restored
   plain tables; 0 failures.
"""
from __future__ import annotations

import sys

import pytest

from conftest import conn_kwargs, create_db
from playbook_runner import REPO, ROLLBACK, db_state, run_playbook

sys.path.insert(0, str(REPO / "tools"))
import workload  # noqa: E402  (the package tools/workload)

# Application statements may wait behind the swap's short lock: lock_timeout (500 ms) + the time
# the swap holds it. Anything above this bound is downtime.
STALL_BOUND_MS = 2000
FAST = {"partition_round_seconds": 3, "partition_upsert_probe_seconds": 2}


@pytest.fixture(scope="module")
def cron_db(pg_server):
    # phase2 schedules pg_cron jobs: use the server's pg_cron database.
    db = create_db(pg_server, baseline=True, seed_calls=20000, cron=True)
    res = run_playbook(db, "phase1", timeout=600)
    assert res.ok, res.text
    return db


def run_under_workload(db, playbook, upsert, tmp_path, extra_vars=None, name="wl"):
    keys = tmp_path / f"{name}.jsonl"
    wl = workload.Workload(conn_kwargs(db), rate=150, upsert=upsert, keys_path=str(keys), max_duration=900)
    wl.start()
    try:
        res = run_playbook(db, playbook, extra_vars={**FAST, **(extra_vars or {})}, timeout=900)
    finally:
        summary = wl.stop()
    return res, summary, keys


def test_phase2_online_story(cron_db, tmp_path):
    db = cron_db
    # 1. The old upsert is still in use: refuse before converting anything.
    res, s, keys = run_under_workload(db, "phase2", "call_uid", tmp_path, name="old_upsert")
    assert not res.ok
    assert "ON CONFLICT (call_uid, started_at) DO NOTHING" in res.failure_text, res.text
    assert "run playbooks/phase2_prepare.yml first" in res.failure_text, res.text
    assert db.scalar("SELECT relkind::text FROM pg_class WHERE oid = 'public.bcfy_calls_raw'::regclass") == "r"
    assert db.scalar("SELECT count(*) FROM dbops.run_lock") == 0, "the refusing run must release its lock"
    assert not (res.backup_dir.exists() and any(res.backup_dir.iterdir())), "a refused run took a backup"
    assert s["failed"] == 0, s["failures"][:5]
    assert workload.check_keys(conn_kwargs(db), str(keys))["ok"]
    # Step 0, as the refusal said: the engine and the unique key the new statement needs.
    res = run_playbook(db, "phase2_prepare", timeout=600)
    assert res.ok, res.text

    # 2. The ingester switched: convert all four tables under load.
    res, s, keys = run_under_workload(db, "phase2", "call_uid_started_at", tmp_path, name="convert")
    assert res.ok, res.text
    print("\nphase2 under workload:", workload.human_line(s))
    assert s["failed"] == 0, s["failures"][:5]
    assert s["max_stall_ms"] < STALL_BOUND_MS, s["max_stall"]
    assert s["statements"] > 100
    check = workload.check_keys(conn_kwargs(db), str(keys))
    assert check["ok"], check
    for t in ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs"):
        assert db.scalar(f"SELECT relkind::text FROM pg_class WHERE oid = 'public.{t}'::regclass") == "p", t
        assert db.scalar("SELECT step FROM dbops.p2_status() WHERE table_name = %s", (t,)) == "swapped"
    assert res.shows("Partition pruning"), res.text
    # issue 11: every copied partition the retention keeps was vacuumed before its swap (visibility map
    # for index-only scans); the expired history is left to the first cleanup, which drops it
    unvacuumed = db.query(
        "SELECT h.partition FROM monitoring.partition_health h JOIN pg_stat_all_tables s "
        "ON s.relid = format('public.%I', h.partition)::regclass "
        "WHERE h.parent IN ('bcfy_calls_raw', 'transcripts', 'api_call_metrics', 'system_logs') "
        "AND h.status NOT IN ('EXPIRED', 'FUTURE') AND NOT h.is_default AND h.rows_estimate > 0 "
        "AND s.last_vacuum IS NULL AND s.last_autovacuum IS NULL")
    assert unvacuumed == [], unvacuumed
    assert db.scalar("SELECT count(*) FROM monitoring.partition_health WHERE status <> 'EXPIRED' "
                     "AND parent IN ('bcfy_calls_raw', 'system_logs') AND rows_estimate > 0") >= 4
    assert res.shows(": vacuumed, "), res.text
    jobs = dict(db.query("SELECT jobname, schedule FROM cron.job"))
    assert jobs == {"maintain-partitions": "0 0 * * *", "cleanup-old-data": "0 2 * * *"}

    # 3. Idempotent.
    res = run_playbook(db, "phase2", extra_vars=FAST, timeout=600)
    assert res.ok, res.text
    assert res.changed == 0, res.task_names("changed")

    # 4. Rollback: refused without -e rollback_confirm=ROLLBACK, after its read-only checks.
    before = db_state(db)
    res = run_playbook(db, "rollback_phase2", extra_vars=FAST, timeout=600)
    assert not res.ok and "-e rollback_confirm=ROLLBACK" in res.failure_text, res.text
    assert "swaps the synced <table>_nonpartitioned tables back" in res.failure_text, res.text
    res = run_playbook(db, "rollback_phase2", extra_vars=FAST, check=True, timeout=600)   # no word needed
    assert res.ok, res.text
    assert db_state(db) == before

    # 5. Rollback under load: nothing written after the swap is lost.
    res, s, keys = run_under_workload(db, "rollback_phase2", "call_uid_started_at", tmp_path, extra_vars=ROLLBACK,
                                      name="rollback")
    assert res.ok, res.text
    print("rollback_phase2 under workload:", workload.human_line(s))
    assert s["failed"] == 0, s["failures"][:5]
    assert s["max_stall_ms"] < STALL_BOUND_MS, s["max_stall"]
    for t in ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs"):
        assert db.scalar(f"SELECT relkind::text FROM pg_class WHERE oid = 'public.{t}'::regclass") == "r", t
    for name in ("convert", "rollback"):
        check = workload.check_keys(conn_kwargs(db), str(tmp_path / f"{name}.jsonl"))
        assert check["ok"], (name, check)
    # the restored reference is a real, validated foreign key again
    assert db.scalar("SELECT convalidated FROM pg_constraint WHERE conname = 'transcripts_call_fk'") is True


def test_phase2_killed_during_backfill_then_resumed(cron_db, tmp_path):
    """SIGKILL the playbook while a table is backfilling (the application keeps writing); the next
    run (taking over the dead run's lease) continues to a correct end: counts and checksums verified,
    every committed row present, no INVALID index, no failed application statement."""
    import os
    import signal
    import time

    from playbook_runner import finish, kill_tree, start_playbook

    db = cron_db
    if db.scalar("SELECT relkind::text FROM pg_class WHERE oid = 'public.bcfy_calls_raw'::regclass") == "p":
        run_playbook(db, "rollback_phase2", extra_vars={**FAST, **ROLLBACK}, timeout=600)
    # step 0 first: the ingester's new unique key must exist before the workload uses it
    prep_res = run_playbook(db, "phase2_prepare", timeout=600)
    assert prep_res.ok, prep_res.text
    keys = tmp_path / "kill.jsonl"
    wl = workload.Workload(conn_kwargs(db), rate=150, upsert="call_uid_started_at", keys_path=str(keys),
                           max_duration=900)
    wl.start()
    try:
        slow = {**FAST, "partition_batch_rows": 200, "partition_round_seconds": 1}
        proc, prep = start_playbook(db, "phase2", extra_vars=slow)
        deadline = time.time() + 300
        killed_at = None
        while time.time() < deadline and proc.poll() is None:
            rows = db.query("SELECT table_name, step, rows_done FROM dbops.p2_state") \
                if db.scalar("SELECT to_regclass('dbops.p2_state') IS NOT NULL") else []
            busy = [r for r in rows if r[1] == "backfilling" and r[2] > 0]
            if busy:
                kill_tree(proc.pid)
                killed_at = busy[0]
                break
            time.sleep(0.2)
        proc.wait(timeout=30)
        finish(proc, prep, timeout=30)
        assert killed_at, "the playbook finished before it could be killed mid-backfill"
        res = run_playbook(db, "phase2", extra_vars={**FAST, "run_lock_force": "true"}, timeout=900)
    finally:
        s = wl.stop()
    assert res.ok, res.text
    assert s["failed"] == 0, s["failures"][:5]
    check = workload.check_keys(conn_kwargs(db), str(keys))
    assert check["ok"], check
    for t in ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs"):
        assert db.scalar("SELECT step FROM dbops.p2_status() WHERE table_name = %s", (t,)) == "swapped", t
    assert db.scalar("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0


def test_finalize_phase2_needs_drop_then_drops(cron_db):
    """finalize_phase2.yml: --check and a run without -e finalize_phase2_confirm=DROP change nothing
    and name what would go; with the word each old copy is re-verified and dropped, no row is lost;
    a second run changes nothing (and needs no word: nothing is left to drop)."""
    db = cron_db
    tables = ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs")
    if any(db.scalar("SELECT step FROM dbops.p2_status() WHERE table_name = %s", (t,)) != "swapped"
           for t in tables):
        res = run_playbook(db, "phase2", extra_vars=FAST, timeout=900)
        assert res.ok, res.text
    counts = {t: db.scalar(f"SELECT count(*) FROM public.{t}") for t in tables}
    before = db_state(db)

    res = run_playbook(db, "finalize_phase2", extra_vars=FAST, check=True, timeout=600)
    assert res.ok, res.text
    assert res.shows("bcfy_calls_raw_nonpartitioned"), res.text
    res = run_playbook(db, "finalize_phase2", extra_vars=FAST, timeout=600)
    assert not res.ok and "-e finalize_phase2_confirm=DROP" in res.failure_text, res.text
    assert "Nothing was changed" in res.failure_text and "system_logs" in res.failure_text, res.text
    assert db_state(db) == before

    res = run_playbook(db, "finalize_phase2", extra_vars={**FAST, "finalize_phase2_confirm": "DROP"}, timeout=900)
    assert res.ok, res.text
    assert res.changed > 0
    for t in tables:
        assert db.scalar("SELECT to_regclass(%s)", (f"public.{t}_nonpartitioned",)) is None, t
        assert db.scalar("SELECT step FROM dbops.p2_status() WHERE table_name = %s", (t,)) == "finalized", t
        assert db.scalar(f"SELECT count(*) FROM public.{t}") == counts[t], t
    assert db.scalar("SELECT count(*) FROM dbops.run_lock") == 0

    res = run_playbook(db, "finalize_phase2", extra_vars=FAST, timeout=600)
    assert res.ok, res.text
    assert res.changed == 0, res.task_names("changed")
