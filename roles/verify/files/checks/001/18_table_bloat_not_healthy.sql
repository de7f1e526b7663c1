-- Guide Monitoring Queries: overall system health.
SELECT * FROM monitoring.table_bloat WHERE status != 'HEALTHY';
