-- corrected: pg_stat_user_tables has no column "tablename" (it is "relname"); also restricted to schema public, which the query's 'public.' || ... assumes.
-- when: any
-- kind: info (table statistics before the migration)
-- Guide 2.1 Pre-Migration Checks: table sizes before migration.
SELECT
  relname AS tablename,
  pg_size_pretty(pg_total_relation_size('public.' || relname)) as total_size,
  n_live_tup as row_count
FROM pg_stat_user_tables
WHERE schemaname = 'public'
  AND relname IN ('bcfy_calls_raw', 'transcripts', 'api_call_metrics', 'system_logs')
ORDER BY pg_total_relation_size('public.' || relname) DESC;
