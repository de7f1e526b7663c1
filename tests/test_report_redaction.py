"""What reports show (issue 9, item 11): no statement literals, and who ran it.

- The health check of long-running queries (roles/maintenance/files/health/01_statistics.sql) gives
  each session's query_id and its text with every literal replaced by ?: a secret in a running
  statement appears in no JSON, Markdown or HTML report of playbooks/maintenance.yml, nor in its output.
- The report's operator is who ran it (the controller's user, here with USER and LOGNAME unset, as
  under some schedulers), @ the controller, not the run lock's holder text with the play name.
"""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import psycopg2
import pytest
import yaml

import playbook_runner
from conftest import apply, phase_sql
from playbook_runner import run_playbook

SECRET = "sk_live_SECRET123"
STATEMENT = ("SELECT pg_sleep(60) /* redaction test */, '%s' AS api_key, E'it\\'s 4111-1111' AS card, "
             "$tag$dollar-secret$tag$ AS body, 987654321 AS n" % SECRET)
HEALTH_SQL = playbook_runner.REPO / "roles" / "maintenance" / "files" / "health" / "01_statistics.sql"
PARAMS = dict(bloat_min_dead_rows=1000, bloat_min_dead_bytes=0, bloat_warning_pct=20, bloat_critical_pct=50, unused_index_min_bytes=1 << 40,
              long_warning_seconds=1, long_critical_seconds=3600, max_rows=5)


@pytest.fixture
def phase1_db(make_db):
    db = make_db(baseline=True)
    apply(db, phase_sql("001"))
    return db


class Session(threading.Thread):
    """An application session running STATEMENT (cancelled at the end)."""

    def __init__(self, db):
        super().__init__(daemon=True)
        self.conn = db.connect()
        self.conn.autocommit = True

    def run(self):
        try:
            with self.conn.cursor() as cur:
                cur.execute(STATEMENT)
        except psycopg2.Error:
            pass

    def __enter__(self):
        self.start()
        time.sleep(2.5)   # longer than long_warning_seconds
        return self

    def __exit__(self, *exc):
        self.conn.cancel()
        self.join(10)
        self.conn.close()


def leaks(text: str) -> list:
    return [s for s in (SECRET, "4111", "dollar-secret", "987654321", "it\\'s") if s in text]


def test_long_query_health_rows_carry_no_literals(phase1_db):
    db = phase1_db
    sql_text = HEALTH_SQL.read_text()
    with Session(db):
        conn = db.connect()
        with conn.cursor() as cur:
            cur.execute(sql_text, PARAMS)
            findings = cur.fetchone()[0]
        conn.close()
    (long_q,) = [f for f in findings if f["check"] == "long_running_queries"]
    assert long_q["severity"] == "warning", long_q
    dump = json.dumps(findings)
    assert leaks(dump) == [], (leaks(dump), long_q)
    (row,) = [r for r in long_q["rows"] if "redaction test" in r["query"]]
    assert row["query"].startswith("SELECT pg_sleep(?) /* redaction test */, ? AS api_key, ? AS card, ? AS body, "
                                   "? AS n"), row["query"]
    assert "query_id" in row   # NULL unless compute_query_id computes it (pg_stat_statements loaded)
    assert "pg_sleep(?)" in long_q["summary"] and leaks(long_q["summary"]) == []


def test_maintenance_reports_carry_no_statement_literals(phase1_db):
    db = phase1_db
    with Session(db):
        res = run_playbook(db, "maintenance", extra_vars={
            "maintenance_health_only": True, "maintenance_long_query_warning_seconds": 1,
            "maintenance_long_query_critical_seconds": 3600})
    reports = [p for p in res.report_dir.rglob("maintenance_*") if p.suffix in (".json", ".md", ".html")]
    assert sorted(p.suffix for p in reports) == [".html", ".json", ".md"], (reports, res.text)
    for path in reports:
        text = path.read_text()
        if path.suffix != ".md":   # the Markdown report has no health section
            assert "redaction test" in text, path      # the finding is there ...
        assert leaks(text) == [], (path.name, leaks(text))   # ... without its literals
    assert "pg_sleep(?)" in res.output
    assert leaks(res.stdout + res.stderr) == [], leaks(res.stdout + res.stderr)


def test_the_report_names_the_user_who_ran_it(baseline_db, tmp_path):
    """The play that takes the lock is "(2/7) Lock, snapshot and back up" and USER/LOGNAME are unset: the
    operator is still `id -un`@hostname (it was ",@host ((2/7) Lock, snapshot...")."""
    play = [{
        "name": "(2/7) Lock, snapshot and back up", "hosts": "scanner_db", "gather_facts": False,
        "vars_files": [str(playbook_runner.REPO / "playbooks" / "vars" / "connection.yml")],
        "module_defaults": {"group/scanner.dbops.all": "{{ scanner_db_login }}"},
        "tasks": [
            {"name": "Take the run lock", "ansible.builtin.include_role": {"name": "run_lock",
                                                                            "tasks_from": "acquire"}},
            {"name": "What preflight found", "ansible.builtin.set_fact": {
                "preflight_server": {"version": "15"}, "preflight_pending": []}},
        ],
    }, {   # the last play of every locked playbook: report (operator), release
        "name": "Report and unlock",
        "ansible.builtin.import_playbook": str(playbook_runner.REPO / "playbooks" / "phases" / "report_and_unlock.yml"),
        "vars": {"report_phase": "operator", "report_title": "Operator"},
    }]
    path = tmp_path / "operator.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    res = run_playbook(baseline_db, str(path), env={"USER": "", "LOGNAME": ""})
    assert res.ok, res.text
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    expected = "%s@%s" % (user, socket.gethostname())
    (report,) = res.report_dir.rglob("operator_*.json")
    assert json.loads(report.read_text())["operator"] == expected
    (md,) = res.report_dir.rglob("operator_*.md")
    assert "by %s |" % expected in md.read_text()
    (html,) = res.report_dir.rglob("operator_*.html")
    assert "<dt>Operator</dt><dd>%s</dd>" % expected in html.read_text()
    assert "Lock, snapshot" not in html.read_text().split("<dt>Operator</dt>")[1][:200]
