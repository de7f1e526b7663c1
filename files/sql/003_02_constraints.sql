-- dbops:no-transaction
-- Phase 3 / step 2: CHECK constraints on the new state columns (and on bcfy_playlists.last_pos),
-- added without a long lock, exactly like Phase 1 (001_02):
--   1. ADD CONSTRAINT ... NOT VALID: ACCESS EXCLUSIVE for milliseconds (no scan); from then on every
--      INSERT/UPDATE is checked. One DO block per table; pg_constraint is checked first because
--      ADD CONSTRAINT has no IF NOT EXISTS (known trap 5).
--   2. VALIDATE CONSTRAINT: scans the existing rows under SHARE UPDATE EXCLUSIVE (reads and writes go
--      on). A no-op when already valid.
-- Partitioned bcfy_calls_raw (after Phase 2): PostgreSQL 15 accepts a NOT VALID CHECK on the
-- partitioned parent; it is created on every partition too (inherited, same name), and VALIDATE on
-- the parent validates every partition. Partitions created later by maintain_partitions() copy it
-- (LIKE ... INCLUDING CONSTRAINTS, then ATTACH, which requires it). Plain bcfy_calls_raw (Phase 2
-- skipped): the same statements. The old copy bcfy_calls_raw_nonpartitioned (Phase 2 swapped, not
-- finalized) gets the same constraints, so a rollback of Phase 2 keeps them.
--
-- If VALIDATE fails ("check constraint ... is violated by some row"), the constraint stays NOT VALID
-- (new rows are still checked): find the rows with docs/GUIDE_QUERIES.md ("Phase 3 CHECK
-- constraints"), fix them and re-run: the file resumes where it stopped.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.bcfy_playlists'::regclass AND conname = 'bcfy_playlists_sync_error_count_check') THEN
        ALTER TABLE public.bcfy_playlists
            ADD CONSTRAINT bcfy_playlists_sync_error_count_check CHECK (sync_error_count >= 0) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.bcfy_playlists'::regclass AND conname = 'bcfy_playlists_last_pos_check') THEN
        ALTER TABLE public.bcfy_playlists
            ADD CONSTRAINT bcfy_playlists_last_pos_check CHECK (last_pos >= 0) NOT VALID;
    END IF;
END
$$;

DO $$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['bcfy_calls_raw', 'bcfy_calls_raw_nonpartitioned'] LOOP
        CONTINUE WHEN to_regclass('public.' || tbl) IS NULL;
        IF NOT EXISTS (SELECT 1 FROM pg_constraint
                       WHERE conrelid = to_regclass('public.' || tbl) AND conname = 'bcfy_calls_raw_processing_stage_check') THEN
            EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT bcfy_calls_raw_processing_stage_check
                                CHECK (processing_stage IN (''pending'', ''downloading'', ''downloaded'', ''converting'',
                                                            ''completed'', ''failed'')) NOT VALID', tbl);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_constraint
                       WHERE conrelid = to_regclass('public.' || tbl) AND conname = 'bcfy_calls_raw_retry_count_check') THEN
            EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT bcfy_calls_raw_retry_count_check
                                CHECK (retry_count >= 0) NOT VALID', tbl);
        END IF;
    END LOOP;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.processing_state'::regclass AND conname = 'processing_state_retry_count_check') THEN
        ALTER TABLE public.processing_state
            ADD CONSTRAINT processing_state_retry_count_check CHECK (retry_count >= 0) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.processing_state'::regclass AND conname = 'processing_state_max_retries_check') THEN
        ALTER TABLE public.processing_state
            ADD CONSTRAINT processing_state_max_retries_check CHECK (max_retries >= 0) NOT VALID;
    END IF;
END
$$;

-- Step 2: validate, one constraint per statement (each scan holds its lock only for itself).
-- squawk-ignore-file prefer-robust-stmts -- VALIDATE is idempotent (no-op when already valid); no transaction on purpose
ALTER TABLE public.bcfy_playlists VALIDATE CONSTRAINT bcfy_playlists_sync_error_count_check;
ALTER TABLE public.bcfy_playlists VALIDATE CONSTRAINT bcfy_playlists_last_pos_check;
ALTER TABLE public.bcfy_calls_raw VALIDATE CONSTRAINT bcfy_calls_raw_processing_stage_check;
ALTER TABLE public.bcfy_calls_raw VALIDATE CONSTRAINT bcfy_calls_raw_retry_count_check;
ALTER TABLE public.processing_state VALIDATE CONSTRAINT processing_state_retry_count_check;
ALTER TABLE public.processing_state VALIDATE CONSTRAINT processing_state_max_retries_check;

-- The old copy, when there is one (a DO block is one transaction: the scan holds the same
-- SHARE UPDATE EXCLUSIVE lock as a plain VALIDATE; nobody but the reverse-sync trigger writes it).
DO $$
BEGIN
    IF to_regclass('public.bcfy_calls_raw_nonpartitioned') IS NOT NULL THEN
        ALTER TABLE public.bcfy_calls_raw_nonpartitioned VALIDATE CONSTRAINT bcfy_calls_raw_processing_stage_check;
        ALTER TABLE public.bcfy_calls_raw_nonpartitioned VALIDATE CONSTRAINT bcfy_calls_raw_retry_count_check;
    END IF;
END
$$;

-- Verification: all six exist as validated CHECK constraints (on every partition too).
DO $$
DECLARE
    expected CONSTANT text[][] := ARRAY[
        ['bcfy_playlists', 'bcfy_playlists_sync_error_count_check'],
        ['bcfy_playlists', 'bcfy_playlists_last_pos_check'],
        ['bcfy_calls_raw', 'bcfy_calls_raw_processing_stage_check'],
        ['bcfy_calls_raw', 'bcfy_calls_raw_retry_count_check'],
        ['processing_state', 'processing_state_retry_count_check'],
        ['processing_state', 'processing_state_max_retries_check']
    ];
    problems text[] := '{}';
    missing_parts text;
BEGIN
    FOR n IN 1 .. array_length(expected, 1) LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_constraint
                       WHERE conrelid = to_regclass('public.' || expected[n][1])
                         AND conname = expected[n][2] AND contype = 'c' AND convalidated) THEN
            problems := problems || expected[n][2];
        ELSE
            RAISE NOTICE '✓ Validated constraint %', expected[n][2];
        END IF;
    END LOOP;
    SELECT string_agg(p.relid::regclass::text, ', ') INTO missing_parts
    FROM pg_partition_tree('public.bcfy_calls_raw') AS p
    WHERE p.relid <> 'public.bcfy_calls_raw'::regclass
      AND NOT EXISTS (SELECT 1 FROM pg_constraint AS k
                      WHERE k.conrelid = p.relid AND k.conname = 'bcfy_calls_raw_processing_stage_check' AND k.convalidated);
    IF missing_parts IS NOT NULL THEN
        problems := problems || ('bcfy_calls_raw_processing_stage_check on ' || missing_parts);
    END IF;
    IF cardinality(problems) > 0 THEN
        RAISE EXCEPTION 'Phase 3 CHECK constraints missing or not validated: %', array_to_string(problems, ', ');
    END IF;
    RAISE NOTICE 'All Phase 3 CHECK constraints validated successfully';
END
$$;
