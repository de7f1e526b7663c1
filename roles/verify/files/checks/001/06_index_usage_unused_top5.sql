-- Guide 1.3 Post-Migration Verification.
-- kind: proof
SELECT * FROM monitoring.index_usage WHERE usage_status = 'UNUSED' LIMIT 5;
