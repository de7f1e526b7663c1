-- Guide Monitoring Queries: pipeline status.
-- kind: proof
SELECT * FROM monitoring.processing_pipeline_status;
