-- Guide Monitoring Queries: performance.
SELECT * FROM monitoring.index_usage WHERE usage_status = 'UNUSED';
