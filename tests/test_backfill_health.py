"""The backfill slows down when the database is under strain (issue 11, part 1).

dbops.p2_backfill reads health signals between batches (dbops.p2_backfill_health: standbys' replay lag,
WAL per second, autovacuum on the table or its shadow, sessions waiting for locks, active sessions) and
runs no batch while one is over its threshold. Against real servers:

* test_standby_replay_lag_pauses_the_backfill: a physical streaming standby of a test server of its own
  (pg_basebackup -R, own port, cluster_name replica1); replay paused on the standby
  (pg_wal_replay_pause()): the backfill stops copying (rows_done unchanged, no batch) while the lag is
  over the threshold, its pauses name the standby; after pg_wal_replay_resume() it finishes and verifies.
* test_lock_storm_pauses_then_resumes: four sessions wait for a lock a test session holds: the backfill
  pauses (no batch), an operator's cancel still stops it at once, and a call running when the lock is
  released resumes and finishes, reporting its pause and how long it lasted.
* test_disabled_thresholds_never_pause: the same storm with the thresholds at 0 (and with no health
  argument, the former three-argument call): no pause, no health check, the table is copied.
* test_signals_a_role_cannot_read_are_reported_not_failed: a role without pg_monitor gets "not available"
  for the signals hidden from it, never an error.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from conftest import PSQL, apply, create_db, drop_db, embedded_server, free_port, phase_sql, wait_for

PG_BIN = pathlib.Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
TABLE = "api_call_metrics"   # 12 000 rows for 3 000 seeded calls
ROWS = 12000

pytestmark = pytest.mark.skipif(PSQL is None or not (PG_BIN / "pg_basebackup").exists(),
                                reason="PostgreSQL 15 binaries not installed")


def as_postgres(cmd: list) -> list:
    """PostgreSQL's programs refuse root: run them as the postgres OS user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.getuid() == 0 else cmd


def engine_db(server, seed_calls: int = 3000):
    db = create_db(server, baseline=True, seed_calls=seed_calls)
    apply(db, phase_sql("001"))
    apply(db, phase_sql("002"))
    for _ in range(50):
        if db.scalar("SELECT dbops.p2_prepare(%s)", (TABLE,))["status"] != "retry":
            break
        time.sleep(0.1)
    return db


def backfill(db, batch: int, max_seconds: int, health, conn=None) -> dict:
    """One round, as the partition role calls it (CALL ... NULL, health) on an autocommit session."""
    own = conn is None
    conn = conn or db.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CALL dbops.p2_backfill(%s, %s, %s, NULL, %s::jsonb)",
                        (TABLE, batch, max_seconds, None if health is None else json.dumps(health)))
            return cur.fetchone()[0]
    finally:
        if own:
            conn.close()


def rows_done(db) -> int:
    return db.scalar("SELECT rows_done FROM dbops.p2_state WHERE table_name = %s", (TABLE,))


def finish(db, health, batch: int = 2000) -> list:
    out = []
    for _ in range(60):
        out.append(backfill(db, batch, 5, health))
        if out[-1]["status"] == "done":
            return out
    raise AssertionError(f"not done after 60 rounds: {out[-1]}")


def verified(db):
    v = db.scalar("SELECT dbops.p2_verify(%s)", (TABLE,))
    assert v["status"] == "ok" and v["source_rows"] == v["target_rows"] == ROWS, v


# ---------------------------------------------------------------------------------------------
# (a) a real physical standby
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def standby_of(server, name: str = "replica1"):
    """A physical streaming standby of server: pg_basebackup -R over the primary's socket, its own
    port, data dir under /tmp (readable by the postgres OS user); stopped and removed on exit."""
    data = server.dir / "data"
    run = server.dir / "run"
    # The embedded server's pg_hba has no replication line: let the postgres OS user stream over the socket.
    with open(data / "pg_hba.conf", "a", encoding="utf-8") as fh:
        fh.write("local replication postgres peer\n")
    su = server.connect("postgres", superuser=True)
    su.autocommit = True
    with su.cursor() as cur:
        cur.execute("SELECT pg_reload_conf()")
        cur.execute("SELECT current_setting('wal_level'), current_setting('max_wal_senders')::int")
        level, senders = cur.fetchone()
    su.close()
    assert level in ("replica", "logical") and senders > 0, (level, senders)
    d = pathlib.Path(tempfile.mkdtemp(prefix="scanner-test-standby-", dir="/tmp"))
    d.chmod(0o755)
    if os.getuid() == 0:
        shutil.chown(d, "postgres", "postgres")
    sdata, port = d / "data", free_port()
    try:
        time.sleep(0.2)  # the reload
        subprocess.run(as_postgres([str(PG_BIN / "pg_basebackup"), "-h", str(run), "-p", str(server.port),
                                    "-U", "postgres", "-D", str(sdata), "-R", "-X", "stream", "-c", "fast"]),
                       check=True, capture_output=True, timeout=120)
        opts = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={d} -c cluster_name={name} "
                f"-c logging_collector=off")
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(sdata), "-w", "-t", "60", "-l",
                                    str(d / "standby.log"), "-o", opts, "start"]),
                       check=True, capture_output=True, timeout=90)
        yield port
    finally:
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(sdata), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(d, ignore_errors=True)


def test_standby_replay_lag_pauses_the_backfill():
    with embedded_server() as server:
        db = engine_db(server)
        with standby_of(server) as sport:
            standby = psycopg2.connect(host="127.0.0.1", port=sport, dbname="postgres", user="postgres",
                                       password=server.su_password)
            standby.autocommit = True
            try:
                def replica():
                    return db.query("SELECT application_name, state, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) "
                                    "FROM pg_stat_replication")
                wait_for(lambda: any(r[0] == "replica1" and r[1] == "streaming" for r in replica()), 60,
                         "the standby streaming")
                with standby.cursor() as cur:
                    cur.execute("SELECT pg_wal_replay_pause()")
                limit = 256 * 1024
                health = {"replay_lag_bytes": limit, "check_seconds": 0.05}
                rounds = []
                t0 = time.monotonic()
                while not (rounds and rounds[-1]["pauses"]):
                    rounds.append(backfill(db, 100, 1, health))
                    assert rounds[-1]["status"] != "done", "copied everything before the lag crossed its threshold"
                    assert len(rounds) < 30, rounds[-1]
                first_pause = rounds[-1]
                before = rows_done(db)
                assert 0 < before < ROWS
                # While replay stays paused: whole rounds pass without a batch, rows_done does not move.
                for _ in range(2):
                    res = backfill(db, 100, 1, health)
                    assert res["batches_this_call"] == 0 and res["rows_this_call"] == 0, res
                    assert res["rows_done"] == before == rows_done(db), res
                    assert res["status"] == "in progress" and res["paused"] is True, res
                    (p,) = res["pauses"]
                    assert p["signal"] == "replay_lag_bytes" and p["ongoing"] is True, p
                    assert p["reason"].startswith("standby replica1 replay lag ") and p["reason"].endswith("> 256 kB"), p
                    assert p["seconds"] >= 0.9, p
                    assert p["worst"]["value"] > limit
                lag = [r[2] for r in replica() if r[0] == "replica1"][0]
                assert lag > limit, lag
                paused_for = time.monotonic() - t0
                with standby.cursor() as cur:
                    cur.execute("SELECT pg_wal_replay_resume()")
                t1 = time.monotonic()
                rest = finish(db, health, batch=100)
                resumed_in = time.monotonic() - t1
            finally:
                standby.close()
        verified(db)
        ended = [p for r in rest for p in r["pauses"] if not p["ongoing"]]
        assert ended and ended[0]["reason"].startswith("standby replica1 replay lag"), rest[0]
        assert sum(r["batches_this_call"] for r in rest) > 0 and rest[-1]["rows_done"] == ROWS
        print(f"\nstandby: paused at {before}/{ROWS} rows ({first_pause['pauses'][0]['reason']}); "
              f"{len(rounds)} rounds before the pause, stopped {paused_for:.1f} s (lag {lag} bytes); "
              f"after resume: {sum(r['batches_this_call'] for r in rest)} batches in {resumed_in:.1f} s, "
              f"pause closed after {ended[0]['seconds']} s in that round")


# ---------------------------------------------------------------------------------------------
# (b), (c) a waiting-lock storm
# ---------------------------------------------------------------------------------------------
class LockStorm:
    """A session holds ACCESS EXCLUSIVE on a table of its own; `waiters` sessions queue behind it."""

    def __init__(self, db, waiters: int = 4):
        db.query("CREATE TABLE IF NOT EXISTS public.t_storm (id int)")
        self.holder = db.connect()
        with self.holder.cursor() as cur:
            cur.execute("LOCK TABLE public.t_storm IN ACCESS EXCLUSIVE MODE")
        self.errors: list = []
        self.threads = [threading.Thread(target=self._wait, args=(db,)) for _ in range(waiters)]
        for t in self.threads:
            t.start()
        wait_for(lambda: db.scalar("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                                   "WHERE NOT l.granted AND c.relname = 't_storm'") == waiters, 30, "the waiters")

    def _wait(self, db):
        try:
            conn = db.connect()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = '120s'")
                cur.execute("SELECT count(*) FROM public.t_storm")
            conn.close()
        except Exception as exc:  # pylint: disable=broad-except
            self.errors.append(exc)

    def release(self):
        if not self.holder.closed:
            self.holder.rollback()
            self.holder.close()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


@pytest.fixture
def storm_db(pg_server):
    db = engine_db(pg_server)
    yield db
    drop_db(pg_server, db.name)


def test_lock_storm_pauses_then_resumes(storm_db):
    db = storm_db
    health = {"lock_waiting_sessions": 3, "check_seconds": 0.1}
    first = backfill(db, 500, 0, health)       # healthy: one batch
    assert first["batches_this_call"] == 1 and first["pauses"] == [] and first["health_checks"] == 1, first
    storm = LockStorm(db, 4)
    try:
        res = backfill(db, 500, 2, health)
        assert res["batches_this_call"] == 0 and res["rows_done"] == 500 == rows_done(db), res
        (p,) = res["pauses"]
        assert p["reason"] == "4 sessions waiting for a lock > 3" and p["ongoing"] and p["seconds"] >= 1.9, p
        assert res["paused_seconds_this_call"] == p["seconds"] and res["health_checks"] >= 10, res

        # An operator's stop still works while it waits: the call is cancelled at once, nothing copied.
        conn = db.connect()
        pid = conn.get_backend_pid()
        failure: list = []
        worker = threading.Thread(target=lambda: _catch(failure, backfill, db, 500, 60, health, conn))
        worker.start()
        wait_for(lambda: db.scalar("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)) == "PgSleep",
                 30, "the backfill waiting")
        t = time.monotonic()
        assert db.scalar("SELECT pg_cancel_backend(%s)", (pid,)) is True
        worker.join(10)
        cancelled_in = time.monotonic() - t
        conn.close()
        assert not worker.is_alive() and len(failure) == 1, failure
        assert isinstance(failure[0], psycopg2.errors.QueryCanceled), failure
        assert rows_done(db) == 500 and cancelled_in < 2, cancelled_in

        # A call that is waiting resumes when the storm ends, and finishes the table in the same call.
        out: list = []
        worker = threading.Thread(target=lambda: out.append(backfill(db, 500, 60, health)))
        worker.start()
        time.sleep(1.5)
        assert rows_done(db) == 500
    finally:
        storm.release()
    released = time.monotonic()
    worker.join(60)
    assert out and out[0]["status"] == "done" and out[0]["rows_done"] == ROWS, out
    (p,) = out[0]["pauses"]
    assert p["ongoing"] is False and p["reason"] == "4 sessions waiting for a lock > 3" and 1.4 <= p["seconds"] < 5, p
    assert out[0]["batches_this_call"] == (ROWS - 500) // 500
    verified(db)
    logged = db.scalar("SELECT result FROM dbops.p2_events WHERE table_name = %s AND action = 'backfill' "
                       "ORDER BY id DESC LIMIT 1", (TABLE,))
    assert logged["pauses"] == out[0]["pauses"]
    print(f"\nlock storm: 4 waiters > 3: 0 batches in a 2 s round; cancelled in {cancelled_in:.2f} s; "
          f"paused {p['seconds']} s then {out[0]['batches_this_call']} batches, done "
          f"{time.monotonic() - released:.1f} s after the release")


def _catch(failure, fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # pylint: disable=broad-except
        failure.append(exc)


def test_disabled_thresholds_never_pause(storm_db):
    db = storm_db
    storm = LockStorm(db, 4)
    try:
        off = {"replay_lag_bytes": 0, "replay_lag_seconds": 0, "wal_bytes_per_second": 0, "autovacuum": "off",
               "lock_waiting_sessions": 0, "active_sessions": None, "check_seconds": 0.1}
        res = backfill(db, 500, 0, off)
        assert res["pauses"] == [] and res["health_checks"] == 0 and res["batches_this_call"] == 1, res
        # no health argument: the three-argument call of before
        conn = db.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CALL dbops.p2_backfill(%s, 500, 0)", (TABLE,))
            res = cur.fetchone()[0]
        conn.close()
        assert res["pauses"] == [] and res["health_checks"] == 0 and res["rows_done"] == 1000, res
        rest = finish(db, off)
    finally:
        storm.release()
    assert all(r["pauses"] == [] for r in rest) and rest[-1]["rows_done"] == ROWS
    verified(db)


def test_signals_a_role_cannot_read_are_reported_not_failed(pg_server):
    db = engine_db(pg_server, seed_calls=0)
    su = db.connect(superuser=True)
    su.autocommit = True
    with su.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS t_nomonitor")
        cur.execute("CREATE ROLE t_nomonitor LOGIN PASSWORD 'nomonitor'")
        cur.execute("GRANT USAGE ON SCHEMA dbops TO t_nomonitor")
        cur.execute("GRANT SELECT ON dbops.p2_state TO t_nomonitor")
        # engine functions are not executable by PUBLIC (issue 18 item 11): a role that runs one is granted it
        cur.execute("GRANT EXECUTE ON FUNCTION dbops.p2_backfill_health(text, jsonb, pg_lsn, timestamptz) TO t_nomonitor")
    try:
        conn = psycopg2.connect(host=db.host, port=db.port, dbname=db.name, user="t_nomonitor", password="nomonitor")
        with conn.cursor() as cur:
            cur.execute("SELECT dbops.p2_backfill_health(%s, %s::jsonb)", (TABLE, json.dumps(
                {"replay_lag_bytes": 1, "replay_lag_seconds": 1, "autovacuum": "any", "lock_waiting_sessions": 5,
                 "active_sessions": 1})))
            h = cur.fetchone()[0]
        conn.close()
        assert set(h["unavailable"]) == {"replay_lag", "autovacuum", "active_sessions"}, h
        assert all("not a member of pg_read_all_stats" in why or "neither a superuser" in why
                   for why in h["unavailable"].values()), h
        assert h["over"] == [], h
    finally:
        with su.cursor() as cur:
            cur.execute("REVOKE ALL ON dbops.p2_state FROM t_nomonitor")
            cur.execute("REVOKE ALL ON FUNCTION dbops.p2_backfill_health(text, jsonb, pg_lsn, timestamptz) FROM t_nomonitor")
            cur.execute("REVOKE USAGE ON SCHEMA dbops FROM t_nomonitor")
            cur.execute("DROP ROLE t_nomonitor")
        su.close()
        drop_db(pg_server, db.name)


# ---------------------------------------------------------------------------------------------
# (d) the VACUUM before the swap (scanner.dbops.vacuum), paced by the same signals
# ---------------------------------------------------------------------------------------------
REPO = pathlib.Path(__file__).resolve().parents[1]


def vacuum_module(db, health, max_seconds: float = 0, check: bool = False) -> dict:
    """scanner.dbops.vacuum as the partition role calls it (ad-hoc, local connection); its result."""
    args = {"table": TABLE, "health": health, "max_seconds": max_seconds, "login_host": db.host,
            "login_port": db.port, "login_user": db.user, "login_password": db.password, "login_db": db.name}
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    p = subprocess.run([str(REPO / ".venv/bin/ansible"), "localhost", "-i", "localhost,", "-c", "local", "-o",
                        "-e", "ansible_python_interpreter=" + str(REPO / ".venv/bin/python"),
                        "-m", "scanner.dbops.vacuum", "-a", json.dumps(args)] + (["--check"] if check else []),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    res = json.loads(p.stdout.split(" => ", 1)[1])
    assert db.password not in p.stdout + p.stderr
    return res


def vacuumed_parts(db) -> list:
    return [r[0] for r in db.query(
        "SELECT c.relname FROM pg_inherits ih JOIN pg_class c ON c.oid = ih.inhrelid "
        "JOIN pg_stat_all_tables s ON s.relid = c.oid WHERE ih.inhparent = 'public.api_call_metrics_p'::regclass "
        "AND s.last_vacuum IS NOT NULL ORDER BY 1")]


def test_vacuum_before_swap_waits_for_health_and_sets_the_visibility_map(storm_db):
    db = storm_db
    finish(db, None)
    plan = db.scalar("SELECT dbops.p2_vacuum_plan(%s)", (TABLE,))
    todo = sorted(p["name"] for p in plan["partitions"])
    assert plan["status"] == "planned" and len(todo) >= 4, plan   # the weeks the 30-day retention keeps
    # the history the first cleanup drops (older than the retention) is not vacuumed
    expired = {r[0] for r in db.query("SELECT partition FROM monitoring.partition_health "
                                      "WHERE parent = 'api_call_metrics_p' AND status = 'EXPIRED'")}
    assert len(expired) >= 10 and not expired & set(todo), (expired, todo)
    assert db.scalar("SELECT count(*) FROM pg_class WHERE relname = ANY(%s) AND relallvisible > 0", (todo,)) == 0

    res = vacuum_module(db, {"lock_waiting_sessions": 3, "check_seconds": 0.2}, check=True)
    assert res["changed"] and res["result"]["status"] == "would vacuum" and vacuumed_parts(db) == [], res

    health = {"lock_waiting_sessions": 3, "check_seconds": 0.2}
    storm = LockStorm(db, 4)
    try:
        # the plan never waits behind another session's lock on an unrelated table (t_storm), whatever
        # plan the planner picks (a size function evaluated on every pg_class row would: it hung in CI)
        conn = db.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET lock_timeout = '2s'")
            for off in ("enable_nestloop", "enable_hashjoin", "enable_mergejoin", "enable_indexscan"):
                cur.execute(f"SET {off} = off")
                cur.execute("SELECT dbops.p2_vacuum_plan(%s)", (TABLE,))
                assert sorted(p["name"] for p in cur.fetchone()[0]["partitions"]) == todo, off
        conn.close()
        # the table's time budget runs out while it waits: nothing vacuumed, the rest left for the next run
        res = vacuum_module(db, health, max_seconds=1)["result"]
        assert res["status"] == "stopped: time budget" and res["left"] == len(todo) and res["vacuumed"] == [], res
        assert res["pauses"][0]["ongoing"] and res["pauses"][0]["reason"] == "4 sessions waiting for a lock > 3", res
        # without a budget it waits, VACUUMs nothing while the storm lasts, and goes on when it ends
        out: list = []
        worker = threading.Thread(target=lambda: out.append(vacuum_module(db, health)))
        worker.start()
        wait_for(lambda: db.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'scanner-dbops vacuum'"),
                 60, "the module connected")
        time.sleep(2)
        assert vacuumed_parts(db) == []
    finally:
        storm.release()
    worker.join(120)
    res = out[0]
    assert res["changed"] and res["result"]["status"] == "vacuumed", res
    # what autovacuum did meanwhile (partitions just filled) is not done twice; together, every one
    assert res["result"]["vacuumed"] and set(res["result"]["vacuumed"]) <= set(todo), res
    assert set(res["result"]["vacuumed"]) == set(vacuumed_parts(db)), res
    assert db.scalar("SELECT dbops.p2_vacuum_plan(%s)", (TABLE,))["partitions"] == []
    (p,) = res["result"]["pauses"]
    assert p["reason"] == "4 sessions waiting for a lock > 3" and p["seconds"] >= 1.8 and not p["ongoing"], p
    # index-only scans no longer visit the heap of a copied partition
    assert db.scalar("SELECT count(*) FROM pg_class WHERE relname = ANY(%s) AND relallvisible > 0", (todo,)) == len(todo)
    # a second call finds nothing to do, and says so
    again = vacuum_module(db, health)
    assert not again["changed"] and again["result"]["status"] == "nothing to do", again
    verified(db)


def test_vacuum_reports_a_partition_it_had_to_skip(storm_db):
    """A partition another session holds a conflicting lock on (as autovacuum does) is skipped, not waited
    for (VACUUM SKIP_LOCKED warns, it does not fail): reported with the server's reason, never counted
    as vacuumed, and the next call vacuums it."""
    db = storm_db
    finish(db, None)
    todo = [p["name"] for p in db.scalar("SELECT dbops.p2_vacuum_plan(%s)", (TABLE,))["partitions"]]
    holder = db.connect()
    with holder.cursor() as cur:
        cur.execute(f"LOCK TABLE public.{todo[0]} IN SHARE UPDATE EXCLUSIVE MODE")
    try:
        r = vacuum_module(db, {})["result"]
        assert r["skipped"] == [todo[0]] and sorted(r["vacuumed"]) == sorted(todo[1:]), r
        assert any("skipping" in x and todo[0] in x for x in r["skipped_reasons"]), r
        assert todo[0] not in vacuumed_parts(db)
    finally:
        holder.rollback()
        holder.close()
    again = vacuum_module(db, {})["result"]
    assert again["vacuumed"] == [todo[0]] and again["skipped"] == [], again
