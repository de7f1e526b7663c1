-- Guide Maintenance Operations, Weekly: vacuum bloated tables (VACUUM cannot run in a transaction block: run in autocommit).
VACUUM ANALYZE bcfy_calls_raw;
VACUUM ANALYZE api_call_metrics;
