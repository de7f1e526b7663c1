-- dbops:no-transaction
-- Phase 1 / step 1: missing indexes, and GIN full-text index replacing the btree on transcripts.tsv.
--
-- Every index is built CONCURRENTLY (SHARE UPDATE EXCLUSIVE lock: reads and writes go on), so this
-- file runs outside a transaction, one statement at a time. Re-running it is a no-op (IF NOT EXISTS);
-- an INVALID index left by an interrupted build is dropped by the runner before the retry.
-- A concurrent build also waits for every transaction older than itself (on ANY table) to end,
-- and that wait counts against lock_timeout: with a long transaction open (a pg_dump, a session
-- idle in transaction) each attempt fails and is retried. Check monitoring.long_running_queries
-- (or pg_stat_activity) before starting.
-- Which application query each index serves: see the comment above it (PRODUCTION_FACTS.md).

-- Audio worker: "WHERE processed = false ORDER BY started_at LIMIT n FOR UPDATE SKIP LOCKED"
-- (oldest call first). Partial, so it only holds the backlog instead of 2.5 M rows; a row leaves
-- it when the worker sets processed = true.
CREATE INDEX CONCURRENTLY IF NOT EXISTS bcfy_calls_raw_pending_idx
    ON public.bcfy_calls_raw (started_at)
    WHERE processed = false;

-- Ingest monitoring / "what arrived recently" (fetched_at is the ingest time, started_at the call time).
CREATE INDEX CONCURRENTLY IF NOT EXISTS bcfy_calls_raw_fetched_at_idx
    ON public.bcfy_calls_raw (fetched_at);

-- API: calls of one feed, newest first ("WHERE feed_id = $1 ORDER BY started_at DESC LIMIT/OFFSET").
-- started_at DESC (NULLS FIRST, the default for DESC) matches the ORDER BY exactly: no sort.
CREATE INDEX CONCURRENTLY IF NOT EXISTS bcfy_calls_raw_feed_started_idx
    ON public.bcfy_calls_raw (feed_id, started_at DESC);

-- API: calls of one talkgroup, newest first (also serves feed_id + tg_id filters).
CREATE INDEX CONCURRENTLY IF NOT EXISTS bcfy_calls_raw_tg_started_idx
    ON public.bcfy_calls_raw (tg_id, started_at DESC);

-- Full-text search "WHERE tsv @@ plainto_tsquery('english', ...)": only GIN (or GiST) serves @@.
-- Built before the old btree is dropped, so search never loses its index.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_tsv_gin_idx
    ON public.transcripts USING gin (tsv);

-- Dashboard "transcripts today / last 24 h" and time-ordered transcript lists.
CREATE INDEX CONCURRENTLY IF NOT EXISTS transcripts_created_at_idx
    ON public.transcripts (created_at);

-- API-usage dashboards: calls per hour (time range over every endpoint) ...
CREATE INDEX CONCURRENTLY IF NOT EXISTS api_call_metrics_timestamp_idx
    ON public.api_call_metrics ("timestamp");

-- ... and per endpoint, newest first.
CREATE INDEX CONCURRENTLY IF NOT EXISTS api_call_metrics_endpoint_timestamp_idx
    ON public.api_call_metrics (endpoint, "timestamp" DESC);

-- Recent polls over every playlist ("ORDER BY poll_started_at DESC LIMIT n") and the 30-day
-- retention delete; the primary key (uuid, poll_started_at) only serves per-playlist lookups.
CREATE INDEX CONCURRENTLY IF NOT EXISTS bcfy_playlist_poll_log_poll_started_at_idx
    ON public.bcfy_playlist_poll_log (poll_started_at);

-- Pipeline queue: items in a given status, oldest update first (stuck / retry detection).
CREATE INDEX CONCURRENTLY IF NOT EXISTS processing_state_status_updated_at_idx
    ON public.processing_state (status, updated_at);

-- Guard: the btree on tsv goes only once the GIN index is there and valid (a plain psql run that
-- skipped an INVALID leftover with IF NOT EXISTS must not get this far).
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index AS i
        WHERE i.indexrelid = to_regclass('public.transcripts_tsv_gin_idx')
          AND i.indisvalid AND i.indisready
    ) THEN
        RAISE EXCEPTION 'transcripts_tsv_gin_idx is missing or INVALID: not dropping transcripts_tsv_idx'
            USING HINT = 'DROP INDEX CONCURRENTLY public.transcripts_tsv_gin_idx; then re-run this file.';
    END IF;
END
$$;

-- The production btree on tsv: useless for @@, costs writes, and rejects any transcript whose
-- tsvector exceeds the btree row limit (~2.7 kB). The generated tsv column itself is untouched.
DROP INDEX CONCURRENTLY IF EXISTS public.transcripts_tsv_idx;

-- Verification: every Phase 1 index exists, is valid and sits on the expected table.
DO $$
DECLARE
    expected CONSTANT text[][] := ARRAY[
        ['bcfy_calls_raw_pending_idx', 'bcfy_calls_raw'],
        ['bcfy_calls_raw_fetched_at_idx', 'bcfy_calls_raw'],
        ['bcfy_calls_raw_feed_started_idx', 'bcfy_calls_raw'],
        ['bcfy_calls_raw_tg_started_idx', 'bcfy_calls_raw'],
        ['transcripts_tsv_gin_idx', 'transcripts'],
        ['transcripts_created_at_idx', 'transcripts'],
        ['api_call_metrics_timestamp_idx', 'api_call_metrics'],
        ['api_call_metrics_endpoint_timestamp_idx', 'api_call_metrics'],
        ['bcfy_playlist_poll_log_poll_started_at_idx', 'bcfy_playlist_poll_log'],
        ['processing_state_status_updated_at_idx', 'processing_state']
    ];
    problems text[] := '{}';
    idx_oid regclass;
    ok boolean;
BEGIN
    FOR n IN 1 .. array_length(expected, 1) LOOP
        idx_oid := to_regclass('public.' || expected[n][1]);
        SELECT i.indisvalid AND i.indisready AND i.indrelid = to_regclass('public.' || expected[n][2])
          INTO ok
          FROM pg_index AS i
         WHERE i.indexrelid = idx_oid;
        IF idx_oid IS NULL THEN
            problems := problems || format('%s (missing)', expected[n][1]);
        ELSIF NOT coalesce(ok, false) THEN
            problems := problems || format('%s (INVALID or not on %s)', expected[n][1], expected[n][2]);
        ELSE
            RAISE NOTICE '✓ Created index %', expected[n][1];
        END IF;
    END LOOP;
    IF to_regclass('public.transcripts_tsv_idx') IS NOT NULL THEN
        problems := problems || 'transcripts_tsv_idx (btree on tsv still present)'::text;
    END IF;
    IF cardinality(problems) > 0 THEN
        RAISE EXCEPTION 'Phase 1 indexes not in place: %', array_to_string(problems, ', ')
            USING HINT = 'Re-run the migration: invalid indexes are dropped and rebuilt.';
    END IF;
    RAISE NOTICE 'All indexes created successfully';
END
$$;
