-- Guide Monitoring Queries: performance.
-- kind: proof
SELECT * FROM monitoring.index_usage WHERE usage_status = 'UNUSED';
