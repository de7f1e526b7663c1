-- Guide Monitoring Queries: performance.
-- kind: proof
SELECT * FROM monitoring.slow_queries LIMIT 20;
