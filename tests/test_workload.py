"""tools/workload (a package run as `python tools/workload`): the simulated application that
measures a migration's downtime.

Runs it (in-process and as a CLI) against fresh baseline databases of the embedded server:
every statement kind runs without failure, the committed-writes journal is verified by
`check` (and a lost row is detected), the post-partitioning upsert target needs its unique
index, a lock held by another session shows up as a stall, lost connections are survived,
and the CLI stops on --until-file and on SIGTERM with its summary written.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import conn_kwargs

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "workload"      # the package's folder: python tools/workload run|check ...

sys.path.insert(0, str(REPO / "tools"))
import workload  # noqa: E402  (the package tools/workload)

ALL_KINDS = sorted(workload.STATEMENTS)


def cli_conn(db, pwfile: pathlib.Path) -> list[str]:
    return ["--host", db.host, "--port", str(db.port), "--dbname", db.name, "--user", db.user,
            "--password-file", str(pwfile)]


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSFILE"] = "/nonexistent"      # only --password-file may provide the password
    return env


def run_cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def seed(db, n: int = 20):
    """A few application rows: unprocessed calls of the last hour, two of them transcribed."""
    db.query("""
        INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, feed_id, tg_id, started_at, ended_at,
                                    duration_ms, raw_json)
        SELECT 'seed' || i || '-' || ts, 'seed' || i, ts, 9001 + i %% 3, 70001 + i %% 5,
               to_timestamp(ts), to_timestamp(ts) + interval '5 s', 5000, '{"seed": true}'
        FROM (SELECT i, extract(epoch FROM now())::bigint - 60 * i AS ts
              FROM generate_series(1, %s) i) s""", (n,))
    db.query("""
        INSERT INTO transcripts (call_uid, text, language, model_name, duration_seconds, confidence)
        SELECT call_uid, 'police unit responding seed', 'en', 'whisper-small', 5, 0.9
        FROM bcfy_calls_raw ORDER BY call_uid LIMIT 2""")


def read_keys(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def assert_every_kind_ran_clean(summ: dict):
    assert summ["failed"] == 0, summ["failures"]
    assert not summ["internal_errors"], summ["internal_errors"]
    assert not summ["anomalies"], summ["anomalies"]
    for kind in ALL_KINDS:
        assert summ["kinds"].get(kind, {}).get("ok", 0) > 0, f"no successful {kind}: {summ['kinds']}"


def test_cli_run_then_check_detects_lost_rows(make_db, tmp_path):
    db = make_db(baseline=True)
    seed(db)
    pwfile = tmp_path / "pw"
    pwfile.write_text(db.password + "\n")
    pwfile.chmod(0o600)
    keys, summary = tmp_path / "keys.jsonl", tmp_path / "summary.json"

    res = run_cli("run", *cli_conn(db, pwfile), "--duration", "3", "--rate", "300",
                  "--keys", str(keys), "--summary", str(summary))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert db.password not in out
    assert "workload: " in res.stdout and " statements, 0 failed, p50 " in res.stdout, res.stdout

    summ = json.loads(summary.read_text())
    assert_every_kind_ran_clean(summ)
    assert summ["stop_reason"] == "duration" and 2.5 < summ["duration_s"] < 6
    assert summ["statements"] == sum(k["ok"] + k["failed"] for k in summ["kinds"].values())
    assert summ["max_stall_ms"] == max(k["max_ms"] for k in summ["kinds"].values())
    for kind in summ["kinds"].values():
        assert kind["p50_ms"] <= kind["p99_ms"] <= kind["max_ms"]
    for table in workload.KEY_TABLES:
        assert summ["writes"][table] > 0, table
    assert summ["connections"]["reconnects"] == 0 and summ["timeline"]

    recs = read_keys(keys)
    assert recs[0]["t"] == "meta" and db.password not in keys.read_text()
    by_t: dict[str, list] = {}
    for r in recs[1:]:
        by_t.setdefault(r["t"], []).append(r)
    assert len(by_t["bcfy_calls_raw"]) == summ["writes"]["bcfy_calls_raw"]
    # the audio worker took the oldest unprocessed calls first: the seed rows
    assert any(r["call_uid"].startswith("seed") for r in by_t["bcfy_calls_raw.processed"])
    assert db.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'scanner-workload'") == 0

    res = run_cli("check", *cli_conn(db, pwfile), "--keys", str(keys))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "check: OK" in res.stdout

    # lose committed writes: one inserted call, one update, one metric row
    transcribed = {r["call_uid"] for r in by_t.get("transcripts", [])}
    processed = {r["call_uid"] for r in by_t["bcfy_calls_raw.processed"]}
    victim = next(r["call_uid"] for r in by_t["bcfy_calls_raw"]
                  if r["call_uid"] not in transcribed and r["call_uid"] not in processed)
    db.query("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (victim,))
    db.query("UPDATE bcfy_calls_raw SET processed = false WHERE call_uid = %s",
             (sorted(processed)[0],))
    db.query("DELETE FROM api_call_metrics WHERE id = %s", (by_t["api_call_metrics"][0]["id"],))

    res = run_cli("check", *cli_conn(db, pwfile), "--keys", str(keys), "--json", str(tmp_path / "c.json"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "check: bcfy_calls_raw: " in res.stdout and "FAILED: 3 committed writes missing" in res.stdout
    report = json.loads((tmp_path / "c.json").read_text())
    missing = {t: r["missing"] for t, r in report["tables"].items()}
    assert missing == {"bcfy_calls_raw": 1, "bcfy_calls_raw.processed": 1, "transcripts": 0,
                       "processing_state": 0, "api_call_metrics": 1, "system_logs": 0}
    assert report["tables"]["bcfy_calls_raw"]["missing_sample"][0][0] == victim

    # a journal cut short by a kill -9 (half a line) is tolerated
    with keys.open("a") as fh:
        fh.write('{"t":"system_logs","id":')
    rep = workload.check_keys(conn_kwargs(db), str(keys))
    assert rep["unreadable_lines"] == 1 and rep["missing_total"] == 3


def test_upsert_call_uid_started_at_needs_a_matching_unique_index(make_db, tmp_path):
    db = make_db(baseline=True)
    seed(db)
    # baseline: no unique index on (call_uid, started_at) -> the ingest fails (42P10), the rest runs
    s1 = workload.Workload(conn_kwargs(db), rate=300, upsert="call_uid_started_at", duration=1.0).run()
    assert s1["kinds"]["ingest"]["failed"] > 0 and s1["kinds"]["ingest"]["ok"] == 0
    assert {f["sqlstate"] for f in s1["failures"]} == {"42P10"}
    assert s1["failed"] == sum(v for k, v in s1["failure_counts"].items() if k.startswith("ingest"))
    assert s1["kinds"]["metrics_insert"]["ok"] > 0 and s1["kinds"]["api_fts"]["ok"] > 0
    assert s1["connections"]["lost"] == 0       # a failed statement is not a lost connection

    db.query("CREATE UNIQUE INDEX ON bcfy_calls_raw (call_uid, started_at)")
    keys = tmp_path / "keys.jsonl"
    wl = workload.Workload(conn_kwargs(db), rate=300, upsert="call_uid_started_at", duration=2.0,
                           keys_path=str(keys), dup_ratio=0.2)
    s2 = wl.run()
    assert_every_kind_ran_clean(s2)
    assert "(call_uid, started_at)" in wl.sql["ingest"]
    assert workload.check_keys(conn_kwargs(db), str(keys))["ok"]


def test_lock_held_by_another_session_is_measured_as_a_stall(make_db, tmp_path):
    db = make_db(baseline=True)
    seed(db)
    keys = tmp_path / "keys.jsonl"
    locked = threading.Event()

    def hold_lock():
        conn = db.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("LOCK TABLE bcfy_calls_raw IN ACCESS EXCLUSIVE MODE")
                locked.set()
                time.sleep(1.5)
            conn.commit()
        finally:
            conn.close()

    with workload.Workload(conn_kwargs(db), rate=300, keys_path=str(keys)) as wl:
        time.sleep(0.6)
        t = threading.Thread(target=hold_lock)
        t.start()
        t.join()
        time.sleep(0.6)
    summ = wl.summary()
    assert locked.is_set()
    assert summ["failed"] == 0, summ["failures"]
    assert 1400 <= summ["max_stall_ms"] < 5000, summ["max_stall"]
    assert summ["roles"]["ingest"]["max_gap_ms"] >= 1400
    assert summ["roles"]["metrics"]["max_gap_ms"] < 1000     # other tables kept working
    assert workload.check_keys(conn_kwargs(db), str(keys))["ok"]
    assert workload.human_line(summ).startswith(f"workload: {summ['statements']} statements, 0 failed, p50 ")


def test_survives_terminated_connections(make_db, tmp_path):
    db = make_db(baseline=True)
    seed(db)
    keys = tmp_path / "keys.jsonl"
    wl = workload.Workload(conn_kwargs(db), rate=300, keys_path=str(keys)).start()
    try:
        time.sleep(1.0)
        killed = db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'scanner-workload' AND datname = %s", (db.name,))
        assert len(killed) == 6
        time.sleep(1.5)
    finally:
        summ = wl.stop()
    assert summ["connections"]["lost"] >= 1
    assert summ["connections"]["reconnects"] == summ["connections"]["lost"]
    assert summ["connections"]["connects"] == 6 + summ["connections"]["reconnects"]
    assert 1 <= summ["failed"] <= 6     # at most one failed statement per killed session
    assert {f["sqlstate"] for f in summ["failures"]} <= {"08006", "08003", "57P01"}, summ["failures"]
    assert not summ["internal_errors"]
    late = [b for b in summ["timeline"] if b["t"] >= 2]
    assert late and sum(b["ok"] for b in late) > 50        # it went on after the kill
    assert workload.check_keys(conn_kwargs(db), str(keys))["ok"]


def test_cli_stops_on_until_file_and_on_sigterm(make_db, tmp_path):
    db = make_db(baseline=True)
    seed(db)
    pwfile = tmp_path / "pw"
    pwfile.write_text(db.password + "\n")
    stop_file = tmp_path / "stop"

    def start(name, *extra):
        return subprocess.Popen([sys.executable, str(TOOL), "run", *cli_conn(db, pwfile), "--rate", "200",
                                 "--keys", str(tmp_path / f"{name}.jsonl"),
                                 "--summary", str(tmp_path / f"{name}.json"), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())

    p_file = start("file", "--until-file", str(stop_file))
    p_term = start("term", "--duration", "120")
    try:
        time.sleep(2.0)
        stop_file.touch()
        p_term.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out_file, err_file = p_file.communicate(timeout=15)
        out_term, err_term = p_term.communicate(timeout=15)
        assert time.monotonic() - t0 < 5
    finally:
        for p in (p_file, p_term):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p_file.returncode == 0, out_file + err_file
    assert p_term.returncode == 0, out_term + err_term
    s_file = json.loads((tmp_path / "file.json").read_text())
    s_term = json.loads((tmp_path / "term.json").read_text())
    assert s_file["stop_reason"] == "until-file" and s_term["stop_reason"] == "SIGTERM"
    for s in (s_file, s_term):
        assert s["failed"] == 0 and s["statements"] > 100 and s["duration_s"] < 10
    assert "workload: " in out_term
    res = run_cli("check", *cli_conn(db, pwfile), "--keys", str(tmp_path / "file.jsonl"),
                  "--keys", str(tmp_path / "term.jsonl"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_hard_max_duration_stops_by_itself(make_db):
    db = make_db(baseline=True)
    wl = workload.Workload(conn_kwargs(db), rate=100, max_duration=1.0).start()
    try:
        assert wl.wait(timeout=10)
    finally:
        summ = wl.stop()
    assert summ["stop_reason"] == "max-duration" and summ["duration_s"] < 4
    assert summ["failed"] == 0 and summ["statements"] > 0


def test_unreachable_database_is_counted_not_fatal():
    wl = workload.Workload({"host": "127.0.0.1", "port": 1, "dbname": "x", "user": "x", "password": "x"},
                           rate=100, duration=0.8, roles=["metrics"])
    summ = wl.run()
    assert summ["statements"] == 0
    assert summ["connections"]["connect_failures"] >= 1
    assert summ["failures"][0]["kind"] == "connect"
    with pytest.raises(ValueError):
        workload.Workload({}, upsert="started_at")


def test_stop_while_blocked_cancels_without_counting_failures(make_db):
    db = make_db(baseline=True)
    seed(db)
    holder = db.connect()
    try:
        wl = workload.Workload(conn_kwargs(db), rate=300, stop_grace_s=0.5).start()
        time.sleep(0.5)
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE bcfy_calls_raw IN ACCESS EXCLUSIVE MODE")
        time.sleep(1.0)
        t0 = time.monotonic()
        summ = wl.stop()
        assert time.monotonic() - t0 < 3.0
    finally:
        holder.rollback()
        holder.close()
    assert summ["failed"] == 0, summ["failures"]
    assert summ["cancelled_at_stop"] >= 1
    assert summ["max_stall_ms"] >= 900 and summ["shutdown_s"] < 3.0
    assert summ["roles"]["metrics"]["max_gap_ms"] < 900      # the tail gap ends at the stop request
