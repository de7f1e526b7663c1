-- Guide 1.3 Post-Migration Verification: view monitoring schema.
SELECT * FROM monitoring.table_health LIMIT 5;
