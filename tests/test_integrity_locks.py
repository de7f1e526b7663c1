"""Lock waits and the run lock's fence (issue 18, items 10 and 12), on a PostgreSQL 15 of its own
(autovacuum_naptime 1 s, so that an autovacuum starts on demand), as the non-superuser `scan`.

Item 10. A swap, rollback, finalize, DETACH or DEFAULT move waits at most lock_timeout (500 ms, below
deadlock_timeout), and PostgreSQL cancels an autovacuum blocking a lock request only after
deadlock_timeout: behind an autovacuum that runs for minutes every retry failed. And a failed attempt
did not say who held the table.
  - the swap through scanner.dbops.step gets past a running autovacuum of the table (made slow with
    per-table cost settings): PostgreSQL cancelled it, and the result and notices say so;
  - finalize behind an ordinary session (BEGIN; LOCK TABLE ...) fails after its retries, each retry
    notice and the error naming that session: pid, application, state, query;
  - a DEFAULT move of maintain_partitions() gets past one on the DEFAULT partition (p2_daily_try);
  - any other statement (a plain ALTER TABLE) names its holder and gets past an autovacuum too;
  - an anti-wraparound autovacuum is waited for (scanner.dbops.step's wraparound_wait), never cancelled.
Item 12. The fence was checked by the controller only (lease renewed every third of the lease):
  - a step whose run lock was taken over between the controller's check and the statement (during its
    backoff) is refused inside its own transaction and changes nothing;
  - the migrate module stops between two files when the lease is lost during the first (the takeover
    waits for the first file's transaction: the lock row is held FOR SHARE);
  - a backfill (a procedure committing per batch) stops at its next batch.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time

import pytest

import playbook_runner
from conftest import PSQL, apply, create_db, embedded_server, phase_sql, wait_for
from test_phase2_engine import backfill, call, convert, prepare

pytestmark = pytest.mark.skipif(PSQL is None, reason="psql not installed")

MODULES = playbook_runner.COLLECTION / "plugins" / "modules"
SLOW_AUTOVACUUM = ("autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0, "
                   "autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1")
TAKEOVER = ("UPDATE dbops.run_lock SET run_id = 'run-B', holder = 'awx (maintenance)', acquired_at = now(), "
            "renewed_at = now(), expires_at = now() + interval '10 minutes'")


@pytest.fixture(scope="module")
def db():
    # workers enough for the slow autovacuums the tests leave running (settings copied to the partitions)
    with embedded_server(settings={"autovacuum_naptime": "1", "autovacuum_max_workers": "10"}) as server:
        d = create_db(server, baseline=True, seed_calls=1000)
        d.query("DELETE FROM system_logs WHERE created_at < now() - interval '40 days'")
        apply(d, phase_sql("001") + phase_sql("002"))
        d.query("ANALYZE")
        yield d


def start_module(db, name: str, **args):
    """Run a module of the collection as Ansible runs it (its own process, JSON arguments)."""
    params = dict(login_host=db.host, login_port=db.port, login_user=db.user, login_password=db.password,
                  login_db=db.name, **args)
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump({"ANSIBLE_MODULE_ARGS": params}, fh)
    env = dict(os.environ, PYTHONPATH=str(playbook_runner.COLLECTIONS))
    proc = subprocess.Popen([str(playbook_runner.PYTHON), str(MODULES / (name + ".py")), path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proc.args_file = path
    return proc


def module_result(proc, timeout=120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    os.unlink(proc.args_file)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), None)
    assert line, "no module result:\n%s\n%s" % (out, err)
    return json.loads(line)


def run_module(db, name: str, **args) -> dict:
    return module_result(start_module(db, name, **args))


def autovacuum_on(db, rel: str):
    return db.scalar("SELECT pid FROM pg_stat_progress_vacuum WHERE relid = %s::regclass", (rel,))


def slow_autovacuum(db, rel: str, where: str, column: str = "duration_ms"):
    """Cost settings that make its autovacuum crawl, then dead rows in rel; returns the worker's pid."""
    db.query(f"ALTER TABLE {rel} SET ({SLOW_AUTOVACUUM})")
    db.query(f"UPDATE {rel} SET {column} = {column} WHERE {where}")
    return wait_for(lambda: autovacuum_on(db, rel), timeout=60, what=f"an autovacuum of {rel}")


def takeover_waits(db):
    """Take the run lock over as run-B from another session (in a thread); returns (thread, done-times)."""
    done = []

    def run():
        db.query(TAKEOVER)
        done.append(time.monotonic())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, done


def take_run_lock(db, run_id="run-A"):
    db.query("DELETE FROM dbops.run_lock") if db.scalar("SELECT to_regclass('dbops.run_lock')") else None
    res = run_module(db, "run_lock", state="present", run_id=run_id, holder="itest (phase2)", ttl_seconds=600)
    assert not res.get("failed"), res


# ---------------------------------------------------------------------------------------------
# item 10
# ---------------------------------------------------------------------------------------------
def test_swap_gets_past_a_running_autovacuum(db):
    t = "api_call_metrics"
    prepare(db, t)
    backfill(db, t, 5000)
    call(db, "SELECT dbops.p2_verify(%s)", (t,))
    pid = slow_autovacuum(db, t, "id % 2 = 0")
    res = run_module(db, "step", sql="SELECT dbops.p2_swap(%(t)s)", args={"t": t}, lock_timeout="500ms",
                     retries=2, retry_delay=0.5)
    assert not res.get("failed"), res
    assert res["result"]["status"] == "swapped", res
    said = " ".join(res["autovacuum"])
    assert f"pid {pid} (autovacuum worker" in said and "cancelled it" in said, res
    assert "deadlock_timeout" in said and f"public.{t}" in said, said
    assert any(n.startswith("autovacuum: p2_swap(api_call_metrics): ") for n in res["notices"]), res["notices"]
    assert db.scalar("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (t,)) == "p"


def test_a_failed_lock_names_its_holder(db):
    t = "system_logs"
    prepare(db, t)
    backfill(db, t, 5000)
    call(db, "SELECT dbops.p2_verify(%s)", (t,))
    call(db, "SELECT dbops.p2_swap(%s)", (t,))
    blocker = db.connect(application_name="itest-holder")
    try:
        with blocker.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            bpid = cur.fetchone()[0]
            cur.execute(f"LOCK TABLE {t} IN ACCESS SHARE MODE")   # psycopg2 opened the transaction (BEGIN)
        res = run_module(db, "step", sql="SELECT dbops.p2_finalize(%(t)s)", args={"t": t}, lock_timeout="200ms",
                         retries=2, retry_delay=0.2)
        assert res.get("failed"), res
        retries = [n for n in res["notices"] if n.startswith("retry ")]
        assert len(retries) == 2, res["notices"]
        for text in retries + [res["msg"]]:
            assert f"pid {bpid} (role scan, " in text, text
            assert 'application "itest-holder"' in text and "idle in transaction" in text, text
            assert f'query "LOCK TABLE {t} IN ACCESS SHARE MODE"' in text and "AccessShareLock on " in text, text
            assert "p2_finalize(system_logs): could not lock public.system_logs" in text, text
        assert db.scalar("SELECT step FROM dbops.p2_state WHERE table_name = %s", (t,)) == "swapped"
    finally:
        blocker.rollback()
        blocker.close()
    res = run_module(db, "step", sql="SELECT dbops.p2_finalize(%(t)s)", args={"t": t}, lock_timeout="500ms")
    assert res["result"]["status"] == "finalized", res


def test_default_move_gets_past_a_running_autovacuum(db):
    """maintain_partitions() moves rows out of DEFAULT under EXCLUSIVE locks (p2_daily_try, lock_wait
    100 ms): an autovacuum of the DEFAULT partition no longer stops it."""
    t = "system_logs"
    if db.scalar("SELECT relkind FROM pg_class WHERE oid = %s::regclass", (t,)) != "p":
        convert(db, t)
    dflt = f"{t}_default"
    db.query(f"ALTER TABLE {dflt} SET ({SLOW_AUTOVACUUM})")
    db.query(f"""INSERT INTO {t} (created_at, component, event_type, duration_ms)
                 SELECT date_trunc('day', now() + interval '3 years') + g * interval '1 second', 'itest', 'x', g
                 FROM generate_series(1, 3000) g""")
    pid = slow_autovacuum(db, dflt, "duration_ms % 2 = 0")
    conn = db.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CALL maintain_partitions(raise_on_error => false)")
            res = cur.fetchone()[0]
        notices = [n.strip() for n in conn.notices]
    finally:
        conn.close()
    assert res["errors"] == [], res
    assert [m["rows"] for m in res["moved_from_default"]] == [3000], res
    said = " ".join(n for n in notices if "autovacuum: " in n)
    assert f"pid {pid} (autovacuum worker" in said and "cancelled it" in said, notices
    assert db.scalar(f"SELECT count(*) FROM {dflt}") == 0


def test_any_statement_names_its_holder_and_gets_past_an_autovacuum(db):
    """Not an engine step (a plain ALTER TABLE, as a migration file has): the module's lock watch names
    the session that held the lock (scanner.dbops.step and migrate), and a blocking autovacuum is made
    to cancel (the same probe)."""
    db.query("CREATE TABLE public.itest_any (id int PRIMARY KEY, v text)")
    db.query("INSERT INTO public.itest_any SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g")
    alter = "ALTER TABLE public.itest_any ADD COLUMN IF NOT EXISTS w%s int"
    blocker = db.connect(application_name="itest-reader")
    try:
        with blocker.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            bpid = cur.fetchone()[0]
            cur.execute("SELECT count(*) FROM public.itest_any")
        res = run_module(db, "step", sql=alter % 1, lock_timeout="300ms", retries=1, retry_delay=0.2)
        mig = run_module(db, "migrate", lock_timeout="300ms", retries=1, retry_delay=0.2, migrations=[
            {"kind": "versioned", "version": "901_01", "name": "any", "sql": alter % 3 + ";\n"}])
    finally:
        blocker.rollback()
        blocker.close()
    assert res.get("failed") and mig.get("failed"), (res, mig)
    for text in ([n for n in res["notices"] if n.startswith("retry ")] + [res["msg"]]
                 + [n for n in mig["notices"] if " | retry " in n] + [mig["msg"]]):
        assert f'held by pid {bpid} (role scan, application "itest-reader", idle in transaction' in text, text
        assert 'query "SELECT count(*) FROM public.itest_any"' in text, text
    pid = slow_autovacuum(db, "public.itest_any", "id % 2 = 0", column="v")
    res = run_module(db, "step", sql=alter % 2, lock_timeout="300ms", retries=1, retry_delay=0.2)
    assert not res.get("failed"), res
    said = " ".join(res["autovacuum"])
    assert f"pid {pid} (autovacuum worker" in said and "cancelled it" in said, res


def test_an_anti_wraparound_autovacuum_is_waited_for_never_cancelled(db):
    """A table older than its autovacuum_freeze_max_age (100 000 transactions, the lowest allowed) gets an
    anti-wraparound autovacuum: the lock attempt says so, the step waits for it (wraparound_wait, polling
    pg_locks: no lock request meanwhile) and never cancels it."""
    # autovacuum_enabled = false: no ordinary autovacuum of it first; an anti-wraparound one runs all the same
    db.query("CREATE TABLE public.itest_wrap (id int PRIMARY KEY, v text) WITH (autovacuum_freeze_max_age = 100000, "
             "autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1, autovacuum_enabled = false)")
    db.query("INSERT INTO public.itest_wrap SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g")
    db.query("CREATE PROCEDURE public.itest_burn(n int) LANGUAGE plpgsql AS $$ "
             "BEGIN FOR i IN 1 .. n LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$")
    db.query("CALL public.itest_burn(101000)")
    pid = wait_for(lambda: autovacuum_on(db, "public.itest_wrap"), timeout=60, what="an anti-wraparound autovacuum")
    assert "(to prevent wraparound)" in db.scalar("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,))
    t0 = time.monotonic()
    res = run_module(db, "step", sql="SELECT dbops.p2_lock('itest', ARRAY['public.itest_wrap']::regclass [])",
                     lock_timeout="300ms", retries=1, retry_delay=0.2, wraparound_wait=3)
    assert res.get("failed"), res
    assert time.monotonic() - t0 >= 3, "it did not wait for the autovacuum"
    assert f"pid {pid} (anti-wraparound autovacuum worker" in res["msg"] and "never cancelled" in res["msg"], res["msg"]
    said = " ".join(res["autovacuum"])
    assert "waited 3 s for pid %s" % pid in said and "still running after wraparound_wait = 3 s" in said, res
    assert "cancelled it" not in said and autovacuum_on(db, "public.itest_wrap") == pid, "the autovacuum was cancelled"


# ---------------------------------------------------------------------------------------------
# item 12
# ---------------------------------------------------------------------------------------------
def test_a_step_taken_over_before_its_retry_changes_nothing(db):
    take_run_lock(db)
    db.query("CREATE TABLE IF NOT EXISTS public.itest_fence (x int)")
    blocker = db.connect()
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE public.itest_fence IN ACCESS EXCLUSIVE MODE")
        proc = start_module(db, "step", sql="INSERT INTO public.itest_fence VALUES (1)", run_lock_id="run-A",
                            lock_timeout="300ms", retries=3, retry_delay=3)
        step_waits = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'scanner-dbops step' "
                      "AND wait_event_type = 'Lock'")
        wait_for(lambda: db.scalar(step_waits), timeout=60, what="the step's first attempt")
        wait_for(lambda: not db.scalar(step_waits), timeout=10, what="the first attempt's lock timeout")
        db.query(TAKEOVER)   # while the step backs off: its controller-side lease check saw run-A
    finally:
        blocker.rollback()
        blocker.close()
    res = module_result(proc)
    assert res.get("failed") and res.get("lock_lost") is True, res
    assert "this run (run run-A) no longer holds the migration run lock: it is now held by awx (maintenance) " \
           "(run run-B)" in res["msg"], res["msg"]
    assert "inside the transaction of the step" in res["msg"], res["msg"]
    assert db.scalar("SELECT count(*) FROM public.itest_fence") == 0, "the step ran for a run without the lock"
    db.query("DELETE FROM dbops.run_lock")


def test_migrate_stops_between_two_files_when_the_lease_is_lost(db):
    take_run_lock(db)
    migrations = [
        {"kind": "versioned", "version": "900_01", "name": "first",
         "sql": "CREATE TABLE public.itest_m1 (x int);\nSELECT pg_sleep(3);\n"},
        {"kind": "versioned", "version": "900_02", "name": "second", "sql": "CREATE TABLE public.itest_m2 (x int);\n"},
    ]
    proc = start_module(db, "migrate", migrations=migrations, run_lock_id="run-A", run_id="run-A")
    wait_for(lambda: db.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'scanner-dbops migrate' "
                               "AND query LIKE '%pg_sleep(3)%'"), timeout=60, what="the first file")
    t_take = time.monotonic()
    thread, done = takeover_waits(db)
    res = module_result(proc)
    thread.join(30)
    assert res.get("failed") and res.get("lock_lost") is True, res
    assert "this run (run run-A) no longer holds the migration run lock" in res["msg"], res["msg"]
    assert "inside the transaction of 900_02" in res["msg"], res["msg"]
    assert db.scalar("SELECT to_regclass('public.itest_m1') IS NOT NULL")
    assert db.scalar("SELECT to_regclass('public.itest_m2') IS NULL"), "the second file ran after the lease was lost"
    assert [r[0] for r in db.query("SELECT version FROM dbops.schema_migrations WHERE version LIKE '900%'")] == ["900_01"]
    assert done and done[0] - t_take > 1.0, "the takeover did not wait for the first file's transaction (FOR SHARE)"
    db.query("DELETE FROM dbops.run_lock")


def test_a_backfill_stops_at_its_next_batch_when_the_lease_is_lost(db):
    t = "transcripts"
    prepare(db, t)
    take_run_lock(db)
    holder = db.connect()
    holder.autocommit = True
    try:
        with holder.cursor() as cur:   # the batches wait for the table's advisory lock (try-lock, no batch)
            cur.execute("SELECT pg_advisory_lock(80620, hashtext('public.transcripts'))")
        proc = start_module(db, "step", sql="CALL dbops.p2_backfill(%(t)s, 100, 30)", args={"t": t},
                            run_lock_id="run-A")
        wait_for(lambda: db.scalar("SELECT step FROM dbops.p2_state WHERE table_name = %s", (t,)) == "backfilling",
                 timeout=60, what="the backfill's start")
        db.query(TAKEOVER)
    finally:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock_all()")
        holder.close()
    res = module_result(proc)
    assert res.get("failed") and res.get("lock_lost") is True, res
    assert "this run (run run-A) no longer holds the migration run lock" in res["msg"], res["msg"]
    assert "before batch 1 of this call of the backfill of transcripts" in res["msg"], res["msg"]
    assert db.scalar("SELECT rows_done FROM dbops.p2_state WHERE table_name = %s", (t,)) == 0
    db.query("DELETE FROM dbops.run_lock")


# ---------------------------------------------------------------------------------------------
# the modules' helpers (no database)
# ---------------------------------------------------------------------------------------------
def test_free_retries_and_statements_that_cannot_run_in_a_transaction():
    pg = playbook_runner.project_code().dbops_pg

    class LockTimeout(pg.psycopg2.Error):
        pgcode = pg.LOCK_NOT_AVAILABLE
        diag = None

    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= 4:
            raise LockTimeout("canceling statement due to lock timeout")
        return "done"
    frees = iter([0.0, 0.0, None, None])   # two autovacuums let go (free), then two ordinary retries
    assert pg.with_retries(fn, retries=2, delay=0.01, free_wait=lambda exc: next(frees)) == ("done", 5)
    calls.clear()
    with pytest.raises(LockTimeout):
        pg.with_retries(fn, retries=1, delay=0.01, free_wait=lambda exc: None)
    for sql in ("CALL dbops.p2_backfill(%(t)s, 5000, 60)", "  -- c\nVACUUM (ANALYZE) public.t",
                "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON t (a)", "call maintain_partitions()"):
        assert pg.autocommit_only(sql), sql
    for sql in ("SELECT dbops.p2_swap(%(t)s)", "INSERT INTO t VALUES (1)", "ALTER TABLE t ADD COLUMN c int"):
        assert not pg.autocommit_only(sql), sql
