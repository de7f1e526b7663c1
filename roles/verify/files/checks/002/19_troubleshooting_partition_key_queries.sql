-- Guide Troubleshooting, "Query Performance Not Improved" 3: a query on the partition key (pruned) and one without it (scans every partition).
-- when: any
-- kind: info (a troubleshooting look at application data)
SELECT * FROM bcfy_calls_raw WHERE started_at > NOW() - INTERVAL '7 days';

SELECT * FROM bcfy_calls_raw WHERE feed_id = 12345;
