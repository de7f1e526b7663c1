-- Guide Monitoring Queries: overall system health.
-- kind: info (Phase 1's view, a system health look)
SELECT * FROM monitoring.long_running_queries;
