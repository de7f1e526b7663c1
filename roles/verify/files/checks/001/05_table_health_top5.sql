-- Guide 1.3 Post-Migration Verification: view monitoring schema.
-- kind: proof
SELECT * FROM monitoring.table_health LIMIT 5;
