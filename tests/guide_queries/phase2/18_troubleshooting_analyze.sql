-- Guide Troubleshooting, "Query Performance Not Improved" 2: update table statistics (autovacuum never analyzes a partitioned parent).
-- when: any
ANALYZE bcfy_calls_raw;
ANALYZE transcripts;
