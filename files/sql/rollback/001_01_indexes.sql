-- dbops:no-transaction
-- Rollback of Phase 1 / step 1: drop the Phase 1 indexes and restore the baseline btree on
-- transcripts.tsv, all CONCURRENTLY (no blocking lock), one statement at a time. Idempotent.
--
-- Caveat: the restored btree rejects any transcript whose tsvector is larger than the btree row
-- limit (~2.7 kB, "index row size ... exceeds btree version 4 maximum"); if such a transcript was
-- stored while Phase 1 was in place, this CREATE INDEX fails and the rollback stops here, before
-- anything is dropped. That btree never served full-text search; it is restored only to give back
-- the exact pre-Phase-1 schema.

-- Restored first: the rollback never leaves transcripts with fewer indexes than the baseline.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_tsv_idx
    ON public.transcripts (tsv);

DROP INDEX CONCURRENTLY IF EXISTS public.transcripts_tsv_gin_idx;
DROP INDEX CONCURRENTLY IF EXISTS public.bcfy_calls_raw_pending_idx;
DROP INDEX CONCURRENTLY IF EXISTS public.bcfy_calls_raw_fetched_at_idx;
DROP INDEX CONCURRENTLY IF EXISTS public.bcfy_calls_raw_feed_started_idx;
DROP INDEX CONCURRENTLY IF EXISTS public.bcfy_calls_raw_tg_started_idx;
DROP INDEX CONCURRENTLY IF EXISTS public.transcripts_created_at_idx;
DROP INDEX CONCURRENTLY IF EXISTS public.api_call_metrics_timestamp_idx;
DROP INDEX CONCURRENTLY IF EXISTS public.api_call_metrics_endpoint_timestamp_idx;
DROP INDEX CONCURRENTLY IF EXISTS public.bcfy_playlist_poll_log_poll_started_at_idx;
DROP INDEX CONCURRENTLY IF EXISTS public.processing_state_status_updated_at_idx;

DO $$
DECLARE
    leftover text;
BEGIN
    SELECT string_agg(c.relname, ', ' ORDER BY c.relname) INTO leftover
    FROM pg_class AS c
    WHERE c.relnamespace = 'public'::regnamespace
      AND c.relname IN ('transcripts_tsv_gin_idx', 'bcfy_calls_raw_pending_idx', 'bcfy_calls_raw_fetched_at_idx',
                        'bcfy_calls_raw_feed_started_idx', 'bcfy_calls_raw_tg_started_idx',
                        'transcripts_created_at_idx', 'api_call_metrics_timestamp_idx',
                        'api_call_metrics_endpoint_timestamp_idx', 'bcfy_playlist_poll_log_poll_started_at_idx',
                        'processing_state_status_updated_at_idx');
    IF leftover IS NOT NULL THEN
        RAISE EXCEPTION 'Phase 1 indexes still present after rollback: %', leftover;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_index
                   WHERE indexrelid = to_regclass('public.transcripts_tsv_idx') AND indisvalid) THEN
        RAISE EXCEPTION 'baseline index transcripts_tsv_idx is missing or INVALID after rollback';
    END IF;
    RAISE NOTICE 'Phase 1 indexes removed; transcripts_tsv_idx restored';
END
$$;
