-- corrected: pg_stat_user_tables has no column "tablename" (it is "relname"); also restricted to schema public, which the query's 'public.' || ... assumes.
-- kind: info (table statistics)
-- Guide Performance Validation / Resource Monitoring: check disk usage.
SELECT
  relname AS tablename,
  pg_size_pretty(pg_total_relation_size('public.' || relname)) as total_size,
  pg_size_pretty(pg_relation_size('public.' || relname)) as table_size,
  pg_size_pretty(pg_indexes_size('public.' || relname)) as index_size
FROM pg_stat_user_tables
WHERE schemaname = 'public'
  AND relname IN ('bcfy_calls_raw', 'transcripts', 'api_call_metrics', 'system_logs')
ORDER BY pg_total_relation_size('public.' || relname) DESC;
