"""Upgrade path to the versioned/repeatable layout, from databases built with the released SQL.

tests/fixtures/released-sql-a7f2e59.tar.gz holds files/sql/0*.sql and rollback/ exactly as released
at a7f2e59, when the Phase 2 engine lived inside the frozen migrations 002_01/002_03 and the
monitoring code inside 001_03/003_03. Each test builds a database with that SQL (through the same
ledger module), brings it to one of three states, then runs today's ordinary phase playbooks once:
1. every phase applied, no table converted;
2. a table mid-conversion (prepared, partly backfilled) by the old engine code;
3. a table swapped but not finalized by the old engine code.
Asserted each time: no object lost (every function, view and table of before is still there),
the ledger history kept (same rows, same applied_at; superseded checksums re-stamped, kept in
superseded_checksums), the code recorded in dbops.schema_repeatables, the conversion continued to the
end with every row present, and a second run changes nothing. Plus: re-applying the engine's code
while a table is mid-conversion regenerates the per-table sync functions the live triggers call.
"""
from __future__ import annotations

import re
import shutil
import tarfile
import time

import pytest

from conftest import SQL_DIR, create_db
from playbook_runner import db_state, migrate_direct, run_playbook

FIXTURE = SQL_DIR.parents[1] / "tests" / "fixtures" / "released-sql-a7f2e59.tar.gz"
TABLES = ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs")
FAST = {"partition_round_seconds": 3, "partition_upsert_probe_seconds": 1}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The released files/sql (versioned + rollback only: that layout had no repeatable files)."""
    d = tmp_path_factory.mktemp("released-sql")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(d, filter="data")
    assert sorted(p.name for p in d.glob("002_*.sql")) == [
        "002_01_partition_engine.sql", "002_02_calls_app_key.sql", "002_03_faster_backfill_and_verify.sql"]
    return d


def old_db(pg_server, released, phases=("001", "002", "003")):
    db = create_db(pg_server, baseline=True, seed_calls=2000, cron=True)
    for phase in phases:
        res = migrate_direct(db, phase, sql_dir=released)
        assert res["applied"], res
    return db


def step(db, sql, params=None):
    """One engine call, retried while it reports a lock it could not take (the engine's contract)."""
    for _ in range(100):
        res = db.scalar(sql, params)
        if not (isinstance(res, dict) and res.get("status") == "retry"):
            return res
        time.sleep(0.1)
    raise AssertionError(f"{sql}: still retry")


def objects(db) -> dict:
    """Every function, view and table of the project's schemas (what an upgrade must not lose)."""
    q = lambda sql: {r[0] for r in db.query(sql, superuser=True)}  # noqa: E731
    return {
        "functions": q("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                       "WHERE n.nspname IN ('dbops', 'monitoring') OR (n.nspname = 'public' AND p.proname IN "
                       "('maintain_partitions', 'cleanup_old_data', 'get_pipeline_stats', 'get_stuck_processing_items'))"),
        "relations": q("SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                       "WHERE n.nspname IN ('dbops', 'monitoring', 'public') AND c.relkind IN ('r', 'p', 'v')"),
        "triggers": q("SELECT tgrelid::regclass::text || ':' || tgname FROM pg_trigger WHERE NOT tgisinternal"),
    }


def ledger(db) -> dict:
    return {r[0]: r[1:] for r in db.query("SELECT version, checksum, applied_at::text FROM dbops.schema_migrations")}


def assert_upgraded(db, before_ledger, before_objects, phases=("001", "002", "003")):
    """phases: those whose playbook ran since before_* were taken."""
    after = ledger(db)
    new_files = {p.name[:6]: p for p in SQL_DIR.glob("0*.sql")}
    # history kept: every old row is still there, applied at the same time
    for version, (_, applied_at) in before_ledger.items():
        if version in new_files:
            assert after[version][1] == applied_at, version
    # superseded texts re-stamped; the old checksum kept
    for version in ("001_03", "002_01", "003_03"):
        if version in before_ledger and version[:3] in phases:
            cs, superseded = db.query("SELECT checksum, superseded_checksums FROM dbops.schema_migrations "
                                      "WHERE version = %s", (version,))[0]
            assert superseded == [before_ledger[version][0]], version
            assert cs != before_ledger[version][0]
    lost = {k: before_objects[k] - v for k, v in objects(db).items()}
    for (tbl,) in db.query("SELECT table_name FROM dbops.p2_state WHERE step IN ('swapped', 'finalized')"):
        # what the conversion itself renames (shadow -> table) and drops (the forward capture trigger)
        lost["relations"].discard(tbl + "_p")
        lost["triggers"].discard(tbl + ":p2_sync_fwd")
    if "002" in phases:   # replaced on purpose: the daily jobs are procedures now (issue 9, items 6 and 7)
        replaced = {"maintain_partitions()", "cleanup_old_data(integer)"}
        assert lost["functions"] & replaced == before_objects["functions"] & replaced
        lost["functions"] -= replaced
        assert db.scalar("SELECT count(*) FROM pg_proc WHERE proname IN ('maintain_partitions', 'cleanup_old_data') "
                         "AND prokind = 'p' AND pronamespace = 'public'::regnamespace") == 2
        # re-signed on purpose: the backfill takes the health thresholds as a fifth argument (issue 11)
        resigned = {"dbops.p2_backfill(text,integer,integer,jsonb)"}
        assert lost["functions"] & resigned == before_objects["functions"] & resigned
        lost["functions"] -= resigned
        assert db.scalar("SELECT count(*) FROM pg_proc WHERE proname = 'p2_backfill'") == 1
    assert lost == {"functions": set(), "relations": set(), "triggers": set()}, lost
    recorded = {r[0] for r in db.query("SELECT name FROM dbops.schema_repeatables WHERE action = 'applied'")}
    expected = {f"{p.parent.name}/{p.stem}" for p in SQL_DIR.glob("repeatable/*/*.sql") if p.parent.name in phases}
    assert recorded == expected


def assert_rows_equal(db, tbl):
    """The partitioned table and its synced plain copy hold the same rows (count and content). jsonb,
    so that the column order (Phase 3 adds columns) does not matter; the partition key as the engine
    derives it (a legacy NULL started_at is filled in the partitioned copy)."""
    key_col, key_expr = db.query("SELECT key_col, key_expr FROM dbops.p2_state WHERE table_name = %s", (tbl,))[0]
    q = ("SELECT count(*), coalesce(sum(hashtextextended((to_jsonb(t) || jsonb_build_object('{k}', {e}))::text, 0)), 0) "
         "FROM public.{t} t")
    assert db.query(q.format(k=key_col, e=key_expr, t=tbl), superuser=True) == \
        db.query(q.format(k=key_col, e=key_expr, t=tbl + "_nonpartitioned"), superuser=True), tbl


def run(db, playbook, **kw):
    res = run_playbook(db, playbook, extra_vars={**FAST, **kw.pop("extra_vars", {})}, timeout=900, **kw)
    assert res.ok, res.text
    return res


def test_all_phases_applied_moves_with_one_run_of_each_phase(pg_server, released):
    db = old_db(pg_server, released)
    before_ledger, before_objects = ledger(db), objects(db)
    res = run(db, "phase1", check=True)   # --check lists what would be re-stamped and re-applied
    assert res.shows("code files among them"), res.text
    assert ledger(db) == before_ledger
    for playbook in ("phase1", "phase2_prepare", "phase3"):
        res = run(db, playbook)
        assert res.shows("re-stamped"), res.text
    assert_upgraded(db, before_ledger, before_objects)
    assert db.scalar("SELECT version FROM dbops.schema_migrations WHERE version = '002_03'") == "002_03"  # kept
    state = db_state(db)
    for playbook in ("phase1", "phase2_prepare", "phase3"):
        res = run(db, playbook)
        assert res.changed == 0, (playbook, res.text)
    assert db_state(db) == state   # (the conversion with the new code: the two tests below)


def test_mid_conversion_continues_after_the_upgrade(pg_server, released):
    db = old_db(pg_server, released, phases=("001", "002"))
    assert step(db, "SELECT dbops.p2_prepare('system_logs')")["status"] == "prepared"
    res = step(db, "CALL dbops.p2_backfill('system_logs', 100, 0)")
    assert res["status"] != "done" and db.scalar("SELECT step FROM dbops.p2_state") == "backfilling"
    old_fwd = db.scalar("SELECT prosrc FROM pg_proc WHERE proname = 'p2_fwd_system_logs'")
    assert "generated by dbops.p2_prepare" in old_fwd
    before_ledger, before_objects = ledger(db), objects(db)
    db.query("INSERT INTO system_logs (component, event_type) VALUES ('upgrade-test', 'before')")
    run(db, "phase2")   # one ordinary run: new layout installed, the conversion continues
    assert_upgraded(db, before_ledger, before_objects, phases=("002",))
    fwd = db.scalar("SELECT prosrc FROM pg_proc WHERE proname = 'p2_fwd_system_logs'")
    assert "generated by dbops.p2_sync_functions" in fwd   # regenerated from the new code
    for tbl in TABLES:
        assert db.scalar("SELECT step FROM dbops.p2_state WHERE table_name = %s", (tbl,)) == "swapped", tbl
        assert_rows_equal(db, tbl)
    assert db.scalar("SELECT count(*) FROM system_logs WHERE component = 'upgrade-test'") == 1
    assert run(db, "phase2").changed == 0


def test_swapped_not_finalized_keeps_its_reverse_sync_and_rolls_back(pg_server, released):
    db = old_db(pg_server, released, phases=("001", "002"))
    assert step(db, "SELECT dbops.p2_prepare('api_call_metrics')")["status"] == "prepared"
    while step(db, "CALL dbops.p2_backfill('api_call_metrics', 5000, 5)")["status"] != "done":
        pass
    step(db, "SELECT dbops.p2_verify('api_call_metrics')")
    assert step(db, "SELECT dbops.p2_swap('api_call_metrics')")["status"] == "swapped"
    before_ledger, before_objects = ledger(db), objects(db)
    run(db, "phase2")
    assert_upgraded(db, before_ledger, before_objects, phases=("002",))
    rev = db.scalar("SELECT prosrc FROM pg_proc WHERE proname = 'p2_rev_api_call_metrics'")
    assert "generated by dbops.p2_sync_functions" in rev
    # rows written after the upgrade reach the plain copy through the regenerated reverse trigger
    db.query("INSERT INTO api_call_metrics (endpoint, status_code, duration_ms, timestamp) "
             "VALUES ('/upgrade', 200, 5, now())")
    for tbl in TABLES:
        assert_rows_equal(db, tbl)
    res = run(db, "rollback_phase2", extra_vars={"rollback_confirm": "ROLLBACK"})
    for tbl in TABLES:
        assert db.scalar(f"SELECT relkind::text FROM pg_class WHERE oid = 'public.{tbl}'::regclass") == "r", tbl
    assert db.scalar("SELECT count(*) FROM api_call_metrics WHERE endpoint = '/upgrade'") == 1


def test_reapplying_the_sync_code_mid_conversion_regenerates_the_live_functions(pg_server, tmp_path):
    db = create_db(pg_server, baseline=True, seed_calls=1000, cron=True)
    for phase in ("001", "002"):
        migrate_direct(db, phase)
    assert step(db, "SELECT dbops.p2_prepare('system_logs')")["status"] == "prepared"
    step(db, "CALL dbops.p2_backfill('system_logs', 100, 0)")
    # a new version of the generator (what a later fix of the sync code looks like)
    changed = tmp_path / "sql"
    shutil.copytree(SQL_DIR, changed)
    sync = changed / "repeatable" / "002" / "03_sync.sql"
    text = sync.read_text()
    assert "keeps public.%3$I equal to public.%2$I" in text
    sync.write_text(text.replace("keeps public.%3$I equal to public.%2$I", "keeps (v2) public.%3$I equal to public.%2$I"))
    plan = migrate_direct(db, "002", sql_dir=changed, check_mode=True)
    assert plan["repeatable_pending"] == ["002/03_sync"] and plan["pending"] == ["002/03_sync"]
    res = migrate_direct(db, "002", sql_dir=changed)
    assert [m["version"] for m in res["applied"]] == ["002/03_sync"]
    assert any("sync trigger functions of public.system_logs regenerated" in n for n in res["notices"])
    assert "keeps (v2)" in db.scalar("SELECT prosrc FROM pg_proc WHERE proname = 'p2_fwd_system_logs'")
    history = db.query("SELECT action FROM dbops.schema_repeatables WHERE name = '002/03_sync' ORDER BY id")
    assert history == [("applied",), ("applied",)]
    # the live trigger runs the new function: a write reaches the shadow
    db.query("INSERT INTO system_logs (component, event_type) VALUES ('v2', 'after')")
    assert db.scalar("SELECT count(*) FROM system_logs_p WHERE component = 'v2'") == 1
    assert migrate_direct(db, "002", sql_dir=changed)["changed"] is False


def created_in_files(pattern: str) -> set:
    names = set()
    for f in sorted(SQL_DIR.glob(pattern)):
        names |= set(re.findall(r"^CREATE OR REPLACE (?:FUNCTION|PROCEDURE|VIEW) ([a-z_]+\.[a-z_0-9]+)", f.read_text(), re.M))
    return names


def test_every_code_object_has_one_home_and_one_drop():
    """Each function, procedure and view is created by exactly one repeatable file and dropped by its
    rollback; versioned files create none (code belongs in repeatable files)."""
    assert created_in_files("0*.sql") == set()
    seen: dict = {}
    for f in sorted(SQL_DIR.glob("repeatable/*/*.sql")):
        made = created_in_files(f.relative_to(SQL_DIR).as_posix())
        dropped = set(re.findall(r"^DROP (?:FUNCTION|PROCEDURE|VIEW) IF EXISTS ([a-z_]+\.[a-z_0-9]+)",
                                 (SQL_DIR / "rollback" / f.relative_to(SQL_DIR)).read_text(), re.M))
        assert made == dropped, (f.name, made ^ dropped)
        for name in made:
            assert name not in seen, f"{name} in {seen.get(name)} and {f}"
            seen[name] = f


def test_database_code_is_exactly_the_files(pg_server):
    """After the three phases, the code objects in the database are those the files create (none left
    behind by a renamed or re-signed function), and the rollbacks remove every one of them."""
    db = create_db(pg_server, baseline=True, seed_calls=200)
    for phase in ("001", "002", "003"):
        migrate_direct(db, phase)
    q = ("SELECT n.nspname || '.' || p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
         "WHERE n.nspname IN ('dbops', 'monitoring') OR (n.nspname = 'public' AND p.proname IN "
         "('maintain_partitions', 'cleanup_old_data', 'get_pipeline_stats', 'get_stuck_processing_items')) "
         "UNION SELECT schemaname || '.' || viewname FROM pg_views WHERE schemaname = 'monitoring'")
    assert {r[0] for r in db.query(q)} == created_in_files("repeatable/*/*.sql")
    for phase in ("003", "002", "001"):
        migrate_direct(db, phase, state="rolled_back")
    assert db.query(q) == []
    last = db.query("SELECT DISTINCT ON (name) action FROM dbops.schema_repeatables ORDER BY name, id DESC")
    assert {r[0] for r in last} == {"rolled_back"} and len(last) == len(list(SQL_DIR.glob("repeatable/*/*.sql")))
