"""Bad input and unfit targets: playbooks/phase1.yml must stop before it changes anything,
with a message that names what to fix, and without ever printing the password.

Each case runs the real playbook against a fresh database of the embedded PostgreSQL 15 as a
login role with a distinctive password (a member of the owning role `scan`, like an RDS
operator granted the owner role), then checks:
  - the run failed, in the preflight play (no run lock taken, no backup, no DDL);
  - the failure message names the cause and the setting to fix;
  - the password appears nowhere in stdout/stderr nor in any file the run left behind;
  - the database is exactly as before (schemas, indexes, constraints, ledger rows).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import time
import uuid

import psycopg2
import pytest
import yaml

import playbook_runner
from conftest import free_port
from playbook_runner import UNSET, db_state, run_playbook

PASSWORD = "Zebra-Distinct:Pw#8841"      # distinctive: any leak is found by a plain substring search
WRONG_PASSWORD = "Wrong-Zebra:Pw#5512"


@dataclasses.dataclass
class Login:
    """A DbInfo look-alike for run_playbook: same database, another role."""
    db: object
    user: str
    password: str

    host = property(lambda self: self.db.host)
    port = property(lambda self: self.db.port)
    name = property(lambda self: self.db.name)


@pytest.fixture(scope="module")
def operator(pg_server):
    """A LOGIN role with a distinctive password, member of the table owner `scan`."""
    role = "dbops_op_" + uuid.uuid4().hex[:8]
    su = pg_server.connect("postgres", superuser=True)
    su.autocommit = True
    with su.cursor() as cur:
        cur.execute("CREATE ROLE %s LOGIN PASSWORD %%s IN ROLE %s" % (role, pg_server.user), (PASSWORD,))
    try:
        yield role
    finally:
        with su.cursor() as cur:
            cur.execute("DROP ROLE IF EXISTS %s" % role)
        su.close()


@pytest.fixture
def target(make_db, operator):
    """A fresh pg_cron-enabled baseline database (the cron database), reached as the operator."""
    db = make_db(baseline=True, seed_calls=50, cron=True)
    return Login(db, operator, PASSWORD)


def files_under(path) -> list:
    out = []
    for root, _dirs, files in os.walk(path):
        out += [os.path.join(root, f) for f in files]
    return out


def assert_refused(res, before, db, *needles, password=PASSWORD):
    """The run failed in preflight, said `needles`, kept the password secret, changed nothing."""
    assert res.rc != 0, res.text
    assert res.failures, "the run failed without a task failure message:\n" + res.text
    message = res.failure_text
    for needle in needles:
        if isinstance(needle, re.Pattern):
            assert needle.search(message), "message does not match %r:\n%s" % (needle.pattern, res.text)
        else:
            assert needle in message, "message does not name %r:\n%s" % (needle, res.text)
    # Stopped in the preflight play: no lock taken, no backup, no migration attempted.
    ran = res.task_names()
    for task in ("acquire | Take or renew the migration lock", "dump | Run pg_dump", "Apply pending migrations"):
        assert not any(task in t for t in ran), "%r ran:\n%s" % (task, res.text)
    assert not (res.backup_dir.exists() and any(res.backup_dir.iterdir())), "a backup was written"
    # The password is nowhere: not in what the operator sees, not in files left behind.
    assert password not in res.stdout, "password in stdout"
    assert password not in res.stderr, "password in stderr"
    assert password not in res.all_text
    for path in files_under(res.workdir):
        if path == str(res.inventory) or "extra_vars_" in path:
            continue        # the inputs themselves
        with open(path, "rb") as fh:
            assert password.encode() not in fh.read(), "password written to %s" % path
    assert db_state(db) == before, "the database changed"


# ---- inputs ----------------------------------------------------------------------------------------
def test_missing_variable(target):
    before = db_state(target.db)
    res = run_playbook(target, "phase1", inventory_vars={"scanner_db_name": UNSET})
    assert_refused(res, before, target.db, "scanner_db_name")


@pytest.mark.parametrize("var, value, needles", [
    ("scanner_db_port", "not-a-port", ["scanner_db_port", "int"]),
    ("scanner_db_sslmode", "bogus", ["scanner_db_sslmode", "bogus", "verify-full"]),
])
def test_invalid_variable(target, var, value, needles):
    before = db_state(target.db)
    res = run_playbook(target, "phase1", inventory_vars={var: value})
    assert_refused(res, before, target.db, *needles)


def test_wrong_password(target):
    before = db_state(target.db)
    res = run_playbook(Login(target.db, target.user, WRONG_PASSWORD), "phase1")
    assert_refused(res, before, target.db, "Cannot connect to PostgreSQL at 127.0.0.1:%d" % target.port,
                   "password authentication failed", "the password (vault / AWX credential)",
                   password=WRONG_PASSWORD)
    assert PASSWORD not in res.all_text


def test_closed_port(target):
    before = db_state(target.db)
    port = free_port()
    res = run_playbook(target, "phase1", inventory_vars={"scanner_db_port": port})
    assert_refused(res, before, target.db, "Cannot connect to PostgreSQL at 127.0.0.1:%d" % port,
                   "Check scanner_db_host / scanner_db_port", re.compile(r"(?i)connection refused|could not connect"))


def test_server_outside_the_supported_range(target):
    """A real server outside the configured range is refused before anything is touched, with the range
    and what to do: here PostgreSQL 15 against a range that ends at 14 (the capability map is fed the
    server's own server_version_num; tests/test_server_versions.py feeds it 12 and 19)."""
    before = db_state(target.db)
    res = run_playbook(target, "phase1", extra_vars={"preflight_max_server_major": 14})
    assert_refused(res, before, target.db, re.compile(r"PostgreSQL 15 \(server_version_num 15\d{4}\) is newer than "
                                                      r"this project supports \(PostgreSQL 13 to 14"),
                   "nothing was changed")


# ---- the inventory ---------------------------------------------------------------------------------
def run_with_inventory(db, inventory, playbook="phase1", args=()):
    """run_playbook, but with `-i inventory` (a path as the operator typed it, relative to the repo)."""
    prep = playbook_runner.prepare(db, playbook, args=list(args))
    prep.cmd[prep.cmd.index("-i") + 1] = str(inventory)
    return playbook_runner.finish(playbook_runner.launch(prep), prep)


def assert_nothing_ran(res, before, db):
    assert res.rc != 0, res.text
    ran = [e["task"] for e in res.events if e["event"] == "task" and e["status"] != "skipped"]
    assert all(t.startswith("Assert at least one host of the group scanner_db") for t in ran), ran
    assert db_state(db) == before, "the database changed"


def test_mistyped_inventory_path(target):
    """ansible-playbook -i inventory/prdo: ansible.cfg's unparsed_is_failed stops it before any play."""
    before = db_state(target.db)
    res = run_with_inventory(target, "inventory/prdo")
    assert_nothing_ran(res, before, target.db)
    assert res.shows("failed to parse inventory source %s" % (playbook_runner.REPO / "inventory" / "prdo")), res.text
    assert not any(e["event"] == "play" for e in res.events), res.text


@pytest.mark.parametrize("groups", [
    {"scanner_db": {"hosts": None}},                                   # the group is empty
    {"scanner_dbs": {"hosts": {playbook_runner.HOST: None}}},          # misnamed: no group scanner_db
], ids=["empty-group", "misnamed-group"])
def test_inventory_without_scanner_db_hosts(target, tmp_path, groups):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": groups}}))
    before = db_state(target.db)
    res = run_with_inventory(target, inventory)
    assert_nothing_ran(res, before, target.db)
    assert res.shows("No host in group scanner_db: check the inventory (-i %s)" % inventory), res.text
    assert res.shows("a mistyped path parses as an empty inventory"), res.text


def test_limit_outside_scanner_db_is_refused(target, tmp_path):
    """--limit naming only hosts outside scanner_db would run nothing either."""
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {
        "scanner_db": {"hosts": {playbook_runner.HOST: playbook_runner.host_vars(target, tmp_path)}},
        "tools": {"hosts": {"bastion": {"ansible_connection": "local"}}}}}}))
    before = db_state(target.db)
    res = run_with_inventory(target, inventory, args=["--limit", "bastion"])
    assert_nothing_ran(res, before, target.db)
    assert res.shows("--limit bastion leaves no host of group scanner_db (%s)" % playbook_runner.HOST), res.text


def test_inventory_check_runs_once_under_limit(target):
    """The check itself passes under --limit <a host of the group>, on that host, once."""
    res = run_playbook(target, "playbooks/phases/inventory_check.yml", args=["--limit", playbook_runner.HOST])
    assert res.ok, res.text
    assert [s for n, s, _ in res.tasks] == ["ok"], res.text


def test_every_operator_playbook_checks_the_inventory_first():
    """Each operator playbook's first entry imports phases/inventory_check.yml; site.yml gets it from
    phase1.yml and tells the later phases (inventory_check_done: true) to skip theirs."""
    playbooks = playbook_runner.REPO / "playbooks"
    for path in sorted(playbooks.glob("*.yml")):
        if path.name in ("demo_seed.yml", "site.yml"):      # demo data only; site.yml: below
            continue
        first = yaml.safe_load(path.read_text())[0]
        assert first.get("ansible.builtin.import_playbook") == "phases/inventory_check.yml", path.name
    site = yaml.safe_load((playbooks / "site.yml").read_text())
    assert site[0]["ansible.builtin.import_playbook"] == "phase1.yml" and "vars" not in site[0]
    for entry in site[1:]:
        assert entry["vars"]["inventory_check_done"] is True, entry


# ---- the target ------------------------------------------------------------------------------------
def test_missing_privilege(target):
    role = "dbops_noown_" + uuid.uuid4().hex[:6]
    pw = "NoOwn-Distinct:Pw#3307"
    db = target.db
    db.query("CREATE ROLE %s LOGIN PASSWORD %%s" % role, (pw,), superuser=True)
    try:
        db.query('GRANT CONNECT ON DATABASE "%s" TO %s' % (db.name, role), superuser=True)
        before = db_state(db)
        res = run_playbook(Login(db, role, pw), "phase1")
        assert_refused(res, before, db, "Role %s lacks privileges" % role, "it does not own",
                       "bcfy_calls_raw (owner scan)", "transcripts (owner scan)",
                       "no CREATE on database %s" % db.name, "Run as the owner", password=pw)
    finally:
        db.query('REVOKE ALL ON DATABASE "%s" FROM %s' % (db.name, role), superuser=True)
        db.query("DROP ROLE %s" % role, superuser=True)


def test_pg_cron_absent(make_db, operator):
    # Any database other than cron.database_name ('scanner') cannot have pg_cron.
    db = make_db(baseline=True, seed_calls=50)
    before = db_state(db)
    res = run_playbook(Login(db, operator, PASSWORD), "phase1")
    assert_refused(res, before, db, "pg_cron is not usable in %s" % db.name, "cron.database_name is scanner",
                   "cron.database_name=%s" % db.name, "preflight_require_pg_cron=false")


def test_backup_folder_under_a_file(target, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    backup_dir = afile / "backups"
    before = db_state(target.db)
    res = run_playbook(target, "phase1", inventory_vars={"backup_dir": str(backup_dir)})
    assert_refused(res, before, target.db, "The backup folder %s" % backup_dir, "is not writable",
                   "its parent %s is missing or not a writable folder" % afile, "Set backup_dir")
    assert afile.read_text() == "not a folder"


def chattr(flag: str, path) -> bool:
    if not shutil.which("chattr"):
        return False
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_backup_folder_immutable(target, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chattr +i needs root (CAP_LINUX_IMMUTABLE); the non-writable case is covered by "
                    "test_backup_folder_under_a_file")
    backup_dir = tmp_path / "immutable_backups"
    backup_dir.mkdir()
    if not chattr("+i", backup_dir):
        pytest.skip("chattr +i is not supported on the file system of %s" % tmp_path)
    try:
        if os.access(backup_dir, os.W_OK):
            pytest.skip("this kernel reports an immutable folder as writable to root (access(2))")
        before = db_state(target.db)
        res = run_playbook(target, "phase1", inventory_vars={"backup_dir": str(backup_dir)})
        assert_refused(res, before, target.db, "The backup folder %s" % backup_dir,
                       "exists but is not a writable folder", "Set backup_dir")
    finally:
        chattr("-i", backup_dir)
    assert list(backup_dir.iterdir()) == []


def test_pg_dump_older_than_server(target, tmp_path):
    bindir = tmp_path / "oldbin"
    bindir.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        script = bindir / tool
        script.write_text("#!/bin/sh\necho '%s (PostgreSQL) 11.22'\n" % tool)
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    before = db_state(target.db)
    res = run_playbook(target, "phase1", extra_vars={"preflight_pg_bin_dir": str(bindir)})
    assert_refused(res, before, target.db, "pg_dump on testdb: pg_dump (PostgreSQL) 11.22",
                   "pg_restore on testdb: pg_restore (PostgreSQL) 11.22", "The server is PostgreSQL 15",
                   "Install postgresql-client-15 or set preflight_pg_bin_dir")


def test_pg_dump_missing(target, tmp_path):
    empty = tmp_path / "nobin"
    empty.mkdir()
    before = db_state(target.db)
    res = run_playbook(target, "phase1", extra_vars={"preflight_pg_bin_dir": str(empty)})
    assert_refused(res, before, target.db, "pg_dump on testdb: not found", "set preflight_pg_bin_dir")


def test_read_only_target(target):
    db = target.db
    db.query('ALTER DATABASE "%s" SET default_transaction_read_only = on' % db.name, superuser=True)
    try:
        before = db_state(db)
        res = run_playbook(target, "phase1")
        assert_refused(res, before, db, "read-only (default_transaction_read_only = on)",
                       "Point scanner_db_host at the writer endpoint")
    finally:
        su = db.server.connect("postgres", superuser=True)   # not from the read-only database itself
        su.autocommit = True
        with su.cursor() as cur:
            cur.execute('ALTER DATABASE "%s" RESET default_transaction_read_only' % db.name)
        su.close()


def test_long_running_transaction(target):
    db = target.db
    holder = db.connect(superuser=True, application_name="dbops-test-long-xact")
    try:
        with holder.cursor() as cur:          # psycopg2 opens a transaction: it stays "idle in transaction"
            cur.execute("SELECT count(*) FROM bcfy_calls_raw")
        pid = holder.get_backend_pid()
        time.sleep(1.5)
        before = db_state(db)
        res = run_playbook(target, "phase1", extra_vars={"preflight_max_xact_age_seconds": 1})
        assert_refused(res, before, db, "older than 1 s", "pid %d (postgres, dbops-test-long-xact" % pid,
                       "idle in transaction", "pg_cancel_backend", "preflight_max_xact_age_seconds")
    finally:
        holder.rollback()
        holder.close()


def test_checksum_drift(target, tmp_path):
    db = target.db
    # Phase 1 applied through the runner's own code (same ledger, same checksums), as the operator.
    applied = playbook_runner.migrate_direct(db, "001", user=target.user, password=target.password)
    assert [m["version"] for m in applied["applied"]] == ["001_01", "001_02", "001_03", "001/01_monitoring_views"], applied
    src = playbook_runner.REPO / "files" / "sql"
    copy = tmp_path / "sql"
    (copy / "rollback").mkdir(parents=True)
    for path in src.glob("001_*.sql"):
        shutil.copy(path, copy / path.name)
        shutil.copy(src / "rollback" / path.name, copy / "rollback" / path.name)
    edited = copy / "001_02_check_constraints.sql"
    edited.write_text(edited.read_text() + "\n-- an edit after the file was applied\n")
    before = db_state(db)
    res = run_playbook(target, "phase1", extra_vars={"preflight_sql_dir": str(copy), "migrate_sql_dir": str(copy)})
    assert_refused(res, before, db, "refusing to continue", "001_02_check_constraints.sql",
                   "put new changes in a new NNN_MM file")
    assert "001_01_indexes.sql" not in res.failure_text and "001_03_monitoring.sql" not in res.failure_text


def test_unchanged_copy_is_not_drift(target, tmp_path):
    """Control for test_checksum_drift: a CRLF copy of the applied files is the same migration."""
    db = target.db
    playbook_runner.migrate_direct(db, "001", user=target.user, password=target.password)
    src = playbook_runner.REPO / "files" / "sql"
    copy = tmp_path / "sql"
    (copy / "rollback").mkdir(parents=True)
    for path in src.glob("001_*.sql"):
        (copy / path.name).write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
        shutil.copy(src / "rollback" / path.name, copy / "rollback" / path.name)
    res = run_playbook(target, "phase1", check=True,
                       extra_vars={"preflight_sql_dir": str(copy), "migrate_sql_dir": str(copy)})
    assert res.ok, res.text
    assert "nothing pending: already applied" in "\n".join(res.messages), res.text
    assert PASSWORD not in res.output


def test_connection_errors_never_leak_through_psycopg2(target):
    """The same wrong password straight through psycopg2: the driver itself never echoes it."""
    with pytest.raises(psycopg2.OperationalError) as err:
        psycopg2.connect(host=target.host, port=target.port, dbname=target.name, user=target.user,
                         password=WRONG_PASSWORD, connect_timeout=5)
    assert WRONG_PASSWORD not in str(err.value)
