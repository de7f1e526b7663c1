-- corrected: pg_stat_user_tables has no column "tablename" (it is "relname"), and pg_total_relation_size() of a partitioned table is 0: sum it over pg_partition_tree().
-- when: any
-- kind: info (table sizes)
-- Guide 2.6: verify disk space was recovered.
SELECT
  relname AS tablename,
  pg_size_pretty((SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree(('public.' || relname)::regclass))) as total_size
FROM pg_stat_user_tables
WHERE schemaname = 'public'
  AND relname IN ('bcfy_calls_raw', 'transcripts', 'api_call_metrics', 'system_logs')
ORDER BY (SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree(('public.' || relname)::regclass)) DESC;
