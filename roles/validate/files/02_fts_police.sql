-- Guide "Performance Validation", Test 2: full-text search (should be 3-5x faster, < 500 ms).
SELECT id, ts_rank(tsv, query) as rank
FROM transcripts, plainto_tsquery('english', 'police') query
WHERE tsv @@ query
LIMIT 10
