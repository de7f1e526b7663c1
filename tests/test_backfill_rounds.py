"""A backfill of many rounds runs to the end in one playbook run (issue 20, item 1).

The backfill's rounds (one CALL dbops.p2_backfill each, partition_round_seconds) were a task file that
included itself once per round: ansible-core died with RecursionError between 200 and 250 rounds (~50
minutes of 15 s rounds), each level slower than the last. They are now a loop in the scanner.dbops.backfill
action. Here phase2.yml copies bcfy_calls_raw one row per batch and one batch per round
(partition_round_seconds = 0) over 1 000 calls: 1 001 rounds in one task (the last finds nothing left). Asserted: the run
succeeds with every round's progress line printed, the table is swapped with every row, and at round 1 000
the mean time of the last ten rounds and the controller's and the worker's memory are within 1.5x of round
10 (printed).
"""
from __future__ import annotations

from playbook_runner import migrate_direct, run_playbook

CALLS = 1000
VARS = {"partition_round_seconds": 0, "partition_upsert_probe_seconds": 1, "partition_batch_rows": 20000,
        "partition_batch_rows_by_table": {"bcfy_calls_raw": 1}, "partition_recount_max_rows": 0}


def test_more_than_a_thousand_rounds_in_one_run(make_db):
    db = make_db(cron=True, seed_calls=CALLS)
    for phase in ("001", "002"):
        migrate_direct(db, phase)
    rows = db.scalar("SELECT count(*) FROM bcfy_calls_raw")
    res = run_playbook(db, "phase2", extra_vars=VARS, timeout=2400)
    assert res.ok, res.text
    (calls,) = [r for n, st, r in res.tasks
                if "Backfill in committed batches" in n and (r.get("result") or {}).get("table") == "bcfy_calls_raw"]
    assert calls["rounds"] >= 1000, calls["rounds"]
    assert calls["rows_copied"] == rows, (calls["rows_copied"], rows)
    assert res.shows("bcfy_calls_raw: round 1000: "), "the progress line of round 1000 was not shown"
    assert db.scalar("SELECT step FROM dbops.p2_status() WHERE table_name = 'bcfy_calls_raw'") == "swapped"
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw") == rows
    s10, s1000 = calls["samples"]["10"], calls["samples"]["1000"]
    print("\nrounds: %d in %.0f s; round 10: %.0f ms, worker %d kB, controller %d kB; round 1000: %.0f ms, "
          "worker %d kB, controller %d kB" % (calls["rounds"], calls["seconds"], s10["round_ms"], s10["worker_rss_kb"],
                                                s10["controller_rss_kb"], s1000["round_ms"], s1000["worker_rss_kb"],
                                                s1000["controller_rss_kb"]))
    assert s1000["round_ms"] <= 1.5 * s10["round_ms"], (s10, s1000)
    for k in ("worker_rss_kb", "controller_rss_kb"):
        assert 0 < s1000[k] <= 1.5 * s10[k], (k, s10, s1000)
