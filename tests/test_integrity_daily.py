"""Integrity of the nightly jobs (files/sql/repeatable/002/08_daily_jobs.sql), issue 18 items 7-9,
against a real PostgreSQL 15, as `scan` (the table owner) unless said otherwise.

Item 7: cleanup_old_data() acts only on tables it detached itself (recorded in dbops.p2_detached in
the DETACH's transaction): a table another role created with the former marker comment
(`dbops:retention-detached {...}`, holding live call_uids) is ignored and reported, not cleared or
dropped.
Item 8: check, clear, drop, in that order: a detached table whose drop is refused (its range is no
longer expired under the current policy) keeps every reference to its rows, and the ATTACH the
error gives puts it back with all of them valid (the next run forgets it).
Item 9: the move out of DEFAULT in maintain_partitions() fires none of the engine's triggers also
where partition trigger clones are internal (PostgreSQL 13 and 14: tgisinternal = true, simulated
here on 15 by setting the flag on DEFAULT's clones), and leaves the triggers of native foreign keys
alone. On 13 and 14 themselves the same test runs unchanged (part 2 as the owner); it passed on
13.23 and 14.23 by hand (server binaries from outside the project, tests/conftest.py's server started
with PG_BIN pointing at them and without pg_cron), and the former trigger selection failed it there.
"""
from __future__ import annotations

import json
import re
import uuid

import psycopg2
import pytest

from conftest import PSQL
from test_phase2_engine import _engine_db, call, convert

pytestmark = pytest.mark.skipif(PSQL is None, reason="psql not installed")

MARKER = "dbops:retention-detached "


@pytest.fixture
def engine_db(make_db):
    return _engine_db(make_db, 40)


def finalize(db, table):
    convert(db, table)
    assert call(db, "SELECT dbops.p2_finalize(%s)", (table,))["status"] == "finalized"


def refs_to(db, uids) -> int:
    """References (transcripts + processing_state) to these call_uids."""
    return db.scalar("SELECT (SELECT count(*) FROM transcripts WHERE call_uid = ANY(%(u)s)) + "
                     "(SELECT count(*) FROM processing_state WHERE call_uid = ANY(%(u)s))", {"u": list(uids)})


def dangling_refs(db) -> int:
    return db.scalar("SELECT (SELECT count(*) FROM transcripts t WHERE t.call_uid IS NOT NULL AND NOT EXISTS "
                     "(SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = t.call_uid)) + "
                     "(SELECT count(*) FROM processing_state ps WHERE ps.call_uid IS NOT NULL AND NOT EXISTS "
                     "(SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = ps.call_uid))")


def test_cleanup_ignores_a_marked_table_it_did_not_detach(engine_db):
    """Item 7: a role with only CREATE on public makes a table with the former marker comment holding
    live call_uids; the job neither clears those references nor drops the table, and reports it."""
    db = engine_db
    finalize(db, "bcfy_calls_raw")
    live = [r[0] for r in db.query(
        "SELECT t.call_uid FROM transcripts t JOIN bcfy_calls_raw c USING (call_uid) "
        "WHERE c.started_at >= now() - interval '30 days' LIMIT 44")]
    assert len(live) == 44
    before = refs_to(db, live)
    role = "t_intruder_" + uuid.uuid4().hex[:8]
    fake = "bcfy_calls_raw_p2001_01"
    su = db.connect(superuser=True)
    su.autocommit = True
    try:
        with su.cursor() as cur:
            cur.execute(f"CREATE ROLE {role} NOLOGIN")
            cur.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {role}")
            cur.execute(f"SET ROLE {role}")
            cur.execute(f"CREATE TABLE public.{fake} (call_uid text, started_at timestamptz)")
            cur.execute(f"INSERT INTO public.{fake} SELECT u, '2001-01-15 00:00+00' FROM unnest(%s::text[]) u", (live,))
            cur.execute(f"GRANT SELECT ON public.{fake} TO PUBLIC")
            cur.execute(f"COMMENT ON TABLE public.{fake} IS %s", (MARKER + json.dumps({
                "table": "bcfy_calls_raw", "time_column": "started_at",
                "range_start": "2001-01-01T00:00:00+00:00", "range_end": "2001-02-01T00:00:00+00:00"}),))
            cur.execute("RESET ROLE")
        res = call(db, "CALL cleanup_old_data(raise_on_error => false)")
        assert refs_to(db, live) == before, "references to live calls were cleared"
        assert db.scalar("SELECT to_regclass(%s)::text", (fake,)) == fake
        assert db.scalar(f"SELECT count(*) FROM {fake}") == 44
        assert fake not in {d["partition"] for d in res["dropped"]} and fake not in res["resumed"], res
        ignored = {i["table"]: i["reason"] for i in res.get("ignored", [])}
        assert fake in ignored and "owner" in ignored[fake], res
        assert db.scalar("SELECT count(*) FROM dbops.p2_detached") == 0
        assert dangling_refs(db) == 0
    finally:
        with su.cursor() as cur:
            cur.execute("RESET ROLE")
            cur.execute(f"DROP OWNED BY {role}")
            cur.execute(f"DROP ROLE {role}")
        su.close()


def test_refused_drop_leaves_every_reference_intact(engine_db):
    """Item 8: a run fails while clearing (a row lock held by the application), so the partition stays
    detached; the retention is then raised: the next run refuses the drop *before* clearing anything,
    and the ATTACH its error gives puts the partition back with every reference valid."""
    db = engine_db
    finalize(db, "bcfy_calls_raw")
    first = sorted(db.query("SELECT partition, range_start, range_end FROM monitoring.partition_health "
                            "WHERE parent = 'bcfy_calls_raw' AND status = 'EXPIRED'"), key=lambda r: r[2])[0]
    part = first[0]
    uids = [r[0] for r in db.query(f"SELECT call_uid FROM {part}")]
    before = refs_to(db, uids)
    assert before > 0
    # an application transaction holds a referencing row of each referencing table: the first batch waits
    blocker = db.connect()
    with blocker.cursor() as cur:
        for child in ("processing_state", "transcripts"):
            cur.execute(f"SELECT id FROM {child} WHERE call_uid = ANY(%s) LIMIT 1 FOR UPDATE", (uids,))
    try:
        res = call(db, "CALL cleanup_old_data(max_partitions => 1, lock_wait => '50ms', lock_retries => 2, "
                       "raise_on_error => false)")
    finally:
        blocker.rollback()
        blocker.close()
    assert [e["partition"] for e in res["errors"]] == [part] and "stays detached" in res["errors"][0]["error"], res
    assert db.scalar("SELECT relispartition FROM pg_class WHERE relname = %s", (part,)) is False
    assert refs_to(db, uids) == before
    # the policy now keeps it: the drop is refused, and nothing of it was cleared
    db.query("UPDATE app_retention_policies SET retention = interval '4000 days' WHERE table_name = 'bcfy_calls_raw'")
    res = call(db, "CALL cleanup_old_data(raise_on_error => false)")
    assert res["resumed"] == [part] and res["dropped"] == [], res
    assert [e["partition"] for e in res["errors"]] == [part] and "not expired" in res["errors"][0]["error"], res
    assert refs_to(db, uids) == before, "a refused drop cleared references"
    assert db.scalar(f"SELECT count(*) FROM {part}") == len(uids)
    # the operator keeps it: the statements the error gives, as they are
    keep = re.search(r"to keep it instead: (.*)$", res["errors"][0]["error"]).group(1)
    db.query(keep)
    assert db.scalar("SELECT parent FROM monitoring.partition_health WHERE partition = %s", (part,)) == "bcfy_calls_raw"
    assert refs_to(db, uids) == before and dangling_refs(db) == 0
    # the next run forgets it (a partition again), touches nothing
    res = call(db, "CALL cleanup_old_data()")
    assert res["errors"] == [] and res["dropped"] == [] and res["resumed"] == [], res
    assert [f["partition"] for f in res["forgotten"]] == [part], res
    assert db.scalar("SELECT count(*) FROM dbops.p2_detached") == 0
    assert refs_to(db, uids) == before


def test_move_out_of_default_fires_no_engine_trigger(engine_db):
    """Item 9: moving rows out of DEFAULT disables the engine's trigger clones whether or not the
    server marks them internal (13/14 do), never the triggers of a native foreign key; afterwards
    every trigger is back in its mode. Checked: the moved call keeps its transcript, the old copy
    keeps its row (no reverse sync), p2_verify agrees."""
    db = engine_db
    convert(db, "bcfy_calls_raw")   # swapped: reverse sync, reference action, guard on every partition
    # a native foreign key on the partitioned table: its check triggers on DEFAULT are internal clones
    db.query("CREATE TABLE t_feeds (feed_id integer PRIMARY KEY)")
    db.query("INSERT INTO t_feeds SELECT DISTINCT feed_id FROM bcfy_calls_raw WHERE feed_id IS NOT NULL "
             "UNION SELECT 77")
    db.query("ALTER TABLE bcfy_calls_raw ADD CONSTRAINT t_feeds_fk FOREIGN KEY (feed_id) REFERENCES t_feeds")
    dflt = "bcfy_calls_raw_default"
    modes = "SELECT tgname, tgenabled, tgisinternal FROM pg_trigger WHERE tgrelid = %s::regclass ORDER BY 1"

    def add_call(uid, started):
        db.query("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, feed_id, started_at) "
                 "VALUES (%s, 't18', extract(epoch FROM %s::timestamptz), 77, %s)", (uid, started, started))
        db.query("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) VALUES (%s, 't18', 1, 1)", (uid,))
        assert db.scalar("SELECT tableoid::regclass::text FROM bcfy_calls_raw WHERE call_uid = %s", (uid,)) == dflt

    def assert_moved(res, uid, partition):
        assert res["errors"] == [] and res["moved_from_default"] == [{"partition": partition, "rows": 1}], res
        assert db.scalar("SELECT tableoid::regclass::text FROM bcfy_calls_raw WHERE call_uid = %s", (uid,)) == partition
        assert db.scalar("SELECT count(*) FROM transcripts WHERE call_uid = %s", (uid,)) == 1, "reference action fired"
        assert db.scalar("SELECT count(*) FROM bcfy_calls_raw_nonpartitioned WHERE call_uid = %s", (uid,)) == 1, \
            "reverse sync fired"
        assert dangling_refs(db) == 0

    # 1. the owner moves a row (on 13/14 every clone is internal already: the case of 2, as the owner)
    add_call("t18-a", "2031-03-05 10:00+00")
    triggers = db.query(modes, (dflt,))
    assert any(t[2] for t in triggers), triggers   # the foreign key's
    assert_moved(call(db, "CALL maintain_partitions()"), "t18-a", "bcfy_calls_raw_p2031_03")
    assert db.query(modes, (dflt,)) == triggers

    # 2. on 15+, the catalog of 13/14 (the clones internal), as the superuser: 15 lets only it disable
    #    an internal trigger, 13/14 let the owner disable a clone (as in 1 there)
    add_call("t18-b", "2031-04-05 10:00+00")
    clones = [r[0] for r in db.query("SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND tgparentid <> 0 "
                                     "AND tgname NOT LIKE 'RI\\_%%'", (dflt,))]
    assert clones
    simulated = [r[0] for r in db.query("SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND "
                                        "tgname = ANY(%s) AND NOT tgisinternal", (dflt, clones))]
    sim = "UPDATE pg_trigger SET tgisinternal = %s WHERE tgrelid = %s::regclass AND tgname = ANY(%s)"
    db.query(sim, (True, dflt, simulated), superuser=True)
    try:
        triggers = db.query(modes, (dflt,))
        assert all(t[2] for t in triggers if t[0] in clones), triggers
        conn = db.connect(superuser=bool(simulated))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '5s'")
                cur.execute("CALL maintain_partitions()")
                res = cur.fetchone()[0]
        finally:
            conn.close()
        assert_moved(res, "t18-b", "bcfy_calls_raw_p2031_04")
        assert db.query(modes, (dflt,)) == triggers
        # what the move disables: every clone, internal or not, none of the foreign key's triggers
        picked = {r[0] for r in db.query("SELECT tgname FROM dbops.p2_move_triggers(%s::regclass)", (dflt,))}
        assert picked >= set(clones), (picked, clones)
        assert not any(n.startswith("RI_ConstraintTrigger") for n in picked), picked
    finally:
        db.query(sim, (False, dflt, simulated), superuser=True)
    assert call(db, "SELECT dbops.p2_verify('bcfy_calls_raw')")["status"] == "ok"
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):   # the foreign key still checks the moved rows' partitions
        db.query("UPDATE bcfy_calls_raw SET feed_id = -1 WHERE call_uid = 't18-b'")
