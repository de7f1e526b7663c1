-- Guide 1.1 Pre-Migration Checklist: CHECK constraint count before the migration.
-- kind: info (a count before the migration)
SELECT COUNT(*) as constraint_count FROM information_schema.check_constraints WHERE constraint_schema = 'public';
