-- Guide Monitoring Queries: performance.
-- kind: info (Phase 1's view, a performance look)
SELECT * FROM monitoring.index_usage WHERE usage_status = 'UNUSED';
