"""phase2.yml's backfill under strain (issue 11, part 1), through the real playbook.

1. Two application sessions stay active (pg_sleep) with partition_health_max_active_sessions = 1 and a
   time budget of 3 s (partition_backfill_max_seconds): every round prints
   `paused: 2 active sessions > 1 (... still waiting)`, no row is copied, the run stops with the budget's
   message (rows copied, how long it paused and why), the lock is released, nothing is lost.
2. The sessions end; the next run continues to four swapped tables and its report (JSON, Markdown,
   HTML) has the backfill pauses section. (A WAL-rate threshold was used here to make that run pause:
   whether the batches of a small table cross it depends on the machine's speed, so it failed on a quiet
   machine; pauses themselves are proven deterministically in tests/test_backfill_health.py.)
"""
from __future__ import annotations

import json
import threading

import psycopg2

from conftest import wait_for
from playbook_runner import migrate_direct, run_playbook

TABLES = ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs")
FAST = {"partition_round_seconds": 1, "partition_upsert_probe_seconds": 1, "partition_batch_rows": 100,
        "partition_batch_rows_by_table": {}, "partition_health_check_seconds": 0.2}


def _sleep(conn):
    try:
        with conn.cursor() as cur:
            cur.execute("SET application_name = 'test-busy'")
            cur.execute("SELECT pg_sleep(600)")
    except psycopg2.Error:
        pass   # cancelled by the test


def test_playbook_pauses_reports_and_keeps_its_budget(make_db):
    db = make_db(cron=True, seed_calls=2000)
    for phase in ("001", "002"):
        migrate_direct(db, phase)

    # 1. Two active sessions > 1 pause it; 3 s of budget. (Their transactions are older than the
    #    preflight's default bound: raised for this test.)
    sleepers = [db.connect() for _ in range(2)]
    threads = []
    for c in sleepers:
        c.autocommit = True
        t = threading.Thread(target=_sleep, args=(c,))
        t.start()
        threads.append((c, t))
    try:
        wait_for(lambda: db.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'test-busy' "
                                   "AND state = 'active'") == 2, 30, "the busy sessions")
        res = run_playbook(db, "phase2", extra_vars={**FAST, "partition_backfill_max_seconds": 3,
                                                     "partition_health_max_active_sessions": 1,
                                                     "preflight_max_xact_age_seconds": 3600}, timeout=600)
    finally:
        for c, t in threads:
            db.query("SELECT pg_cancel_backend(%s)", (c.get_backend_pid(),))
            t.join(30)
            c.close()
    assert not res.ok, res.text
    assert res.shows("paused: 2 active sessions > 1"), res.text
    fail = res.failure_text
    assert "bcfy_calls_raw: the backfill used its time budget, partition_backfill_max_seconds = 3" in fail, fail
    assert "0/2000 rows copied, paused " in fail and "(2 active sessions > 1)" in fail, fail
    assert "Nothing is lost: run the playbook again to continue" in fail, fail
    step, done = db.query("SELECT step, rows_done FROM dbops.p2_state WHERE table_name = 'bcfy_calls_raw'")[0]
    assert step == "backfilling" and done == 0, (step, done)
    assert db.scalar("SELECT count(*) FROM dbops.run_lock") == 0

    # 2. The sessions gone, the next run continues to the end; its report has the pauses section
    #    (what a pause looks like in it: tests/test_report_html.py's sample).
    res = run_playbook(db, "phase2", extra_vars=FAST, timeout=900)
    assert res.ok, res.text
    for t in TABLES:
        assert db.scalar("SELECT step FROM dbops.p2_status() WHERE table_name = %s", (t,)) == "swapped", t
    assert db.scalar("SELECT rows_done FROM dbops.p2_state WHERE table_name = 'bcfy_calls_raw'") == 2000
    (report,) = res.report_dir.rglob("002_*.json")
    pauses = json.loads(report.read_text())["backfill_pauses"]
    assert isinstance(pauses, list), pauses
    md = report.with_suffix(".md").read_text()
    assert "## Backfill pauses" in md
    html = report.with_suffix(".html").read_text()
    assert 'id="pauses"' in html
    print(f"\nplaybook: {len(pauses)} pause(s) in the second run's report")
