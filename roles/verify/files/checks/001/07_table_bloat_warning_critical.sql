-- Guide 1.3 Post-Migration Verification, and again in Performance Validation / Resource Monitoring
-- kind: proof
-- ("Check table bloat"): the same query.
SELECT * FROM monitoring.table_bloat WHERE status IN ('WARNING', 'CRITICAL');
