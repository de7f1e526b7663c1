"""Issue 18: an invariant-checking concurrency test of the Phase 2 engine (Jepsen / Elle style), and a
named deterministic regression for each race it is built to find.

test_fuzz_conversion_invariants[seed]: sessions (threads, one connection each) run random transactions
at every isolation level - INSERT, INSERT ... ON CONFLICT (call_uid, started_at) DO NOTHING / DO UPDATE,
UPDATE of the payload, of started_at (across partitions), of call_uid, DELETE, COPY, TRUNCATE of one
partition - on bcfy_calls_raw, transcripts and processing_state, while the driver converts
bcfy_calls_raw and transcripts (prepare, backfill in small batches, verify, swap, maintain_partitions,
rollback, verify and swap again, finalize, maintain_partitions, cleanup_old_data). Between two steps the
invariants are checked in one REPEATABLE READ snapshot (call_uid unique, every reference has its call,
the partitioned copy equals the plain one); at the end the sessions' journals are replayed into a model
(no committed write lost or resurrected). Every refused transaction is counted by SQLSTATE; a refusal
native constraints would not give, a SQLSTATE outside the allowed classes, a transaction committed that
native constraints refuse: violations. Generator, model and checker: tests/fuzz_model.py.

Knobs (environment; `make test-fuzz SEEDS="1 2 3" FUZZ_SECONDS=120` for long runs):
  FUZZ_SEEDS     seeds, one test each (default "1 2 3"); a seed replays the same transaction mix,
                 not the same interleaving
  FUZZ_SECONDS   the walk's dwell budget per seed (default 10; a seed takes about 3x that)
  FUZZ_SCALE     demo calls = 500 x scale (default 1)
  FUZZ_THREADS   sessions (default 4)
  FUZZ_SQL_DIR   another files/sql tree to test (e.g. an exported older commit)
  FUZZ_JOURNAL_DIR  where the journals go (default: the test's tmp_path)

The test_case* tests choreograph two or three sessions with explicit BEGIN and ordering and assert
what PostgreSQL does with native constraints: where it raises (40001 / 23505 / 23503, TRUNCATE
refused), the engine must raise, and no bad state may be left.
"""
from __future__ import annotations

import datetime as dt
import os
import pathlib
import threading
import time
import uuid

import psycopg2
import psycopg2.errors
import pytest

from conftest import PSQL, DbInfo, apply, create_db, drop_db, phase_sql
from fuzz_model import TRUNCATE_REFUSED, Refused, engine, run_fuzz, sqlstate

REPO = pathlib.Path(__file__).resolve().parents[1]
SQL_DIR = pathlib.Path(os.environ.get("FUZZ_SQL_DIR") or REPO / "files" / "sql")
PHASE1 = phase_sql("001", SQL_DIR)
PHASE2 = phase_sql("002", SQL_DIR)
SEEDS = [int(s) for s in os.environ.get("FUZZ_SEEDS", "1 2 3").replace(",", " ").split()]
SECONDS = float(os.environ.get("FUZZ_SECONDS", "10"))
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
THREADS = int(os.environ.get("FUZZ_THREADS", "4"))
CALLS = max(100, int(500 * SCALE))

pytestmark = pytest.mark.skipif(PSQL is None, reason="psql not installed")


# ---------------------------------------------------------------------------------------------
# databases: one template per module (demo data + Phase 1 + Phase 2), a clone per test
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_template(pg_server):
    name = "fuzz_tmpl_" + uuid.uuid4().hex[:10]
    try:
        db = create_db(pg_server, baseline=True, seed_calls=CALLS, name=name)
        # only calls and transcripts are converted: keep the other big tables small
        db.query("DELETE FROM system_logs WHERE created_at < now() - interval '40 days'")
        db.query("DELETE FROM api_call_metrics WHERE \"timestamp\" < now() - interval '40 days'")
        apply(db, PHASE1)
        apply(db, PHASE2)
        db.query("ANALYZE")
        yield db
    finally:
        drop_db(pg_server, name)


@pytest.fixture
def clone_db(pg_server, fuzz_template):
    made: list[str] = []

    def _clone() -> DbInfo:
        name = "t_" + uuid.uuid4().hex[:12]
        made.append(name)
        su = pg_server.connect("postgres", superuser=True)
        su.autocommit = True
        try:
            for attempt in range(40):
                try:
                    with su.cursor() as cur:
                        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{fuzz_template.name}" OWNER {pg_server.user}')
                    break
                except psycopg2.errors.ObjectInUse:   # an autovacuum worker still on the template
                    if attempt == 39:
                        raise
                    time.sleep(0.25)
        finally:
            su.close()
        return DbInfo(pg_server, name)

    yield _clone
    for name in made:
        drop_db(pg_server, name)


# ---------------------------------------------------------------------------------------------
# the invariant test
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_conversion_invariants(seed, clone_db, tmp_path):
    db = clone_db()
    jdir = pathlib.Path(os.environ["FUZZ_JOURNAL_DIR"]) if os.environ.get("FUZZ_JOURNAL_DIR") else tmp_path
    jdir.mkdir(parents=True, exist_ok=True)
    res = run_fuzz(db, seed, SECONDS, THREADS, CALLS, journal_dir=jdir, log=lambda m: print(f"[seed {seed}] {m}"))
    text = res.summary()
    print(text)
    assert res.n_committed > 50 * THREADS, text   # the sessions did run
    assert len(res.violations) == 0, text


# ---------------------------------------------------------------------------------------------
# named regressions: the five races, choreographed
# ---------------------------------------------------------------------------------------------
def prepare(db, tbl):
    for _ in range(100):
        res = engine(db, "SELECT dbops.p2_prepare(%s)", (tbl,))
        if res["status"] != "retry":
            assert res["status"] in ("prepared", "already prepared"), res
            return res
        time.sleep(0.05)
    raise AssertionError(f"prepare {tbl}: no lock")


def backfill(db, tbl, batch=5000):
    while engine(db, "CALL dbops.p2_backfill(%s, %s, 60)", (tbl, batch))["status"] != "done":
        pass


def convert(db, *tbls):
    for tbl in tbls:
        prepare(db, tbl)
        backfill(db, tbl)
        assert engine(db, "SELECT dbops.p2_verify(%s)", (tbl,))["status"] == "ok"
        assert engine(db, "SELECT dbops.p2_swap(%s)", (tbl,))["status"] == "swapped"


class Sess:
    """A session driven step by step: BEGIN, statements, COMMIT, each in the test's order."""

    def __init__(self, db, iso="REPEATABLE READ"):
        self.conn = db.connect()
        self.conn.autocommit = True
        self.cur = self.conn.cursor()
        self.cur.execute("SET lock_timeout = '10s'")
        self.cur.execute(f"BEGIN ISOLATION LEVEL {iso}")
        self.error: str | None = None

    def q(self, sql, params=None):
        """Runs a statement; an error rolls the transaction back and is kept (SQLSTATE)."""
        if self.error:
            return None
        try:
            self.cur.execute(sql, params)
            return self.cur.fetchall() if self.cur.description else self.cur.rowcount
        except psycopg2.Error as e:
            self.error = f"{sqlstate(e)}: {' '.join(str(e).split())}"
            self.cur.execute("ROLLBACK")
            return None

    def commit(self) -> str | None:
        """COMMIT (or nothing after an error); returns None when committed, else 'SQLSTATE: message'."""
        if not self.error:
            try:
                self.cur.execute("COMMIT")
            except psycopg2.Error as e:
                self.error = f"{sqlstate(e)}: {' '.join(str(e).split())}"
        self.conn.close()
        return self.error

    @property
    def code(self):
        return self.error.split(":")[0] if self.error else None


def dangling(db) -> list:
    return db.query("SELECT 'transcripts', id, call_uid FROM transcripts t WHERE call_uid IS NOT NULL AND NOT EXISTS "
                    "(SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = t.call_uid) UNION ALL "
                    "SELECT 'processing_state', id, call_uid FROM processing_state p WHERE call_uid IS NOT NULL AND NOT EXISTS "
                    "(SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = p.call_uid)")


def verify_error(db, tbl) -> str | None:
    try:
        res = engine(db, "SELECT dbops.p2_verify(%s)", (tbl,))
        return None if res["status"] == "ok" else str(res)
    except Refused as e:
        return str(e)


UNREFERENCED = ("NOT EXISTS (SELECT 1 FROM transcripts t WHERE t.call_uid = c.call_uid) "
                "AND NOT EXISTS (SELECT 1 FROM processing_state p WHERE p.call_uid = c.call_uid)")


def first_batch_victims(db, n):
    """Unreferenced calls among the 50 smallest call_uids: the first backfill batch (50 rows) copies them."""
    return [r[0] for r in db.query(
        f"SELECT call_uid FROM (SELECT * FROM bcfy_calls_raw ORDER BY call_uid LIMIT 50) c "
        f"WHERE started_at IS NOT NULL AND {UNREFERENCED} ORDER BY call_uid LIMIT %s", (n,))]


def test_case1_rr_delete_after_backfill_batch(clone_db):
    """A REPEATABLE READ writer whose snapshot predates the batch that copies a row, then deletes it:
    with native tables the DELETE simply succeeds. The copy must not survive it in the shadow (or the
    writer gets 40001 and the row stays in both)."""
    db = clone_db()
    prepare(db, "bcfy_calls_raw")
    (victim,) = first_batch_victims(db, 1)
    w = Sess(db)
    w.q("SELECT started_at FROM bcfy_calls_raw WHERE call_uid = %s", (victim,))       # the snapshot
    res = engine(db, "CALL dbops.p2_backfill('bcfy_calls_raw', 50, 0)")                # one batch, committed
    assert res["batches_this_call"] == 1
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw_p WHERE call_uid = %s", (victim,)) == 1
    w.q("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (victim,))
    outcome = w.commit()
    backfill(db, "bcfy_calls_raw", 500)
    src = db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE call_uid = %s", (victim,))
    shadow = db.scalar("SELECT count(*) FROM bcfy_calls_raw_p WHERE call_uid = %s", (victim,))
    verr = verify_error(db, "bcfy_calls_raw")
    if outcome is None:
        assert (src, shadow) == (0, 0), (
            f"the REPEATABLE READ DELETE of {victim} committed, but its copy stays in bcfy_calls_raw_p "
            f"(source {src} row, shadow {shadow} row): the shadow diverges; p2_verify: {verr}")
    else:
        assert w.code == "40001" and (src, shadow) == (1, 1), (outcome, src, shadow)
    assert verr is None, verr


def test_case1_rr_rekey_after_backfill_batch(clone_db):
    """As case 1, the row re-keyed instead of deleted: its started_at moved to another partition (one
    writer), its call_uid changed (another writer). The shadow must hold the new version only."""
    db = clone_db()
    prepare(db, "bcfy_calls_raw")
    v1, v2 = first_batch_victims(db, 2)
    old1 = db.scalar("SELECT started_at FROM bcfy_calls_raw WHERE call_uid = %s", (v1,))
    new1 = old1 - dt.timedelta(days=40)
    w1, w2 = Sess(db), Sess(db)
    w1.q("SELECT started_at FROM bcfy_calls_raw WHERE call_uid = %s", (v1,))
    w2.q("SELECT started_at FROM bcfy_calls_raw WHERE call_uid = %s", (v2,))
    engine(db, "CALL dbops.p2_backfill('bcfy_calls_raw', 50, 0)")
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw_p WHERE call_uid IN (%s, %s)", (v1, v2)) == 2
    w1.q("UPDATE bcfy_calls_raw SET started_at = %s WHERE call_uid = %s", (new1, v1))
    out1 = w1.commit()
    w2.q("UPDATE bcfy_calls_raw SET call_uid = %s WHERE call_uid = %s", (v2 + "-rekeyed", v2))
    out2 = w2.commit()
    backfill(db, "bcfy_calls_raw", 500)
    problems = []
    got1 = [r[0] for r in db.query("SELECT started_at FROM bcfy_calls_raw_p WHERE call_uid = %s", (v1,))]
    want1 = [new1] if out1 is None else [old1]
    if out1 is not None and not out1.startswith("40001"):
        problems.append(f"started_at update of {v1} refused with {out1} (native: success)")
    if got1 != want1:
        problems.append(f"UPDATE of started_at of {v1} {'committed' if out1 is None else 'refused'}: the shadow has "
                        f"{[str(x) for x in got1]}, the source {[str(x) for x in want1]} (stale copy left behind)")
    got2 = sorted(r[0] for r in db.query("SELECT call_uid FROM bcfy_calls_raw_p WHERE call_uid IN (%s, %s)",
                                        (v2, v2 + "-rekeyed")))
    want2 = [v2 + "-rekeyed"] if out2 is None else [v2]
    if out2 is not None and not out2.startswith("40001"):
        problems.append(f"call_uid update of {v2} refused with {out2} (native: success)")
    if got2 != want2:
        problems.append(f"UPDATE of call_uid {v2} -> {v2}-rekeyed {'committed' if out2 is None else 'refused'}: "
                        f"the shadow has {got2}, the source {want2} (stale copy left behind)")
    verr = verify_error(db, "bcfy_calls_raw")
    if verr:
        problems.append(f"p2_verify: {verr}")
    assert not problems, "\n".join(problems)


def test_case2_rr_inserts_same_call_uid_other_started_at(clone_db):
    """After the swap call_uid alone has no unique index; the guard must keep it unique like the
    native primary key did: of two REPEATABLE READ transactions inserting the same call_uid with
    different started_at, the second gets 23505 (or 40001), whether the first committed before the
    second's INSERT or while it waited. Swapped (the reverse sync into the old copy, which still has
    the primary key on call_uid, happens to give 40001) and after finalize (only the guard is left)."""
    db = clone_db()
    convert(db, "bcfy_calls_raw")
    ins = ("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at) VALUES (%s, %s, %s, %s) "
           "ON CONFLICT (call_uid, started_at) DO NOTHING")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    problems = []
    for stage, base in (("swapped", 4200000000), ("finalized", 4300000000)):
        if stage == "finalized":
            assert engine(db, "SELECT dbops.p2_finalize('bcfy_calls_raw')")["status"] == "finalized"
        # (a) the first commits before the second inserts
        uid = f"case2a-{base}"
        t1, t2 = Sess(db), Sess(db)
        for t in (t1, t2):
            t.q("SELECT count(*) FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        t1.q(ins, (uid, "case2a", base + 1, now - dt.timedelta(days=40)))
        assert t1.commit() is None
        t2.q(ins, (uid, "case2a", base + 2, now))
        out = t2.commit()
        n = db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        if out is None or t2.code not in ("23505", "40001") or n != 1:
            problems.append(f"{stage} (a) first committed, then the second inserts: second -> {out or 'committed'}; "
                            f"{n} rows with call_uid {uid} (native: 23505, 1 row)")
        # (b) the second inserts while the first has not committed yet (it waits, then must fail)
        uid = f"case2b-{base}"
        t1, t2 = Sess(db), Sess(db)
        for t in (t1, t2):
            t.q("SELECT count(*) FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        t1.q(ins, (uid, "case2b", base + 11, now - dt.timedelta(days=40)))
        th = threading.Thread(target=t2.q, args=(ins, (uid, "case2b", base + 12, now)))
        th.start()
        time.sleep(0.5)   # t2 waits (native: on t1's index entry; the engine: on the guard's advisory lock)
        assert t1.commit() is None
        th.join(15)
        out = t2.commit()
        n = db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        if out is None or t2.code not in ("23505", "40001") or n != 1:
            problems.append(f"{stage} (b) the second inserts while the first is in progress: second -> "
                            f"{out or 'committed'}; {n} rows with call_uid {uid} (native: 23505, 1 row)")
    dups = db.query("SELECT call_uid, count(*) FROM bcfy_calls_raw GROUP BY 1 HAVING count(*) > 1")
    if dups:
        problems.append(f"duplicate call_uid in bcfy_calls_raw: {dups}")
    assert not problems, "\n".join(problems)


def test_case3_rr_delete_misses_new_reference(clone_db):
    """The emulated ON DELETE SET NULL under REPEATABLE READ: a transcript and a processing_state row
    referencing call X commit after the deleter's snapshot; the deleter then deletes X. Native
    (ri_triggers.c crosscheck): 40001 for the deleter. Never a dangling reference."""
    db = clone_db()
    convert(db, "bcfy_calls_raw")
    x = db.scalar(f"SELECT call_uid FROM bcfy_calls_raw c WHERE started_at > now() - interval '30 days' AND {UNREFERENCED} "
                  "ORDER BY call_uid LIMIT 1")
    t1 = Sess(db)
    t1.q("SELECT 1 FROM bcfy_calls_raw WHERE call_uid = %s", (x,))   # the deleter's snapshot
    tid = db.scalar("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) VALUES (%s, 'case 3', 1, 0.5) "
                    "RETURNING id", (x,))
    pid = db.scalar("INSERT INTO processing_state (call_uid, status) VALUES (%s, 'queued') RETURNING id", (x,))
    t1.q("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (x,))
    out = t1.commit()
    call_n = db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE call_uid = %s", (x,))
    tr_ref = db.scalar("SELECT call_uid FROM transcripts WHERE id = %s", (tid,))
    ps_ref = db.scalar("SELECT call_uid FROM processing_state WHERE id = %s", (pid,))
    if out is None:
        assert (tr_ref, ps_ref) == (None, None), (
            f"the REPEATABLE READ DELETE of call {x} committed but left transcripts.id {tid} -> {tr_ref} and "
            f"processing_state.id {pid} -> {ps_ref} dangling (native: 40001 for the deleter, or SET NULL)")
    else:
        assert t1.code == "40001" and (call_n, tr_ref, ps_ref) == (1, x, x), (out, call_n, tr_ref, ps_ref)
    assert dangling(db) == []


def test_case4_truncate_of_one_partition_refused(clone_db):
    """TRUNCATE of one partition: a row-level sync trigger never sees it and a trigger-pair reference
    cannot stop it. Native: a table referenced by a foreign key cannot be truncated (0A000); the
    engine's block raises P0001. While swapped (calls and transcripts: the reverse sync) and after
    finalize (calls: still referenced by transcripts / processing_state)."""
    db = clone_db()
    convert(db, "bcfy_calls_raw", "transcripts")
    problems = []

    def try_truncate(tbl, stage):
        parts = [r[0] for r in db.query("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                        "WHERE i.inhparent = %s::regclass", (tbl,))]
        rows, part = max((db.scalar(f'SELECT count(*) FROM public."{p}"'), p) for p in parts)   # the fullest one
        s = Sess(db, "READ COMMITTED")
        s.q(f'TRUNCATE public."{part}"')
        if s.error is None:
            refs = s.q("SELECT count(*) FROM transcripts t WHERE call_uid IS NOT NULL AND NOT EXISTS "
                       "(SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = t.call_uid)")[0][0]
            s.q("ROLLBACK")   # keep the data for the next part
            s.conn.close()
            problems.append(f"{stage}: TRUNCATE {part} ({rows} rows) accepted ({refs} transcripts left dangling "
                            f"in that transaction); native: 0A000 (referenced by a foreign key) / the engine's block P0001")
        else:
            s.conn.close()
            if s.code not in TRUNCATE_REFUSED:
                problems.append(f"{stage}: TRUNCATE {part} refused with {s.error} (expected 0A000 or P0001)")
        return part

    try_truncate("bcfy_calls_raw", "swapped")
    try_truncate("transcripts", "swapped")
    for t in ("transcripts", "bcfy_calls_raw"):
        assert engine(db, "SELECT dbops.p2_finalize(%s)", (t,))["status"] == "finalized"
    try_truncate("bcfy_calls_raw", "finalized")
    assert not problems, "\n".join(problems)


def test_case5_cross_partition_rekey_of_referenced_call(clone_db):
    """A call referenced by a transcript (ON UPDATE NO ACTION): changing its call_uid raises 23503
    natively, whether started_at changes with it (the row moves to another partition: DELETE + INSERT
    underneath) or not. The engine must not turn the move into ON DELETE SET NULL."""
    db = clone_db()
    convert(db, "bcfy_calls_raw")
    rows = db.query("SELECT c.call_uid, c.started_at, t.id FROM bcfy_calls_raw c JOIN transcripts t USING (call_uid) "
                    "WHERE c.started_at > now() - interval '60 days' ORDER BY c.call_uid LIMIT 2")
    problems = []
    for (uid, started, tid), (label, shift) in zip(rows, (("cross-partition", 35), ("same partition", 0))):
        s = Sess(db, "READ COMMITTED")
        s.q("UPDATE bcfy_calls_raw SET call_uid = %s, started_at = %s WHERE call_uid = %s",
            (uid + "-rekeyed", started - dt.timedelta(days=shift), uid))
        out = s.commit()
        ref = db.scalar("SELECT call_uid FROM transcripts WHERE id = %s", (tid,))
        if out is None or s.code != "23503":
            problems.append(f"{label} UPDATE of call_uid {uid} (+ started_at -{shift} days), referenced by transcript "
                            f"{tid}: {out or 'committed'}; the transcript now references {ref!r} (native: 23503, "
                            f"reference unchanged)")
        elif ref != uid:
            problems.append(f"{label}: refused, but transcript {tid} now references {ref!r}")
    if dangling(db):
        problems.append(f"dangling references: {dangling(db)}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# found by the invariant test beyond the five known cases: a REPEATABLE READ / SERIALIZABLE writer
# whose snapshot predates a step's commit (the engine's trigger functions read the catalog and
# dbops.p2_state in that old snapshot)
# ---------------------------------------------------------------------------------------------
def test_rr_writer_snapshot_before_prepare(clone_db):
    """Writers take their snapshot (reading another table), then prepare commits, then they update a
    call: the new forward trigger fires. Native: the UPDATE just works. Found by the invariant test:
    P0002 'query returned no rows' from p2_sync_upsert_sql (the column signature and p2_state read in
    the old snapshot)."""
    db = clone_db()
    uids = first_batch_victims(db, 2)
    ws = [Sess(db, "REPEATABLE READ"), Sess(db, "SERIALIZABLE")]
    for w in ws:
        w.q("SELECT count(*) FROM dbops.p2_state")   # the snapshot, before prepare (no lock on the calls)
    prepare(db, "bcfy_calls_raw")
    problems = []
    for w, uid, iso in zip(ws, uids, ("REPEATABLE READ", "SERIALIZABLE")):
        w.q("UPDATE bcfy_calls_raw SET error = %s WHERE call_uid = %s", (f"after prepare {iso}", uid))
        out = w.commit()
        if out is not None and w.code != "40001":
            problems.append(f"{iso}: UPDATE of {uid}, snapshot taken before prepare -> {out} (native: success)")
    backfill(db, "bcfy_calls_raw", 500)
    verr = verify_error(db, "bcfy_calls_raw")
    if verr:
        problems.append(f"p2_verify: {verr}")
    assert not problems, "\n".join(problems)


def test_rr_writer_snapshot_before_swap(clone_db):
    """Writers take their snapshot (reading another table), then the swap commits, then one deletes an
    unreferenced call (REPEATABLE READ), the other moves one to another month (SERIALIZABLE): the reference action of the new
    partitioned table fires. Native: the statements just work. Found by the invariant test: 42P01
    'relation "public.bcfy_calls_raw_p" does not exist' from p2_ref_action (the parent looked up by
    name in the old snapshot, where it was still called bcfy_calls_raw_p)."""
    db = clone_db()
    prepare(db, "bcfy_calls_raw")
    backfill(db, "bcfy_calls_raw", 500)
    assert engine(db, "SELECT dbops.p2_verify('bcfy_calls_raw')")["status"] == "ok"
    v1, v2 = first_batch_victims(db, 2)
    started = db.scalar("SELECT started_at FROM bcfy_calls_raw WHERE call_uid = %s", (v2,))
    w1, w2 = Sess(db), Sess(db, "SERIALIZABLE")
    for w in (w1, w2):
        w.q("SELECT count(*) FROM dbops.p2_state")   # the snapshot, before the swap (no lock on the calls)
    assert engine(db, "SELECT dbops.p2_swap('bcfy_calls_raw')")["status"] == "swapped"
    problems = []
    w1.q("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (v1,))
    out = w1.commit()
    if out is not None and w1.code != "40001":
        problems.append(f"REPEATABLE READ DELETE of {v1} after the swap -> {out} (native: success)")
    w2.q("UPDATE bcfy_calls_raw SET started_at = %s WHERE call_uid = %s", (started - dt.timedelta(days=40), v2))
    out = w2.commit()
    if out is not None and w2.code != "40001":
        problems.append(f"SERIALIZABLE UPDATE of started_at of {v2} after the swap -> {out} (native: success)")
    verr = verify_error(db, "bcfy_calls_raw")
    if verr:
        problems.append(f"p2_verify (old copy vs partitioned): {verr}")
    assert not problems, "\n".join(problems)
