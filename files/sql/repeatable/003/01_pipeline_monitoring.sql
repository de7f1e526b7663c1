-- Phase 3's pipeline monitoring (guide 3.2 and "Monitoring Queries"):
--   get_pipeline_stats(window)                      counts per stage over a recent window
--   get_stuck_processing_items(stuck_after, ...)    items sitting in an in-flight stage too long
--   monitoring.pipeline_stats                       get_pipeline_stats() over the last 24 hours
--   monitoring.processing_pipeline_status           queue health per stage, stuck / retry counts
--   monitoring.playlist_sync_health                 one row per playlist, sync errors and status
--
-- Functions and views only (no lock on application data beyond the ACCESS SHARE a view definition
-- takes for a moment).
--
-- Cost on production (2.5 M calls, ~750 k processing_state rows): nothing here scans a whole table.
--   * bcfy_calls_raw is always read through a started_at range (now() - window): after Phase 2 that
--     is the partition key (pruning keeps 1-2 monthly partitions), before it the btree on
--     started_at serves the range. Only the calls of the window are aggregated.
--   * processing_state in-flight statuses ('queued', 'downloaded', 'transcribed') are read through
--     Phase 1's index (status, updated_at): few rows. Terminal statuses only within the window.
--   * bcfy_playlists is a few hundred rows; its last poll comes from the poll log's primary key
--     (uuid, poll_started_at), one index probe per playlist.
-- No new index: every existing call reads processing_stage = 'pending' after a catalog-only ADD
-- COLUMN, so a partial index on non-terminal stages would hold the whole table, and PostgreSQL 15
-- cannot build an index CONCURRENTLY on a partitioned table. The started_at range is the cheap path.
--
-- Legacy rows: processing_stage was added with the constant default 'pending' (no UPDATE of 2.5 M
-- rows), so a call the audio worker handled before it set processing_stage reads 'pending'. The
-- functions report an effective stage: 'pending' with processed = true is 'completed', 'pending'
-- with an error is 'failed'. Calls are "in flight" in 'downloading', 'downloaded', 'converting'.
-- Functions are LANGUAGE sql with a string body (not BEGIN ATOMIC): they resolve the tables at run
-- time, so a later Phase 2 swap (or its rollback) needs nothing re-pointed.

CREATE SCHEMA IF NOT EXISTS monitoring;

CREATE OR REPLACE FUNCTION public.get_pipeline_stats(p_window interval DEFAULT interval '24 hours')
RETURNS TABLE (
    source text,
    stage text,
    items bigint,
    pct numeric,
    retrying bigint,
    oldest timestamptz,
    newest timestamptz
)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH calls AS (
        -- started_at range: partition pruning (Phase 2) or the started_at btree (before it).
        SELECT CASE WHEN c.processing_stage = 'pending' AND c.processed THEN 'completed'
                    WHEN c.processing_stage = 'pending' AND c.error IS NOT NULL THEN 'failed'
                    ELSE coalesce(c.processing_stage, 'pending') END AS stage,
               c.retry_count, c.started_at AS at
        FROM public.bcfy_calls_raw AS c
        WHERE c.started_at >= now() - p_window
    ), states AS (
        -- in-flight statuses through (status, updated_at); terminal ones within the window.
        SELECT s.status AS stage, s.retry_count, s.updated_at AS at
        FROM public.processing_state AS s
        WHERE s.status IN ('queued', 'downloaded', 'transcribed')
           OR s.updated_at >= now() - p_window
    ), counted AS (
        SELECT 'bcfy_calls_raw'::text AS source, stage, count(*) AS items,
               count(*) FILTER (WHERE retry_count > 0) AS retrying, min(at) AS oldest, max(at) AS newest
        FROM calls GROUP BY stage
        UNION ALL
        SELECT 'processing_state', stage, count(*),
               count(*) FILTER (WHERE retry_count > 0), min(at), max(at)
        FROM states GROUP BY stage
    )
    SELECT k.source, k.stage, k.items,
           round(100.0 * k.items / nullif(sum(k.items) OVER (PARTITION BY k.source), 0), 1) AS pct,
           k.retrying, k.oldest, k.newest
    FROM counted AS k
    ORDER BY k.source, k.items DESC, k.stage
$$;
COMMENT ON FUNCTION public.get_pipeline_stats(interval) IS
'Items per pipeline stage: calls started within p_window (effective stage: legacy pending+processed = completed), processing_state rows in flight or updated within p_window. Reads only the window (partition key / indexes).';

CREATE OR REPLACE FUNCTION public.get_stuck_processing_items(
    p_stuck_after interval DEFAULT interval '1 hour',
    p_lookback interval DEFAULT interval '7 days',
    p_limit integer DEFAULT 100
)
RETURNS TABLE (
    source text,
    call_uid text,
    item_id bigint,
    stage text,
    retry_count integer,
    max_retries integer,
    last_activity timestamptz,
    stuck_for interval,
    last_error text
)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM (
        -- Calls in an in-flight stage whose last attempt (else fetch time) is older than p_stuck_after,
        -- among the calls started within p_lookback (partition pruning / started_at btree).
        SELECT 'bcfy_calls_raw'::text AS source, c.call_uid, NULL::bigint AS item_id, c.processing_stage AS stage,
               c.retry_count, NULL::integer AS max_retries,
               coalesce(c.last_attempt, c.fetched_at, c.started_at) AS last_activity,
               now() - coalesce(c.last_attempt, c.fetched_at, c.started_at) AS stuck_for, c.error AS last_error
        FROM public.bcfy_calls_raw AS c
        WHERE c.started_at >= now() - p_lookback
          AND c.processing_stage IN ('downloading', 'downloaded', 'converting')
          AND coalesce(c.last_attempt, c.fetched_at, c.started_at) < now() - p_stuck_after
        UNION ALL
        -- processing_state rows in an in-flight status not updated for p_stuck_after: an index range
        -- scan per status on (status, updated_at); no lookback needed.
        SELECT 'processing_state', s.call_uid, s.id, s.status, s.retry_count, s.max_retries,
               s.updated_at, now() - s.updated_at, s.last_error
        FROM public.processing_state AS s
        WHERE s.status IN ('queued', 'downloaded', 'transcribed')
          AND s.updated_at < now() - p_stuck_after
    ) AS stuck
    ORDER BY stuck.last_activity
    LIMIT p_limit
$$;
COMMENT ON FUNCTION public.get_stuck_processing_items(interval, interval, integer) IS
'Items in an in-flight stage for longer than p_stuck_after (default 1 hour): calls started within p_lookback in downloading/downloaded/converting, processing_state rows queued/downloaded/transcribed. Oldest first, at most p_limit.';

CREATE OR REPLACE VIEW monitoring.pipeline_stats AS
SELECT s.source, s.stage, s.items, s.pct, s.retrying, s.oldest, s.newest
FROM public.get_pipeline_stats(interval '24 hours') AS s;
COMMENT ON VIEW monitoring.pipeline_stats IS
'get_pipeline_stats() over the last 24 hours (health-check endpoint). Other windows: SELECT * FROM get_pipeline_stats(interval ''1 hour'').';

CREATE OR REPLACE VIEW monitoring.processing_pipeline_status AS
WITH calls AS (
    -- Last 7 days of calls (partition pruning / started_at btree).
    SELECT CASE WHEN c.processing_stage = 'pending' AND c.processed THEN 'completed'
                WHEN c.processing_stage = 'pending' AND c.error IS NOT NULL THEN 'failed'
                ELSE coalesce(c.processing_stage, 'pending') END AS stage,
           c.retry_count, NULL::integer AS max_retries,
           coalesce(c.last_attempt, c.fetched_at, c.started_at) AS at
    FROM public.bcfy_calls_raw AS c
    WHERE c.started_at >= now() - interval '7 days'
), states AS (
    -- In-flight statuses in full (index on (status, updated_at)), terminal ones of the last 7 days.
    SELECT s.status AS stage, s.retry_count, s.max_retries, s.updated_at AS at
    FROM public.processing_state AS s
    WHERE s.status IN ('queued', 'downloaded', 'transcribed')
       OR s.updated_at >= now() - interval '7 days'
), unioned AS (
    SELECT 'bcfy_calls_raw'::text AS source, calls.* FROM calls
    UNION ALL
    SELECT 'processing_state', states.* FROM states
)
SELECT
    u.source,
    u.stage,
    count(*) AS items,
    count(*) FILTER (WHERE u.stage IN ('downloading', 'downloaded', 'converting', 'queued', 'transcribed')
                       AND u.at < now() - interval '1 hour') AS stuck_items,
    count(*) FILTER (WHERE u.retry_count > 0) AS retried_items,
    count(*) FILTER (WHERE u.retry_count >= coalesce(u.max_retries, 3)) AS retries_exhausted,
    min(u.at) AS oldest_activity,
    max(u.at) AS newest_activity,
    now() - min(u.at) AS oldest_age
FROM unioned AS u
GROUP BY u.source, u.stage
ORDER BY u.source, u.stage;
COMMENT ON VIEW monitoring.processing_pipeline_status IS
'Per source and stage: items (calls of the last 7 days; processing_state in flight or updated in the last 7 days), stuck (> 1 hour in an in-flight stage; details: get_stuck_processing_items()), retried, retries exhausted (retry_count >= max_retries, 3 for calls).';

CREATE OR REPLACE VIEW monitoring.playlist_sync_health AS
SELECT
    p.uuid,
    p.name,
    p.sync,
    p.last_synced_at,
    now() - p.last_synced_at AS since_last_sync,
    p.sync_error_count,
    p.last_error_message,
    lp.poll_started_at AS last_poll_started_at,
    lp.success AS last_poll_success,
    CASE
        WHEN NOT coalesce(p.sync, false) THEN 'DISABLED'
        WHEN p.sync_error_count >= 5 THEN 'FAILING'
        WHEN p.sync_error_count > 0 THEN 'ERRORS'
        WHEN p.last_synced_at IS NULL THEN 'NEVER_SYNCED'
        WHEN p.last_synced_at < now() - interval '1 hour' THEN 'STALE'
        ELSE 'HEALTHY'
    END AS status
FROM public.bcfy_playlists AS p
LEFT JOIN LATERAL (
    -- Primary key (uuid, poll_started_at): one backward index probe per playlist.
    SELECT l.poll_started_at, l.success
    FROM public.bcfy_playlist_poll_log AS l
    WHERE l.uuid = p.uuid
    ORDER BY l.poll_started_at DESC
    LIMIT 1
) AS lp ON true
ORDER BY p.sync_error_count DESC, p.last_synced_at NULLS FIRST, p.name;
COMMENT ON VIEW monitoring.playlist_sync_health IS
'One row per playlist: last sync, sync_error_count, last error, last poll; status DISABLED (sync off), FAILING (>= 5 errors), ERRORS (> 0), NEVER_SYNCED, STALE (> 1 hour), HEALTHY.';

-- Verification and the guide's expected output (3.1).
DO $$
DECLARE
    missing text[] := '{}';
    v text;
BEGIN
    FOREACH v IN ARRAY ARRAY['pipeline_stats', 'processing_pipeline_status', 'playlist_sync_health'] LOOP
        IF to_regclass('monitoring.' || v) IS NULL THEN
            missing := missing || ('monitoring.' || v);
        ELSE
            EXECUTE format('SELECT 1 FROM monitoring.%I LIMIT 0', v);
            RAISE NOTICE '✓ View monitoring.%', v;
        END IF;
    END LOOP;
    FOREACH v IN ARRAY ARRAY['public.get_pipeline_stats(interval)',
                             'public.get_stuck_processing_items(interval,interval,integer)'] LOOP
        IF to_regprocedure(v) IS NULL THEN
            missing := missing || v;
        ELSE
            RAISE NOTICE '✓ Function %', v;
        END IF;
    END LOOP;
    IF cardinality(missing) > 0 THEN
        RAISE EXCEPTION 'Phase 3 monitoring objects missing: %', array_to_string(missing, ', ');
    END IF;
    SELECT string_agg(format('%s.%s', c.table_name, c.column_name), ', ' ORDER BY c.table_name, c.ordinal_position)
      INTO v
    FROM information_schema.columns AS c
    WHERE c.table_schema = 'public'
      AND (c.table_name, c.column_name) IN (
          ('bcfy_playlists', 'last_synced_at'), ('bcfy_playlists', 'sync_error_count'),
          ('bcfy_playlists', 'last_error_message'), ('bcfy_calls_raw', 'processing_stage'),
          ('bcfy_calls_raw', 'retry_count'), ('processing_state', 'created_at'),
          ('processing_state', 'retry_count'), ('processing_state', 'max_retries'));
    RAISE NOTICE 'New columns: %', v;
    RAISE NOTICE 'New functions: get_pipeline_stats(), get_stuck_processing_items()';
    RAISE NOTICE 'New views: monitoring.pipeline_stats, monitoring.processing_pipeline_status, monitoring.playlist_sync_health';
    RAISE NOTICE 'Phase 3 Schema Improvements Complete! ✓';
END
$$;

-- Phase 3 adds columns to bcfy_calls_raw and its old copy while a Phase 2 conversion may be
-- swapped but not finalized: the sync triggers already copy them (they check the columns per row
-- and fall back to dynamic SQL), this brings back their static, faster path. Runs right after the
-- phase's versioned files.
DO $$
BEGIN
    IF to_regprocedure('dbops.p2_sync_refresh()') IS NOT NULL THEN
        EXECUTE 'SELECT dbops.p2_sync_refresh()';
    END IF;
END
$$;
