"""Unit tests (no database) of the project's Python code.

scanner.dbops module_utils/sql.py: statement splitting (quotes, '' and E'' escapes, "idents;",
$$ and $tag$ bodies, nested /* */, -- comments, line numbers, empty statements), the
no-transaction marker, CONCURRENTLY detection, CREATE INDEX CONCURRENTLY name parsing and the
CRLF-stable checksum. module_utils/pg.py: retry/backoff and its exhaustion, the
notice sink, error text, and that a failed connection never shows the password.
lookup/migrations.py: ordering, names, rollback pairing, bad input.
modules/migrate.py: the checks it makes before touching a database.
"""
from __future__ import annotations

import pathlib
import shutil

import psycopg2
import pytest
from ansible.errors import AnsibleError

import playbook_runner
from conftest import free_port

CODE = playbook_runner.project_code()
sql = CODE.dbops_sql
pg = CODE.dbops_pg
REPO = playbook_runner.REPO


def split(text):
    return sql.split_statements(text)


def stmts(text):
    return [s for s, _ in split(text)]


# ---- split_statements -------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("SELECT 1; SELECT 2;", ["SELECT 1", "SELECT 2"]),
    ("SELECT 1", ["SELECT 1"]),                                    # no trailing semicolon
    ("SELECT 'a;b'; SELECT 2", ["SELECT 'a;b'", "SELECT 2"]),
    ("SELECT 'it''s; here'; SELECT 2;", ["SELECT 'it''s; here'", "SELECT 2"]),
    ("SELECT ''';'''; SELECT 2;", ["SELECT ''';'''", "SELECT 2"]),
    # E'' strings: backslash escapes the quote; a plain string keeps a backslash literal
    ("SELECT E'a\\'; b'; SELECT 2;", ["SELECT E'a\\'; b'", "SELECT 2"]),
    ("SELECT e'\\\\'; SELECT 3;", ["SELECT e'\\\\'", "SELECT 3"]),
    ("SELECT x=E'\\';'; SELECT 3;", ["SELECT x=E'\\';'", "SELECT 3"]),
    ("SELECT 'C:\\'; SELECT 4;", ["SELECT 'C:\\'", "SELECT 4"]),
    ("SELECT name'; x'; SELECT 4;", ["SELECT name'; x'", "SELECT 4"]),   # 'e' ends an identifier: not E''
    # "identifiers" may hold ; and "" escapes
    ('SELECT 1 AS "we;ird""x;"; SELECT 2;', ['SELECT 1 AS "we;ird""x;"', "SELECT 2"]),
    # dollar quotes, anonymous and tagged, with ; and other tags inside
    ("DO $$ BEGIN PERFORM 1; END $$; SELECT 2;", ["DO $$ BEGIN PERFORM 1; END $$", "SELECT 2"]),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $fn$ SELECT 1; $$ $x$ $fn$; SELECT 2;",
     ["CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $fn$ SELECT 1; $$ $x$ $fn$", "SELECT 2"]),
    ("DO $a$ BEGIN RAISE NOTICE '$$;'; END $a$; SELECT 2;", ["DO $a$ BEGIN RAISE NOTICE '$$;'; END $a$", "SELECT 2"]),
    # $1 parameters and identifiers containing $ are not dollar quotes
    ("SELECT $1::int; SELECT foo$bar$ FROM t; SELECT 3;", ["SELECT $1::int", "SELECT foo$bar$ FROM t", "SELECT 3"]),
    # nested block comments hide ;
    ("SELECT 1 /* a /* nested; */ still; */ ; SELECT 2;", ["SELECT 1 /* a /* nested; */ still; */", "SELECT 2"]),
    # -- comments hide ; and end at the newline
    ("SELECT 1 -- not the end; really\n+ 1; SELECT 2;", ["SELECT 1 -- not the end; really\n+ 1", "SELECT 2"]),
    # empty statements and comment-only statements are dropped
    ("  ;  ;\n; ", []),
    ("-- only a comment;\n/* and; another */\n", []),
    ("SELECT 1;;; -- trailing comment;\n", ["SELECT 1"]),
    # a quote character inside a comment does not open a string
    ("-- don't\nSELECT 1; /* it's */ SELECT 2;", ["SELECT 1", "SELECT 2"]),
])
def test_split(text, expected):
    assert stmts(text) == expected


def test_split_drops_leading_comments_and_keeps_inner_ones():
    text = "-- header; with a semicolon\n/* block\n comment */\nSELECT /* inner */ 1 -- tail\n;"
    assert stmts(text) == ["SELECT /* inner */ 1 -- tail"]


def test_split_line_numbers():
    text = ("-- dbops:no-transaction\n"          # 1
            "-- comment\n"                       # 2
            "\n"                                 # 3
            "SELECT 1;\n"                        # 4
            "SELECT 'multi\n"                    # 5
            "line';\n"                           # 6
            "/* block\n"                         # 7
            "   comment */ SELECT\n"             # 8
            "  2;\n"                             # 9
            "DO $$\n"                            # 10
            "BEGIN\n"                            # 11
            "END $$;\n"                          # 12
            "SELECT \"a\n"                       # 13
            "b\";  SELECT 3;\n"                  # 14
            "-- x\n"                             # 15
            "SELECT 4")                          # 16
    assert [ln for _, ln in split(text)] == [4, 5, 8, 10, 13, 14, 16]


def test_split_unterminated_dollar_quote_keeps_the_rest_together():
    # An unterminated body must not be split in the middle (PostgreSQL reports the error).
    assert stmts("SELECT 0; SELECT $a$ unterminated; SELECT 6;") == ["SELECT 0", "SELECT $a$ unterminated; SELECT 6;"]


def test_split_real_phase1_files():
    for path in sorted((REPO / "files" / "sql").glob("001_*.sql")):
        text = path.read_text()
        parts = split(text)
        assert parts, path
        for stmt, line in parts:
            assert not stmt.startswith("--"), (path.name, line, stmt[:60])
            assert stmt.strip() == stmt
            # the reported line holds the statement's first token
            assert text.splitlines()[line - 1].strip().startswith(stmt.split()[0]), (path.name, line, stmt[:60])
    idx = [s for s, _ in split((REPO / "files" / "sql" / "001_01_indexes.sql").read_text())]
    assert sum(s.startswith("CREATE INDEX CONCURRENTLY") for s in idx) == 10
    assert any(s.startswith("DO $$") and "RAISE NOTICE" in s for s in idx)


# ---- markers and concurrency --------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("-- dbops:no-transaction\nSELECT 1;", True),
    ("-- dbops:no-transaction\r\nSELECT 1;", True),
    ("\ufeff-- dbops:no-transaction\nSELECT 1;", True),
    ("  -- DBOPS:No-Transaction  \n", True),
    ("\n-- dbops:no-transaction\n", False),              # only the first line counts
    ("-- a comment\n-- dbops:no-transaction\n", False),
    ("-- dbops:no-transaction-please\n", False),
    ("--dbops:no-transaction\n", False),
    ("", False),
])
def test_is_no_transaction(text, expected):
    assert sql.is_no_transaction(text) is expected


@pytest.mark.parametrize("stmt, expected", [
    ("CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t (x)", True),
    ("create unique index concurrently i on t (x)", True),
    ("DROP INDEX CONCURRENTLY IF EXISTS public.i", True),
    ("REINDEX INDEX CONCURRENTLY i", True),
    ("REINDEX (VERBOSE) TABLE CONCURRENTLY t", True),
    ("REINDEX\nINDEX\nCONCURRENTLY i", True),
    ("CREATE INDEX i ON t (x)", False),
    ("CREATE INDEX IF NOT EXISTS concurrently_idx ON t (x)", False),
    ("REINDEX TABLE concurrently_log", False),
    ("ALTER TABLE t VALIDATE CONSTRAINT c", False),
    ("DROP INDEX i", False),
    ("SELECT 'CREATE INDEX CONCURRENTLY'", False),
])
def test_is_concurrent(stmt, expected):
    assert sql.is_concurrent(stmt) is expected


@pytest.mark.parametrize("stmt, expected", [
    ("CREATE INDEX CONCURRENTLY IF NOT EXISTS foo ON t (x)", (None, "foo")),
    ("CREATE INDEX CONCURRENTLY IF NOT EXISTS Foo_Idx\n    ON public.t USING gin (x)", ("public", "foo_idx")),
    ("create unique index concurrently if not exists foo on only Public.Tbl (x)", ("public", "foo")),
    ('CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "MyIdx" ON "My Schema" . "T" (x)', ("My Schema", "MyIdx")),
    ('CREATE INDEX CONCURRENTLY IF NOT EXISTS foo ON "we.ird" (x)', (None, "foo")),        # dot inside quotes
    ('CREATE INDEX CONCURRENTLY IF NOT EXISTS foo ON "a"."b.c" (x)', ("a", "foo")),
    ('CREATE INDEX CONCURRENTLY IF NOT EXISTS "a""b" ON t (x)', (None, 'a"b')),            # "" inside a name
    ('CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON "s""x"."t" (x)', ('s"x', "i")),
    ("CREATE INDEX CONCURRENTLY IF NOT EXISTS i$2 ON s.t$1 (x)", ("s", "i$2")),
    # no IF NOT EXISTS: not re-runnable, so the runner does not treat it as rebuildable
    ("CREATE INDEX CONCURRENTLY foo ON t (x)", None),
    ("CREATE INDEX IF NOT EXISTS foo ON t (x)", None),
    ("DROP INDEX CONCURRENTLY IF EXISTS foo", None),
])
def test_concurrent_index(stmt, expected):
    assert sql.concurrent_index(stmt) == expected


def test_concurrent_index_of_every_phase1_build():
    text = (REPO / "files" / "sql" / "001_01_indexes.sql").read_text()
    names = [sql.concurrent_index(s) for s in stmts(text) if s.startswith("CREATE INDEX")]
    assert len(names) == 10 and all(n and n[0] == "public" for n in names), names


# ---- checksum -----------------------------------------------------------------------------------
def test_checksum_normalises_crlf():
    lf = "-- dbops:no-transaction\nSELECT 1;\n"
    assert sql.checksum(lf) == sql.checksum(lf.replace("\n", "\r\n"))
    assert len(sql.checksum(lf)) == 64 and int(sql.checksum(lf), 16) >= 0
    assert sql.checksum(lf) != sql.checksum(lf + " ")            # any other change counts
    assert sql.checksum(lf) != sql.checksum(lf.replace("\n", "\r"))
    assert sql.checksum("é\n") == sql.checksum("é\r\n")            # utf-8 text


def test_checksum_matches_sha256_of_lf_file():
    import hashlib
    path = REPO / "files" / "sql" / "001_02_check_constraints.sql"
    assert sql.checksum(path.read_text()) == hashlib.sha256(path.read_bytes().replace(b"\r\n", b"\n")).hexdigest()


# ---- dbops_pg.with_retries ----------------------------------------------------------------------
class FakePgError(psycopg2.Error):
    """psycopg2.Error's pgcode is a read-only C attribute: a subclass attribute overrides it."""
    pgcode = pg.LOCK_NOT_AVAILABLE


class FakeDeadlock(psycopg2.Error):
    pgcode = pg.DEADLOCK_DETECTED


class FakeSyntax(psycopg2.Error):
    pgcode = "42601"


@pytest.fixture
def sleeps(monkeypatch):
    waits = []
    monkeypatch.setattr(pg.time, "sleep", waits.append)
    return waits


def failing(times, exc=FakePgError):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise exc("canceling statement due to lock timeout")
        return "done"
    return fn, calls


def test_with_retries_succeeds_after_lock_timeouts(sleeps):
    fn, calls = failing(3)
    seen = []
    result, attempts = pg.with_retries(fn, retries=5, delay=0.5, on_retry=lambda n, w, e: seen.append((n, w)))
    assert (result, attempts, len(calls)) == ("done", 4, 4)
    assert sleeps == [0.5, 1.0, 2.0]                             # exponential backoff
    assert seen == [(1, 0.5), (2, 1.0), (3, 2.0)]


def test_with_retries_backoff_is_capped(sleeps):
    fn, _ = failing(6)
    pg.with_retries(fn, retries=6, delay=4, max_delay=10)
    assert sleeps == [4, 8, 10, 10, 10, 10]


def test_with_retries_exhaustion_reraises_the_last_error(sleeps):
    fn, calls = failing(100)
    with pytest.raises(FakePgError):
        pg.with_retries(fn, retries=2, delay=0.1)
    assert len(calls) == 3                                       # 1 try + 2 retries, then give up
    assert sleeps == [0.1, 0.2]


def test_with_retries_zero_retries_fails_at_once(sleeps):
    fn, calls = failing(1)
    with pytest.raises(FakePgError):
        pg.with_retries(fn, retries=0, delay=1)
    assert len(calls) == 1 and sleeps == []


def test_with_retries_retries_deadlocks(sleeps):
    fn, calls = failing(1, FakeDeadlock)
    assert pg.with_retries(fn, retries=1, delay=0.5) == ("done", 2)


@pytest.mark.parametrize("exc", [FakeSyntax, psycopg2.Error, ValueError])
def test_with_retries_does_not_retry_other_errors(sleeps, exc):
    fn, calls = failing(1, exc)
    with pytest.raises(exc):
        pg.with_retries(fn, retries=5, delay=0.5)
    assert len(calls) == 1 and sleeps == []


def test_with_retries_real_wait_is_bounded():
    # No monkeypatch: the real sleep is used and the total wait is bounded by the backoff.
    import time
    fn, calls = failing(2)
    t0 = time.monotonic()
    assert pg.with_retries(fn, retries=2, delay=0.05) == ("done", 3)
    assert 0.14 <= time.monotonic() - t0 < 2


# ---- dbops_pg: notices, error text, connection errors -------------------------------------------
def test_notice_sink_keeps_all_and_strips_levels():
    sink = pg.NoticeSink()
    for i in range(120):
        sink.append("NOTICE:  n%d\n" % i)
    sink.append("WARNING:  careful")
    assert len(sink) == 121 and sink[0] == "n0" and sink[-1] == "careful"
    assert sink.drain()[:2] == ["n0", "n1"] and list(sink) == []


def test_pg_error_text_names_the_sqlstate():
    text = pg.pg_error_text(FakePgError("canceling statement due to lock timeout\nCONTEXT: x"))
    assert text == "[55P03] canceling statement due to lock timeout"
    assert pg.pg_error_text(psycopg2.Error("plain")) == "plain"


def test_connect_failure_hides_the_password(monkeypatch):
    secret = "S3cret-Unit-Pw:zebra"

    def boom(**kw):
        assert kw["password"] == secret
        raise psycopg2.OperationalError('FATAL: password authentication failed (password "%s")' % secret)
    monkeypatch.setattr(pg.psycopg2, "connect", boom)
    params = dict(login_host="db.example", login_port=5432, login_user="scan", login_password=secret,
                  login_db="scanner", ssl_mode="disable", connect_params={})
    with pytest.raises(RuntimeError) as err:
        pg.connect(params, "test")
    msg = str(err.value)
    assert secret not in msg and "********" in msg
    assert "db.example:5432" in msg and "scanner" in msg and "scan" in msg


def test_connect_to_a_closed_port_is_a_clean_error():
    port = free_port()
    params = dict(login_host="127.0.0.1", login_port=port, login_user="scan", login_password="Pw-closed-port-7",
                  login_db="scanner", ssl_mode="disable", connect_params={"connect_timeout": 3})
    with pytest.raises(RuntimeError) as err:
        pg.connect(params, "test")
    msg = str(err.value)
    assert "cannot connect to PostgreSQL at 127.0.0.1:%d" % port in msg
    assert "Pw-closed-port-7" not in msg and err.value.__cause__ is None


# ---- the lookup ---------------------------------------------------------------------------------
@pytest.fixture
def sql_dir(tmp_path):
    d = tmp_path / "sql"
    (d / "rollback").mkdir(parents=True)
    return d


def write(path: pathlib.Path, text="SELECT 1;\n"):
    path.write_text(text)
    return path


def test_lookup_reads_phase_in_order_with_rollbacks(sql_dir):
    write(sql_dir / "001_02_second.sql", "-- dbops:no-transaction\nSELECT 2;\n")
    write(sql_dir / "001_01_first.sql")
    write(sql_dir / "001_10_tenth.sql")
    write(sql_dir / "002_01_other_phase.sql")
    write(sql_dir / "rollback" / "001_01_first.sql", "SELECT -1;\n")
    write(sql_dir / "rollback" / "001_02_second.sql", "SELECT -2;\n")
    write(sql_dir / "README.md", "not sql")
    migs = playbook_runner.lookup_migrations("001", sql_dir)
    assert [m["version"] for m in migs] == ["001_01", "001_02", "001_10"]
    assert [m["name"] for m in migs] == ["first", "second", "tenth"]
    assert migs[0]["sql"] == "SELECT 1;\n" and migs[0]["rollback_sql"] == "SELECT -1;\n"
    assert migs[1]["rollback_sql"] == "SELECT -2;\n"
    assert migs[2]["rollback_sql"] is None                        # unpaired: no rollback
    assert migs[0]["path"].endswith("001_01_first.sql")


def test_lookup_real_phase1_pairs_every_file():
    migs = playbook_runner.lookup_migrations("001")
    assert [m["version"] for m in migs] == ["001_01", "001_02", "001_03", "001/01_monitoring_views"]
    assert all(m["rollback_sql"] for m in migs)
    assert all(sql.checksum(m["sql"]) == sql.checksum((REPO / m["path"]).read_text()) for m in migs)


@pytest.mark.parametrize("fname", ["001_01_Bad_Case.sql", "001_1_short.sql", "001_01-dash.sql", "001_01_.sql",
                                   "001_01_has space.sql"])
def test_lookup_rejects_bad_file_names(sql_dir, fname):
    write(sql_dir / "001_01_ok.sql")
    write(sql_dir / fname)
    with pytest.raises(AnsibleError, match="bad migration file name"):
        playbook_runner.lookup_migrations("001", sql_dir)


def test_lookup_missing_folder(tmp_path):
    with pytest.raises(AnsibleError, match="migration folder not found: .*nope"):
        playbook_runner.lookup_migrations("001", tmp_path / "nope")


def test_lookup_no_files_for_phase(sql_dir):
    write(sql_dir / "002_01_x.sql")
    with pytest.raises(AnsibleError, match="no migration files .*001_"):
        playbook_runner.lookup_migrations("001", sql_dir)


@pytest.mark.parametrize("phase", ["1", "01", "0001", "abc", "001_01"])
def test_lookup_rejects_bad_phase(sql_dir, phase):
    write(sql_dir / "001_01_x.sql")
    with pytest.raises(AnsibleError, match="phase must be three digits"):
        playbook_runner.lookup_migrations(phase, sql_dir)


def test_lookup_reads_crlf_copy_with_the_same_checksum(sql_dir):
    src = REPO / "files" / "sql" / "001_02_check_constraints.sql"
    (sql_dir / src.name).write_bytes(src.read_bytes().replace(b"\n", b"\r\n"))
    shutil.copy(REPO / "files" / "sql" / "rollback" / src.name, sql_dir / "rollback" / src.name)
    (m,) = playbook_runner.lookup_migrations("001", sql_dir)
    assert sql.checksum(m["sql"]) == sql.checksum(src.read_text())


# ---- dbops_migrate: what it checks before connecting --------------------------------------------
class FakeModule:
    def __init__(self, check_mode=False, **params):
        base = dict(ledger_schema="dbops", state="applied", include_unrecorded=False, login_user="scan",
                    applied_by="", run_id="", retries=0, retry_delay=0.1)
        base.update(params)
        self.params, self.check_mode = base, check_mode


def mig(version, sql_text="SELECT 1;", rollback=None, kind="versioned"):
    return dict(kind=kind, version=version, name="n" + version.replace("_", "").replace("/", ""),
                path="files/sql/%s_x.sql" % version, sql=sql_text, rollback_sql=rollback)


def runner(check_mode=False, **params):
    return CODE.dbops_migrate.Runner(FakeModule(check_mode, **params))


def plan(migs, ledger, repeatables=None):
    return CODE.dbops_migrate.Plan(migs, ledger, repeatables or {})


def test_migrate_rejects_duplicate_versions():
    r = runner(migrations=[mig("001_01"), mig("001_01")])
    with pytest.raises(CODE.dbops_migrate.MigrationError, match="duplicate migration versions"):
        r.run()


def test_migrate_rejects_incomplete_migrations():
    r = runner(migrations=[dict(version="001_01", name="x")])
    with pytest.raises(CODE.dbops_migrate.MigrationError, match="needs version, name and sql"):
        r.run()


def test_migrate_rejects_an_unknown_kind():
    r = runner(migrations=[mig("001_01", kind="sometimes")])
    with pytest.raises(CODE.dbops_migrate.MigrationError, match="unknown migration kind 'sometimes'"):
        r.run()


def test_migrate_refuses_checksum_drift_naming_the_file():
    applied = mig("001_01", "SELECT 1;")
    ledger = {"001_01": dict(checksum=sql.checksum("SELECT 0;"), applied_at="2026-01-01", applied_by="op")}
    with pytest.raises(CODE.dbops_migrate.MigrationError) as err:
        runner(check_mode=True).apply(plan([applied, mig("001_02")], ledger))
    assert "refusing to continue" in str(err.value) and "files/sql/001_01_x.sql" in str(err.value)


def test_migrate_restamps_a_superseded_checksum_instead_of_refusing():
    old = "SELECT 0;"
    new = "-- dbops:supersedes sha256:%s\nSELECT 1;" % sql.checksum(old)
    ledger = {"001_01": dict(checksum=sql.checksum(old), applied_at="t", applied_by="op")}
    res = runner(check_mode=True).apply(plan([mig("001_01", new)], ledger))
    assert res["changed"] and res["restamped"] == ["001_01"] and res["pending"] == []
    other = "-- dbops:supersedes sha256:%s\nSELECT 1;" % sql.checksum("SELECT 2;")
    with pytest.raises(CODE.dbops_migrate.MigrationError, match="refusing to continue"):
        runner(check_mode=True).apply(plan([mig("001_01", other)], ledger))


def test_migrate_plan_in_check_mode_needs_no_database():
    ledger = {"001_01": dict(checksum=sql.checksum("SELECT 1;"), applied_at="t", applied_by="op")}
    res = runner(check_mode=True).apply(plan([mig("001_01"), mig("001_02"), mig("001_03")], ledger))
    assert res["changed"] and res["pending"] == ["001_02", "001_03"] and res["applied"] == []
    res = runner(check_mode=True).apply(plan([mig("001_01")], ledger))
    assert not res["changed"] and res["pending"] == []


def test_migrate_repeatables_run_when_new_changed_or_rolled_back():
    ledger = {"001_01": dict(checksum=sql.checksum("SELECT 1;"), applied_at="t", applied_by="op")}
    reps = [mig("001/01_a", "SELECT 'a';", kind="repeatable"), mig("001/02_b", "SELECT 'b';", kind="repeatable"),
            mig("001/03_c", "SELECT 'c';", kind="repeatable"), mig("001/04_d", "SELECT 'd';", kind="repeatable")]
    rows = {"001/01_a": dict(checksum=sql.checksum("SELECT 'a';"), action="applied"),
            "001/02_b": dict(checksum=sql.checksum("SELECT 'old b';"), action="applied"),
            "001/03_c": dict(checksum=sql.checksum("SELECT 'c';"), action="rolled_back")}
    res = runner(check_mode=True).apply(plan([mig("001_01")] + reps, ledger, rows))
    assert res["pending"] == ["001/02_b", "001/03_c", "001/04_d"] == res["repeatable_pending"]
    rows.update({k: dict(checksum=sql.checksum(m["sql"]), action="applied") for k, m in
                 (("001/02_b", reps[1]), ("001/03_c", reps[2]), ("001/04_d", reps[3]))})
    assert runner(check_mode=True).apply(plan([mig("001_01")] + reps, ledger, rows))["changed"] is False


def test_migrate_names_retired_rows_of_the_phase():
    ledger = {v: dict(checksum=sql.checksum("SELECT 1;"), applied_at="t", applied_by="op")
              for v in ("001_01", "002_01", "002_03")}
    res = runner(check_mode=True).apply(plan([mig("002_01")], ledger))
    assert res["retired"] == ["002_03"] and not res["changed"]


def test_migrate_rollback_plan_newest_first_and_needs_rollback_sql():
    ledger = {"001_01": {}, "001_02": {}}
    migs = [mig("001_01", rollback="SELECT -1;"), mig("001_02", rollback="SELECT -2;"), mig("001_03")]
    res = runner(check_mode=True).rollback(plan(migs, ledger))
    assert res["pending"] == ["001_02", "001_01"] and res["changed"]
    with pytest.raises(CODE.dbops_migrate.MigrationError, match="no rollback SQL for 001_03"):
        runner(check_mode=True, include_unrecorded=True).rollback(plan(migs, ledger))
    assert runner(check_mode=True).rollback(plan(migs, {}))["changed"] is False


def test_migrate_rollback_undoes_code_before_state():
    migs = [mig("002_01", rollback="SELECT -1;"), mig("002/01_x", kind="repeatable", rollback="SELECT -3;"),
            mig("002/02_y", kind="repeatable", rollback="SELECT -4;")]
    res = runner(check_mode=True).rollback(plan(migs, {"002_01": {}}))
    assert res["pending"] == ["002/02_y", "002/01_x", "002_01"]
    migs[2]["rollback_sql"] = None
    with pytest.raises(CODE.dbops_migrate.MigrationError, match="files/sql/rollback/repeatable/"):
        runner(check_mode=True).rollback(plan(migs, {"002_01": {}}))


def test_lookup_reads_repeatables_and_preconditions(tmp_path):
    (tmp_path / "rollback" / "repeatable" / "002").mkdir(parents=True)
    (tmp_path / "repeatable" / "002").mkdir(parents=True)
    (tmp_path / "002_01_state.sql").write_text("CREATE TABLE t ();")
    (tmp_path / "rollback" / "002_preconditions.sql").write_text("SELECT 'guard';")
    (tmp_path / "repeatable" / "002" / "02_b.sql").write_text("SELECT 'b';")
    (tmp_path / "repeatable" / "002" / "01_a.sql").write_text("SELECT 'a';")
    (tmp_path / "rollback" / "repeatable" / "002" / "01_a.sql").write_text("SELECT '-a';")
    migs = playbook_runner.lookup_migrations("002", tmp_path)
    assert [(m["kind"], m["version"]) for m in migs] == [
        ("versioned", "002_01"), ("precondition", "002/preconditions"), ("repeatable", "002/01_a"),
        ("repeatable", "002/02_b")]
    assert migs[2]["rollback_sql"] == "SELECT '-a';" and migs[3]["rollback_sql"] is None
    (tmp_path / "repeatable" / "002" / "3_bad.sql").write_text("SELECT 1;")
    with pytest.raises(AnsibleError, match="bad repeatable file name"):
        playbook_runner.lookup_migrations("002", tmp_path)


def test_run_lock_refusal_names_holder_and_how_to_override():
    text = CODE.dbops_run_lock.refusal(dict(holder="alice@laptop (phase1)", run_id="R-1", acquired_at="a",
                                            renewed_at="b", expires_at="c"))
    assert "alice@laptop (phase1)" in text and "R-1" in text and "run_lock_force=true" in text


def test_dbops_step_tells_a_lost_connection_from_an_sql_error(baseline_db):
    """reconnect=true re-runs a step only when the session is gone, never after an SQL error."""
    import psycopg2

    step = playbook_runner.project_code().dbops_step
    conn = baseline_db.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1/0")
    except psycopg2.Error as exc:
        assert not step.connection_lost(conn, exc), "division by zero in a live session is not a lost connection"
    su = baseline_db.connect(superuser=True)
    su.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    with su.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    su.close()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        raise AssertionError("the terminated session still answered")
    except psycopg2.Error as exc:
        assert step.connection_lost(conn, exc), (type(exc), getattr(exc, "pgcode", None))
    conn.close()
