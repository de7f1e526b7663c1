-- Guide Monitoring Queries: pipeline status.
-- kind: proof
SELECT * FROM monitoring.playlist_sync_health WHERE sync_error_count > 0;
