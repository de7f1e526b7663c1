-- Guide "Performance Validation", Test 1: time-range query (should be 10-100x faster, < 100 ms).
SELECT COUNT(*) FROM bcfy_calls_raw
WHERE started_at > NOW() - INTERVAL '7 days'
