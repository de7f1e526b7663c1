-- Guide 3.2 Verify New Features: playlist sync health.
-- kind: proof
SELECT * FROM monitoring.playlist_sync_health;
