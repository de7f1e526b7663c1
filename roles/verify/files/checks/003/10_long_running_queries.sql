-- Guide Monitoring Queries: overall system health.
SELECT * FROM monitoring.long_running_queries;
