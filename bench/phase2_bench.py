#!/usr/bin/env python3
"""Phase 2 benchmark: prints numbers measured in ONE run on this machine (not a timed test).

  .venv/bin/python bench/phase2_bench.py                 # default scale: 200 000 calls
  .venv/bin/python bench/phase2_bench.py --scale seed    # the guide's volumes: 2.5 M calls, 0.75 M transcripts,
                                                         # 10 M metrics, 5 M logs

It starts its own PostgreSQL 15 (fsync on, like the demo) on a free loopback port, seeds it, runs
Phase 1, then measures, with tools/workload running the application's statements (--rate per second)
during every step that changes something:
  * Phase 2 (playbooks/phase2.yml): wall time, and the engine's conversion time (prepare to swap, per
    table); the application's p50/p99/max stall; peak extra disk (database size sampled every second)
    against the four tables' size;
  * the floor: one INSERT ... SELECT per table into the same partitioned layout (the partitions and
    indexes Phase 2 made), summed; Phase 2's conversion time / floor;
  * the guide's own method (rename the table, create the partitioned one, INSERT ... SELECT, in one
    transaction, table by table; rolled back here, so nothing changes): its time and how long it blocks
    the application's writers;
  * finalize_phase2.yml, then the guide's DELETE of the expired rows (rolled back) against
    CALL cleanup_old_data() for the same rows, each with the application's max stall;
  * the guide's three validation queries (median of 5) before Phase 2, after it, and after the cleanup.
Writes the numbers as JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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


def plain(query: str) -> str:
    """A guide query on the plain copies Phase 2 keeps in sync until finalize (<table>_nonpartitioned)."""
    for t in TABLES:
        query = re.sub(rf"\b{t}\b", f"{t}_nonpartitioned", query)
    return query


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


def playbook(env, name, extra=None):
    cmd = [str(REPO / ".venv/bin/ansible-playbook"), "-i", "inventory/local", f"playbooks/{name}.yml"]
    for k, v in (extra or {}).items():
        cmd += ["-e", f"{k}={v}"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{name} failed:\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def layout_copy_sql(conn, table: str, copy: str) -> list:
    """Statements that create `copy`: partitioned like public.<table> now is (same key, same partition
    bounds), with its columns, defaults, constraints and indexes (LIKE ... INCLUDING ALL)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_get_partkeydef(%s::regclass)", (f"public.{table}",))
        key = cur.fetchone()[0]
        cur.execute("SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                    "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass ORDER BY 1",
                    (f"public.{table}",))
        parts = cur.fetchall()
    out = [f"CREATE TABLE public.{copy} (LIKE public.{table} INCLUDING ALL) PARTITION BY {key}"]
    out += [f"CREATE TABLE public.{copy}_{n} PARTITION OF public.{copy} {bound}" for n, (_, bound) in enumerate(parts)]
    return out


def insert_cols(conn, table: str) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_schema='public' AND table_name=%s "
                    "AND is_generated = 'NEVER' ORDER BY ordinal_position", (table,))
        return ", ".join('"%s"' % r[0] for r in cur.fetchall())


def guide_method(ck: dict, table: str) -> dict:
    """The guide's conversion of one table, in one transaction, rolled back: RENAME the table (writers
    wait from here), CREATE the partitioned one (layout of Phase 2's), INSERT ... SELECT every row.
    Returns the transaction's seconds (writers blocked) and the INSERT's (the floor)."""
    conn = psycopg2.connect(**ck)
    try:
        cols = insert_cols(conn, table)
        ddl = layout_copy_sql(conn, table, "bench_new")
        with conn.cursor() as cur:
            t0 = time.perf_counter()
            cur.execute(f"ALTER TABLE public.{table} RENAME TO bench_old")
            for stmt in ddl:
                cur.execute(stmt.replace(f"public.{table}", "public.bench_old"))
            t1 = time.perf_counter()
            cur.execute(f"INSERT INTO public.bench_new ({cols}) SELECT {cols} FROM public.bench_old")
            rows = cur.rowcount
            t2 = time.perf_counter()
        conn.rollback()
        t3 = time.perf_counter()
    finally:
        conn.close()
    return {"rows": rows, "insert_s": round(t2 - t1, 2), "transaction_s": round(t3 - t0, 2),
            "rows_per_s": round(rows / (t2 - t1)) if t2 > t1 else None}


class DiskSampler(threading.Thread):
    """pg_database_size every second: the peak above the size at the start."""

    def __init__(self, ck):
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(**ck)
        self.conn.autocommit = True
        self.stop = threading.Event()
        self.start_bytes = self.size()
        self.peak = self.start_bytes

    def size(self) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_database_size(current_database())")
            return cur.fetchone()[0]

    def run(self):
        while not self.stop.wait(1.0):
            self.peak = max(self.peak, self.size())

    def finish(self) -> dict:
        self.stop.set()
        self.join(5)
        self.peak = max(self.peak, self.size())
        self.conn.close()
        return {"start_bytes": self.start_bytes, "peak_bytes": self.peak, "extra_bytes": self.peak - self.start_bytes}


def under_workload(ck, rate, keys, fn):
    """fn() while the application's statements run; (fn's result, the workload's summary)."""
    wl = workload.Workload(ck, rate=rate, upsert="call_uid_started_at", keys_path=str(keys), max_duration=7200)
    wl.start()
    time.sleep(2)
    try:
        res = fn()
        time.sleep(1)
    finally:
        s = wl.stop()
    return res, {"statements": s["statements"], "failed": s["failed"], **s["latency_ms"],
                 "max_stall_ms": s["max_stall_ms"], "max_stall_kind": (s.get("max_stall") or {}).get("kind")}


def expired_delete(ck: dict, cap_s: float) -> dict:
    """The guide's cleanup: DELETE the rows older than each table's retention, one transaction per
    table, rolled back here (the engine's cleanup then works on the same rows). Each DELETE is capped
    at cap_s seconds (statement_timeout): at seed scale the one on bcfy_calls_raw fires a per-row
    reference action for every row and ran past 17 minutes; a capped table counts as cap_s, so the
    total is a lower bound and says so."""
    conn = psycopg2.connect(**ck)
    out = {}
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name, time_column, retention FROM app_retention_policies "
                        "WHERE partition_interval IS NOT NULL ORDER BY 1")
            pols = cur.fetchall()
        conn.rollback()
        for t, col, keep in pols:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL statement_timeout = %s", (f"{int(cap_s * 1000)}ms",))
                t0 = time.perf_counter()
                try:
                    cur.execute(f'DELETE FROM public.{t} WHERE "{col}" < now() - %s::interval', (keep,))
                    out[t] = {"rows": cur.rowcount, "seconds": round(time.perf_counter() - t0, 2), "capped": False}
                except psycopg2.errors.QueryCanceled:
                    out[t] = {"rows": None, "seconds": round(time.perf_counter() - t0, 2), "capped": True}
            conn.rollback()
    finally:
        conn.close()
    return {"tables": out, "seconds": round(sum(v["seconds"] for v in out.values()), 2),
            "capped": [t for t, v in out.items() if v["capped"]], "cap_s": cap_s}


def engine_cleanup(ck: dict) -> dict:
    conn = psycopg2.connect(**ck)
    conn.autocommit = True
    dropped = refs = 0
    per_table: dict = {}
    t0 = time.perf_counter()
    try:
        with conn.cursor() as cur:
            while True:
                cur.execute("CALL cleanup_old_data(max_partitions => 1000)")
                res = cur.fetchone()[0]
                dropped += len(res["dropped"])
                refs += sum(x["references_cleared"] for x in res["dropped"])
                for x in res["dropped"]:   # each partition's detach, references, proof and drop
                    t = per_table.setdefault(x["table"], {"partitions": 0, "seconds": 0.0, "references_cleared": 0})
                    t["partitions"] += 1
                    t["seconds"] = round(t["seconds"] + float(x.get("seconds") or 0), 3)
                    t["references_cleared"] += x["references_cleared"]
                if not res["dropped"] or res["errors"]:
                    break
    finally:
        conn.close()
    return {"seconds": round(time.perf_counter() - t0, 2), "dropped": dropped, "references_cleared": refs,
            "tables": per_table, "errors": res["errors"]}


def table_bytes(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute("SELECT c.relname, coalesce((SELECT sum(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i "
                    "WHERE i.inhparent = c.oid), 0) + pg_total_relation_size(c.oid) FROM pg_class c "
                    "WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY(%s)", (TABLES,))
        return {r[0]: int(r[1]) for r in cur.fetchall()}


def partition_counts(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute("SELECT parent, count(*) FROM monitoring.partition_health WHERE parent = ANY(%s) GROUP BY 1",
                    (TABLES,))
        return dict(cur.fetchall())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200000)
    ap.add_argument("--scale", choices=["default", "seed"], default="default",
                    help="seed = the guide's volumes (2.5 M calls + 0.75 M transcripts, 10 M metrics, 5 M logs)")
    ap.add_argument("--rate", type=float, default=150, help="application statements/s during each measured step")
    ap.add_argument("--delete-cap", type=float, default=300,
                    help="seconds each table's guide DELETE may run (statement_timeout); capped ones make the total a lower bound")
    ap.add_argument("--json", default=str(REPO / "bench" / "last_run.json"))
    ap.add_argument("--keep", action="store_true", help="leave the server running")
    a = ap.parse_args()
    calls = 2500000 if a.scale == "seed" else a.calls

    d = pathlib.Path(tempfile.mkdtemp(prefix="scanner-bench-", dir="/var/tmp"))
    d.chmod(0o755)
    port = free_port()
    env = {**os.environ, "PG_EMBED_DIR": str(d / "pg"), "PG_EMBED_PORT": str(port),
           "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    out = {"calls": calls, "rate": a.rate, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_at_start": os.getloadavg()}
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
            cur.execute("VACUUM ANALYZE")   # the tables as a long-running production database has them
            cur.execute("SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES))
            out["rows"] = dict(zip(TABLES, cur.fetchone()))
        out["table_bytes_before"] = table_bytes(conn)
        out["queries_before_ms"] = {k: round(timed_query(conn, q), 2) for k, q in QUERIES.items()}
        out["phase2_prepare_s"] = round(playbook(env, "phase2_prepare"), 1)
        conn.close()
        keys = [d / f"keys_{n}.jsonl" for n in range(4)]

        disk = DiskSampler(ck)
        disk.start()
        t = time.perf_counter()
        _, out["workload_phase2"] = under_workload(ck, a.rate, keys[0], lambda: playbook(env, "phase2"))
        out["phase2_s"] = round(time.perf_counter() - t, 1)
        out["disk_phase2"] = disk.finish()
        conn = psycopg2.connect(**ck)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT table_name, rows_done, backfill_seconds, extract(epoch FROM swapped_at - prepared_at) "
                        "FROM dbops.p2_state")
            out["engine"] = {r[0]: {"rows": r[1], "backfill_s": float(r[2]), "convert_s": round(float(r[3]), 2),
                                    "backfill_rows_per_s": round(r[1] / float(r[2])) if r[2] else None}
                             for r in cur.fetchall()}
        out["partitions_after_phase2"] = partition_counts(conn)
        # what the operator gets right after the swap: no manual VACUUM or ANALYZE here
        out["queries_after_ms"] = {k: round(timed_query(conn, q), 2) for k, q in QUERIES.items()}
        # the same rows, the same moment: the plain tables Phase 2 keeps in sync until finalize (the
        # workload added rows to both since "before", which alone slows the 7-day and 24-hour counts)
        out["queries_plain_copy_ms"] = {k: round(timed_query(conn, plain(q)), 2) for k, q in QUERIES.items()}
        conn.close()

        def guide_all():
            return {t: guide_method(ck, t) for t in TABLES}
        out["guide_method"], out["workload_guide_method"] = under_workload(ck, a.rate, keys[1], guide_all)

        out["finalize_s"] = round(playbook(env, "finalize_phase2", {"finalize_phase2_confirm": "DROP"}), 1)
        out["guide_delete"], out["workload_guide_delete"] = under_workload(ck, a.rate, keys[2],
                                                                          lambda: expired_delete(ck, a.delete_cap))
        out["cleanup"], out["workload_cleanup"] = under_workload(ck, a.rate, keys[3], lambda: engine_cleanup(ck))
        conn = psycopg2.connect(**ck)
        conn.autocommit = True
        out["partitions_after_cleanup"] = partition_counts(conn)
        out["queries_after_cleanup_ms"] = {k: round(timed_query(conn, q), 2) for k, q in QUERIES.items()}
        conn.close()
        out["lost_rows"] = workload.check_keys(ck, [str(k) for k in keys])["missing_total"]
    finally:
        if not a.keep:
            subprocess.run([str(REPO / "scripts/pg_embedded.sh"), "destroy"], env=env, stdout=subprocess.DEVNULL)
            shutil.rmtree(d, ignore_errors=True)
    report(out, calls, a)
    pathlib.Path(a.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"(JSON: {a.json})")


def _w(w: dict) -> str:
    return (f"{w['statements']} statements, {w['failed']} failed, p50 {w['p50']:.1f} ms, p99 {w['p99']:.1f} ms, "
            f"max stall {w['max_stall_ms']:.0f} ms ({w['max_stall_kind']})")


def _deletes(gd: dict) -> str:
    parts = []
    for t, v in gd["tables"].items():
        parts.append(f"{t} >= {v['seconds']} s (capped)" if v["capped"] else f"{t} {v['rows']} rows in {v['seconds']} s")
    return ", ".join(parts)


def report(out: dict, calls: int, a):
    mb = 1024 * 1024
    print(f"\nPhase 2 benchmark, {calls} calls, rows: {out['rows']}; load at start {out['load_at_start']}")
    print(f"seed {out['seed_s']} s, Phase 1 {out['phase1_s']} s, Phase 2 step 0 {out['phase2_prepare_s']} s")
    floor = sum(g["insert_s"] for g in out["guide_method"].values())
    conv = sum(e["convert_s"] for e in out["engine"].values())
    print(f"Phase 2: {out['phase2_s']} s wall (preflight, backup, report included); conversion (prepare to swap, "
          f"summed over the tables) {conv:.1f} s")
    print(f"floor (one INSERT ... SELECT per table, same partitions and indexes) {floor:.1f} s: "
          f"conversion / floor = {conv / floor:.2f}x (target <= 1.5x); wall / floor = {out['phase2_s'] / floor:.2f}x")
    print(f"{'table':<18}{'floor rows/s':>14}{'backfill rows/s':>17}{'convert s':>11}{'guide blocks writers s':>24}")
    for t in TABLES:
        g, e = out["guide_method"][t], out["engine"].get(t, {})
        print(f"{t:<18}{g['rows_per_s'] or 0:>14}{e.get('backfill_rows_per_s') or 0:>17}{e.get('convert_s', 0):>11}"
              f"{g['transaction_s']:>24}")
    print(f"application during Phase 2: {_w(out['workload_phase2'])} (targets p99 < 100 ms, max stall < 1 s)")
    gm = sum(g["transaction_s"] for g in out["guide_method"].values())
    print(f"the guide's method: {gm:.1f} s of transactions, each blocking its table's writers throughout; "
          f"application meanwhile: {_w(out['workload_guide_method'])}")
    dk, tb = out["disk_phase2"], sum(out["table_bytes_before"].values())
    print(f"peak extra disk during Phase 2: {dk['extra_bytes'] / mb:.0f} MB = {dk['extra_bytes'] / tb:.2f}x the four "
          f"tables ({tb / mb:.0f} MB)")
    gd, cl = out["guide_delete"], out["cleanup"]
    print(f"retention: the guide's DELETE {'>= ' if gd['capped'] else ''}{gd['seconds']} s ({_deletes(gd)}) "
          f"(application: {_w(out['workload_guide_delete'])}); cleanup_old_data() {cl['seconds']} s, "
          f"{cl['dropped']} partitions, {cl['references_cleared']} references cleared (application: "
          f"{_w(out['workload_cleanup'])}): {'>= ' if gd['capped'] else ''}{gd['seconds'] / cl['seconds']:.0f}x faster "
          f"(target >= 100x)")
    for t, c in sorted(cl.get("tables", {}).items()):   # per table: the guide's DELETE of the same rows vs ours
        d = gd["tables"].get(t, {})
        ratio = f"{d['seconds'] / c['seconds']:.1f}x" if c["seconds"] and d.get("seconds") else "-"
        print(f"  {t:<18} DELETE {'>= ' if d.get('capped') else ''}{d.get('seconds', '-')} s | cleanup {c['seconds']} s "
              f"({c['partitions']} partitions, {c['references_cleared']} references cleared): "
              f"{'>= ' if d.get('capped') else ''}{ratio}")
    print(f"partitions after Phase 2 {out['partitions_after_phase2']}, after the cleanup {out['partitions_after_cleanup']}")
    print("guide queries, median of 5 (speed = before / after; target >= 1.0x):")
    for k in QUERIES:
        b, f, c = out["queries_before_ms"][k], out["queries_after_ms"][k], out["queries_after_cleanup_ms"][k]
        pc = out["queries_plain_copy_ms"][k]
        print(f"  {k:<11} before Phase 2 {b:7.2f} ms | after it {f:7.2f} ms ({b / f if f else 0:5.2f}x) vs the plain "
              f"copy, same rows, same moment {pc:7.2f} ms ({pc / f if f else 0:5.2f}x) | after the cleanup {c:7.2f} ms "
              f"({b / c if c else 0:5.2f}x)")
    print(f"lost rows (every committed write of the application checked): {out['lost_rows']}")


if __name__ == "__main__":
    main()
