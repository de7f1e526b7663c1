"""The run lock's lease during long steps, and its fencing token (issue 9, item 9).

- A step longer than the lease (a 3 s lease; a pg_sleep step, an async job held with state=hold) keeps
  the lock: another run trying to take it all along is refused every time.
- A pg_dump longer than the lease (held up by a lock) keeps the lock too, and the dump removes the
  password file a killed run left for the same database (item 11), never another database's.
- A run whose lock was taken over is refused at its next step (scanner.dbops.step and
  scanner.dbops.migrate) with a message naming the new holder, and the step did not run.
- A running step whose lock is taken over (forced) is cancelled within a third of the lease.
A single-transaction step holds the lock row FOR SHARE from its start to its COMMIT (the fence inside
its transaction, issue 18 item 12: tests/test_integrity_locks.py), so a takeover waits for it; the long
steps here are procedures committing as they go (like the backfill), which hold the row only briefly.
"""
from __future__ import annotations

import hashlib
import threading
import time

import psycopg2
import pytest
import yaml

import playbook_runner
from playbook_runner import finish, run_playbook, start_playbook

PG_BIN = "/usr/lib/postgresql/15/bin/"
CONNECTION = str(playbook_runner.REPO / "playbooks" / "vars" / "connection.yml")
TAKEOVER = ("UPDATE dbops.run_lock SET run_id = 'maint-B', holder = 'awx (maintenance)', acquired_at = now(), "
            "renewed_at = now(), expires_at = now() + interval '10 minutes'")
# A long step that commits as it goes, like CALL dbops.p2_backfill (a procedure that knows nothing of
# the fencing token: only the lease keeper watches it).
SLEEPER = ("CREATE OR REPLACE PROCEDURE public.itest_sleep(secs integer) LANGUAGE plpgsql AS $$ "
           "BEGIN FOR i IN 1 .. secs * 5 LOOP PERFORM pg_sleep(0.2); COMMIT; END LOOP; END $$")


def play_file(tmp_path, tasks, name="fencing") -> str:
    play = [{
        "name": name, "hosts": "scanner_db", "gather_facts": False,
        "vars_files": [CONNECTION],
        "module_defaults": {"group/scanner.dbops.all": "{{ scanner_db_login }}"},
        "tasks": tasks,
    }]
    path = tmp_path / (name + ".yml")
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    return str(path)


def acquire(run_id="run-A", ttl=3):
    return [
        {"name": "Name the run", "ansible.builtin.set_fact": {"run_lock_run_id": run_id}},
        {"name": "Take the run lock", "ansible.builtin.include_role": {"name": "run_lock", "tasks_from": "acquire"},
         "vars": {"run_lock_ttl_seconds": ttl}},
    ]


class Contender(threading.Thread):
    """Another run (the 03:00 maintenance job) trying to take the lock as run-B every 0.3 s, as
    scanner.dbops.run_lock does: it can only take an expired lease."""

    def __init__(self, db, start_when=None):
        super().__init__(daemon=True)
        self.db, self.stop, self.tries, self.taken = db, threading.Event(), 0, []
        self.start_when = start_when or (lambda: True)

    def run(self):
        conn = self.db.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            while not self.stop.wait(0.3):
                if not self.start_when():
                    continue
                cur.execute("SELECT to_regclass('dbops.run_lock') IS NOT NULL")
                if not cur.fetchone()[0]:
                    continue
                # taking over an expired lease (once run-A released it there is no row to take)
                cur.execute("""
                    UPDATE dbops.run_lock SET run_id = 'run-B', holder = 'maintenance', acquired_at = now(),
                           renewed_at = now(), expires_at = now() + interval '10 minutes'
                     WHERE lock_name = 'migration' AND expires_at < now()
                    RETURNING 1""")
                self.tries += 1
                if cur.fetchone() is not None:
                    self.taken.append(time.monotonic())
                    break
        conn.close()


def test_a_step_longer_than_the_lease_keeps_the_lock(baseline_db, tmp_path):
    """3 s lease, a 9 s step: the lease is renewed while it runs, run-B never gets it."""
    db = baseline_db
    db.query(SLEEPER)
    tasks = acquire(ttl=3) + [
        {"name": "Long step", "scanner.dbops.step": {"sql": "CALL public.itest_sleep(9)"}, "register": "long_step"},
        {"name": "Release", "ansible.builtin.include_role": {"name": "run_lock", "tasks_from": "release"}},
    ]
    probe = db.connect()
    probe.autocommit = True

    def step_running():
        with probe.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'CALL public.itest_sleep(9)' "
                        "AND datname = current_database()")
            return cur.fetchone()[0] > 0

    # the other run tries while the step runs (on this busy test machine the tasks around it may take
    # longer than the short lease; in production the lease is 30 min)
    contender = Contender(db, start_when=step_running)
    contender.start()
    try:
        res = run_playbook(db, play_file(tmp_path, tasks))
    finally:
        contender.stop.set()
        contender.join(10)
        probe.close()
    assert res.ok, res.text
    assert contender.tries > 15, contender.tries
    assert contender.taken == [], "run-B took the lock while run-A was still working: %s" % res.text
    step = res.task("Long step")
    assert step["lease_renewals"] >= 3, step
    assert db.scalar("SELECT count(*) FROM dbops.run_lock") == 0


def test_a_run_whose_lock_was_taken_over_is_refused_at_its_next_step(baseline_db, tmp_path):
    """The lease of run-A is taken over (as the maintenance job would once it expired): the next step
    and the next migration of run-A stop before doing anything, naming the new holder."""
    db = baseline_db
    tasks = acquire(ttl=600) + [
        {"name": "A step while holding the lock", "scanner.dbops.step": {"sql": "SELECT 1"}},
        {"name": "Another run takes the lock over",
         "community.postgresql.postgresql_query": {"query": TAKEOVER}},
        {"name": "Next step", "scanner.dbops.step": {"sql": "CREATE TABLE public.fence_probe (x int)"},
         "ignore_errors": True, "register": "next_step"},
        {"name": "Next migration", "scanner.dbops.migrate": {"migrations": [
            {"kind": "versioned", "version": "900_01", "name": "probe",
             "sql": "CREATE TABLE public.fence_probe2 (x int);"}]},
         "ignore_errors": True},
        {"name": "Release (not ours any more)", "ansible.builtin.include_role": {"name": "run_lock",
                                                                                 "tasks_from": "release"}},
        {"name": "A step after the release is not fenced", "scanner.dbops.step": {"sql": "SELECT 2"}},
    ]
    res = run_playbook(db, play_file(tmp_path, tasks))
    assert res.ok, res.text
    for name in ("Next step", "Next migration"):
        r = res.task(name, "failed")
        assert r, res.text
        msg = r["msg"]
        assert "this run (run run-A) no longer holds the migration run lock" in msg, msg
        assert "awx (maintenance) (run maint-B)" in msg and "Stopped before" in msg, msg
        assert "Traceback" not in msg and r["lock_lost"] is True
    assert db.scalar("SELECT to_regclass('public.fence_probe') IS NULL"), "the refused step ran"
    assert db.scalar("SELECT to_regclass('public.fence_probe2') IS NULL"), "the refused migration ran"
    assert db.query("SELECT run_id FROM dbops.run_lock") == [("maint-B",)], "run-A released the new holder's lock"


def test_a_running_step_is_cancelled_when_its_lock_is_taken_over(baseline_db, tmp_path):
    db = baseline_db
    db.query(SLEEPER)
    tasks = acquire(ttl=3) + [
        {"name": "Long step", "scanner.dbops.step": {"sql": "CALL public.itest_sleep(60)"}},
    ]
    proc, prep = start_playbook(db, play_file(tmp_path, tasks))
    deadline = time.monotonic() + 60
    while not db.scalar("SELECT count(*) FROM pg_stat_activity WHERE query = 'CALL public.itest_sleep(60)' "
                        "AND datname = current_database()"):
        assert time.monotonic() < deadline and proc.poll() is None, "the step did not start"
        time.sleep(0.2)
    db.query(TAKEOVER)
    t_taken = time.monotonic()
    res = finish(proc, prep, timeout=60)
    assert not res.ok
    assert time.monotonic() - t_taken < 10, "the step ran on for %.0f s after losing the lock" % (
        time.monotonic() - t_taken)
    msg = res.task("Long step", "failed")["msg"]
    assert "no longer holds the migration run lock" in msg and "Stopped during the step" in msg, msg
    assert "maint-B" in msg


def test_a_long_backup_keeps_the_lock_and_removes_a_killed_runs_password_file(baseline_db, tmp_path):
    """pg_dump takes 15 s (a slow wrapper; 5 s lease): the lock stays this run's. A PGPASSFILE a killed
    run left for this database is removed, one of another database is not, none is left after."""
    db = baseline_db
    workdir = playbook_runner.new_workdir()
    pgpass_dir = workdir / "backups" / ".pgpass.d"
    pgpass_dir.mkdir(parents=True, mode=0o700)
    prefix = "pgpass_%s_" % hashlib.sha1(("%s:%s/%s/%s" % (db.host, db.port, db.name, db.user)).encode()) \
        .hexdigest()[:16]
    killed = pgpass_dir / (prefix + "20260101T000000Z.pgpass")
    killed.write_text("secret-left-by-a-killed-run")
    other = pgpass_dir / "pgpass_0123456789abcdef_20260101T000000Z.pgpass"
    other.write_text("another database's live run")
    slow_bin = tmp_path / "bin"
    slow_bin.mkdir()
    started = tmp_path / "pg_dump.started"
    (slow_bin / "pg_dump").write_text("#!/bin/sh\nsleep 3\ntouch {0}\nsleep 12\n{1}pg_dump \"$@\"\nrc=$?\nrm {0}\nexit $rc\n".format(started, PG_BIN))
    (slow_bin / "pg_dump").chmod(0o755)
    tasks = acquire(ttl=5) + [
        {"name": "Back up", "ansible.builtin.include_role": {"name": "backup", "tasks_from": "dump"},
         "vars": {"backup_tables": ["system_logs"], "backup_pg_bin": str(slow_bin) + "/",
                  "backup_label": "fencing", "backup_poll_seconds": 1}},
        {"name": "Release", "ansible.builtin.include_role": {"name": "run_lock", "tasks_from": "release"}},
    ]
    # the other run tries while pg_dump runs, from 3 s after its start (on this busy test machine the
    # tasks before it may take longer than the short lease; in production the lease is 30 min)
    contender = Contender(db, start_when=started.exists)
    contender.start()
    try:
        res = run_playbook(db, play_file(tmp_path, tasks), workdir=workdir)
    finally:
        contender.stop.set()
        contender.join(10)
    assert res.ok, res.text
    assert contender.tries > 30 and contender.taken == [], "run-B took the lock during the backup"
    assert res.task("Keep the run lock while pg_dump runs")["renewals"] >= 2
    assert list((workdir / "backups").glob("backup_*fencing*.dump")), "no backup written"
    assert not killed.exists(), "the killed run's password file was left"
    assert other.exists(), "another database's password file was removed"
    assert sorted(p.name for p in pgpass_dir.iterdir()) == [other.name]
    assert oct(pgpass_dir.stat().st_mode & 0o777) == "0o700"
