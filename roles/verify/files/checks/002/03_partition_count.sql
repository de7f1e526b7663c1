-- corrected: the guide's 2.4 query (02_verify_partitions_created.sql) counts 1 per table name; the partitions of a table are listed in pg_inherits.
-- when: after_swap
-- kind: proof
-- Guide 2.4 Post-Migration Verification: partitions per converted table.
SELECT
  inhparent::regclass AS tablename,
  count(*) AS partition_count
FROM pg_inherits
WHERE inhparent IN ('bcfy_calls_raw'::regclass, 'transcripts'::regclass,
                    'api_call_metrics'::regclass, 'system_logs'::regclass)
GROUP BY inhparent
ORDER BY 1;
