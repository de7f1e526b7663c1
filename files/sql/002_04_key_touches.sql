-- Phase 2 / step 4 (issue 18): the table that lets the engine's integrity triggers see what a
-- REPEATABLE READ or SERIALIZABLE transaction's snapshot hides (one transaction, idempotent).
--
-- PostgreSQL's own unique indexes and foreign keys look past a transaction's snapshot: a unique
-- index checks every committed or in-progress entry (it waits for an in-progress one), and the RI
-- triggers run their checks with the latest snapshot and a crosscheck against the transaction's
-- (ri_triggers.c: ri_PerformCheck), raising "could not serialize access due to concurrent update"
-- (40001) where the transaction's snapshot and the database disagree. PL/pgSQL cannot choose a
-- snapshot; a unique index can: every writer of a guarded key (a unique key that lost its
-- table-wide index on a partitioned table) and every new reference to a row of a partitioned
-- table upserts a hash of (ns, key) here, ON CONFLICT DO UPDATE. That row lock serializes the writers of one
-- key like a unique index does (the second waits for the first), and a REPEATABLE READ /
-- SERIALIZABLE transaction whose snapshot predates another writer's commit gets 40001 from
-- PostgreSQL itself (the conflicting row is invisible to it: ExecOnConflictUpdate). Rows are only
-- needed while a snapshot older than their last writer may exist: dbops.p2_touch_prune() deletes
-- the others (maintain_partitions() runs it every night).
-- Design: docs/PHASE2_DESIGN.md, "Integrity under every isolation level".

CREATE TABLE IF NOT EXISTS dbops.p2_key_touches (
    -- hashtextextended('<ns>|<key>', 0): ns 'u:<table>:<constraint>' (uniqueness guard) or
    -- 'r:<constraint>' (reference), key ROW(<key values>)::text. 64 bits keep a row at ~40 bytes
    -- (the text form measured ~400 bytes with its index); two keys meeting on one hash only make
    -- one writer wait for, or retry after, the other (about n^2 / 2^65 pairs among n keys a day)
    h bigint PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id()   -- the last writer
);

-- What the last prune saw: the oldest transaction id still running and the virtual transaction ids
-- of every running transaction. Once none of those transactions runs any more, no snapshot can be
-- older than the rows written by transactions below that id.
CREATE TABLE IF NOT EXISTS dbops.p2_key_touches_prune (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    at timestamptz NOT NULL,
    oldest_xid xid8 NOT NULL,
    vxids text [] NOT NULL
);

REVOKE ALL ON dbops.p2_key_touches, dbops.p2_key_touches_prune FROM PUBLIC;

-- The transactions that ran when a backfill finished (virtual transaction ids): a snapshot taken
-- before the last batch committed does not see every copied row, so the swap waits until none of
-- them runs any more (as an online index build waits for older snapshots): a REPEATABLE READ
-- transaction that had not yet touched the table would otherwise read, after the swap, a
-- partitioned table missing rows it should see, and update or delete nothing.
ALTER TABLE dbops.p2_state ADD COLUMN IF NOT EXISTS backfill_vxids text [];
