-- Guide Monitoring Queries: performance.
-- kind: info (Phase 1's view over pg_stat_statements)
SELECT * FROM monitoring.slow_queries LIMIT 20;
