-- corrected: bcfy_calls_raw has no column "tablename"; the partition a row lives in is tableoid::regclass.
-- when: any
-- kind: proof
-- Guide 2.4 Post-Migration Verification: check partition distribution.
SELECT
  tableoid::regclass AS tablename,
  COUNT(*) as rows
FROM bcfy_calls_raw
GROUP BY tableoid
ORDER BY tableoid::regclass::text;
