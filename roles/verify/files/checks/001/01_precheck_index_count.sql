-- Guide 1.1 Pre-Migration Checklist: index count before the migration.
-- kind: info (a count before the migration)
SELECT COUNT(*) as index_count FROM pg_indexes WHERE schemaname = 'public';
