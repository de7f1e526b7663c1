-- Stuck pipeline items with Phase 3 (read-only; roles/maintenance, tasks/health.yml): whatever
-- public.get_stuck_processing_items() returns (its own age threshold), counted and sampled.
WITH stuck AS (
    SELECT to_jsonb(g) AS item FROM public.get_stuck_processing_items() AS g
)

SELECT jsonb_build_array(jsonb_build_object(
    'check', 'stuck_pipeline_items',
    'severity', CASE WHEN count(*) >= %(stuck_critical_count)s THEN 'critical'
                     WHEN count(*) >= %(stuck_warning_count)s THEN 'warning' ELSE 'ok' END,
    'summary', CASE WHEN count(*) = 0 THEN 'get_stuck_processing_items() returns no item'
                    ELSE 'get_stuck_processing_items() returns ' || count(*) || ' stuck item(s)' END,
    'rows', coalesce((SELECT jsonb_agg(x.item) FROM (SELECT item FROM stuck LIMIT %(max_rows)s) AS x), '[]')
)) AS findings
FROM stuck;
