-- dbops:no-transaction
-- Rollback of Phase 1 / step 2: drop the Phase 1 CHECK constraints. One statement per table, each
-- autocommitted, so each ACCESS EXCLUSIVE lock (no scan: milliseconds) covers a single table.
-- Idempotent (IF EXISTS).
-- squawk-ignore-file ban-drop-constraint -- a rollback: it removes exactly the CHECKs Phase 1 added

ALTER TABLE public.bcfy_calls_raw
    DROP CONSTRAINT IF EXISTS bcfy_calls_raw_duration_ms_check,
    DROP CONSTRAINT IF EXISTS bcfy_calls_raw_size_bytes_check,
    DROP CONSTRAINT IF EXISTS bcfy_calls_raw_ended_at_check;

ALTER TABLE public.transcripts
    DROP CONSTRAINT IF EXISTS transcripts_confidence_check,
    DROP CONSTRAINT IF EXISTS transcripts_duration_seconds_check;

ALTER TABLE public.api_call_metrics
    DROP CONSTRAINT IF EXISTS api_call_metrics_status_code_check,
    DROP CONSTRAINT IF EXISTS api_call_metrics_duration_ms_check;

ALTER TABLE public.system_logs
    DROP CONSTRAINT IF EXISTS system_logs_duration_ms_check;

ALTER TABLE public.bcfy_playlist_poll_log
    DROP CONSTRAINT IF EXISTS bcfy_playlist_poll_log_poll_ended_at_check;
