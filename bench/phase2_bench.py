#!/usr/bin/env python3
"""Phase 2 benchmark: prints numbers measured in ONE run on this machine (not a timed test).

  .venv/bin/python bench/phase2_bench.py                 # default scale: 200 000 calls (a few minutes)
  .venv/bin/python bench/phase2_bench.py --calls 500000
  .venv/bin/python bench/phase2_bench.py --scale seed    # the guide's volumes: 2.5 M calls, 0.75 M transcripts,
                                                         # 10 M metrics, 5 M logs

It starts its own PostgreSQL 15 (fsync on, like the demo) on a free loopback port, seeds it, runs
Phase 1, then measures:
  * per table: rows/s of a single `INSERT INTO copy SELECT ... FROM table` (same indexes), and the
    Phase 2 backfill's rows/s, and their ratio;
  * Phase 2 wall time (playbooks/phase2.yml) while tools/workload runs the application's statements:
    their p50/p99/max latency and failures;
  * the guide's three validation queries (time range, full-text, dashboard) before and after, as ratios.
Writes the numbers as JSON next to the printout (--json).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psycopg2

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import workload  # noqa: E402  (the package tools/workload)

TABLES = ["bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs"]
QUERIES = {
    "time_range": "SELECT COUNT(*) FROM bcfy_calls_raw WHERE started_at > NOW() - INTERVAL '7 days'",
    "full_text": ("SELECT id, ts_rank(tsv, query) AS rank FROM transcripts, plainto_tsquery('english', 'police') query "
                  "WHERE tsv @@ query LIMIT 10"),
    "dashboard": ("SELECT COUNT(*) AS calls_24h, COUNT(DISTINCT feed_id) AS active_feeds, "
                  "AVG(duration_ms::NUMERIC) / 1000 AS avg_duration_sec FROM bcfy_calls_raw "
                  "WHERE started_at > NOW() - INTERVAL '24 hours'"),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_query(conn, sql, runs=5):
    times = []
    with conn.cursor() as cur:
        for _ in range(runs):
            t0 = time.perf_counter()
            cur.execute(sql)
            cur.fetchall()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def copy_rate(conn, table):
    """rows/s of one INSERT INTO copy SELECT ... FROM table into a table with the same indexes."""
    with conn.cursor() as cur:
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema='public' AND table_name=%s "
                    "AND is_generated = 'NEVER' ORDER BY ordinal_position", (table,))
        cols = ", ".join('"%s"' % r[0] for r in cur.fetchall())
        cur.execute(f"DROP TABLE IF EXISTS bench_copy; CREATE TABLE bench_copy (LIKE public.{table} INCLUDING ALL)")
        t0 = time.perf_counter()
        cur.execute(f"INSERT INTO bench_copy ({cols}) SELECT {cols} FROM public.{table}")
        rows = cur.rowcount
        secs = time.perf_counter() - t0
        cur.execute("DROP TABLE bench_copy")
    return rows, secs


def playbook(env, name, extra=None):
    cmd = [str(REPO / ".venv/bin/ansible-playbook"), "-i", "inventory/local", f"playbooks/{name}.yml"]
    for k, v in (extra or {}).items():
        cmd += ["-e", f"{k}={v}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{name} failed:\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200000)
    ap.add_argument("--scale", choices=["default", "seed"], default="default",
                    help="seed = the guide's volumes (2.5 M calls + 0.75 M transcripts, 10 M metrics, 5 M logs)")
    ap.add_argument("--rate", type=float, default=150, help="application statements/s during Phase 2")
    ap.add_argument("--json", default=str(REPO / "bench" / "last_run.json"))
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
        conn = psycopg2.connect(**ck)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ANALYZE")
            cur.execute("SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES))
            out["rows"] = dict(zip(TABLES, cur.fetchone()))
        out["copy"] = {}
        for t in TABLES:
            rows, secs = copy_rate(conn, t)
            out["copy"][t] = {"rows": rows, "seconds": round(secs, 2), "rows_per_s": round(rows / secs)}
        out["queries_before_ms"] = {k: round(timed_query(conn, q), 2) for k, q in QUERIES.items()}
        out["phase2_prepare_s"] = round(playbook(env, "phase2_prepare"), 1)
        conn.close()

        keys = d / "keys.jsonl"
        wl = workload.Workload(ck, rate=a.rate, upsert="call_uid_started_at", keys_path=str(keys), max_duration=7200)
        wl.start()
        time.sleep(2)
        try:
            out["phase2_s"] = round(playbook(env, "phase2"), 1)
        finally:
            s = wl.stop()
        out["workload"] = {"statements": s["statements"], "failed": s["failed"], **s["latency_ms"],
                           "max_stall_ms": s["max_stall_ms"]}
        out["lost_rows"] = workload.check_keys(ck, str(keys))["missing_total"]
        conn = psycopg2.connect(**ck)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ANALYZE")
            cur.execute("SELECT table_name, rows_done, backfill_seconds FROM dbops.p2_state")
            out["backfill"] = {r[0]: {"rows": r[1], "seconds": float(r[2]),
                                      "rows_per_s": round(r[1] / float(r[2])) if r[2] else None} for r in cur.fetchall()}
        out["queries_after_ms"] = {k: round(timed_query(conn, q), 2) for k, q in QUERIES.items()}
        conn.close()
    finally:
        if not a.keep:
            subprocess.run([str(REPO / "scripts/pg_embedded.sh"), "destroy"], env=env, stdout=subprocess.DEVNULL)
            shutil.rmtree(d, ignore_errors=True)

    print(f"\nPhase 2 benchmark, {calls} calls, rows: {out['rows']}")
    print(f"seed {out['seed_s']} s, Phase 1 {out['phase1_s']} s, Phase 2 step 0 {out['phase2_prepare_s']} s, "
          f"Phase 2 {out['phase2_s']} s (wall, under {a.rate:.0f} app statements/s)")
    print(f"{'table':<18}{'copy rows/s':>14}{'backfill rows/s':>17}{'ratio':>8}")
    for t in TABLES:
        c, b = out["copy"][t]["rows_per_s"], out["backfill"].get(t, {}).get("rows_per_s") or 0
        out["backfill"].setdefault(t, {})["ratio_to_copy"] = round(b / c, 2) if c else None
        print(f"{t:<18}{c:>14}{b:>17}{(b / c if c else 0):>8.2f}")
    w = out["workload"]
    print(f"application during Phase 2: {w['statements']} statements, {w['failed']} failed, p50 {w['p50']:.1f} ms, "
          f"p99 {w['p99']:.1f} ms, max {w['max']:.0f} ms; lost rows: {out['lost_rows']}")
    for k in QUERIES:
        b, f = out["queries_before_ms"][k], out["queries_after_ms"][k]
        print(f"guide query {k:<11} before {b:8.2f} ms  after {f:8.2f} ms  speed-up {b / f if f else 0:6.2f}x")
    pathlib.Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"(JSON: {a.json})")


if __name__ == "__main__":
    main()
