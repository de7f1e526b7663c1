-- dbops:no-transaction
-- Rollback of Phase 3 / step 2: drop the Phase 3 CHECK constraints (columns stay: see
-- rollback/003_01_columns.sql). One statement per table, each autocommitted, so each ACCESS
-- EXCLUSIVE lock (no scan: milliseconds) covers a single table (and its partitions). Idempotent.
-- squawk-ignore-file ban-drop-constraint -- a rollback: it removes exactly the CHECKs Phase 3 added

ALTER TABLE public.bcfy_playlists
    DROP CONSTRAINT IF EXISTS bcfy_playlists_sync_error_count_check,
    DROP CONSTRAINT IF EXISTS bcfy_playlists_last_pos_check;

ALTER TABLE public.bcfy_calls_raw
    DROP CONSTRAINT IF EXISTS bcfy_calls_raw_processing_stage_check,
    DROP CONSTRAINT IF EXISTS bcfy_calls_raw_retry_count_check;

ALTER TABLE public.processing_state
    DROP CONSTRAINT IF EXISTS processing_state_retry_count_check,
    DROP CONSTRAINT IF EXISTS processing_state_max_retries_check;

DO $$
BEGIN
    IF to_regclass('public.bcfy_calls_raw_nonpartitioned') IS NOT NULL THEN
        ALTER TABLE public.bcfy_calls_raw_nonpartitioned
            DROP CONSTRAINT IF EXISTS bcfy_calls_raw_processing_stage_check,
            DROP CONSTRAINT IF EXISTS bcfy_calls_raw_retry_count_check;
    END IF;
END
$$;
