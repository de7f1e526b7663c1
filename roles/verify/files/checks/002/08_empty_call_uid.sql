-- Guide 2.5 Data Verification: check for data integrity (should return 0).
-- when: any
-- kind: proof
SELECT COUNT(*) FROM bcfy_calls_raw WHERE call_uid IS NULL OR call_uid = '';
