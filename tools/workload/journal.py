"""The journal of committed writes and the check that nothing was lost.

KeyLog writes a JSON-lines keys file: a "meta" record per run, then one record per write, written
only after its COMMIT returned; its record types are KEY_TABLES. check_keys() loads one or more
keys files and proves with anti-joins that every journaled key is still in the database.
"""
from __future__ import annotations

import csv
import io
import json
import os
import threading

from .db import APP_NAME, connect, describe_target

# Keys-file record types checked by `check`.
KEY_TABLES = ("bcfy_calls_raw", "bcfy_calls_raw.processed", "transcripts", "processing_state",
              "api_call_metrics", "system_logs")


class KeyLog:
    """JSON-lines journal of committed writes (written only after the commit returned)."""

    def __init__(self, path: str | None, meta: dict):
        self.path = path
        self.lock = threading.Lock()
        self.fh = open(path, "w", encoding="utf-8") if path else None
        self.write({"t": "meta", **meta})

    def write(self, rec: dict):
        if self.fh is None:
            return
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        with self.lock:
            if self.fh is not None:
                self.fh.write(line)

    def flush(self):
        with self.lock:
            if self.fh is not None:
                self.fh.flush()

    def close(self):
        with self.lock:
            if self.fh is not None:
                self.fh.flush()
                os.fsync(self.fh.fileno())
                self.fh.close()
                self.fh = None


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------

_CHECKS = {
    # record type: (temp-table columns, anti-join SQL returning the missing keys)
    "bcfy_calls_raw": (
        "call_uid text, started_at timestamptz",
        "SELECT k.call_uid, k.started_at::text FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM bcfy_calls_raw c "
        "WHERE c.call_uid = k.call_uid AND c.started_at IS NOT DISTINCT FROM k.started_at)"),
    "bcfy_calls_raw.processed": (
        "call_uid text",
        "SELECT k.call_uid FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM bcfy_calls_raw c "
        "WHERE c.call_uid = k.call_uid AND c.processed IS TRUE)"),
    "transcripts": (
        "id bigint, call_uid text",
        "SELECT k.id::text, k.call_uid FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM transcripts t "
        "WHERE t.id = k.id AND t.call_uid IS NOT DISTINCT FROM k.call_uid)"),
    "processing_state": (
        "call_uid text, status text",
        "SELECT k.call_uid, k.status FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM processing_state p "
        "WHERE p.call_uid = k.call_uid AND p.status = k.status)"),
    "api_call_metrics": (
        "id bigint",
        "SELECT k.id::text FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM api_call_metrics m WHERE m.id = k.id)"),
    "system_logs": (
        "id bigint",
        "SELECT k.id::text FROM pg_temp.wl_check_keys k WHERE NOT EXISTS (SELECT 1 FROM system_logs l WHERE l.id = k.id)"),
}
_CHECK_FIELDS = {
    "bcfy_calls_raw": ("call_uid", "started_at"),
    "bcfy_calls_raw.processed": ("call_uid",),
    "transcripts": ("id", "call_uid"),
    "processing_state": ("call_uid", "status"),
    "api_call_metrics": ("id",),
    "system_logs": ("id",),
}


def load_keys(paths: list[str]) -> tuple[dict[str, dict], int, list[dict]]:
    """-> ({record type: {key tuple: None}}, unreadable line count, meta records).
    For processing_state the last recorded status of a call wins (it is an upsert)."""
    keys: dict[str, dict] = {t: {} for t in _CHECKS}
    bad = 0
    metas = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                    t = rec["t"]
                except (ValueError, KeyError, TypeError):
                    bad += 1          # e.g. a last line cut by a kill -9
                    continue
                if t == "meta":
                    metas.append(rec)
                    continue
                if t not in _CHECKS:
                    bad += 1
                    continue
                fields = _CHECK_FIELDS[t]
                try:
                    if t == "processing_state":
                        keys[t][rec["call_uid"]] = rec["status"]
                    else:
                        keys[t][tuple(rec[f] for f in fields)] = None
                except KeyError:
                    bad += 1
    keys["processing_state"] = {(k, v): None for k, v in keys["processing_state"].items()}
    return keys, bad, metas


def check_keys(conn_kwargs: dict, keys_paths, sample: int = 5) -> dict:
    """Verify that every committed write journaled in keys file(s) is still in the database."""
    if isinstance(keys_paths, (str, os.PathLike)):
        keys_paths = [str(keys_paths)]
    keys, bad, metas = load_keys(list(keys_paths))
    conn = connect(conn_kwargs, APP_NAME + "-check")
    report = {"target": describe_target(conn_kwargs), "keys_files": list(keys_paths),
              "unreadable_lines": bad, "runs": [m.get("run_tag") for m in metas], "tables": {}}
    try:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = 0")
            for t, (cols, sql) in _CHECKS.items():
                entries = list(keys[t])
                res = {"expected": len(entries), "missing": 0, "missing_sample": []}
                if entries:
                    cur.execute(f"CREATE TEMP TABLE wl_check_keys ({cols}) ON COMMIT DROP")
                    buf = io.StringIO()
                    w = csv.writer(buf, lineterminator="\n")
                    for e in entries:
                        w.writerow(["" if v is None else v for v in e])
                    buf.seek(0)
                    cur.copy_expert("COPY pg_temp.wl_check_keys FROM STDIN WITH (FORMAT csv)", buf)
                    cur.execute("ANALYZE pg_temp.wl_check_keys")
                    cur.execute(sql)
                    missing = cur.fetchall()
                    res["missing"] = len(missing)
                    res["missing_sample"] = [list(m) for m in missing[:sample]]
                    cur.execute("DROP TABLE pg_temp.wl_check_keys")
                report["tables"][t] = res
        conn.rollback()
    finally:
        conn.close()
    report["missing_total"] = sum(r["missing"] for r in report["tables"].values())
    report["ok"] = report["missing_total"] == 0
    return report
