-- Guide 1.4 Performance Analysis: run ANALYZE to update statistics.
ANALYZE bcfy_calls_raw;
ANALYZE transcripts;
ANALYZE api_call_metrics;
ANALYZE system_logs;
