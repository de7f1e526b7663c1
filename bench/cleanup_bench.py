#!/usr/bin/env python3
"""Retention benchmark (issue 9, item 6): the first CALL cleanup_old_data() after a conversion, under
the application workload. Prints numbers measured in ONE run on this machine (not a timed test).

  .venv/bin/python bench/cleanup_bench.py                 # 200 000 calls (about 10 minutes here)
  .venv/bin/python bench/cleanup_bench.py --calls 500000
  .venv/bin/python bench/cleanup_bench.py --scale seed    # the guide's volumes: 2.5 M calls (long)

It starts its own PostgreSQL 15 (fsync on, like the demo) on a free loopback port, seeds a year of
history (playbooks/demo_seed.yml), runs Phase 1, Phase 2 and finalize_phase2.yml, then starts
tools/workload (the application's statements, --rate per second) and runs the first
CALL cleanup_old_data(max_partitions => 1000) - hundreds of expired partitions, references to clear -
and reports the application's latency while it ran: max stall (longest statement or wait), p99, max,
failures, lost rows; and what the cleanup did (partitions dropped, references cleared, seconds).
Writes the numbers as JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import psycopg2

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "bench"))
import workload  # noqa: E402  (the package tools/workload)
from phase2_bench import free_port, playbook  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200000)
    ap.add_argument("--scale", choices=["default", "seed"], default="default",
                    help="seed = the guide's volumes (2.5 M calls, ...)")
    ap.add_argument("--rate", type=float, default=150, help="application statements/s during the cleanup")
    ap.add_argument("--json", default=str(REPO / "bench" / "last_cleanup_run.json"))
    ap.add_argument("--keep", action="store_true", help="leave the server running")
    a = ap.parse_args()
    calls = 2500000 if a.scale == "seed" else a.calls

    d = pathlib.Path(tempfile.mkdtemp(prefix="scanner-bench-", dir="/var/tmp"))
    d.chmod(0o755)
    port = free_port()
    env = {**os.environ, "PG_EMBED_DIR": str(d / "pg"), "PG_EMBED_PORT": str(port),
           "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    out = {"calls": calls, "rate": a.rate}
    try:
        subprocess.run([str(REPO / "scripts/pg_embedded.sh"), "start"], env=env, check=True, stdout=subprocess.DEVNULL)
        pw = (d / "pg" / "scan.password").read_text().strip()
        ck = dict(host="127.0.0.1", port=port, dbname="scanner", user="scan", password=pw)
        t = time.perf_counter()
        playbook(env, "demo_seed", {"demo_seed_calls": calls})
        out["seed_s"] = round(time.perf_counter() - t, 1)
        out["phase1_s"] = round(playbook(env, "phase1"), 1)
        out["phase2_s"] = round(playbook(env, "phase2"), 1)
        out["finalize_s"] = round(playbook(env, "finalize_phase2", {"finalize_phase2_confirm": "DROP"}), 1)
        conn = psycopg2.connect(**ck)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ANALYZE")
            cur.execute("SELECT parent, count(*), sum(rows_estimate)::bigint FROM monitoring.partition_health "
                        "WHERE status = 'EXPIRED' GROUP BY 1 ORDER BY 1")
            out["expired"] = {r[0]: {"partitions": r[1], "rows_estimate": r[2]} for r in cur.fetchall()}
            cur.execute("SELECT count(*) FROM transcripts t JOIN bcfy_calls_raw c USING (call_uid) "
                        "WHERE c.started_at < now() - interval '90 days'")
            out["references_to_expired_calls"] = cur.fetchone()[0]

        keys = d / "keys.jsonl"
        wl = workload.Workload(ck, rate=a.rate, upsert="call_uid_started_at", keys_path=str(keys), max_duration=7200)
        wl.start()
        time.sleep(3)
        runs = []
        try:
            with conn.cursor() as cur:
                while True:
                    t = time.perf_counter()
                    cur.execute("SELECT clock_timestamp()::text")
                    started = cur.fetchone()[0]
                    cur.execute("CALL cleanup_old_data(max_partitions => 1000)")
                    res = cur.fetchone()[0]
                    cur.execute("SELECT clock_timestamp()::text")
                    runs.append({"started": started, "ended": cur.fetchone()[0],
                                 "seconds": round(time.perf_counter() - t, 2), "dropped": len(res["dropped"]),
                                 "references_cleared": sum(x["references_cleared"] for x in res["dropped"]),
                                 "errors": res["errors"]})
                    if not res["dropped"] or res["errors"]:
                        break
            time.sleep(3)
        finally:
            s = wl.stop()
        conn.close()
        out["cleanup"] = runs
        out["workload"] = {"statements": s["statements"], "failed": s["failed"], **s["latency_ms"],
                           "max_stall_ms": s["max_stall_ms"], "max_stall": s["max_stall"],
                           "timeline": s.get("timeline")}   # per-second max latency: when the stall happened
        out["lost_rows"] = workload.check_keys(ck, str(keys))["missing_total"]
    finally:
        if not a.keep:
            subprocess.run([str(REPO / "scripts/pg_embedded.sh"), "destroy"], env=env, stdout=subprocess.DEVNULL)
            shutil.rmtree(d, ignore_errors=True)

    print(f"\nRetention benchmark, {calls} calls; seed {out['seed_s']} s, Phase 1 {out['phase1_s']} s, "
          f"Phase 2 {out['phase2_s']} s, finalize {out['finalize_s']} s")
    print("expired before the first cleanup:", ", ".join(f"{k} {v['partitions']} partitions (~{v['rows_estimate']} rows)"
                                                         for k, v in out["expired"].items()),
          f"; {out['references_to_expired_calls']} transcripts reference expired calls")
    for i, r in enumerate(out["cleanup"], 1):
        print(f"cleanup run {i} ({r['started']} .. {r['ended']}): {r['seconds']} s, {r['dropped']} partitions dropped, "
              f"{r['references_cleared']} references cleared, errors: {r['errors'] or 'none'}")
    w = out["workload"]
    print(f"application during the cleanup ({a.rate:.0f} statements/s): {w['statements']} statements, {w['failed']} failed, "
          f"p50 {w['p50']:.1f} ms, p99 {w['p99']:.1f} ms, max {w['max']:.0f} ms, max stall {w['max_stall_ms']:.0f} ms "
          f"({w['max_stall']['kind']}); lost rows: {out['lost_rows']}")
    pathlib.Path(a.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"(JSON: {a.json})")


if __name__ == "__main__":
    main()
