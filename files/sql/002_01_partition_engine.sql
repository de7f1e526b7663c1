-- Phase 2 / step 1: the partitioning engine's state and configuration (one transaction).
-- dbops:supersedes sha256:f058d158d02ae3682f9b4220ec915b68fc5a6e9e19bbe46540741576cb81615f
--
-- Installs, and changes no application table:
--   * public.app_retention_policies   interval / retention / premake per table (the guide reads it)
--   * dbops.p2_config                 engine knobs per table (NULL partition-key policy, app key index)
--   * dbops.p2_state, p2_objects, p2_refs, p2_events   engine state, index-name map, references, log
-- The engine's code (functions, procedures, the daily jobs, monitoring.partition_health) is in
-- files/sql/repeatable/002/: re-applied whenever it changes. The superseded checksum above is the
-- earlier text of this file, which also held that code: a database that applied it has every
-- table this text creates, so its ledger row is re-stamped, not re-run.
-- Design, locks and failure modes: docs/PHASE2_DESIGN.md.

CREATE SCHEMA IF NOT EXISTS dbops;
CREATE SCHEMA IF NOT EXISTS monitoring;

-- ---------------------------------------------------------------------------------------------
-- Configuration
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS public.app_retention_policies (
    table_name text PRIMARY KEY,
    time_column text NOT NULL,
    partition_interval text CHECK (partition_interval IN ('day', 'week', 'month')),
    retention interval NOT NULL CHECK (retention > interval '0'),
    premake bigint NOT NULL DEFAULT 3 CHECK (premake BETWEEN 1 AND 366),
    enabled boolean NOT NULL DEFAULT true,
    notes text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE public.app_retention_policies IS
    'Partitioning and retention per table (Phase 2). partition_interval NULL = not partitioned: '
    'cleanup_old_data() deletes rows older than retention (small tables only). premake = future '
    'partitions kept ahead by maintain_partitions(). enabled = false: both daily jobs skip the table.';

INSERT INTO public.app_retention_policies (table_name, time_column, partition_interval, retention, premake, notes)
VALUES
    ('bcfy_calls_raw', 'started_at', 'month', interval '90 days', 3, 'one row per radio call'),
    ('transcripts', 'created_at', 'month', interval '180 days', 3, 'one row per transcribed call'),
    ('api_call_metrics', 'timestamp', 'week', interval '30 days', 4, 'ISO weeks (Monday 00:00 UTC)'),
    ('system_logs', 'created_at', 'day', interval '30 days', 7, 'service event log'),
    ('bcfy_playlist_poll_log', 'poll_started_at', NULL, interval '30 days', 3, 'not partitioned: DELETE')
ON CONFLICT (table_name) DO NOTHING;

CREATE TABLE IF NOT EXISTS dbops.p2_config (
    table_name text PRIMARY KEY,
    null_key_expr text,
    app_key_index text,
    max_initial_partitions bigint NOT NULL DEFAULT 1000 CHECK (max_initial_partitions > 0)
);

COMMENT ON TABLE dbops.p2_config IS
    'Phase 2 engine knobs. null_key_expr: SQL over the table''s own columns giving the partition key '
    'of a row whose time column is NULL (the engine adds a constant fallback: the prepare time). '
    'app_key_index: a unique index on (old key, partition key) that must exist and be valid on the '
    'source before p2_prepare (the application''s new ON CONFLICT arbiter).';

INSERT INTO dbops.p2_config (table_name, null_key_expr, app_key_index)
VALUES
    ('bcfy_calls_raw', 'coalesce(started_at, to_timestamp(ts::double precision), fetched_at)',
     'bcfy_calls_raw_call_uid_started_at_key'),
    ('transcripts', NULL, NULL),
    ('api_call_metrics', NULL, NULL),
    ('system_logs', NULL, NULL)
ON CONFLICT (table_name) DO NOTHING;

-- ---------------------------------------------------------------------------------------------
-- State
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS dbops.p2_state (
    table_name text PRIMARY KEY,
    step text NOT NULL CHECK (step IN ('shadow_created', 'prepared', 'backfilling', 'backfilled',
                                       'verified', 'swapped', 'finalized')),
    shadow_name text NOT NULL,
    twin_name text NOT NULL,
    pk_col text NOT NULL,
    pk_type text NOT NULL,
    key_col text NOT NULL,
    unit text NOT NULL,
    key_expr text NOT NULL,
    null_key_fallback timestamptz,
    ins_cols text [] NOT NULL,
    all_cols text [] NOT NULL,
    fwd_function text NOT NULL,
    rev_function text NOT NULL,
    sequences jsonb NOT NULL DEFAULT '[]',
    guards jsonb NOT NULL DEFAULT '[]',
    user_triggers jsonb NOT NULL DEFAULT '[]',
    warnings jsonb NOT NULL DEFAULT '[]',
    range_from timestamptz,
    range_to timestamptz,
    partitions_created bigint,
    rows_total bigint,
    rows_done bigint NOT NULL DEFAULT 0,
    rows_copied bigint NOT NULL DEFAULT 0,
    null_key_rows bigint NOT NULL DEFAULT 0,
    last_key text,
    batches bigint NOT NULL DEFAULT 0,
    lock_waits bigint NOT NULL DEFAULT 0,
    backfill_seconds numeric NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    prepared_at timestamptz,
    backfill_started_at timestamptz,
    backfill_done_at timestamptz,
    verified_at timestamptz,
    swapped_at timestamptz,
    rolled_back_at timestamptz,
    finalized_at timestamptz,
    verify_result jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE dbops.p2_state IS
    'Phase 2: one row per table being (or already) converted to RANGE partitions. step: '
    'shadow_created -> prepared -> backfilling -> backfilled -> verified -> swapped -> finalized '
    '(p2_rollback: swapped -> backfilled; p2_abort deletes the row).';

-- Index names: the shadow builds every index under a temporary name; the swap gives the
-- partitioned table the original names and the old table the twin names (rollback: reverse).
CREATE TABLE IF NOT EXISTS dbops.p2_objects (
    table_name text NOT NULL,
    orig_name text NOT NULL,
    shadow_name text NOT NULL,
    twin_name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('primary key', 'unique', 'index')),
    definition text NOT NULL,
    PRIMARY KEY (table_name, orig_name)
);

-- Foreign keys that involve a table the engine converts, as they were before Phase 2 (the
-- definition is kept to restore them on rollback).
CREATE TABLE IF NOT EXISTS dbops.p2_refs (
    child_table text NOT NULL,
    conname text NOT NULL,
    parent_table text NOT NULL,
    child_cols text [] NOT NULL,
    parent_cols text [] NOT NULL,
    on_delete text NOT NULL,
    on_update text NOT NULL,
    definition text NOT NULL,
    captured_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (child_table, conname)
);

CREATE TABLE IF NOT EXISTS dbops.p2_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    table_name text,
    action text NOT NULL,
    result jsonb
);
