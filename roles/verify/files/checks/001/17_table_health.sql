-- Guide Monitoring Queries: overall system health.
-- kind: proof
SELECT * FROM monitoring.table_health;
