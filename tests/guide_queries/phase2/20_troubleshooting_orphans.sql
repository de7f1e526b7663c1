-- Guide Troubleshooting, "Foreign Key Violations" 1: transcripts whose call is missing (0 while the reference is enforced; NULL call_uid never counts).
-- when: any
SELECT COUNT(*) FROM transcripts
WHERE call_uid NOT IN (SELECT call_uid FROM bcfy_calls_raw);
