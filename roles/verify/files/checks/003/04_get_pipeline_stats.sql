-- Guide 3.2 Verify New Features: test new functions.
-- kind: proof
SELECT * FROM get_pipeline_stats();
