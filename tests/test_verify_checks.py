"""The guide's checks that the verify role runs after a phase (roles/verify/files/checks/<phase>/*.sql)
declare their kind, and only a proof may fail the phase.

  -- kind: proof   reads what the phase made (its views, functions, columns, partitions) or is the
                   guide's verification of it: an error fails the phase;
  -- kind: info    only informs (server logs, statistics, activity, sizes, plans): an error is recorded
                   as "not available here: <reason>", shown in the run and in the report.

1. Every check file has exactly one kind line in its leading comment block.
2. A server configured like Debian's default (logging_collector = off, log_directory 'log' relative
   to the data folder, which does not exist): pg_ls_logdir() fails there, as in production; Phase 1
   still succeeds, says that 23_postgres_logs.sql is not available here and why, and the report
   records it. A failing proof check (here one without a kind line, which counts as proof) still
   fails the phase.
"""
from __future__ import annotations

import json
import re

import psycopg2
import pytest

from conftest import create_db, embedded_server
from playbook_runner import REPO, ledger, run_playbook

CHECKS_DIR = REPO / "roles" / "verify" / "files" / "checks"
CHECKS = sorted(CHECKS_DIR.glob("*/*.sql"))
KIND = re.compile(r"^-- kind: *([a-z]+)")
LOGS_CHECK = "23_postgres_logs.sql"
NO_LOG_DIR = 'could not open directory "log": No such file or directory'


def leading_comments(path) -> list:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return lines


# ---- 1. every check declares its kind ----------------------------------------------------------------
def test_checks_found():
    assert len(CHECKS) >= 40 and {p.parent.name for p in CHECKS} == {"001", "002", "003"}


@pytest.mark.parametrize("path", CHECKS, ids=[p.parent.name + "/" + p.name for p in CHECKS])
def test_every_check_declares_its_kind(path):
    kinds = [m.group(1) for m in map(KIND.match, path.read_text().splitlines()) if m]
    assert len(kinds) == 1, "%s: exactly one '-- kind: proof|info' line, found %s" % (path.name, kinds)
    assert kinds[0] in ("proof", "info"), path.name
    assert any(KIND.match(line) for line in leading_comments(path)), "%s: the kind line is not in the header" % path.name


def test_known_kinds():
    kind = {p.parent.name + "/" + p.name: KIND.match(next(ln for ln in leading_comments(p) if KIND.match(ln))).group(1)
            for p in CHECKS}
    assert kind["001/" + LOGS_CHECK] == "info"            # the server's logs
    assert kind["001/13_connection_pool.sql"] == "info"    # activity
    assert kind["001/04_verify_monitoring_views.sql"] == "proof"
    assert kind["002/03_partition_count.sql"] == "proof"
    assert kind["003/04_get_pipeline_stats.sql"] == "proof"


# ---- 2. a server without a log directory -------------------------------------------------------------
@pytest.fixture(scope="module")
def no_log_server():
    """Its own server, logged like Debian's default: no logging collector, log_directory 'log' (missing)."""
    with embedded_server(settings={"logging_collector": "off", "log_directory": "log"}) as server:
        yield server


@pytest.fixture(scope="module")
def phase1_run(no_log_server):
    db = create_db(no_log_server, baseline=True, seed_calls=50, cron=True)
    return db, run_playbook(db, "phase1")


def test_the_logs_query_fails_on_this_server(no_log_server):
    """The reproduction: on this server the guide's log query raises, as on a stock Debian server."""
    conn = no_log_server.connect("postgres")          # as the application role (pg_monitor)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW logging_collector")
            assert cur.fetchone()[0] == "off"
            with pytest.raises(psycopg2.Error, match=re.escape(NO_LOG_DIR)):
                cur.execute("SELECT name FROM pg_ls_logdir()")
    finally:
        conn.close()


def test_phase1_succeeds_and_says_the_logs_are_not_available(phase1_run):
    db, res = phase1_run
    assert res.ok, res.text
    assert ledger(db, "001") == ["001_01", "001_02", "001_03"]
    assert res.shows("%s (info only): not available here: %s" % (LOGS_CHECK, NO_LOG_DIR)), res.text
    assert res.task("Run each check", "ok"), res.task_names()


def test_the_report_records_it(phase1_run):
    _, res = phase1_run
    (report,) = sorted(res.report_dir.glob("001_*.json"))
    checks = json.loads(report.read_text())["checks"]
    assert len(checks) == len(list((CHECKS_DIR / "001").glob("*.sql"))), checks
    by_file = {c["file"]: c for c in checks}
    assert by_file[LOGS_CHECK] == {"file": LOGS_CHECK, "kind": "info", "status": "not available here",
                                   "reason": NO_LOG_DIR}
    assert all(c["status"] == "ok" for f, c in by_file.items() if f != LOGS_CHECK), checks
    md = report.with_suffix(".md").read_text()
    assert "`%s` (info): not available here: %s" % (LOGS_CHECK, NO_LOG_DIR) in md, md
    html = report.with_suffix(".html").read_text()
    assert "%s (info): not available here: %s" % (LOGS_CHECK, NO_LOG_DIR.replace('"', "&#34;")) in html


def test_a_failing_proof_check_still_fails_the_phase(phase1_run, tmp_path):
    """Checks of one's own (verify_checks_dir): a file without a kind line counts as proof."""
    db, first = phase1_run
    assert first.ok, first.text
    checks = tmp_path / "checks" / "001"
    checks.mkdir(parents=True)
    (checks / "01_info.sql").write_text("-- kind: info\nSELECT name FROM pg_ls_logdir();\n")
    (checks / "02_proof.sql").write_text("-- a check of the phase's own work\nSELECT * FROM monitoring.no_such_view;\n")
    res = run_playbook(db, "phase1", extra_vars={"verify_checks_dir": str(checks.parent)})
    assert res.rc != 0, res.text
    failed = [f for f in res.failures if not f.ignored]
    assert any("no_such_view" in f.msg for f in failed), res.text
    assert not any("pg_ls_logdir" in f.msg for f in failed), res.text
    assert any("Verification failed" in f.msg for f in failed), res.text
    assert db.scalar("SELECT count(*) FROM dbops.run_lock WHERE expires_at > now()") == 0   # released
