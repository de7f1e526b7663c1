-- Guide Performance Validation, Test 3: dashboard aggregation over the last 24 hours.
-- when: any
-- kind: info (a performance look at application data)
SELECT
  COUNT(*) as calls_24h,
  COUNT(DISTINCT feed_id) as active_feeds,
  AVG(duration_ms::NUMERIC) / 1000 as avg_duration_sec
FROM bcfy_calls_raw
WHERE started_at > NOW() - INTERVAL '24 hours';
