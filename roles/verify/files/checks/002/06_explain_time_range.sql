-- Guide 2.4 Post-Migration Verification: time-range query (partition pruning: "Subplans Removed" in the plan).
-- when: any
-- kind: proof
EXPLAIN ANALYZE
SELECT * FROM bcfy_calls_raw
WHERE started_at > NOW() - INTERVAL '7 days'
LIMIT 100;
