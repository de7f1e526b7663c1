-- corrected: "\d bcfy_playlists" is a psql meta-command; the same facts from information_schema (expected: last_synced_at, sync_error_count, last_error_message).
-- kind: proof
-- Guide 3.2 Verify New Features: check new columns.
SELECT column_name, data_type, is_nullable, column_default
FROM information_schema.columns
WHERE table_schema = 'public' AND table_name = 'bcfy_playlists'
  AND column_name IN ('last_synced_at', 'sync_error_count', 'last_error_message')
ORDER BY ordinal_position;
