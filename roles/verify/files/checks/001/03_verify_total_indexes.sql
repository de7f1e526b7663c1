-- Guide 1.3 Post-Migration Verification: verify all indexes were created.
-- kind: proof
SELECT COUNT(*) as total_indexes
FROM pg_indexes
WHERE schemaname = 'public';
