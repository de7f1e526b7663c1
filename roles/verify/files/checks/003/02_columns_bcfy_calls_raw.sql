-- corrected: "\d bcfy_calls_raw" is a psql meta-command; the same facts from information_schema (expected: processing_stage, retry_count).
-- kind: proof
-- Guide 3.2 Verify New Features: check new columns.
SELECT column_name, data_type, is_nullable, column_default
FROM information_schema.columns
WHERE table_schema = 'public' AND table_name = 'bcfy_calls_raw'
  AND column_name IN ('processing_stage', 'retry_count')
ORDER BY ordinal_position;
