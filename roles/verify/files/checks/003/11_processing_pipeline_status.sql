-- Guide Monitoring Queries: pipeline status.
SELECT * FROM monitoring.processing_pipeline_status;
