-- Guide Performance Validation, Test 2: full-text search (served by transcripts_tsv_gin_idx from Phase 1).
-- kind: info (a performance look at application data)
SELECT id, ts_rank(tsv, query) as rank
FROM transcripts, plainto_tsquery('english', 'police') query
WHERE tsv @@ query
LIMIT 10;
