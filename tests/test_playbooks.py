"""playbooks/phase1.yml and playbooks/rollback_phase1.yml end to end, as an operator runs them.

One pg_cron database (the server's cron.database_name) seeded with 3000 calls goes through the
whole life cycle, one playbook run per stage, in file order:

  --check (nothing changes) -> phase1 (applies, backs up, reports) -> phase1 again (changed=0,
  no backup) -> rollback (baseline back) -> rollback again (changed=0) -> phase1 again, this
  time as an operator role whose password holds ':' and a backslash (the PGPASSFILE escaping).

Each stage's result is kept in STAGES; a test that needs an earlier stage fails with that
stage's output when it did not succeed.
"""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import uuid

import pytest

import playbook_runner
from conftest import create_db, drop_db
from playbook_runner import ROLLBACK, Stages, db_state, run_playbook

REPO = playbook_runner.REPO
SEED_CALLS = 3000
PHASE1_VERSIONS = ["001_01", "001_02", "001_03"]
PHASE1_PENDING = PHASE1_VERSIONS + ["001/01_monitoring_views"]   # versioned, then the repeatable code
PHASE1_INDEXES = [
    "bcfy_calls_raw_pending_idx", "bcfy_calls_raw_fetched_at_idx", "bcfy_calls_raw_feed_started_idx",
    "bcfy_calls_raw_tg_started_idx", "transcripts_tsv_gin_idx", "transcripts_created_at_idx",
    "api_call_metrics_timestamp_idx", "api_call_metrics_endpoint_timestamp_idx",
    "bcfy_playlist_poll_log_poll_started_at_idx", "processing_state_status_updated_at_idx",
]
PHASE1_CONSTRAINTS = [
    "bcfy_calls_raw_duration_ms_check", "bcfy_calls_raw_size_bytes_check", "bcfy_calls_raw_ended_at_check",
    "transcripts_confidence_check", "transcripts_duration_seconds_check", "api_call_metrics_status_code_check",
    "api_call_metrics_duration_ms_check", "system_logs_duration_ms_check", "bcfy_playlist_poll_log_poll_ended_at_check",
]
TABLES = ["bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs", "bcfy_playlists",
          "bcfy_playlist_poll_log", "processing_state"]
SPECIAL_PASSWORD = "Colon:Back\\slash Pw-4417"
PG_RESTORE = next((p for p in ("/usr/lib/postgresql/15/bin/pg_restore", "/usr/bin/pg_restore")
                   if pathlib.Path(p).exists()), "pg_restore")

STAGES = Stages()  # run_stage(env, name, playbook, **kw) keeps the result; stage(name) returns it if ok
run_stage, stage = STAGES.run, STAGES.ok


@pytest.fixture(scope="module")
def env(pg_server):
    """The module's database, a shared work dir (backups/reports accumulate) and the baseline state."""
    db = create_db(pg_server, baseline=True, seed_calls=SEED_CALLS, cron=True)
    workdir = playbook_runner.new_workdir()
    role = "dbops_pw_" + uuid.uuid4().hex[:8]
    db.query("CREATE ROLE %s LOGIN PASSWORD %%s IN ROLE %s" % (role, pg_server.user), (SPECIAL_PASSWORD,),
             superuser=True)
    env = dict(db=db, workdir=workdir, baseline=db_state(db), counts=counts(db), role=role)
    try:
        yield env
    finally:
        drop_db(pg_server, db.name)
        su = pg_server.connect("postgres", superuser=True)
        su.autocommit = True
        with su.cursor() as cur:
            cur.execute("DROP ROLE IF EXISTS %s" % role)
        su.close()


def counts(db) -> dict:
    return {t: db.scalar("SELECT count(*) FROM public.%s" % t) for t in TABLES}


def backups(env) -> list:
    d = pathlib.Path(env["workdir"]) / "backups"
    return sorted(p for p in d.glob("backup_*.dump")) if d.exists() else []


def reports(env, prefix) -> list:
    d = pathlib.Path(env["workdir"]) / "reports"
    return sorted(d.glob(prefix + "_*.json"), key=lambda p: p.stat().st_mtime) if d.exists() else []


def index_valid(db, name) -> bool | None:
    return db.scalar("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)", ("public." + name,))


# ---- --check on the untouched database ----------------------------------------------------------
def test_check_mode_reports_and_changes_nothing(env):
    db = env["db"]
    res = run_stage(env, "check", "phase1", check=True)
    assert res.ok, res.text
    assert res.changed > 0, "check mode must report what would change:\n" + res.text
    msgs = "\n".join(res.messages)
    assert "pending: 001_01, 001_02, 001_03, 001/01_monitoring_views" in msgs, res.text
    assert "Would apply: 001_01, 001_02, 001_03; code files to re-apply: 001/01_monitoring_views." in msgs, res.text
    assert db_state(db) == env["baseline"], "--check changed the database"
    assert db.scalar("SELECT to_regnamespace('dbops') IS NULL") and db.scalar("SELECT to_regnamespace('monitoring') IS NULL")
    assert not any(index_valid(db, i) is not None for i in PHASE1_INDEXES)
    assert backups(env) == [], "--check took a backup"
    (report,) = reports(env, "001")
    data = json.loads(report.read_text())
    assert data["check_mode"] is True and data["migrations"] == [] and data["pending_before"] == PHASE1_PENDING


# ---- phase 1 --------------------------------------------------------------------------------------
def test_phase1_applies(env):
    res = run_stage(env, "phase1", "phase1")
    assert res.ok, res.text
    assert res.changed > 0 and res.failed == 0, res.text
    # The guide's progress notices reach the operator's screen.
    for needle in ["✓ Created index bcfy_calls_raw_pending_idx", "✓ Created index transcripts_tsv_gin_idx",
                   "All indexes created successfully", "✓ Validated constraint transcripts_confidence_check",
                   "All CHECK constraints validated successfully", "Monitoring views created successfully",
                   "Phase 1 Migration Complete! ✓"]:
        assert res.shows(needle), "%r not shown:\n%s" % (needle, res.text)
    assert re.search(r"Applied: 001_01_indexes \(\d+ ms, 13 statements, 0 lock retries\), 001_02_check_constraints",
                     res.screen), res.text
    db = env["db"]
    for name in PHASE1_INDEXES:
        assert index_valid(db, name) is True, name
    assert db.scalar("SELECT to_regclass('public.transcripts_tsv_idx')") is None
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = ANY(%s) AND convalidated",
                     (PHASE1_CONSTRAINTS,)) == len(PHASE1_CONSTRAINTS)
    assert db.scalar("SELECT count(*) FROM pg_views WHERE schemaname = 'monitoring'") == 7
    assert db.scalar("SELECT count(*) FROM dbops.run_lock") == 0, "the run lock was not released"
    assert counts(db) == env["counts"], "rows changed"


def test_backup_is_proven(env):
    res = stage("phase1")
    (dump,) = backups(env)
    assert re.fullmatch(r"backup_testdb_pre_phase1_\d{8}T\d{6}Z\.dump", dump.name), dump.name
    assert (dump.parent.stat().st_mode & 0o777) == 0o700
    manifest_path = pathlib.Path(str(dump) + ".manifest.json")
    assert manifest_path.exists() and (manifest_path.stat().st_mode & 0o777) == 0o600
    manifest = json.loads(manifest_path.read_text())
    import hashlib
    assert manifest["sha256"] == hashlib.sha256(dump.read_bytes()).hexdigest()
    assert manifest["path"] == str(dump) and int(manifest["size_bytes"]) == dump.stat().st_size
    assert manifest["format"] == "custom" and manifest["label"] == "pre_phase1" and manifest["sha256_of"] == "file"
    listing = subprocess.run([PG_RESTORE, "--list", str(dump)], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    data_entries = [ln for ln in listing.stdout.splitlines() if " TABLE DATA public " in ln]
    for table in TABLES:
        assert any(" %s " % table in ln for ln in data_entries), "no data of %s in the dump" % table
    toc = [ln for ln in listing.stdout.splitlines() if ln and not ln.startswith(";")]
    assert int(manifest["toc_entries"]) == len(toc)
    # Taken before the DDL: the dump holds the baseline btree on tsv and none of the new indexes.
    assert "transcripts_tsv_idx" in listing.stdout and "transcripts_tsv_gin_idx" not in listing.stdout
    assert res.shows("Backup %s" % dump)
    assert not list(pathlib.Path(env["workdir"]).rglob("*.pgpass")), "the temporary PGPASSFILE was left behind"


def test_report_written(env):
    res = stage("phase1")
    report = reports(env, "001")[-1]
    assert report.with_suffix(".md").exists()
    data = json.loads(report.read_text())
    assert data["check_mode"] is False and data["phase"] == "001"
    assert [m["version"] for m in data["migrations"]] == PHASE1_PENDING
    assert all(m["retries"] == 0 and m["duration_ms"] >= 0 and m["statements"] > 0 for m in data["migrations"])
    assert data["pending_before"] == PHASE1_PENDING
    assert re.fullmatch(r"\d{8}T\d{6}Z-\d+", data["run_id"]) and report.name == "001_%s.json" % data["run_id"]
    assert data["backup"]["path"] == str(backups(env)[0])
    before = {t: int(v["rows"]) for t, v in data["tables_before"].items()}
    after = {t: int(v["rows"]) for t, v in data["tables_after"].items()}
    assert before == after == env["counts"]
    assert any("Phase 1 Migration Complete! ✓" in n for n in data["notices"])
    assert int(data["checks_run"]) > 0
    md = report.with_suffix(".md").read_text()
    assert "| 001_01 | indexes | statement-by-statement |" in md and data["run_id"] in md
    assert res.shows(str(report.with_suffix(".md")))


def test_ledger_rows(env):
    res = stage("phase1")
    db = env["db"]
    rows = db.query("SELECT version, name, checksum, execution, applied_by, duration_ms, run_id, applied_at "
                    "FROM dbops.schema_migrations ORDER BY version")
    run_id = json.loads(reports(env, "001")[-1].read_text())["run_id"]
    assert [r[0] for r in rows] == PHASE1_VERSIONS
    by_version = {m["version"]: m for m in playbook_runner.lookup_migrations("001")}
    for version, name, checksum, execution, applied_by, duration_ms, row_run_id, applied_at in rows:
        assert name == by_version[version]["name"]
        assert checksum == playbook_runner.project_code().dbops_sql.checksum(by_version[version]["sql"])
        assert execution == ("transaction" if version == "001_03" else "statement-by-statement")
        assert applied_by.endswith("(db role scan)") and "@" in applied_by, applied_by
        assert duration_ms >= 0 and row_run_id == run_id and applied_at is not None
    assert res.shows(run_id)


# ---- idempotence ------------------------------------------------------------------------------------
def test_second_run_changes_nothing(env):
    stage("phase1")
    state = db_state(env["db"])
    before_backups = backups(env)
    res = run_stage(env, "phase1_again", "phase1")
    assert res.ok, res.text
    assert res.changed == 0, "a second run reported changes:\n" + res.text
    assert backups(env) == before_backups, "a second run took a backup"
    assert res.shows("Nothing to apply: phase 001 is already applied.")
    assert res.shows("nothing pending: already applied")
    assert db_state(env["db"]) == state
    data = json.loads(reports(env, "001")[-1].read_text())
    assert data["migrations"] == [] and data["backup"] is None and data["pending_before"] == []


# ---- rollback ---------------------------------------------------------------------------------------
def test_rollback_restores_the_baseline(env):
    stage("phase1")
    db = env["db"]
    # Without the word the rollback stops after its read-only checks; --check needs no word.
    before = db_state(db)
    res = run_playbook(db, "rollback_phase1", workdir=env["workdir"])
    assert not res.ok and "-e rollback_confirm=ROLLBACK" in res.failure_text, res.text
    assert "Nothing was changed" in res.failure_text, res.text
    res = run_playbook(db, "rollback_phase1", workdir=env["workdir"], check=True)
    assert res.ok, res.text
    assert db_state(db) == before
    res = run_stage(env, "rollback", "rollback_phase1", extra_vars=ROLLBACK)
    assert res.ok, res.text
    assert res.changed > 0, res.text
    assert res.shows("Rolled back: 001/01_monitoring_views (code)") and res.shows("001_03_monitoring (")
    assert res.shows("Phase 1 indexes removed; transcripts_tsv_idx restored")
    assert all(index_valid(db, i) is None for i in PHASE1_INDEXES)
    assert index_valid(db, "transcripts_tsv_idx") is True
    assert db.scalar("SELECT count(*) FROM pg_constraint WHERE conname = ANY(%s)", (PHASE1_CONSTRAINTS,)) == 0
    assert db.scalar("SELECT to_regnamespace('monitoring') IS NULL")
    assert db.scalar("SELECT count(*) FROM dbops.schema_migrations") == 0
    assert db.scalar("SELECT count(*) FROM dbops.run_lock") == 0
    assert counts(db) == env["counts"]
    # Exactly the baseline, apart from the project's own bookkeeping schema.
    state = db_state(db)
    base = env["baseline"]
    assert [i for i in state["indexes"] if i[0] != "dbops"] == base["indexes"]
    assert state["constraints"] == base["constraints"]
    assert state["views"] == base["views"] and state["invalid"] == []
    assert [s for s in state["schemas"] if s != ("dbops",)] == base["schemas"]
    assert reports(env, "rollback-001"), "no rollback report"


def test_second_rollback_changes_nothing(env):
    stage("rollback")
    state = db_state(env["db"])
    res = run_stage(env, "rollback_again", "rollback_phase1", extra_vars=ROLLBACK)
    assert res.ok, res.text
    assert res.changed == 0, res.text
    assert res.shows("Nothing to roll back: phase 001 is not applied.")
    assert db_state(env["db"]) == state


def test_phase1_after_rollback_with_a_special_password(env):
    """Phase 1 again after the rollback, as an operator whose password needs PGPASSFILE escaping."""
    stage("rollback")
    db = env["db"]
    n_backups = len(backups(env))
    login = type("Login", (), dict(host=db.host, port=db.port, name=db.name, user=env["role"],
                                   password=SPECIAL_PASSWORD))()
    res = run_playbook(login, "phase1", workdir=env["workdir"])
    STAGES["phase1_after_rollback"] = res
    assert res.ok, res.text
    assert res.changed > 0 and res.shows("Phase 1 Migration Complete! ✓")
    assert len(backups(env)) == n_backups + 1, "no new backup (pg_dump could not log in?)"
    for name in PHASE1_INDEXES:
        assert index_valid(db, name) is True, name
    assert db.scalar("SELECT to_regclass('public.transcripts_tsv_idx')") is None
    assert [r[0] for r in db.query("SELECT version FROM dbops.schema_migrations ORDER BY 1")] == PHASE1_VERSIONS
    assert db.scalar("SELECT applied_by FROM dbops.schema_migrations WHERE version = '001_01'").endswith(
        "(db role %s)" % env["role"])
    assert counts(db) == env["counts"]
    for text in (res.stdout, res.stderr, res.all_text):
        assert SPECIAL_PASSWORD not in text
    for path in list((pathlib.Path(env["workdir"]) / "reports").iterdir()) + list(
            (pathlib.Path(env["workdir"]) / "backups").glob("*.json")):
        assert SPECIAL_PASSWORD not in path.read_text(), path


def test_verify_detects_rows_lost_during_the_phase(make_db, tmp_path):
    """The verify role compares with the snapshot taken BEFORE the change (the callers pass it as a
    lazy template; the role freezes it before counting again): rows deleted in between are caught."""
    db = make_db(seed_calls=300)
    pb = tmp_path / "lose_rows.yml"
    pb.write_text(f"""---
- name: Snapshot, lose rows, verify
  hosts: scanner_db
  gather_facts: false
  vars_files: [{playbook_runner.REPO}/playbooks/vars/connection.yml]
  module_defaults:
    group/community.postgresql.all: "{{{{ scanner_db_login }}}}"
  tasks:
    - name: Snapshot
      ansible.builtin.include_role: {{name: verify, tasks_from: snapshot}}
      vars: {{verify_phase: "001"}}
    - name: Lose rows
      community.postgresql.postgresql_query:
        query: DELETE FROM system_logs WHERE id IN (SELECT id FROM system_logs ORDER BY id LIMIT 7)
    - name: Verify
      ansible.builtin.include_role: {{name: verify, tasks_from: counts}}
      vars:
        verify_phase: "001"
        verify_before: "{{{{ verify_snapshot }}}}"
""")
    res = run_playbook(db, str(pb))
    assert res.rc != 0, res.text
    assert "Table system_logs lost rows" in res.failure_text, res.text


def test_existing_report_and_backup_folders_keep_their_mode(make_db, tmp_path):
    """report_dir / backup_dir pointing at an existing shared folder (like /tmp, mode 1777): the
    roles create missing folders 0750 / 0700 but never chmod one that exists."""
    import stat

    db = make_db(seed_calls=200)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    res = run_playbook(db, "phase1", inventory_vars={"report_dir": str(shared), "backup_dir": str(shared)},
                       extra_vars={"preflight_require_pg_cron": False})
    assert res.ok, res.text
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777, oct(shared.stat().st_mode)
    assert list(shared.glob("001_*.json")) and list(shared.glob("backup_*.dump")), sorted(shared.iterdir())
    fresh = tmp_path / "fresh" / "reports"
    res = run_playbook(db, "phase1", inventory_vars={"report_dir": str(fresh)},
                       extra_vars={"preflight_require_pg_cron": False})
    assert res.ok, res.text
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o750
