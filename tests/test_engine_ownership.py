"""Phase 2 engine: what the swap must carry besides rows (issue 9, items 4 and 5), SQL level.

- Rollback after Phase 3 keeps every value: the sync triggers copy the columns both tables share
  now (Phase 3's processing_stage / retry_count written by the application after the swap come
  back with a rollback; a column added or dropped later is followed without regeneration), and a
  rollback compares both copies per range before anything is swapped back or dropped, refusing
  with the differing ranges.
- Ownership: tables owned by a NOLOGIN role, the application connected as a role with grants only,
  the engine run by a LOGIN member of the owner role (the RDS setup) and by a superuser: the
  partitioned table, every partition (also those maintain_partitions() makes later) and the moved
  sequences keep the owner; privileges as of the swap (a REVOKE since prepare included), comments,
  storage settings, replica identity and trigger firing states are carried; a publication is
  reported.
"""
from __future__ import annotations

import time
import uuid

import psycopg2
import psycopg2.errors
import pytest

from conftest import PSQL, apply, create_db, drop_db, phase_sql

PHASE1, PHASE2, PHASE3 = phase_sql("001"), phase_sql("002"), phase_sql("003")
TABLES = ["bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs"]

pytestmark = pytest.mark.skipif(PSQL is None, reason="psql not installed")


def call(connect, sql: str, params=None, retries: int = 60):
    """One engine step on a fresh autocommit connection, retried on lock_not_available.
    Returns (first column of the first row, notices)."""
    for attempt in range(retries):
        conn = connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '300ms'")
                cur.execute(sql, params)
                row = cur.fetchone() if cur.description else None
                return (row[0] if row else None), list(conn.notices)
        except psycopg2.errors.LockNotAvailable:
            time.sleep(0.05 * (1 + attempt % 5))
        finally:
            conn.close()
    raise AssertionError(f"{sql}: still lock_not_available")


def step(connect, sql, params=None):
    return call(connect, sql, params)[0]


def prepare(connect, tbl):
    for _ in range(60):
        res = step(connect, "SELECT dbops.p2_prepare(%s)", (tbl,))
        if res["status"] != "retry":
            assert res["status"] == "prepared", res
            return res
    raise AssertionError("no lock")


def finish(connect, tbl):
    """backfill -> verify -> swap; returns (swap result, swap notices)."""
    while step(connect, "CALL dbops.p2_backfill(%s, 2000, 5)", (tbl,))["status"] != "done":
        pass
    assert step(connect, "SELECT dbops.p2_verify(%s)", (tbl,))["status"] == "ok"
    res, notices = call(connect, "SELECT dbops.p2_swap(%s)", (tbl,))
    assert res["status"] == "swapped", res
    return res, notices


def rollback(connect, tbl):
    """What roles/partition/tasks/rollback_table.yml runs: compare, swap back, drop the copy."""
    checked = step(connect, "SELECT dbops.p2_rollback_check(%s)", (tbl,))
    assert checked["status"] == "ok", checked
    assert step(connect, "SELECT dbops.p2_rollback(%s, false)", (tbl,))["status"] == "rolled back"
    assert step(connect, "SELECT dbops.p2_abort(%s)", (tbl,))["status"] == "aborted"


@pytest.fixture
def db(pg_server):
    d = create_db(pg_server, baseline=True, seed_calls=2000)
    try:
        d.query("DELETE FROM system_logs WHERE created_at < now() - interval '20 days'")
        apply(d, PHASE1)
        apply(d, PHASE2)
        d.query("ANALYZE")
        yield d
    finally:
        drop_db(pg_server, d.name)


# ---------------------------------------------------------------------------------------------
# item 4: rollback after Phase 3
# ---------------------------------------------------------------------------------------------
def test_rollback_after_phase3_keeps_every_value(db):
    conn = db.connect
    prepare(conn, "bcfy_calls_raw")
    finish(conn, "bcfy_calls_raw")
    apply(db, PHASE3)   # columns + CHECKs on the partitioned table and on its old copy, then the code
    for t in ("bcfy_calls_raw", "bcfy_calls_raw_nonpartitioned"):
        assert db.scalar("SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass "
                         "AND attname IN ('processing_stage', 'retry_count')", (t,)) == 2
    # the application writes Phase 3's columns after the swap (guide 3.3): updates, an insert
    uids = [r[0] for r in db.query("SELECT call_uid FROM bcfy_calls_raw ORDER BY call_uid LIMIT 50")]
    db.query("UPDATE bcfy_calls_raw SET processing_stage = 'downloading', retry_count = 2 WHERE call_uid = ANY(%s)",
             (uids[:25],))
    db.query("UPDATE bcfy_calls_raw SET processing_stage = 'failed', retry_count = 3, error = 'timeout' "
             "WHERE call_uid = ANY(%s)", (uids[25:],))
    db.query("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at, processing_stage, retry_count) "
             "VALUES ('p3-4200000001', 'p3', 4200000001, now(), 'completed', 1)")
    # a column added to both copies later, without regenerating the sync functions (dynamic path)
    for t in ("bcfy_calls_raw", "bcfy_calls_raw_nonpartitioned"):
        db.query(f"ALTER TABLE {t} ADD COLUMN p3_note text")
    db.query("UPDATE bcfy_calls_raw SET p3_note = 'late column', retry_count = 4 WHERE call_uid = %s", (uids[0],))
    expected = db.query("SELECT call_uid, processing_stage, retry_count, error, p3_note FROM bcfy_calls_raw "
                        "ORDER BY call_uid")
    assert call(conn, "SELECT dbops.p2_verify('bcfy_calls_raw')")[0]["columns_compared"] >= 20

    rollback(conn, "bcfy_calls_raw")
    assert db.scalar("SELECT relkind FROM pg_class WHERE oid = 'bcfy_calls_raw'::regclass") == "r"
    assert db.scalar("SELECT to_regclass('bcfy_calls_raw_p')") is None
    assert db.query("SELECT call_uid, processing_stage, retry_count, error, p3_note FROM bcfy_calls_raw "
                    "ORDER BY call_uid") == expected
    assert db.scalar("SELECT processing_stage || retry_count FROM bcfy_calls_raw WHERE call_uid = 'p3-4200000001'") \
        == "completed1"


def test_sync_follows_dropped_columns_and_rollback_refuses_on_difference(db):
    conn = db.connect
    prepare(conn, "api_call_metrics")
    finish(conn, "api_call_metrics")
    # the swapped pair: a column on both copies, then dropped from both (as Phase 3's rollback with
    # rollback_phase3_drop_columns does): writes keep working and keep both copies equal
    for t in ("api_call_metrics", "api_call_metrics_nonpartitioned"):
        db.query(f"ALTER TABLE {t} ADD COLUMN extra integer DEFAULT 0")
    step(conn, "SELECT dbops.p2_sync_refresh()")   # static path with the extra column
    db.query("INSERT INTO api_call_metrics (endpoint, status_code, duration_ms, extra) VALUES ('/a', 200, 5, 7)")
    for t in ("api_call_metrics", "api_call_metrics_nonpartitioned"):
        db.query(f"ALTER TABLE {t} DROP COLUMN extra")
    db.query("INSERT INTO api_call_metrics (endpoint, status_code, duration_ms) VALUES ('/b', 200, 6)")
    db.query("UPDATE api_call_metrics SET status_code = 503 WHERE endpoint = '/a'")
    assert step(conn, "SELECT dbops.p2_verify('api_call_metrics')")["status"] == "ok"

    # the copies differ (a row of the old copy changed behind the reverse sync): refused, named, nothing changed
    victim, ts = db.query("SELECT id, timestamp FROM api_call_metrics ORDER BY id LIMIT 1")[0]
    db.query("UPDATE api_call_metrics_nonpartitioned SET duration_ms = duration_ms + 1 WHERE id = %s",
             (victim,))
    week = db.scalar("SELECT to_char(date_trunc('week', %s::timestamptz, 'UTC') AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
                     (ts,))
    with pytest.raises(psycopg2.errors.RaiseException, match=r"rollback of api_call_metrics refused.*1 range.*"
                       + week + r".*values differ"):
        db.query("SELECT dbops.p2_rollback_check('api_call_metrics')")
    assert db.scalar("SELECT relkind FROM pg_class WHERE oid = 'api_call_metrics'::regclass") == "p"
    assert db.scalar("SELECT step FROM dbops.p2_state WHERE table_name = 'api_call_metrics'") == "swapped"
    # repaired: swap back; then the restored table diverges from the copy about to be dropped: abort refuses
    db.query("UPDATE api_call_metrics_nonpartitioned SET duration_ms = duration_ms - 1 WHERE id = %s",
             (victim,))
    assert step(conn, "SELECT dbops.p2_rollback_check('api_call_metrics')")["status"] == "ok"
    assert step(conn, "SELECT dbops.p2_rollback('api_call_metrics', false)")["status"] == "rolled back"
    db.query("ALTER TABLE api_call_metrics DISABLE TRIGGER p2_sync_fwd")
    db.query("DELETE FROM api_call_metrics WHERE id = %s", (victim,))
    db.query("ALTER TABLE api_call_metrics ENABLE TRIGGER p2_sync_fwd")
    with pytest.raises(psycopg2.errors.RaiseException, match=r"rollback of api_call_metrics refused.*"
                       r"1 range.*" + week + r".*rows in api_call_metrics / \d+ rows in api_call_metrics_p"):
        db.query("SELECT dbops.p2_abort('api_call_metrics')")
    assert db.scalar("SELECT to_regclass('api_call_metrics_p') IS NOT NULL")
    assert db.scalar("SELECT count(*) FROM dbops.p2_state WHERE table_name = 'api_call_metrics'") == 1


# ---------------------------------------------------------------------------------------------
# item 5: ownership and the rest of the table's properties
# ---------------------------------------------------------------------------------------------
def owners(db, tbl):
    """{object: owner} for the table, every partition and the sequences it owns."""
    rows = db.query(
        "SELECT c.oid::regclass::text, pg_get_userbyid(c.relowner) FROM pg_class c "
        "WHERE c.oid = %s::regclass OR c.oid IN (SELECT relid FROM pg_partition_tree(%s::regclass)) "
        "OR c.oid IN (SELECT d.objid FROM pg_depend d WHERE d.refobjid = %s::regclass AND d.deptype = 'a' "
        "             AND d.classid = 'pg_class'::regclass)", (tbl, tbl, tbl))
    return dict(rows)


def test_swap_keeps_owner_grants_and_properties(pg_server, db):
    sfx = uuid.uuid4().hex[:6]
    owner, app = f"app_owner_{sfx}", f"app_rw_{sfx}"
    app_pw = uuid.uuid4().hex
    su = db.connect(superuser=True)
    su.autocommit = True
    cur = su.cursor()
    try:
        # the RDS layout: tables owned by a NOLOGIN role, the engine run by `scan`, a LOGIN member of
        # it (and of pg_monitor), the application a role with grants only
        cur.execute(f"CREATE ROLE {owner} NOLOGIN")
        cur.execute(f"CREATE ROLE {app} LOGIN PASSWORD %s", (app_pw,))
        cur.execute(f"GRANT {owner} TO scan")
        # (scan is already a member of pg_monitor on the test server, scripts/pg_embedded.sh: the
        # cleanup must leave it so, or every later Phase 2 run of this worker's server finds scan
        # blind to other roles' statements and its upsert gate refuses)
        assert db.scalar("SELECT pg_has_role('scan', 'pg_monitor', 'MEMBER')")
        cur.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {owner}")
        cur.execute(f"GRANT USAGE ON SCHEMA public TO {app}")
        for t in TABLES:
            cur.execute(f"ALTER TABLE public.{t} OWNER TO {owner}")   # owned sequences follow
        cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(TABLES)}, processing_state TO {app}")
        cur.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {app}")
        # properties that must survive the swap
        cur.execute("COMMENT ON TABLE api_call_metrics IS 'per request timings'")
        cur.execute("COMMENT ON COLUMN api_call_metrics.endpoint IS 'route'")
        cur.execute("ALTER TABLE system_logs SET (autovacuum_vacuum_scale_factor = 0.02, fillfactor = 90, "
                    "toast.autovacuum_enabled = false)")
        cur.execute("ALTER TABLE api_call_metrics REPLICA IDENTITY FULL")
        cur.execute("CREATE FUNCTION public.own_touch() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RETURN NEW; END $$")
        cur.execute("CREATE TRIGGER metrics_touch BEFORE INSERT ON api_call_metrics FOR EACH ROW "
                    "EXECUTE FUNCTION public.own_touch()")
        cur.execute("ALTER TABLE api_call_metrics ENABLE REPLICA TRIGGER metrics_touch")
        cur.execute("CREATE PUBLICATION own_pub FOR TABLE system_logs")

        conn = db.connect
        for t in TABLES:
            prepare(conn, t)
        # granted and revoked between prepare and swap: carried as of the swap
        cur.execute(f"REVOKE DELETE ON api_call_metrics FROM {app}")
        cur.execute(f"GRANT TRUNCATE ON system_logs TO {app}")
        swaps = {t: finish(conn, t) for t in TABLES}

        want = {"bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs"}
        for t in want:
            got = owners(db, t)
            assert len(got) > 3 and set(got.values()) == {owner}, (t, got)
        assert owners(db, "transcripts")["transcripts_id_seq"] == owner
        # the application still reads and writes every table (no outage)
        app_conn = psycopg2.connect(host=db.host, port=db.port, dbname=db.name, user=app, password=app_pw)
        app_conn.autocommit = True
        with app_conn.cursor() as a:
            for t in TABLES:
                a.execute(f"SELECT count(*) FROM {t}")
            a.execute("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) "
                      "VALUES ('own-4300000001', 'own', 4300000001, now()) ON CONFLICT (call_uid, started_at) DO NOTHING")
            a.execute("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) "
                      "VALUES ('own-4300000001', 'x', 1, 1)")
            a.execute("INSERT INTO api_call_metrics (endpoint, status_code, duration_ms) VALUES ('/o', 200, 1)")
            a.execute("INSERT INTO system_logs (component, event_type, message) VALUES ('own', 'info', 'own')")
            a.execute("UPDATE bcfy_calls_raw SET error = 'e' WHERE call_uid = 'own-4300000001'")
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                a.execute("DELETE FROM api_call_metrics WHERE endpoint = '/o'")
        app_conn.close()
        assert db.scalar("SELECT error FROM bcfy_calls_raw_nonpartitioned WHERE call_uid = 'own-4300000001'") == "e"
        assert db.scalar(f"SELECT has_table_privilege('{app}', 'system_logs', 'TRUNCATE')")
        assert not db.scalar(f"SELECT has_table_privilege('{app}', 'api_call_metrics', 'DELETE')")
        # comments, storage settings (every partition), replica identity, trigger firing state
        assert db.scalar("SELECT obj_description('api_call_metrics'::regclass, 'pg_class')") == "per request timings"
        assert db.scalar("SELECT col_description('api_call_metrics'::regclass, 3)") == "route"
        opts = db.query("SELECT DISTINCT c.reloptions::text, t.reloptions::text FROM pg_inherits i "
                        "JOIN pg_class c ON c.oid = i.inhrelid LEFT JOIN pg_class t ON t.oid = c.reltoastrelid "
                        "WHERE i.inhparent = 'system_logs'::regclass")
        assert opts == [("{autovacuum_vacuum_scale_factor=0.02,fillfactor=90}", "{autovacuum_enabled=false}")]
        assert {r[0] for r in db.query(
            "SELECT relreplident FROM pg_class WHERE oid = 'api_call_metrics'::regclass OR oid IN "
            "(SELECT inhrelid FROM pg_inherits WHERE inhparent = 'api_call_metrics'::regclass)")} == {"f"}
        assert {r[0] for r in db.query("SELECT tgenabled FROM pg_trigger WHERE tgname = 'metrics_touch' "
                                       "AND tgrelid = 'api_call_metrics'::regclass")} == {"R"}
        # the publication is reported: in the result and as a WARNING (the step module returns notices)
        res, notices = swaps["system_logs"]
        assert any("own_pub" in w for w in res["warnings"]), res
        assert any(n.startswith("WARNING") and "own_pub" in n for n in notices), notices
        assert swaps["bcfy_calls_raw"][0]["warnings"] == []

        # maintain_partitions() run by the member: new partitions belong to the owner, with the settings
        last = db.scalar("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                         "WHERE i.inhparent = 'system_logs'::regclass AND c.relname <> 'system_logs_default' "
                         "ORDER BY c.relname DESC LIMIT 1")
        db.query(f"DROP TABLE {last}")
        created = step(conn, "CALL maintain_partitions()")["created"]
        assert last in created, created
        assert set(owners(db, last).values()) == {owner} and last in owners(db, last)
        assert db.scalar("SELECT reloptions::text FROM pg_class WHERE relname = %s", (last,)) == \
            "{autovacuum_vacuum_scale_factor=0.02,fillfactor=90}"

        # rollback gives back the old tables with their owner, the REPLICA trigger state restored
        for t in reversed(TABLES):
            rollback(conn, t)
        for t in TABLES:
            assert set(owners(db, t).values()) == {owner}
        assert db.scalar("SELECT tgenabled FROM pg_trigger WHERE tgname = 'metrics_touch'") == "R"
    finally:
        cur.execute(f"DROP PUBLICATION IF EXISTS own_pub")
        su.close()
        drop_db(pg_server, db.name)
        su = pg_server.connect("postgres", superuser=True)
        su.autocommit = True
        with su.cursor() as c:
            c.execute(f"REVOKE {owner} FROM scan")
            c.execute(f"DROP ROLE IF EXISTS {app}")
            c.execute(f"DROP ROLE IF EXISTS {owner}")
        su.close()


def test_superuser_run_leaves_objects_to_the_owner(db):
    def su():
        return db.connect(superuser=True)
    for t in ("api_call_metrics", "transcripts"):
        prepare(su, t)
        finish(su, t)
        got = owners(db, t)
        assert set(got.values()) == {"scan"}, got
    assert owners(db, "transcripts")["transcripts_id_seq"] == "scan"
    # the table's owner (not a superuser) keeps using and maintaining it
    db.query("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) VALUES (NULL, 'x', 1, 1)")
    assert step(db.connect, "SELECT dbops.p2_rollback_check('transcripts')")["status"] == "ok"


def test_prepare_refuses_a_non_member_clearly(pg_server, db):
    sfx = uuid.uuid4().hex[:6]
    owner = f"other_owner_{sfx}"
    db.query(f"CREATE ROLE {owner} NOLOGIN", superuser=True)
    try:
        db.query(f"ALTER TABLE system_logs OWNER TO {owner}", superuser=True)
        with pytest.raises(psycopg2.errors.RaiseException, match=f"scan is not a member of {owner}"):
            db.query("SELECT dbops.p2_prepare('system_logs')")
        assert db.scalar("SELECT to_regclass('system_logs_p')") is None
    finally:
        drop_db(pg_server, db.name)
        su = pg_server.connect("postgres", superuser=True)
        su.autocommit = True
        with su.cursor() as c:
            c.execute(f"DROP ROLE IF EXISTS {owner}")
        su.close()
