-- Guide 3.2 Verify New Features: test new functions.
SELECT * FROM get_pipeline_stats();
