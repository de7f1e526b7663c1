-- Guide Monitoring Queries: performance.
SELECT * FROM monitoring.slow_queries LIMIT 20;
