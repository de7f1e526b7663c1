-- Guide 3.2 Verify New Features, and 3.3 (health check endpoint): the pipeline view.
-- kind: proof
SELECT * FROM monitoring.pipeline_stats;
