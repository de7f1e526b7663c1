-- dbops:no-transaction
-- Phase 1 / step 2: CHECK constraints on value ranges, added without a long lock.
--
-- Two steps per constraint, each its own autocommitted statement:
--   1. ADD CONSTRAINT ... NOT VALID: ACCESS EXCLUSIVE for milliseconds (no table scan); from then on
--      every INSERT/UPDATE is checked. One DO block per table takes that lock once for all its
--      constraints; pg_constraint is checked first because ADD CONSTRAINT has no IF NOT EXISTS.
--   2. VALIDATE CONSTRAINT: scans the existing rows under SHARE UPDATE EXCLUSIVE, which does not
--      block reads or writes. Validating an already valid constraint is a no-op.
-- NULL passes every check (a CHECK rejects only FALSE), so nullable columns keep their NULLs.
--
-- If VALIDATE fails ("check constraint ... is violated by some row"), the constraint stays NOT VALID
-- (new rows are still checked); find the offending rows with the query in docs/GUIDE_QUERIES.md
-- ("Phase 1 CHECK constraints"), fix or delete them, and re-run: the file resumes where it stopped.
--
-- Names: <table>_<column>_check (ended_at / poll_ended_at: the column that must not precede its start).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.bcfy_calls_raw'::regclass AND conname = 'bcfy_calls_raw_duration_ms_check') THEN
        ALTER TABLE public.bcfy_calls_raw
            ADD CONSTRAINT bcfy_calls_raw_duration_ms_check CHECK (duration_ms >= 0) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.bcfy_calls_raw'::regclass AND conname = 'bcfy_calls_raw_size_bytes_check') THEN
        ALTER TABLE public.bcfy_calls_raw
            ADD CONSTRAINT bcfy_calls_raw_size_bytes_check CHECK (size_bytes >= 0) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.bcfy_calls_raw'::regclass AND conname = 'bcfy_calls_raw_ended_at_check') THEN
        ALTER TABLE public.bcfy_calls_raw
            ADD CONSTRAINT bcfy_calls_raw_ended_at_check CHECK (ended_at >= started_at) NOT VALID;
    END IF;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.transcripts'::regclass AND conname = 'transcripts_confidence_check') THEN
        ALTER TABLE public.transcripts
            ADD CONSTRAINT transcripts_confidence_check CHECK (confidence >= 0 AND confidence <= 1) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.transcripts'::regclass AND conname = 'transcripts_duration_seconds_check') THEN
        ALTER TABLE public.transcripts
            ADD CONSTRAINT transcripts_duration_seconds_check CHECK (duration_seconds >= 0) NOT VALID;
    END IF;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.api_call_metrics'::regclass AND conname = 'api_call_metrics_status_code_check') THEN
        ALTER TABLE public.api_call_metrics
            ADD CONSTRAINT api_call_metrics_status_code_check CHECK (status_code >= 100 AND status_code <= 599) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.api_call_metrics'::regclass AND conname = 'api_call_metrics_duration_ms_check') THEN
        ALTER TABLE public.api_call_metrics
            ADD CONSTRAINT api_call_metrics_duration_ms_check CHECK (duration_ms >= 0) NOT VALID;
    END IF;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.system_logs'::regclass AND conname = 'system_logs_duration_ms_check') THEN
        ALTER TABLE public.system_logs
            ADD CONSTRAINT system_logs_duration_ms_check CHECK (duration_ms >= 0) NOT VALID;
    END IF;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'public.bcfy_playlist_poll_log'::regclass AND conname = 'bcfy_playlist_poll_log_poll_ended_at_check') THEN
        ALTER TABLE public.bcfy_playlist_poll_log
            ADD CONSTRAINT bcfy_playlist_poll_log_poll_ended_at_check CHECK (poll_ended_at >= poll_started_at) NOT VALID;
    END IF;
END
$$;

-- Step 2: validate, one constraint per statement (each scan holds its lock only for itself).
-- squawk-ignore-file prefer-robust-stmts -- VALIDATE is idempotent (no-op when already valid); no transaction on purpose
ALTER TABLE public.bcfy_calls_raw VALIDATE CONSTRAINT bcfy_calls_raw_duration_ms_check;
ALTER TABLE public.bcfy_calls_raw VALIDATE CONSTRAINT bcfy_calls_raw_size_bytes_check;
ALTER TABLE public.bcfy_calls_raw VALIDATE CONSTRAINT bcfy_calls_raw_ended_at_check;
ALTER TABLE public.transcripts VALIDATE CONSTRAINT transcripts_confidence_check;
ALTER TABLE public.transcripts VALIDATE CONSTRAINT transcripts_duration_seconds_check;
ALTER TABLE public.api_call_metrics VALIDATE CONSTRAINT api_call_metrics_status_code_check;
ALTER TABLE public.api_call_metrics VALIDATE CONSTRAINT api_call_metrics_duration_ms_check;
ALTER TABLE public.system_logs VALIDATE CONSTRAINT system_logs_duration_ms_check;
ALTER TABLE public.bcfy_playlist_poll_log VALIDATE CONSTRAINT bcfy_playlist_poll_log_poll_ended_at_check;

-- Verification: all nine exist as CHECK constraints and are validated.
DO $$
DECLARE
    expected CONSTANT text[][] := ARRAY[
        ['bcfy_calls_raw', 'bcfy_calls_raw_duration_ms_check'],
        ['bcfy_calls_raw', 'bcfy_calls_raw_size_bytes_check'],
        ['bcfy_calls_raw', 'bcfy_calls_raw_ended_at_check'],
        ['transcripts', 'transcripts_confidence_check'],
        ['transcripts', 'transcripts_duration_seconds_check'],
        ['api_call_metrics', 'api_call_metrics_status_code_check'],
        ['api_call_metrics', 'api_call_metrics_duration_ms_check'],
        ['system_logs', 'system_logs_duration_ms_check'],
        ['bcfy_playlist_poll_log', 'bcfy_playlist_poll_log_poll_ended_at_check']
    ];
    problems text[] := '{}';
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
    IF cardinality(problems) > 0 THEN
        RAISE EXCEPTION 'Phase 1 CHECK constraints missing or not validated: %', array_to_string(problems, ', ');
    END IF;
    RAISE NOTICE 'All CHECK constraints validated successfully';
END
$$;
