-- Guide Monitoring Queries: overall system health.
-- kind: proof
SELECT * FROM monitoring.long_running_queries;
