"""Phase 1 SQL (files/sql/001_*.sql and their rollbacks) against a real PostgreSQL 15.

The files are applied the way the migration runner applies them: a file whose first line is
`-- dbops:no-transaction` statement by statement in autocommit (psql -f does exactly that), any
other file in one transaction (psql -1), with a short lock_timeout, as the non-superuser `scan`.

Checked: every index exists and is valid, full-text search uses the GIN index, the btree on tsv
is gone, the CHECK constraints are validated and enforced, the seven monitoring views answer
(also with pg_stat_statements missing, and for partitioned tables), every guide query of
tests/guide_queries/phase1 runs, a second run changes nothing, an interrupted run resumes, and
the rollback gives back the baseline exactly.
"""
from __future__ import annotations

import functools
import pathlib
import time

import psycopg2
import pytest

from conftest import NO_TX_MARKER, PSQL, apply, phase_rollback_sql, phase_sql
from conftest import psql as run_psql

REPO = pathlib.Path(__file__).resolve().parents[1]
SQL_DIR = REPO / "files" / "sql"
PHASE1 = phase_sql("001")
ROLLBACK1 = phase_rollback_sql("001")
# Read-only checks (also run by the verify role in production) + the maintenance ones (tests only).
GUIDE_QUERIES = sorted([*(REPO / "roles" / "verify" / "files" / "checks" / "001").glob("*.sql"),
                        *(REPO / "tests" / "guide_queries" / "phase1").glob("*.sql")])

INDEXES = {  # name -> (table, access method)
    "bcfy_calls_raw_pending_idx": ("bcfy_calls_raw", "btree"),
    "bcfy_calls_raw_fetched_at_idx": ("bcfy_calls_raw", "btree"),
    "bcfy_calls_raw_feed_started_idx": ("bcfy_calls_raw", "btree"),
    "bcfy_calls_raw_tg_started_idx": ("bcfy_calls_raw", "btree"),
    "transcripts_tsv_gin_idx": ("transcripts", "gin"),
    "transcripts_created_at_idx": ("transcripts", "btree"),
    "api_call_metrics_timestamp_idx": ("api_call_metrics", "btree"),
    "api_call_metrics_endpoint_timestamp_idx": ("api_call_metrics", "btree"),
    "bcfy_playlist_poll_log_poll_started_at_idx": ("bcfy_playlist_poll_log", "btree"),
    "processing_state_status_updated_at_idx": ("processing_state", "btree"),
}
CONSTRAINTS = {  # name -> (table, an update that must be rejected on any row with started_at set)
    "bcfy_calls_raw_duration_ms_check": ("bcfy_calls_raw", "duration_ms = -1"),
    "bcfy_calls_raw_size_bytes_check": ("bcfy_calls_raw", "size_bytes = -1"),
    "bcfy_calls_raw_ended_at_check": ("bcfy_calls_raw", "ended_at = started_at - interval '1 s'"),
    "transcripts_confidence_check": ("transcripts", "confidence = 1.5"),
    "transcripts_duration_seconds_check": ("transcripts", "duration_seconds = -0.1"),
    "api_call_metrics_status_code_check": ("api_call_metrics", "status_code = 600"),
    "api_call_metrics_duration_ms_check": ("api_call_metrics", "duration_ms = -5"),
    "system_logs_duration_ms_check": ("system_logs", "duration_ms = -5"),
    "bcfy_playlist_poll_log_poll_ended_at_check": (
        "bcfy_playlist_poll_log", "poll_ended_at = poll_started_at - interval '1 s'"),
}
VIEWS = ["connections", "database_size", "index_usage", "long_running_queries", "slow_queries",
         "table_bloat", "table_health"]

pytestmark = pytest.mark.skipif(PSQL is None, reason="psql not installed")


@pytest.fixture
def psql(tmp_path):
    """conftest.psql (db, file_or_sql, *, runner_mode=True, superuser=False) -> CompletedProcess,
    never raising on SQL errors, with its pgpass file in the test's tmp_path."""
    return functools.partial(run_psql, tmpdir=tmp_path)


def snapshot(db) -> dict:
    """What Phase 1 may touch: indexes, CHECK constraints, monitoring objects, extensions."""
    return {
        "indexes": db.query(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"),
        "checks": db.query(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated "
            "FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND contype = 'c' ORDER BY 1, 2"),
        "monitoring": db.query(
            "SELECT c.relname, pg_get_viewdef(c.oid), obj_description(c.oid, 'pg_class') FROM pg_class c "
            "WHERE c.relnamespace = to_regnamespace('monitoring') ORDER BY 1"),
        "functions": db.query(
            "SELECT p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)) FROM pg_proc p "
            "WHERE p.pronamespace = to_regnamespace('monitoring') ORDER BY 1"),
        "extensions": db.query("SELECT extname FROM pg_extension ORDER BY 1"),
    }


@pytest.fixture
def seeded_db(make_db):
    """Baseline schema with demo data (every demo row satisfies the Phase 1 constraints)."""
    db = make_db(baseline=True, seed_calls=3000)
    db.query("ANALYZE")
    return db


@pytest.fixture
def phase1_db(seeded_db, psql):
    seeded_db.phase1_output = apply(seeded_db, PHASE1, psql)
    return seeded_db


def test_files_pair_with_rollbacks():
    assert [f.relative_to(SQL_DIR).as_posix() for f in PHASE1] == [
        "001_01_indexes.sql", "001_02_check_constraints.sql", "001_03_monitoring.sql",
        "repeatable/001/01_monitoring_views.sql"]
    assert sorted(f.relative_to(SQL_DIR / "rollback").as_posix() for f in ROLLBACK1) == sorted(
        f.relative_to(SQL_DIR).as_posix() for f in PHASE1)
    for f in PHASE1 + ROLLBACK1:
        text = f.read_text()
        # Concurrent builds cannot run in a transaction; every other multi-table change is in one.
        assert ("CONCURRENTLY" in text) <= text.startswith(NO_TX_MARKER), f.name
        for line in text.splitlines():
            if line.lstrip().upper().startswith("CREATE INDEX") or line.lstrip().upper().startswith("CREATE UNIQUE"):
                assert "CONCURRENTLY IF NOT EXISTS" in line.upper(), f"{f.name}: {line}"


def test_operator_messages(phase1_db):
    out = phase1_db.phase1_output
    for name in INDEXES:
        assert f"✓ Created index {name}" in out
    for msg in ("All indexes created successfully", "Monitoring views created successfully",
                "Phase 1 Migration Complete! ✓"):
        assert msg in out
    assert out.index("All indexes created successfully") < out.index("Monitoring views created successfully") \
        < out.index("Phase 1 Migration Complete! ✓")


def test_indexes_exist_and_valid(phase1_db):
    rows = phase1_db.query(
        "SELECT c.relname, t.relname, am.amname, i.indisvalid, i.indisready FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE c.relname = ANY(%s)", (list(INDEXES),))
    found = {r[0]: (r[1], r[2]) for r in rows if r[3] and r[4]}
    assert found == INDEXES
    # The useless btree on tsv is gone; the generated column is untouched.
    assert phase1_db.scalar("SELECT to_regclass('public.transcripts_tsv_idx')") is None
    assert phase1_db.scalar(
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d JOIN pg_attribute a "
        "ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
        "WHERE d.adrelid = 'transcripts'::regclass AND a.attname = 'tsv' AND a.attgenerated = 's'"
    ) == "to_tsvector('english'::regconfig, COALESCE(text, ''::text))"


def explain(db, sql: str) -> str:
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SET enable_seqscan = off")
            cur.execute("EXPLAIN " + sql)
            return "\n".join(r[0] for r in cur.fetchall())
    finally:
        conn.close()


@pytest.mark.parametrize("index, sql", [
    ("transcripts_tsv_gin_idx",
     "SELECT id, ts_rank(tsv, query) AS rank FROM transcripts, plainto_tsquery('english', 'police') query "
     "WHERE tsv @@ query LIMIT 10"),
    ("bcfy_calls_raw_pending_idx",
     "SELECT call_uid FROM bcfy_calls_raw WHERE processed = false ORDER BY started_at LIMIT 10 "
     "FOR UPDATE SKIP LOCKED"),
    ("bcfy_calls_raw_feed_started_idx",
     "SELECT call_uid FROM bcfy_calls_raw WHERE feed_id = 1 ORDER BY started_at DESC LIMIT 50"),
    ("bcfy_calls_raw_tg_started_idx",
     "SELECT call_uid FROM bcfy_calls_raw WHERE tg_id = 1 ORDER BY started_at DESC LIMIT 50"),
])
def test_application_queries_use_the_new_indexes(phase1_db, index, sql):
    assert index in explain(phase1_db, sql)


def test_fts_finds_rows(phase1_db):
    assert phase1_db.scalar(
        "SELECT count(*) FROM transcripts WHERE tsv @@ plainto_tsquery('english', 'police')") > 0


def started_set(table: str) -> str:
    return "started_at IS NOT NULL" if table == "bcfy_calls_raw" else "true"


def test_constraints_validated_and_enforced(phase1_db):
    rows = phase1_db.query(
        "SELECT conname, conrelid::regclass::text, convalidated FROM pg_constraint "
        "WHERE contype = 'c' AND conname = ANY(%s)", (list(CONSTRAINTS),))
    assert {r[0]: (r[1], r[2]) for r in rows} == {n: (t, True) for n, (t, _) in CONSTRAINTS.items()}
    phase1_db.query("INSERT INTO system_logs (component, event_type, duration_ms) VALUES ('t', 't', NULL)")
    phase1_db.query("INSERT INTO bcfy_playlist_poll_log (uuid, poll_started_at) VALUES (gen_random_uuid(), now())")
    for name, (table, assignment) in CONSTRAINTS.items():
        with pytest.raises(psycopg2.errors.CheckViolation, match=name):
            phase1_db.query(f"UPDATE {table} SET {assignment} WHERE ctid = "
                            f"(SELECT min(ctid) FROM {table} WHERE {started_set(table)})")
    # NULL passes every check.
    phase1_db.query("UPDATE bcfy_calls_raw SET duration_ms = NULL, size_bytes = NULL, ended_at = NULL "
                    "WHERE ctid = (SELECT min(ctid) FROM bcfy_calls_raw)")


def test_monitoring_views(phase1_db):
    assert [r[0] for r in phase1_db.query(
        "SELECT table_name FROM information_schema.views WHERE table_schema = 'monitoring' ORDER BY 1")] == VIEWS
    for view in VIEWS:
        phase1_db.query(f"SELECT * FROM monitoring.{view}")
        assert phase1_db.scalar("SELECT obj_description(%s::regclass, 'pg_class')", (f"monitoring.{view}",))
    health = phase1_db.query("SELECT tablename, table_type, live_rows FROM monitoring.table_health")
    assert ("bcfy_calls_raw", "table", 3000) in health
    usage = dict(phase1_db.query("SELECT indexname, usage_status FROM monitoring.index_usage"))
    assert set(INDEXES) <= set(usage) and set(usage.values()) <= {"UNUSED", "LOW_USAGE", "ACTIVE", "INVALID"}
    assert set(r[0] for r in phase1_db.query("SELECT status FROM monitoring.table_bloat")) <= {
        "HEALTHY", "WARNING", "CRITICAL"}
    assert phase1_db.scalar("SELECT count(*) FROM monitoring.slow_queries") > 0
    assert phase1_db.scalar("SELECT bool_or(is_current) FROM monitoring.database_size")


def test_table_bloat_status_from_dead_tuples(phase1_db):
    phase1_db.query("CREATE TABLE bloat_probe AS SELECT g AS id FROM generate_series(1, 5000) g")
    phase1_db.query("DELETE FROM bloat_probe WHERE id <= 2000")
    phase1_db.query("SELECT pg_stat_force_next_flush()")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = phase1_db.query("SELECT dead_rows, status FROM monitoring.table_bloat WHERE tablename = 'bloat_probe'")
        if row and row[0][0] >= 2000:
            break
        time.sleep(0.2)
    assert row == [(2000, "CRITICAL")]   # 40 % dead >= 20 %


def test_health_check_judges_bloat_by_dead_rows_and_their_size(phase1_db):
    """The maintenance health verdict (roles/maintenance/files/health/01_statistics.sql): a heap is a
    bloat finding only with at least bloat_min_dead_rows dead rows AND bloat_min_dead_bytes of them. A
    few-kB table with 40 % dead rows failed the nightly job as CRITICAL (seen on PostgreSQL 13 in the
    matrix: a small history partition right after Phase 2); a 4 MB one with half its rows dead still is."""
    health_sql = (REPO / "roles" / "maintenance" / "files" / "health" / "01_statistics.sql").read_text()
    phase1_db.query("CREATE TABLE bloat_tiny AS SELECT g AS id FROM generate_series(1, 5000) g;"
                    "DELETE FROM bloat_tiny WHERE id <= 2000;"
                    "CREATE TABLE bloat_big AS SELECT g AS id, repeat('x', 400) AS pad FROM generate_series(1, 10000) g;"
                    "DELETE FROM bloat_big WHERE id % 2 = 0;"
                    "SELECT pg_stat_force_next_flush()")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and phase1_db.scalar(
            "SELECT count(*) FROM monitoring.table_bloat WHERE tablename IN ('bloat_tiny', 'bloat_big') "
            "AND dead_rows >= 2000") < 2:
        time.sleep(0.2)
    params = dict(bloat_min_dead_rows=1000, bloat_warning_pct=10, bloat_critical_pct=20, unused_index_min_bytes=1 << 40,
                  long_warning_seconds=3600, long_critical_seconds=7200, max_rows=50)

    def bloat(min_dead_bytes):
        conn = phase1_db.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(health_sql, {**params, "bloat_min_dead_bytes": min_dead_bytes})
                found = next(f for f in cur.fetchone()[0] if f["check"] == "table_bloat")
        finally:
            conn.close()
        return found["severity"], {r["tablename"] for r in found["rows"]} & {"bloat_tiny", "bloat_big"}, found["summary"]

    assert bloat(0)[:2] == ("critical", {"bloat_tiny", "bloat_big"})           # rows alone: both
    severity, tables, summary = bloat(1 << 20)                                    # 1 MB of dead rows at least
    assert (severity, tables) == ("critical", {"bloat_big"}), summary
    assert "bloat_big 50" in summary and "rows, about" in summary, summary
    assert bloat(1 << 30)[:2] == ("ok", set())                                  # nothing has 1 GB dead
    phase1_db.query("DROP TABLE bloat_tiny, bloat_big")


def test_views_handle_partitioned_tables(phase1_db):
    phase1_db.query("""
        CREATE TABLE part_probe (id int, d date) PARTITION BY RANGE (d);
        CREATE TABLE part_probe_1 PARTITION OF part_probe FOR VALUES FROM ('2025-01-01') TO ('2025-02-01');
        CREATE TABLE part_probe_2 PARTITION OF part_probe FOR VALUES FROM ('2025-02-01') TO ('2025-03-01');
        CREATE INDEX part_probe_d_idx ON part_probe (d);
        INSERT INTO part_probe SELECT g, date '2025-01-01' + g % 50 FROM generate_series(1, 1000) g;
        ANALYZE part_probe;
    """)
    assert phase1_db.query(
        "SELECT table_type, partitions, live_rows FROM monitoring.table_health WHERE tablename LIKE 'part_probe%'"
    ) == [("partitioned table", 2, 1000)]
    assert phase1_db.query(
        "SELECT indexname, size_bytes > 0 FROM monitoring.index_usage WHERE tablename LIKE 'part_probe%'"
    ) == [("part_probe_d_idx", True)]
    assert sorted(phase1_db.query(
        "SELECT tablename, partition_of FROM monitoring.table_bloat WHERE tablename LIKE 'part_probe%'")) == [
        ("part_probe_1", "part_probe"), ("part_probe_2", "part_probe")]


def test_guide_queries_run(phase1_db, psql):
    assert len(GUIDE_QUERIES) >= 20
    failures = []
    for f in GUIDE_QUERIES:
        first = f.read_text().splitlines()[0]
        assert first.startswith("-- "), f"{f.name}: first line must be a comment"
        r = psql(phase1_db, f, runner_mode=False)   # plain psql -f, as an operator would
        if r.returncode != 0 or "ERROR" in r.stderr:
            failures.append(f"{f.name}: {r.stderr.strip()}")
    assert not failures, "\n".join(failures)


def test_guide_monitoring_views_count(phase1_db, psql):
    r = psql(phase1_db, REPO / "roles/verify/files/checks/001/04_verify_monitoring_views.sql", runner_mode=False)
    assert "(7 rows)" in r.stdout


def test_second_run_changes_nothing(phase1_db, psql):
    before = snapshot(phase1_db)
    out = apply(phase1_db, PHASE1, psql)
    assert "Phase 1 Migration Complete! ✓" in out
    assert snapshot(phase1_db) == before


def test_resume_after_failed_validation(seeded_db, psql):
    """Bad data stops VALIDATE; the constraint stays NOT VALID (still checks new rows); after the
    data is fixed the same file completes."""
    apply(seeded_db, PHASE1[:1], psql)
    seeded_db.query("UPDATE transcripts SET confidence = 1.2 WHERE id = (SELECT min(id) FROM transcripts)")
    r = psql(seeded_db, PHASE1[1])
    assert r.returncode != 0 and "transcripts_confidence_check" in r.stderr
    assert seeded_db.scalar(
        "SELECT convalidated FROM pg_constraint WHERE conname = 'transcripts_confidence_check'") is False
    seeded_db.query("UPDATE transcripts SET confidence = 1 WHERE confidence > 1")
    out = apply(seeded_db, PHASE1[1:], psql)
    assert "Phase 1 Migration Complete! ✓" in out


def test_btree_kept_while_gin_is_invalid(seeded_db, psql):
    """A leftover INVALID GIN index (skipped by IF NOT EXISTS under plain psql) must not let the
    file drop the old btree."""
    seeded_db.query("CREATE INDEX transcripts_tsv_gin_idx ON transcripts USING gin (tsv)")
    seeded_db.query("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'transcripts_tsv_gin_idx'::regclass",
                    superuser=True)
    r = psql(seeded_db, PHASE1[0])
    assert r.returncode != 0 and "not dropping transcripts_tsv_idx" in r.stderr
    assert seeded_db.scalar("SELECT to_regclass('public.transcripts_tsv_idx') IS NOT NULL")
    # What the runner does before retrying: drop the invalid index; then the file completes.
    psql(seeded_db, "DROP INDEX CONCURRENTLY public.transcripts_tsv_gin_idx")
    apply(seeded_db, PHASE1[:1], psql)
    assert seeded_db.scalar("SELECT to_regclass('public.transcripts_tsv_idx')") is None


def test_monitoring_file_refuses_an_incomplete_phase(baseline_db, psql):
    """001_03 re-checks the whole phase: run alone, it names what is missing and (one
    transaction) leaves nothing behind."""
    r = psql(baseline_db, PHASE1[2])
    assert r.returncode != 0 and "index(es) missing or INVALID: api_call_metrics_endpoint_timestamp_idx" in r.stderr
    assert baseline_db.scalar("SELECT to_regnamespace('monitoring')") is None


def test_rollback_restores_baseline(seeded_db, psql):
    baseline = snapshot(seeded_db)
    apply(seeded_db, PHASE1, psql)
    out = apply(seeded_db, ROLLBACK1, psql)
    assert "transcripts_tsv_idx restored" in out and "monitoring schema removed" in out
    assert snapshot(seeded_db) == baseline          # indexes, constraints, no monitoring, extensions
    assert seeded_db.scalar("SELECT to_regnamespace('monitoring')") is None
    assert seeded_db.scalar("SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'") == 1
    apply(seeded_db, ROLLBACK1, psql)              # idempotent
    assert snapshot(seeded_db) == baseline
    apply(seeded_db, PHASE1, psql)                 # and Phase 1 can be applied again
    assert seeded_db.scalar("SELECT to_regclass('public.transcripts_tsv_gin_idx') IS NOT NULL")


def test_rollback_keeps_foreign_objects_in_monitoring(phase1_db, psql):
    phase1_db.query("CREATE TABLE monitoring.someone_elses (id int)")
    out = apply(phase1_db, ROLLBACK1, psql)
    assert "monitoring schema kept" in out
    assert phase1_db.scalar("SELECT count(*) FROM pg_class WHERE relnamespace = 'monitoring'::regnamespace") == 1


def test_slow_queries_without_pg_stat_statements(make_db, psql):
    """Non-superuser migration on a database without the extension: a notice, then an empty
    slow_queries that says why; once an admin creates the extension, the same view has rows."""
    db = make_db(baseline=True)
    db.query("DROP EXTENSION pg_stat_statements", superuser=True)
    out = apply(db, PHASE1, psql)
    assert "pg_stat_statements not created" in out and "Phase 1 Migration Complete! ✓" in out
    conn = db.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT * FROM monitoring.slow_queries WHERE mean_time_ms > 1000")
            assert cur.fetchall() == []
        assert any("pg_stat_statements is not installed" in n for n in conn.notices)
    finally:
        conn.close()
    db.query("CREATE EXTENSION pg_stat_statements", superuser=True)
    db.query("SELECT count(*) FROM bcfy_calls_raw")
    assert db.scalar("SELECT count(*) FROM monitoring.slow_queries") > 0
