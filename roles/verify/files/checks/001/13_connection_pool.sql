-- Guide Connection Pool Monitoring: check connection usage (monitoring.connections adds pool-pressure columns).
-- kind: info (server activity)
SELECT
  usename,
  application_name,
  state,
  COUNT(*) as connection_count
FROM pg_stat_activity
GROUP BY usename, application_name, state
ORDER BY connection_count DESC;
