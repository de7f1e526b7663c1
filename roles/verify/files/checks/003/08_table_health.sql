-- Guide Monitoring Queries: overall system health.
-- kind: info (Phase 1's view, a system health look)
SELECT * FROM monitoring.table_health;
