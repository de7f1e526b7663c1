-- Guide Maintenance Operations, Monthly: analyze query performance.
SELECT * FROM monitoring.slow_queries
WHERE mean_time_ms > 1000;
