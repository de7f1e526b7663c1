-- Stuck pipeline items without Phase 3 (read-only; roles/maintenance, tasks/health.yml): calls that
-- the audio worker has not processed (processed = false) for longer than the threshold.
-- Bounded: at most count_cap rows are counted.
WITH stuck AS (
    SELECT c.call_uid, c.feed_id, c.started_at, c.fetched_at, c.last_attempt, left(c.error, 120) AS error
    FROM public.bcfy_calls_raw AS c
    WHERE c.processed = false
      AND coalesce(c.fetched_at, c.started_at) < now() - make_interval(mins => %(stuck_age_minutes)s)
    LIMIT %(count_cap)s
)

SELECT jsonb_build_array(jsonb_build_object(
    'check', 'stuck_pipeline_items',
    'severity', CASE WHEN count(*) >= %(stuck_critical_count)s THEN 'critical'
                     WHEN count(*) >= %(stuck_warning_count)s THEN 'warning' ELSE 'ok' END,
    'summary', 'get_stuck_processing_items() not installed (Phase 3); fallback: '
               || CASE WHEN count(*) = 0
                   THEN 'no call waiting for the audio worker (processed = false) longer than '
                        || %(stuck_age_minutes)s || ' min'
                   ELSE count(*) || CASE WHEN count(*) >= %(count_cap)s THEN '+' ELSE '' END
                        || ' call(s) unprocessed for longer than ' || %(stuck_age_minutes)s || ' min, oldest fetched '
                        || min(s.fetched_at)::text || ': is the audio worker running?'
               END,
    'rows', coalesce((SELECT jsonb_agg(to_jsonb(x)) FROM (SELECT * FROM stuck ORDER BY fetched_at LIMIT %(max_rows)s) AS x),
                     '[]'))) AS findings
FROM stuck AS s;
