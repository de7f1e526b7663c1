-- Guide Performance Validation, Test 1: time-range count (pruned to the last partitions).
-- when: any
-- kind: info (a performance look at application data)
\timing
SELECT COUNT(*) FROM bcfy_calls_raw
WHERE started_at > NOW() - INTERVAL '7 days';
