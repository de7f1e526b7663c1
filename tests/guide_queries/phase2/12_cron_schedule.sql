-- Guide 2.7 Set Up Automated Partition Maintenance (needs pg_cron in shared_preload_libraries, run in the database named by cron.database_name; the extension itself is created by rds_superuser).
-- when: cron
-- Corrected: CALL instead of the guide's SELECT (the daily jobs are procedures that commit between short steps, see docs/PHASE2_DESIGN.md).
CREATE EXTENSION IF NOT EXISTS pg_cron;

SELECT cron.schedule('maintain-partitions', '0 0 * * *',
  'CALL maintain_partitions();'
);

SELECT cron.schedule('cleanup-old-data', '0 2 * * *',
  'CALL cleanup_old_data();'
);

SELECT * FROM cron.job WHERE jobname IN ('maintain-partitions', 'cleanup-old-data');
