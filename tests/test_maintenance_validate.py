"""playbooks/validate.yml and playbooks/maintenance.yml on a real PostgreSQL, in file order:

  validate --check before Phase 1 (no baseline: says so, changed=0)
  -> phase1 (saves dbops.perf_baseline before migrating) -> phase2
  -> validate (ratios and verdicts against the baseline; pruning and GIN assertions hold)
  -> maintenance (first run) -> maintenance again: healthy, changed=0, VACUUM not due, pg_cron
     history not readable (USAGE revoked) reported as a finding, not a crash
  -> maintenance with the VACUUM due today: VACUUM ANALYZE runs; old pg_cron runs are purged
  -> maintenance with one failing step of the daily jobs: the rest done, the run fails naming it
  -> health-only run with a row in a DEFAULT partition, a failed pg_cron run and a long-running
     query: exits non-zero naming the three findings, changed=0, report written first.

Plus unit tests of the validate role's verdict filter (no database).
One pg_cron database (the server's cron.database_name), 3000 calls.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import threading
import time

import psycopg2
import pytest

import playbook_runner
from conftest import create_db, drop_db
from playbook_runner import Stages, run_playbook

REPO = playbook_runner.REPO
SEED_CALLS = 3000
STAGES = Stages()  # run_stage(env, name, playbook, **kw) keeps the result; stage(name) returns it if ok
run_stage, stage = STAGES.run, STAGES.ok
QUIET_VACUUM = {"maintenance_vacuum": "never"}


def _filters():
    spec = importlib.util.spec_from_file_location(
        "dbops_perf_filters", playbook_runner.COLLECTION / "plugins" / "filter" / "perf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def env(pg_server):
    db = create_db(pg_server, baseline=True, seed_calls=SEED_CALLS, cron=True)
    workdir = playbook_runner.new_workdir()
    try:
        yield dict(db=db, workdir=workdir)
    finally:
        drop_db(pg_server, db.name)


def fact(res, task_part, name):
    r = res.task(task_part)
    assert r is not None, "task %r not found:\n%s" % (task_part, res.text)
    return r["ansible_facts"][name]


def today_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%A")


def other_day() -> str:
    return (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3)).strftime("%A")


# ---- validate before anything: no baseline ------------------------------------------------------
def test_validate_without_baseline_says_so(env):
    res = run_stage(env, "validate0", "validate", check=True)
    assert res.ok, res.text
    assert res.changed == 0, res.task_names("changed")
    assert res.shows("No baseline: dbops.perf_baseline has no row"), res.text
    result = fact(res, "Publish validate_result", "validate_result")
    assert result["baseline"] is None
    assert [t["name"] for t in result["tests"]] == ["time_range_7d", "fts_police", "dashboard_24h"]
    for t in result["tests"]:
        assert t["speedup"] is None and t["baseline_ms"] is None and t["current_ms"] > 0
        assert t["verdict"].startswith("no baseline: speedup unknown"), t
    # plain table, no GIN index yet: nothing to assert about pruning / GIN
    assert result["tests"][0]["plan"]["partitions_total"] is None
    assert result["tests"][1]["plan"]["gin_usable"] is None
    assert env["db"].scalar("SELECT to_regclass('dbops.perf_baseline') IS NULL")


# ---- phase 1 saves the baseline, phase 2 partitions ----------------------------------------------
def test_phase1_saves_the_baseline_then_phase2(env):
    db = env["db"]
    res = run_stage(env, "phase1", "phase1", timeout=600)
    assert res.ok, res.text
    assert res.shows("Performance baseline (pre_phase1) saved"), res.text
    rows = db.query("SELECT label, repetitions, jsonb_array_length(tests), run_id <> '' FROM dbops.perf_baseline")
    assert rows == [("pre_phase1", 5, 3, True)], rows
    # taken before the migrations: no GIN index in the stored catalog
    assert db.scalar("SELECT catalog->'gin_index' FROM dbops.perf_baseline") is False
    res = run_stage(env, "phase2", "phase2", extra_vars={"partition_round_seconds": 3,
                                                         "partition_upsert_probe_seconds": 2}, timeout=600)
    assert res.ok, res.text
    assert db.scalar("SELECT relkind::text FROM pg_class WHERE oid = 'public.bcfy_calls_raw'::regclass") == "p"


def test_validate_after_phase2_compares_with_the_baseline(env):
    stage("phase2")
    res = run_stage(env, "validate", "validate")
    assert res.ok, res.text
    assert res.changed == 0, res.task_names("changed")
    result = fact(res, "Publish validate_result", "validate_result")
    assert result["baseline"]["label"] == "pre_phase1" and result["baseline"]["taken_utc"].endswith("Z")
    by = {t["name"]: t for t in result["tests"]}
    for t in by.values():
        assert t["baseline_ms"] > 0 and t["current_ms"] > 0
        assert t["speedup"] == pytest.approx(t["baseline_ms"] / t["current_ms"], rel=0.02)
        assert t["verdict"].startswith("reached: " if t["met_speedup"] else "not reached: "), t
        assert ("%sx" % t["speedup"]) in t["verdict"]
        assert res.shows(t["name"]) and res.shows("%sx" % t["speedup"])
    assert by["time_range_7d"]["promise"] == "10-100x and <100 ms"
    assert by["fts_police"]["promise"] == "3-5x and <500 ms"
    assert by["dashboard_24h"]["promise"] == "5-10x"
    plan = by["time_range_7d"]["plan"]
    assert 0 < plan["partitions_scanned"] < plan["partitions_total"], plan
    assert res.shows("Partition pruning: the 7-day query reads %d of %d partitions"
                     % (plan["partitions_scanned"], plan["partitions_total"])), res.text
    assert by["fts_police"]["plan"]["gin_usable"] is True
    assert res.shows("GIN: the full-text search can use the GIN index"), res.text
    print("\nvalidate after phase 2:", {n: (t["baseline_ms"], t["current_ms"], t["speedup"]) for n, t in by.items()})


# ---- maintenance -------------------------------------------------------------------------------
def test_maintenance_healthy_then_idempotent(env):
    stage("phase2")
    db = env["db"]
    first = run_stage(env, "maint1", "maintenance", extra_vars=QUIET_VACUUM)
    assert first.ok, first.text
    # pg_cron history unreadable for the app role: a finding, not a crash
    db.query("REVOKE USAGE ON SCHEMA cron FROM scan", superuser=True)
    try:
        res = run_stage(env, "maint2", "maintenance",
                        extra_vars={"maintenance_vacuum": "weekly", "maintenance_vacuum_weekday": other_day()})
    finally:
        db.query("GRANT USAGE ON SCHEMA cron TO scan", superuser=True)
    assert res.ok, res.text
    assert res.changed == 0, res.task_names("changed")
    assert res.shows("Health: HEALTHY"), res.text
    assert res.shows("not due (weekly, %s; today is %s UTC)" % (other_day(), today_utc())), res.text
    assert res.task("VACUUM ANALYZE the hot tables", "ok") is None
    health = fact(res, "Publish maintenance_result.health", "maintenance_result")["health"]
    assert health["status"] == "healthy"
    checks = {f["check"]: f for f in health["findings"]}
    for name in ("table_bloat", "unused_indexes", "long_running_queries", "partition_gaps", "future_partitions",
                 "default_partition_rows", "stuck_pipeline_items", "cron_failed_runs", "maintenance_run"):
        assert name in checks, (name, checks.keys())
        assert set(checks[name]) == {"check", "severity", "summary", "rows"}
    assert checks["cron_failed_runs"]["severity"] == "warning"
    assert "cannot read cron.job_run_details as scan" in checks["cron_failed_runs"]["summary"]
    assert "not installed (Phase 3)" in checks["stuck_pipeline_items"]["summary"]
    assert checks["default_partition_rows"]["severity"] == "ok"
    assert checks["partition_gaps"]["severity"] == "ok" and checks["future_partitions"]["severity"] == "ok"


def test_maintenance_vacuum_when_due_and_cron_history_purge(env):
    stage("maint2")
    db = env["db"]
    part = db.scalar("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                     "WHERE i.inhparent = 'public.api_call_metrics'::regclass ORDER BY c.relname DESC LIMIT 1")
    before = db.scalar("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = %s", (part,))
    db.query("INSERT INTO cron.job_run_details (jobid, runid, database, username, command, status, return_message, "
             "start_time, end_time) VALUES "
             "(1, 990001, %(d)s, 'scan', 'SELECT 1', 'succeeded', '1 row', now() - interval '40 days', now() - interval '40 days'), "
             "(1, 990002, %(d)s, 'scan', 'SELECT 1', 'succeeded', '1 row', now() - interval '20 days', now() - interval '20 days'), "
             "(1, 990003, %(d)s, 'scan', 'SELECT 1', 'succeeded', '1 row', now() - interval '2 days', now() - interval '2 days')",
             {"d": db.name}, superuser=True)
    res = run_stage(env, "maint_vacuum", "maintenance",
                    extra_vars={"maintenance_vacuum": "weekly", "maintenance_vacuum_weekday": today_utc()})
    assert res.ok, res.text
    vac = res.task("VACUUM ANALYZE the hot tables")
    assert vac is not None and vac.get("changed"), res.text
    assert [r["item"] for r in vac["results"]] == ["bcfy_calls_raw", "api_call_metrics", "transcripts", "system_logs"]
    after = db.scalar("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = %s", (part,))
    assert after > before, (part, before, after)
    left = [r[0] for r in db.query("SELECT runid FROM cron.job_run_details WHERE runid >= 990001 ORDER BY 1",
                                   superuser=True)]
    assert left == [990003], left
    assert res.shows("pg_cron history: deleted 2 run(s) older than 14 days"), res.text
    db.query("DELETE FROM cron.job_run_details WHERE runid >= 990001", superuser=True)


def test_retention_deletes_are_vacuumed_before_the_health_checks(env):
    """Retention DELETEs expired rows of the unpartitioned poll log (30 days); without a VACUUM right
    after, the health check read those dead rows as CRITICAL bloat and failed the nightly job."""
    stage("maint2")
    db = env["db"]
    db.query("INSERT INTO bcfy_playlist_poll_log (uuid, poll_started_at, success) SELECT gen_random_uuid(), "
             "now() - interval '40 days' - g * interval '1 second', true FROM generate_series(1, 4000) g")
    res = run_stage(env, "maint_retention", "maintenance", extra_vars={"maintenance_vacuum": "never"})
    assert res.ok, res.text
    vac = res.task("VACUUM ANALYZE the tables retention deleted rows from")
    assert vac is not None and [r["item"]["key"] for r in vac["results"]] == ["bcfy_playlist_poll_log"], res.text
    assert db.scalar("SELECT count(*) FROM bcfy_playlist_poll_log WHERE poll_started_at < now() - interval '30 days'") == 0
    assert not res.shows("[CRITICAL] table_bloat"), res.text
    again = run_playbook(db, "maintenance", workdir=env["workdir"], extra_vars={"maintenance_vacuum": "never"})
    assert again.ok and again.changed == 0, again.text


def test_maintenance_reports_a_failed_step_after_doing_the_rest(env):
    """Issue 9, item 11: one step of the daily jobs fails (a table already has the name the next
    system_logs partition needs): the other tables are still maintained, and the run fails after the
    report, naming the partition and the error (maintenance_run finding)."""
    stage("maint2")
    db = env["db"]
    last = {t: db.scalar("SELECT partition FROM monitoring.partition_health WHERE parent = %s AND NOT is_default "
                         "ORDER BY range_start DESC LIMIT 1", (t,)) for t in ("system_logs", "api_call_metrics")}
    for p in last.values():
        db.query(f"DROP TABLE {p}")
    db.query(f"CREATE TABLE {last['system_logs']} (unrelated int)")
    try:
        res = run_stage(env, "maint_failed_step", "maintenance", extra_vars=QUIET_VACUUM)
        other = db.scalar("SELECT parent FROM monitoring.partition_health WHERE partition = %s",
                          (last["api_call_metrics"],))
    finally:
        db.query(f"DROP TABLE IF EXISTS {last['system_logs']}")
        db.query("CALL maintain_partitions()")
    assert res.rc != 0, res.text
    assert other == "api_call_metrics"
    assert "maintenance_run" in res.failure_text, res.failure_text
    assert "1 failed step(s)" in res.failure_text and last["system_logs"] in res.failure_text, res.failure_text
    assert "already exists" in res.failure_text, res.failure_text
    health = fact(res, "Publish maintenance_result.health", "maintenance_result")["health"]
    run = next(f for f in health["findings"] if f["check"] == "maintenance_run")
    assert run["severity"] == "critical" and [r["partition"] for r in run["rows"]] == [last["system_logs"]], run


def test_maintenance_unhealthy_exits_nonzero_after_the_report(env):
    stage("maint2")
    db = env["db"]
    db.query("INSERT INTO system_logs (created_at, component, event_type, message) "
             "VALUES ('2099-06-01', 'test', 'health', 'lands in the DEFAULT partition')")
    db.query("INSERT INTO cron.job_run_details (jobid, runid, database, username, command, status, return_message, "
             "start_time, end_time) VALUES (1, 990010, %s, 'scan', 'CALL maintain_partitions()', 'failed', "
             "'ERROR: canceling statement due to lock timeout', now() - interval '1 hour', now() - interval '1 hour')",
             (db.name,), superuser=True)
    sleeper = db.connect()
    sleeper.autocommit = True
    err: list = []

    def sleep():
        try:
            with sleeper.cursor() as cur:
                cur.execute("SELECT pg_sleep(120) /* long-running test query */")
        except psycopg2.Error as exc:  # cancelled below
            err.append(exc)

    t = threading.Thread(target=sleep, daemon=True)
    t.start()
    try:
        time.sleep(2)
        res = run_stage(env, "maint_bad", "maintenance",
                        extra_vars={"maintenance_health_only": True, "maintenance_long_query_warning_seconds": 1,
                                    "maintenance_long_query_critical_seconds": 2})
    finally:
        sleeper.cancel()
        t.join(10)
        sleeper.close()
        db.query("DELETE FROM system_logs WHERE created_at = '2099-06-01'")
        db.query("DELETE FROM cron.job_run_details WHERE runid = 990010", superuser=True)
    assert res.rc != 0, res.text
    assert res.changed == 0, res.task_names("changed")
    assert res.task("Take or renew the migration lock") is None, "a health-only run must not take the run lock"
    assert "Database health is UNHEALTHY" in res.failure_text, res.text
    for name in ("default_partition_rows", "cron_failed_runs", "long_running_queries"):
        assert name in res.failure_text, (name, res.failure_text)
    assert "system_logs_default holds 1 row(s)" in res.failure_text
    assert "canceling statement due to lock timeout" in res.failure_text
    assert "long-running test query" in res.output
    health = fact(res, "Publish maintenance_result.health", "maintenance_result")["health"]
    assert health["status"] == "unhealthy"
    assert [f["severity"] for f in health["findings"][:3]] == ["critical"] * 3
    # the report was written before the verdict failed the job
    reports = sorted(res.report_dir.rglob("maintenance_*.json"), key=lambda p: p.stat().st_mtime)
    assert reports, "no maintenance report written"
    assert "default_partition_rows" in reports[-1].read_text()


# ---- the verdict filter, without a database ------------------------------------------------------
def test_verdicts_come_from_numbers():
    f = _filters()
    tests = [{"name": "time_range_7d", "table": "calls", "speedup_min": 10, "speedup_max": 100, "target_ms": 100,
              "query": "q1"},
             {"name": "fts_police", "table": "transcripts", "speedup_min": 3, "speedup_max": 5, "target_ms": 500,
              "query": "q2"}]

    def run(name, total, planning, relations=(), index=None):
        return {"name": name, "median_ms": total, "runs_ms": [total], "planning_ms": planning,
                "execution_ms": total - planning,
                "plan": {"relations": list(relations), "index_scans": [{"node": "Bitmap Index Scan", "index": index}]
                         if index else [], "subplans_removed": 3, "buffers_hit": 7, "buffers_read": 1,
                         "scan_nodes": ["Seq Scan"], "top_node": "Limit"}}

    catalog = {"calls_partitions": ["c_p1", "c_p2", "c_p3", "c_p4"], "gin_indexes": ["t_gin"], "calls_rows": 200000,
               "transcripts_rows": 1000, "gin_usable": True}
    baseline = {"tests": [run("time_range_7d", 1.0, 0.1), run("fts_police", 300.0, 0.1)]}
    current = [run("time_range_7d", 2.0, 1.6, relations=["c_p4"]), run("fts_police", 20.0, 0.2, index="t_gin")]
    out = {t["name"]: t for t in f.perf_compare(current, baseline, tests, catalog)}
    t1 = out["time_range_7d"]
    assert t1["speedup"] == 0.5 and t1["met_speedup"] is False and t1["met_target"] is True
    assert t1["verdict"].startswith("not reached: 0.5x at this scale")
    assert "planning 1.60 ms > execution 0.40 ms (4 partitions to consider)" in t1["verdict"]
    assert "on a ~200,000-row table" in t1["verdict"] and "heap" not in t1["verdict"]
    # an index-only scan that still reads the heap (a partition never vacuumed) is named as a reason
    current[0]["plan"]["heap_fetches"] = 1234
    slow = {t["name"]: t for t in f.perf_compare(current, baseline, tests, catalog)}["time_range_7d"]
    assert "index-only scans still read 1234 rows from the heap" in slow["verdict"], slow["verdict"]
    assert slow["plan"]["heap_fetches"] == 1234
    assert t1["plan"]["partitions_scanned"] == 1 and t1["plan"]["partitions_total"] == 4
    t2 = out["fts_police"]
    assert t2["speedup"] == 15.0 and t2["met_speedup"] is True and t2["plan"]["gin_used"] is True
    assert t2["verdict"].startswith("reached: 15.0x faster") and "beyond the promised 5x" in t2["verdict"]
    none = f.perf_compare(current, None, tests, catalog)
    assert all(t["speedup"] is None and t["verdict"].startswith("no baseline") for t in none)
    assert f.median([3, 1, 2]) == 2 and f.median([4, 1, 2, 3]) == 2.5
    explain = [{"Plan": {"Node Type": "Aggregate", "Shared Hit Blocks": 5, "Shared Read Blocks": 2, "Plans": [
        {"Node Type": "Append", "Subplans Removed": 9, "Plans": [
            {"Node Type": "Index Only Scan", "Relation Name": "c_p4", "Index Name": "c_p4_idx", "Heap Fetches": 41}]}]},
        "Planning Time": 0.5, "Execution Time": 0.25}]
    s = f.plan_summary(explain)
    assert s["total_ms"] == 0.75 and s["relations"] == ["c_p4"] and s["subplans_removed"] == 9
    assert s["heap_fetches"] == 41
    assert s["buffers_hit"] == 5 and s["buffers_read"] == 2 and s["index_scans"][0]["index"] == "c_p4_idx"
    assert json.dumps(s)
