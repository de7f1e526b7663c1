-- Guide 3.2 Verify New Features, and 3.3 (health check endpoint): the pipeline view.
SELECT * FROM monitoring.pipeline_stats;
