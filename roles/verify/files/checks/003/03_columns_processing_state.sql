-- corrected: "\d processing_state" is a psql meta-command; the same facts from information_schema (expected: created_at, retry_count, max_retries).
-- kind: proof
-- Guide 3.2 Verify New Features: check new columns.
SELECT column_name, data_type, is_nullable, column_default
FROM information_schema.columns
WHERE table_schema = 'public' AND table_name = 'processing_state'
  AND column_name IN ('created_at', 'retry_count', 'max_retries')
ORDER BY ordinal_position;
