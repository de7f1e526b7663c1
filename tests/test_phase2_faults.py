"""Phase 2 faults around the swap, through the real playbook, while the application writes.

The swap is made to wait: the test prepares bcfy_calls_raw itself (dbops.p2_prepare: shadow table +
capture trigger, exactly what the playbook's first step does) and holds ACCESS SHARE on the shadow
table from another session. The application never touches the shadow, so it does not notice; the
playbook backfills and verifies, then its swap waits on the lock (lock_timeout 500 ms, backoff).
While it waits:

* test_second_run_refused_and_connection_cut_during_swap: a second phase2.yml is started and must
  stop in preflight naming the holder; then the swapping session is killed server-side
  (pg_terminate_backend, as a failover or a network cut would): dbops_step reopens the connection and
  runs the idempotent step again; the blocker lets go; the first run ends correctly.
* test_controller_killed_during_step_then_resumed[p2_verify|p2_swap]: the controller is SIGKILLed
  (whole process tree) while the verification (held on the engine's event log) or the swap is
  retrying; the next run (taking over the dead run's lease) finishes.

Both assert: 0 failed application statements, no statement stalled beyond the bound, every committed
key present afterwards, all four tables swapped, counts and checksums verified by the playbook, no
INVALID index.
"""
from __future__ import annotations

import sys
import threading
import time

import psycopg2
import pytest

from conftest import conn_kwargs, wait_for
from playbook_runner import REPO, finish, kill_tree, run_playbook, start_playbook

sys.path.insert(0, str(REPO / "tools"))
import workload  # noqa: E402  (the package tools/workload)

STALL_BOUND_MS = 2000
# 5 000 calls, ~1 500 transcripts, 20 000 metrics, 10 000 logs: with 3 000 only transcripts are
# recounted under the swap's lock, the others rely on the verification (both paths run).
FAST = {"partition_round_seconds": 2, "partition_upsert_probe_seconds": 1, "partition_recount_max_rows": 3000}
TABLES = ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs")


@pytest.fixture
def ready_db(make_db):
    """Phase 1 and Phase 2 step 0 applied on 5 000 calls; pg_cron present."""
    db = make_db(cron=True, seed_calls=5000)
    for pb in ("phase1", "phase2_prepare"):
        res = run_playbook(db, pb, timeout=600)
        assert res.ok, res.text
    return db


def prepare_calls(db) -> str:
    """dbops.p2_prepare('bcfy_calls_raw') until it is prepared; returns the shadow table's name."""
    for _ in range(50):
        r = db.scalar("SELECT dbops.p2_prepare('bcfy_calls_raw')")
        if r.get("status") != "retry":
            break
        time.sleep(0.2)
    step, shadow = db.query("SELECT step, shadow_name FROM dbops.p2_state WHERE table_name = 'bcfy_calls_raw'")[0]
    assert step in ("prepared", "backfilling"), step
    return shadow


class ShadowBlocker:
    """Holds ACCESS SHARE on the shadow table: only the swap (ACCESS EXCLUSIVE on it) has to wait."""

    def __init__(self, db, shadow):
        self.conn = db.connect()
        with self.conn.cursor() as cur:
            cur.execute("SET application_name = 'test-shadow-blocker'")
            cur.execute(f"LOCK TABLE public.{shadow} IN ACCESS SHARE MODE")

    def release(self):
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


class EventLogBlocker:
    """Holds SHARE on dbops.p2_events: p2_verify, which logs its result there last (after it has
    compared and updated the progress row, in the same transaction), has to wait. An already
    prepared and backfilled table makes the playbook's prepare and backfill steps return without
    logging, and the application never touches the engine's log."""

    def __init__(self, db):
        self.conn = db.connect()
        with self.conn.cursor() as cur:
            cur.execute("SET application_name = 'test-event-log-blocker'")
            cur.execute("LOCK TABLE dbops.p2_events IN SHARE MODE")

    release = ShadowBlocker.release


def backfill_calls(db):
    """Backfill bcfy_calls_raw to the end directly (what the playbook's backfill rounds do)."""
    for _ in range(200):
        if db.scalar("CALL dbops.p2_backfill('bcfy_calls_raw', 5000, 5, NULL)")["status"] == "done":
            return
    raise AssertionError("backfill did not finish")


def step_waiting(db, fn="p2_swap"):
    """The pid of a dbops session waiting for a lock in the engine function fn, or None."""
    rows = db.query("SELECT pid FROM pg_stat_activity WHERE application_name = 'scanner-dbops step' "
                    "AND query LIKE %s AND wait_event_type = 'Lock'", (f"%{fn}%",), superuser=True)
    return rows[0][0] if rows else None


def still_running(proc, prep) -> bool:
    """True while the started playbook runs; fails the test with its output once it has stopped
    (a run that failed early must not leave the test waiting for a step it will never reach)."""
    if proc.poll() is None:
        return True
    res = finish(proc, prep, timeout=5)
    raise AssertionError("the playbook stopped (rc %s) before its step waited for the lock:\n%s" % (res.rc, res.text))


def swap_waiting(db):
    return step_waiting(db, "p2_swap")


def assert_converted_and_intact(db, wl_summary, keys_path):
    assert wl_summary["failed"] == 0, wl_summary["failures"][:5]
    assert wl_summary["statements"] > 100, wl_summary
    assert wl_summary["max_stall_ms"] < STALL_BOUND_MS, wl_summary["max_stall_ms"]
    check = workload.check_keys(conn_kwargs(db), str(keys_path))
    assert check["ok"], check
    for t in TABLES:
        assert db.scalar("SELECT step FROM dbops.p2_status() WHERE table_name = %s", (t,)) == "swapped", t
        assert db.scalar("SELECT relkind::text FROM pg_class WHERE oid = %s::regclass", (f"public.{t}",)) == "p", t
        assert db.scalar("SELECT to_regclass(%s) IS NOT NULL", (f"public.{t}_nonpartitioned",)), t
    assert db.scalar("SELECT count(*) FROM pg_index WHERE NOT indisvalid") == 0
    assert db.scalar("SELECT count(*) FROM dbops.run_lock") == 0, "the run lock was not released"


def test_second_run_refused_and_connection_cut_during_swap(ready_db, tmp_path):
    db = ready_db
    keys = tmp_path / "keys.jsonl"
    wl = workload.Workload(conn_kwargs(db), rate=120, upsert="call_uid_started_at", keys_path=str(keys),
                           max_duration=600)
    wl.start()
    blocker = None
    try:
        blocker = ShadowBlocker(db, prepare_calls(db))
        proc, prep = start_playbook(db, "phase2", extra_vars=FAST)
        victim = wait_for(lambda: still_running(proc, prep) and swap_waiting(db), 480, "the swap of bcfy_calls_raw to wait for its lock")

        # a second run while the first one holds the migration lock: stops in preflight, names the holder
        second = run_playbook(db, "phase2", extra_vars=FAST, timeout=300)
        assert second.rc != 0, second.text
        assert "another migration run holds the lock on this database" in second.failure_text, second.text
        assert "-e run_lock_force=true" in second.failure_text, second.text
        assert not any("p2_swap" in str(t) or "Swap" in t for t in second.task_names("ok")), second.text
        assert proc.poll() is None, "the first run stopped while the second one was refused"

        # the connection of the swapping session is cut server-side
        assert db.query("SELECT pg_terminate_backend(%s)", (victim,), superuser=True)[0][0]
        wait_for(lambda: (swap_waiting(db) or 0) not in (0, victim), 60, "the swap to run again on a new connection")
        blocker.release()
        res = finish(proc, prep, timeout=600)
    finally:
        if blocker:
            blocker.release()
        s = wl.stop()
    assert res.ok, res.text
    swaps = [r for n, st, r in res.tasks if "Swap the partitioned table in" in n and st == "ok"]
    assert len(swaps) == 4, res.text
    assert [r["result"]["recount"] for r in swaps] == [False, True, False, False], [r["result"] for r in swaps]
    calls_swap = swaps[0]
    assert calls_swap["reconnects"] >= 1, calls_swap
    assert any(n.startswith("reconnect 1") and "connection was lost" in n for n in calls_swap["notices"]), calls_swap
    assert "reconnect 1 in" in res.stdout, "the operator is not shown the reconnect"
    assert_converted_and_intact(db, s, keys)


@pytest.mark.parametrize("step", ["p2_verify", "p2_swap"])
def test_controller_killed_during_step_then_resumed(ready_db, tmp_path, step):
    """SIGKILL the controller (whole process tree) while the verification or the swap of
    bcfy_calls_raw is in progress (held waiting on a lock, retrying); the next run finishes."""
    db = ready_db
    keys = tmp_path / "keys.jsonl"
    wl = workload.Workload(conn_kwargs(db), rate=120, upsert="call_uid_started_at", keys_path=str(keys),
                           max_duration=600)
    wl.start()
    blocker = None
    try:
        shadow = prepare_calls(db)
        if step == "p2_verify":
            backfill_calls(db)
            blocker = EventLogBlocker(db)
        else:
            blocker = ShadowBlocker(db, shadow)
        proc, prep = start_playbook(db, "phase2", extra_vars=FAST)
        wait_for(lambda: still_running(proc, prep) and step_waiting(db, step), 480, f"{step} of bcfy_calls_raw to wait for its lock")
        kill_tree(proc.pid)
        proc.wait(timeout=30)
        finish(proc, prep, timeout=30)
        # the dead run's session gives up at its lock_timeout; nothing half-done remains
        wait_for(lambda: not step_waiting(db, step), 30, f"the orphaned {step} attempt to end")
        assert db.scalar("SELECT relkind::text FROM pg_class WHERE oid = 'public.bcfy_calls_raw'::regclass") == "r"
        assert db.scalar("SELECT step FROM dbops.p2_state WHERE table_name = 'bcfy_calls_raw'") == \
            ("backfilled" if step == "p2_verify" else "verified")
        blocker.release()
        res = run_playbook(db, "phase2", extra_vars={**FAST, "run_lock_force": "true"}, timeout=600)
    finally:
        if blocker:
            blocker.release()
        s = wl.stop()
    assert res.ok, res.text
    assert_converted_and_intact(db, s, keys)
