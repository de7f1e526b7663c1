-- corrected: pg_stat_user_tables has no column "tablename" (it is "relname"); also restricted to schema public, which the query's 'public.' || ... assumes.
-- kind: info (table statistics)
-- Guide 1.4 Performance Analysis: check improvement (sizes and live rows of the four big tables).
SELECT
  relname AS tablename,
  pg_size_pretty(pg_total_relation_size('public.' || relname)) as total_size,
  n_live_tup as rows
FROM pg_stat_user_tables
WHERE schemaname = 'public'
  AND relname IN ('bcfy_calls_raw', 'transcripts', 'api_call_metrics', 'system_logs')
ORDER BY pg_total_relation_size('public.' || relname) DESC;
