"""Production shapes the test servers do not have by default (issue 9, items 2 and 3).

One server of this module's own (conftest.embedded_server: pg_cron and pg_stat_statements preloaded,
cron.database_name = scanner), one small database `scanner` (baseline schema, a few calls, Phase 1
applied) in which pg_cron is preloaded but NOT created: the usual state of a fresh RDS database
after the parameter-group change. The cases run in file order on that database:

(a) the migration role `scan` (not a superuser) cannot create pg_cron: phase2.yml stops in its
    preflight play, naming the fix (CREATE EXTENSION pg_cron + GRANT USAGE ON SCHEMA cron as a
    superuser, or preflight_require_pg_cron=false); no backup, nothing converted.
(c) pg_stat_statements is not created: phase2.yml refuses in preflight, before any backup, and says
    so plainly; with -e partition_app_upsert_confirmed=true the gate lets it through (in (b)).
(d) pg_stat_statements is there but the migration role cannot read other roles' query text (no
    pg_read_all_stats; the application's statements run as another role): the old upsert is
    invisible (`<insufficient privilege>`), and phase2.yml refuses, saying it cannot see them.
    Twice: with pg_read_all_settings (today's code converts: its regex sees nothing), and as a plain
    owner role without it (today's preflight crashes reading shared_preload_libraries).
(b) the same database, the migration role now able to create pg_cron (a superuser): Phase 2
    creates the extension in its own step, before converting, converts and schedules the jobs
    (pg_stat_statements still absent, the switch confirmed with -e partition_app_upsert_confirmed=true).
"""
from __future__ import annotations

import psycopg2
import pytest

from conftest import create_db, embedded_server
from playbook_runner import db_state, migrate_direct, run_playbook

FAST = {"partition_round_seconds": 2, "partition_upsert_probe_seconds": 1}
NO_CRON = {**FAST, "preflight_require_pg_cron": False}
TABLES = ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs")
INGEST_PASSWORD = "Ingest-Only:Pw#2207"


@pytest.fixture(scope="module")
def server():
    with embedded_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def db(server):
    """`scanner` (the server's cron.database_name) with pg_cron loaded but not created, Phase 1 applied."""
    d = create_db(server, baseline=True, seed_calls=200, name=server.cron_db)   # cron=False: no CREATE EXTENSION
    migrate_direct(d, "001")
    assert d.scalar("SELECT count(*) FROM pg_extension WHERE extname = 'pg_cron'") == 0
    assert "pg_cron" in d.query("SHOW shared_preload_libraries", superuser=True)[0][0]
    return d


def superuser_sql(db, *statements):
    conn = db.connect(superuser=True)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for stmt in statements:
                cur.execute(stmt)
    finally:
        conn.close()


def assert_refused_in_preflight(res, before, db, *needles):
    """Failed in the preflight play with the needles in its message; no lock, no backup, no change."""
    assert res.rc != 0, res.text
    message = res.failure_text
    for needle in needles:
        assert needle in message, "message does not name %r:\n%s" % (needle, res.text)
    ran = res.task_names()
    for task in ("acquire | Take or renew the migration lock", "dump | Run pg_dump", "Apply pending migrations"):
        assert not any(task in t for t in ran), "%r ran:\n%s" % (task, res.text)
    assert not (res.backup_dir.exists() and any(res.backup_dir.iterdir())), "a backup was written:\n" + res.text
    assert db.scalar("SELECT to_regclass('dbops.p2_state') IS NULL"), "the Phase 2 engine was installed"
    for t in TABLES:
        assert db.scalar(f"SELECT relkind::text FROM pg_class WHERE oid = 'public.{t}'::regclass") == "r", t
    assert db_state(db) == before, "the database changed"


# ---- (a) pg_cron loaded, not created, and the role cannot create it ---------------------------------
def test_a_pg_cron_not_creatable_stops_in_preflight(db):
    before = db_state(db)
    res = run_playbook(db, "phase2", extra_vars=FAST)
    assert_refused_in_preflight(res, before, db, "pg_cron", "not created in this database", "cannot create it",
                                "CREATE EXTENSION pg_cron;", "GRANT USAGE ON SCHEMA cron TO scan;",
                                "preflight_require_pg_cron=false", "Nothing was changed")
    assert res.task("Assert the migration role can use pg_cron, or create it", "failed"), res.task_names()


# ---- (c) pg_stat_statements not created ---------------------------------------------------------------
@pytest.fixture
def no_pgss(db):
    superuser_sql(db, "DROP EXTENSION pg_stat_statements")
    try:
        yield db
    finally:
        superuser_sql(db, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def test_c_no_pg_stat_statements_refuses_before_the_backup(no_pgss):
    db = no_pgss
    before = db_state(db)
    res = run_playbook(db, "phase2", extra_vars=NO_CRON)
    assert_refused_in_preflight(res, before, db, "pg_stat_statements is not installed in scanner",
                                "cannot see which upsert the application runs",
                                "ON CONFLICT (call_uid, started_at) DO NOTHING",
                                "-e partition_app_upsert_confirmed=true", "Nothing was changed")
    assert "Cannot execute SQL" not in res.text and "does not exist" not in res.failure_text, res.text
    # With -e partition_app_upsert_confirmed=true the gate lets the run through: test (b) below.


# ---- (d) the view is there, but the application's statements are someone else's ------------------------
@pytest.fixture(params=["reads_settings", "plain_owner"])
def blind_role(request, db):
    """`scan` without pg_monitor (so without pg_read_all_stats); the ingester runs as role `ingest`
    and still uses the old ON CONFLICT (call_uid). reads_settings: scan keeps pg_read_all_settings
    (only the query text is hidden); plain_owner: not even that (shared_preload_libraries and
    cron.database_name are then unreadable: preflight must not crash on them)."""
    settings = request.param == "reads_settings"
    superuser_sql(db, "REVOKE pg_monitor FROM scan", *(["GRANT pg_read_all_settings TO scan"] if settings else []),
                  "CREATE ROLE ingest LOGIN PASSWORD '%s'" % INGEST_PASSWORD,
                  "GRANT SELECT, INSERT ON bcfy_calls_raw TO ingest",
                  "SELECT pg_stat_statements_reset()")
    conn = psycopg2.connect(host=db.host, port=db.port, dbname=db.name, user="ingest", password=INGEST_PASSWORD)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT call_uid, started_at FROM bcfy_calls_raw LIMIT 1")
            uid, started = cur.fetchone()
            for _ in range(5):
                cur.execute("INSERT INTO bcfy_calls_raw (call_uid, started_at) VALUES (%s, %s) "
                            "ON CONFLICT (call_uid) DO NOTHING", (uid, started))
        yield db
    finally:
        conn.close()
        superuser_sql(db, "REVOKE ALL ON bcfy_calls_raw FROM ingest", "DROP ROLE IF EXISTS ingest",
                      "REVOKE pg_read_all_settings FROM scan", "GRANT pg_monitor TO scan")


def test_d_unreadable_query_text_refuses(blind_role):
    db = blind_role
    # The reproduction: as scan, the old statement is there but its text is hidden.
    assert db.scalar("SELECT count(*) FROM pg_stat_statements WHERE query = '<insufficient privilege>'") > 0
    assert db.scalar("SELECT count(*) FROM pg_stat_statements WHERE query ~* 'on\\s+conflict\\s*\\(\\s*call_uid\\s*\\)'") == 0
    before = db_state(db)
    res = run_playbook(db, "phase2", extra_vars=NO_CRON)
    assert_refused_in_preflight(res, before, db, "Role scan cannot see the application's statements",
                                "<insufficient privilege>", "neither a superuser nor a member of pg_read_all_stats",
                                "GRANT pg_read_all_stats TO scan", "-e partition_app_upsert_confirmed=true",
                                "Nothing was changed")


# ---- (b) the role may create pg_cron: Phase 2 creates it, converts, schedules ----------------------------
@pytest.fixture
def superuser_scan(no_pgss):
    superuser_sql(no_pgss, "ALTER ROLE scan SUPERUSER")
    try:
        yield no_pgss
    finally:
        superuser_sql(no_pgss, "ALTER ROLE scan NOSUPERUSER")


def test_b_creatable_pg_cron_is_created_then_jobs_scheduled(superuser_scan):
    """Also (c)'s way out: pg_stat_statements still absent, the operator confirms the switch."""
    db = superuser_scan
    res = run_playbook(db, "phase2", extra_vars={**FAST, "partition_app_upsert_confirmed": True}, timeout=600)
    assert res.ok, res.text
    assert res.task("Assert the application switched its upsert", "ok"), res.task_names()
    assert res.shows("the operator confirmed the ingester uses"), res.text
    assert res.shows("Phase 2 runs CREATE EXTENSION IF NOT EXISTS pg_cron"), res.text
    created = res.task("Create pg_cron (CREATE EXTENSION IF NOT EXISTS pg_cron", "ok")
    assert created and created.get("changed"), res.task_names()
    # created before anything was converted: its step precedes the engine and the conversion
    names = res.task_names()
    created_at = next(i for i, n in enumerate(names) if "Create pg_cron (CREATE EXTENSION" in n)
    assert created_at < next(i for i, n in enumerate(names) if "Apply pending migrations" in n), names
    assert db.scalar("SELECT count(*) FROM pg_extension WHERE extname = 'pg_cron'") == 1
    assert dict(db.query("SELECT jobname, schedule FROM cron.job", superuser=True)) == {
        "maintain-partitions": "0 0 * * *", "cleanup-old-data": "0 2 * * *"}
    for t in TABLES:
        assert db.scalar("SELECT step FROM dbops.p2_status() WHERE table_name = %s", (t,)) == "swapped", t
