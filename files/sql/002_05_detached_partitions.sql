-- Phase 2 / step 5: the register of the partitions cleanup_old_data() detached (one transaction).
--
-- Installs, and changes no application table:
--   * dbops.p2_detached   one row per expired partition the daily job detached and has not dropped yet
-- cleanup_old_data() (files/sql/repeatable/002/08_daily_jobs.sql) writes the row in the DETACH's own
-- transaction and deletes it in the DROP's; it resumes, clears the references of and drops only a
-- table recorded here that is still the same relation (same oid and name, in public, not a partition,
-- owned by its parent's owner). It used to find its work by a table comment
-- ('dbops:retention-detached {...}'), which any role that can create a table in public can write
-- (PUBLIC could, up to PostgreSQL 14): issue 18 item 7. The procedure adopts such a legacy-marked
-- table only under the rule described there.
-- Not version 002_03: databases built with the released layout keep a retired 002_03 row in the
-- ledger (002_03_faster_backfill_and_verify.sql), and a new file of that version would be refused
-- as a changed applied file.
-- Design: docs/PHASE2_DESIGN.md ("Daily jobs").

CREATE SCHEMA IF NOT EXISTS dbops;

CREATE TABLE IF NOT EXISTS dbops.p2_detached (
    rel oid PRIMARY KEY,
    relname text NOT NULL,
    table_name text NOT NULL,
    parent oid NOT NULL,
    owner oid NOT NULL,
    time_column text NOT NULL,
    range_start timestamptz,
    range_end timestamptz NOT NULL,
    source text NOT NULL DEFAULT 'detach' CHECK (source IN ('detach', 'legacy-marker')),
    detached_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE dbops.p2_detached IS
    'Phase 2: expired partitions cleanup_old_data() detached and has not dropped yet (written in the '
    'DETACH''s transaction, deleted in the DROP''s). rel/relname: the detached table; table_name/parent: '
    'the policy table it was a partition of; owner: its owner then (the parent''s); range_start/'
    'range_end: its bounds (range_start NULL = MINVALUE); source: detach, or legacy-marker (a table the '
    'former code marked with a comment, adopted). Only the engine writes it.';

REVOKE ALL ON dbops.p2_detached FROM PUBLIC;
