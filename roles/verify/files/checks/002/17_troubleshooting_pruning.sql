-- Guide Troubleshooting, "Query Performance Not Improved" 1: verify partition pruning ("Subplans Removed: X").
-- when: any
-- kind: info (a troubleshooting plan)
EXPLAIN SELECT * FROM bcfy_calls_raw
WHERE started_at > NOW() - INTERVAL '1 day';
