-- Guide 2.4 Post-Migration Verification: "verify partitions were created" (valid as written, but it groups by the table name itself, so every row counts 1: 03_partition_count.sql counts the partitions).
-- when: any
-- kind: proof
SELECT
  schemaname,
  tablename,
  count(*) as partition_count
FROM pg_tables
WHERE tablename LIKE 'bcfy_calls_raw_%'
GROUP BY schemaname, tablename;
