-- Guide 2.4 Post-Migration Verification: verify foreign keys still work.
-- when: any
-- kind: proof
SELECT COUNT(*) FROM transcripts WHERE call_uid IS NOT NULL;
