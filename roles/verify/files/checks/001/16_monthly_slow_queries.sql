-- Guide Maintenance Operations, Monthly: analyze query performance.
-- kind: proof
SELECT * FROM monitoring.slow_queries
WHERE mean_time_ms > 1000;
