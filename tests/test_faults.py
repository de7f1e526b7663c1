"""Faults during playbooks/phase1.yml on a real PostgreSQL 15: what a busy production database
and an unlucky operator do to a migration, and that the playbook survives each.

  (a) an INVALID index left by an interrupted build is dropped and rebuilt;
  (b) a table locked by the application for a few seconds: lock timeouts are retried, the run
      succeeds and the retries are reported ((a) and (b) share one run);
  (c) a lock that never goes away: retries run out, the run stops with a clear message, the
      database stays usable, the run lock is released, and a re-run completes;
  (d) two runs at once: a live lease of another run stops the second at once, naming the
      holder; an expired lease is taken over with a warning (by the re-run of (c)); the lease
      module itself refuses a second holder atomically;
  (e) the controller killed mid-build (SIGKILL to the ansible-playbook process group): the
      killed run's lease stays live, -e run_lock_force=true takes it over (with a warning) and
      the re-run completes, rebuilding the INVALID index the interrupted build left.

Speed: except for the last re-run of (e), runs use an empty verify_checks_dir (the guide's 20
read-only checks are exercised by test_playbooks.py) and backup_poll_seconds=1.
"""
from __future__ import annotations

import os
import pathlib
import signal
import threading
import time

import pytest

import playbook_runner
from conftest import create_db, drop_db, wait_for
from playbook_runner import db_state, finish, kill_tree, ledger, run_playbook, start_playbook

SEED_CALLS = 3000
PHASE1_VERSIONS = ["001_01", "001_02", "001_03"]
PENDING_IDX_DEF = ("CREATE INDEX bcfy_calls_raw_pending_idx ON public.bcfy_calls_raw USING btree (started_at) "
                   "WHERE (processed = false)")
GIN_IDX_DEF = "CREATE INDEX transcripts_tsv_gin_idx ON public.transcripts USING gin (tsv)"


@pytest.fixture(scope="module")
def fast_vars(tmp_path_factory):
    empty = tmp_path_factory.mktemp("no_checks")
    (empty / "001").mkdir()
    return {"verify_checks_dir": str(empty), "backup_poll_seconds": 1}


@pytest.fixture
def db(make_db):
    return make_db(baseline=True, seed_calls=SEED_CALLS, cron=True)


def invalid_indexes(db) -> list:
    return [r[0] for r in db.query("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid ORDER BY 1")]


def index_def(db, name):
    return db.scalar("SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i "
                     "WHERE i.indexrelid = to_regclass(%s) AND i.indisvalid AND i.indisready", ("public." + name,))


def run_lock_rows(db) -> list:
    if not db.scalar("SELECT to_regclass('dbops.run_lock') IS NOT NULL"):
        return []
    return db.query("SELECT run_id, holder, expires_at > now() AS live FROM dbops.run_lock")


GIN_BUILD = "%CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_tsv_gin_idx%"


def dbops_backends(db, query_like="%") -> list:
    """Sessions of the playbook's modules (playbooks/vars/connection.yml sets application_name
    'scanner-dbops' for all of them) whose current or last statement matches query_like."""
    return db.query("SELECT pid, state, wait_event_type, query FROM pg_stat_activity "
                    "WHERE application_name LIKE 'scanner-dbops%%' AND datname = current_database() "
                    "AND pid <> pg_backend_pid() AND query LIKE %s", (query_like,), superuser=True)


def assert_phase1_complete(db):
    assert ledger(db) == PHASE1_VERSIONS
    assert invalid_indexes(db) == []
    assert index_def(db, "bcfy_calls_raw_pending_idx") == PENDING_IDX_DEF
    assert index_def(db, "transcripts_tsv_gin_idx") == GIN_IDX_DEF
    assert db.scalar("SELECT to_regclass('public.transcripts_tsv_idx')") is None
    assert run_lock_rows(db) == [], "the run lock was not released"


class TableLocker(threading.Thread):
    """Another session that takes `LOCK TABLE <table> IN ACCESS EXCLUSIVE MODE` once the backup of
    the run is written (earlier, pg_dump and the row counts would simply queue behind it) and
    holds it until release() is called, or hold_after_migrate seconds after the migration
    reached the GIN build on transcripts."""

    def __init__(self, db, backup_dir: pathlib.Path, table="transcripts", hold_after_migrate=None):
        super().__init__(daemon=True)
        self.db, self.backup_dir, self.table = db, pathlib.Path(backup_dir), table
        self.hold_after_migrate = hold_after_migrate
        self.locked = threading.Event()
        self._release = threading.Event()
        self.error = None
        self.held_seconds = 0.0
        self.saw_migrate = False

    def release(self):
        self._release.set()

    def run(self):
        try:
            wait_for(lambda: list(self.backup_dir.glob("*.manifest.json")), timeout=180, what="the backup")
            conn = self.db.connect(superuser=True, application_name="dbops-test-app-lock")
            try:
                with conn.cursor() as cur:
                    cur.execute("LOCK TABLE public.%s IN ACCESS EXCLUSIVE MODE" % self.table)
                t0 = time.monotonic()
                self.locked.set()
                if self.hold_after_migrate is not None:
                    deadline = time.monotonic() + 120
                    while not self._release.is_set() and time.monotonic() < deadline:
                        if dbops_backends(self.db, GIN_BUILD):
                            self.saw_migrate = True
                            break
                        time.sleep(0.05)
                    self._release.wait(self.hold_after_migrate)
                else:
                    self._release.wait(300)
                conn.rollback()
                self.held_seconds = time.monotonic() - t0
            finally:
                conn.close()
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.locked.set()


# ---- (a) + (b): one run on a busy database ---------------------------------------------------------
class TestBusyDatabase:
    """One phase1 run (to keep the file fast) facing two independent faults:
    (a) an INVALID bcfy_calls_raw_pending_idx left by an interrupted build, and
    (b) the application holding ACCESS EXCLUSIVE on transcripts for ~3 s once the migration
        reaches the GIN build there. CREATE INDEX CONCURRENTLY waits up to
        migrate_concurrent_lock_timeout (5min by default: its wait does not block the
        application) before a retry; 1s makes the retries visible here."""

    @pytest.fixture(scope="class")
    def busy(self, pg_server, fast_vars):
        db = create_db(pg_server, baseline=True, seed_calls=SEED_CALLS, cron=True)
        try:
            conn = db.connect()
            conn.autocommit = True
            try:
                with conn.cursor() as cur, pytest.raises(Exception, match="could not create unique index"):
                    cur.execute("CREATE UNIQUE INDEX CONCURRENTLY bcfy_calls_raw_pending_idx "
                                "ON bcfy_calls_raw (processed)")
            finally:
                conn.close()
            invalid_before = invalid_indexes(db)
            work = playbook_runner.new_workdir()
            locker = TableLocker(db, work / "backups", hold_after_migrate=3.0)
            locker.start()
            res = run_playbook(db, "phase1", workdir=work, extra_vars={
                **fast_vars, "migrate_concurrent_lock_timeout": "1s", "migrate_lock_timeout": "1s"})
            locker.release()
            locker.join(30)
            yield dict(db=db, res=res, locker=locker, invalid_before=invalid_before)
        finally:
            drop_db(pg_server, db.name)

    def test_run_succeeds(self, busy):
        res = busy["res"]
        assert res.ok, res.text
        assert res.shows("Phase 1 Migration Complete! ✓")
        assert_phase1_complete(busy["db"])

    def test_invalid_index_is_dropped_and_rebuilt(self, busy):
        res = busy["res"]
        assert busy["invalid_before"] == ["bcfy_calls_raw_pending_idx"]
        assert res.shows("001_01 | index public.bcfy_calls_raw_pending_idx is INVALID (left by an interrupted build): "
                         "dropping and rebuilding"), res.text
        assert invalid_indexes(busy["db"]) == []
        assert index_def(busy["db"], "bcfy_calls_raw_pending_idx") == PENDING_IDX_DEF

    def test_lock_contention_is_retried(self, busy):
        res, locker = busy["res"], busy["locker"]
        assert locker.error is None, locker.error
        assert locker.saw_migrate and locker.held_seconds >= 3.0, vars(locker)
        assert res.ok, res.text
        assert res.shows("001_01 | retry 1 in 0.5s after: [55P03] canceling statement due to lock timeout"), res.text
        retries = {m["version"]: m["retries"] for m in res.task("Apply pending migrations")["applied"]}
        assert retries["001_01"] > 0, retries
        assert res.shows("%d lock retries" % retries["001_01"])
        import json
        (report,) = sorted(res.report_dir.glob("001_*.json"))
        assert json.loads(report.read_text())["migrations"][0]["retries"] == retries["001_01"]


# ---- (c) a lock that never goes away ------------------------------------------------------------------
def test_lock_retries_exhausted(db, fast_vars):
    work = playbook_runner.new_workdir()
    locker = TableLocker(db, work / "backups")
    locker.start()
    try:
        res = run_playbook(db, "phase1", workdir=work, extra_vars={
            **fast_vars, "migrate_retries": 1, "migrate_lock_timeout": "200ms",
            "migrate_concurrent_lock_timeout": "200ms"})
        assert locker.locked.is_set() and locker.error is None, locker.error
        # The lock is still held when the run ends: it gave up instead of waiting.
        assert db.scalar("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                         "WHERE a.application_name = 'dbops-test-app-lock' AND l.mode = 'AccessExclusiveLock'") >= 1
    finally:
        locker.release()
        locker.join(30)
    assert res.rc != 0, res.text
    msg = res.failure_text
    for needle in ("Phase 1 stopped", "files/sql/001_01_indexes.sql: statement 5 of 13",
                   "[55P03] canceling statement due to lock timeout", "The database is usable",
                   "Fix the cause and re-run", "rollback_phase1.yml"):
        assert needle in msg, "%r missing:\n%s" % (needle, res.text)
    assert res.shows("retry 1 in 0.5s")
    # Usable: the application writes to the table; nothing half-built; the lease is gone.
    db.query("UPDATE transcripts SET confidence = confidence WHERE id = (SELECT min(id) FROM transcripts)")
    assert db.scalar("SELECT count(*) FROM transcripts") > 0
    assert invalid_indexes(db) == []
    assert run_lock_rows(db) == []
    assert db.scalar("SELECT count(*) FROM dbops.schema_migrations") == 0
    # The four bcfy_calls_raw indexes before the failing statement are there; the file resumes.
    assert index_def(db, "bcfy_calls_raw_tg_started_idx") is not None
    # (d, expired lease) Meanwhile a third run crashed and left a lease that has since expired:
    # the re-run takes it over with a warning naming that run, and completes.
    db.query("INSERT INTO dbops.run_lock (run_id, holder, acquired_at, renewed_at, expires_at) "
             "VALUES ('crashed-run-7', 'carol@laptop (phase1)', now() - interval '2 h', "
             "now() - interval '1 h', now() - interval '30 min')")
    again = run_playbook(db, "phase1", workdir=work, extra_vars=fast_vars)
    assert again.ok, again.text
    warning = [w for w in again.warnings if "took over the migration lock" in w]
    assert warning and "carol@laptop (phase1) (run crashed-run-7)" in warning[0], again.warnings
    assert "its lease had expired" in warning[0]
    assert again.shows("took over the migration lock from carol@laptop (phase1)")
    assert again.shows("Phase 1 Migration Complete! ✓")
    assert again.shows("001_01 | ✓ Created index transcripts_tsv_gin_idx")
    assert_phase1_complete(db)


# ---- (d) two runs at once ---------------------------------------------------------------------------
def test_run_lock_live_lease_refuses_a_second_run(db, fast_vars):
    """(d) Another run holds a live lease: phase1 stops in preflight, naming it. (An expired lease
    is taken over in test_lock_retries_exhausted; a live one with run_lock_force=true in
    test_killed_mid_build_then_forced_rerun.)"""
    code = playbook_runner.project_code()
    conn = db.connect()
    conn.autocommit = True
    with conn.cursor() as cur:   # the lock table exactly as dbops_run_lock creates it
        cur.execute(code.dbops_run_lock.DDL.format(schema="dbops"))
        cur.execute("INSERT INTO dbops.run_lock (run_id, holder, expires_at) "
                    "VALUES ('other-run-42', 'alice@awx (phase1)', now() + interval '30 min')")
    conn.close()
    before = db_state(db)
    res = run_playbook(db, "phase1", extra_vars=fast_vars)
    assert res.rc != 0, res.text
    msg = res.failure_text
    for needle in ("another migration run holds the lock on this database", "alice@awx (phase1)",
                   "run other-run-42", "-e run_lock_force=true"):
        assert needle in msg, "%r missing:\n%s" % (needle, res.text)
    assert [f.task for f in res.failures] == ["preflight : activity | Check that no other run holds the migration lock"]
    assert not any("Run pg_dump" in t for t in res.task_names()), "it went on to back up"
    assert db_state(db) == before, "the refused run changed the database (or the other run's lease)"


# ---- (e) controller killed mid-build ---------------------------------------------------------------
def test_killed_mid_build_then_forced_rerun(db, fast_vars):
    # The application keeps a write transaction open on transcripts: the GIN build gets its
    # (INVALID) catalog entry, then waits for that writer to finish.
    app = db.connect(superuser=True, application_name="dbops-test-app-writer")
    try:
        with app.cursor() as cur:
            cur.execute("UPDATE transcripts SET confidence = confidence WHERE id = (SELECT min(id) FROM transcripts)")
        proc, prep = start_playbook(db, "phase1", extra_vars=fast_vars)
        try:
            wait_for(lambda: db.scalar("SELECT NOT indisvalid FROM pg_index "
                                       "WHERE indexrelid = to_regclass('public.transcripts_tsv_gin_idx')"),
                     timeout=180, what="the GIN build to start")
            (orphan,) = wait_for(lambda: [b for b in dbops_backends(db, GIN_BUILD) if b[2] == "Lock"], timeout=30,
                                 what="the GIN build to wait for the writer")
        except BaseException:
            kill_tree(proc.pid)
            raise AssertionError(finish(proc, prep, timeout=30).text)
        kill_tree(proc.pid)
        killed = finish(proc, prep, timeout=30)
        assert killed.rc == -signal.SIGKILL, killed.text
        # The module died with the process group, but its server session keeps waiting for the
        # lock (PostgreSQL notices a lost client only when it next talks to it; even
        # client_connection_check_interval does not interrupt this wait). The runbook ends it.
        if dbops_backends(db, GIN_BUILD):
            db.query("SELECT pg_terminate_backend(%s)", (orphan[0],), superuser=True)
        wait_for(lambda: not dbops_backends(db, GIN_BUILD), timeout=15, what="the orphaned session to end")
    finally:
        app.rollback()
        app.close()
    assert invalid_indexes(db) == ["transcripts_tsv_gin_idx"], "the interrupted build left no INVALID index"
    assert ledger(db) == []
    (lease,) = run_lock_rows(db)
    assert lease[2] is True, "the killed run's lease should still be live: %s" % (lease,)
    killed_run_id = lease[0]

    res = run_playbook(db, "phase1", extra_vars={"run_lock_force": True})   # full verify this time
    assert res.ok, res.text
    warning = [w for w in res.warnings if "took over the migration lock" in w]
    assert warning and killed_run_id in warning[0] and "forced by the operator" in warning[0], res.warnings
    assert res.shows("001_01 | index public.transcripts_tsv_gin_idx is INVALID (left by an interrupted build): "
                     "dropping and rebuilding"), res.text
    assert res.shows("Phase 1 Migration Complete! ✓")
    assert any("Run each check" in t for t in res.task_names("ok")), "verify's checks did not run"
    assert_phase1_complete(db)


# ---- (d') the lease itself: two runs that both passed preflight -----------------------------------------
def test_run_lock_module_takes_the_lease_atomically(db, tmp_path):
    """scanner.dbops.run_lock as the plays call it (same module_defaults): the second of two runs is refused
    at acquire time too, a renewal keeps the lease, and only the holder can release it."""
    import yaml

    def call(name, **args):
        return {"name": name, "scanner.dbops.run_lock": args, "register": name.replace(" ", "_"), "ignore_errors": True}

    play = [{
        "name": "run lock calls", "hosts": "scanner_db", "gather_facts": False,
        "vars_files": [str(playbook_runner.REPO / "playbooks" / "vars" / "connection.yml")],
        "module_defaults": {"group/scanner.dbops.all": "{{ scanner_db_login }}"},
        "tasks": [
            call("A takes", state="present", run_id="run-A", holder="alice (A)", ttl_seconds=600),
            call("B is refused", state="present", run_id="run-B", holder="bob (B)"),
            call("A renews", state="present", run_id="run-A", holder="alice (A)", ttl_seconds=600),
            call("B cannot release", state="absent", run_id="run-B"),
            call("B check is refused", state="check", run_id="run-B"),
            call("A releases", state="absent", run_id="run-A"),
            call("B takes", state="present", run_id="run-B", holder="bob (B)"),
            call("B releases", state="absent", run_id="run-B"),
        ],
    }]
    path = tmp_path / "run_lock_calls.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    res = run_playbook(db, str(path))
    assert res.ok, res.text
    got = {name: r for name, status, r in res.tasks}
    failed = {name for name, status, r in res.tasks if status == "failed"}
    assert failed == {"B is refused", "B check is refused"}, res.text
    assert got["A takes"]["held_by"]["run_id"] == "run-A"
    refused = got["B is refused"]
    assert "alice (A) (run run-A)" in refused["msg"] and refused["held_by"]["run_id"] == "run-A", refused
    assert "took_over" not in got["A renews"]
    assert got["B cannot release"]["released"] is False and got["B cannot release"]["held_by"]["run_id"] == "run-A"
    assert got["A releases"]["released"] is True
    assert "took_over" not in got["B takes"] and got["B takes"]["held_by"]["run_id"] == "run-B"
    assert got["B releases"]["released"] is True
    assert not any(r.get("changed") for r in got.values()), "the lease is bookkeeping: changed must stay false"
    assert run_lock_rows(db) == []
