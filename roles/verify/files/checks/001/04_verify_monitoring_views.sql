-- Guide 1.3 Post-Migration Verification: the monitoring views (expected: 7).
-- kind: proof
SELECT * FROM information_schema.views
WHERE table_schema = 'monitoring'
ORDER BY table_name;
