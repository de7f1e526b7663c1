-- Rollback of files/sql/repeatable/003/01_pipeline_monitoring.sql: drops the pipeline views and
-- functions. No CASCADE: an object someone built on them makes the rollback stop with an error naming it.
-- squawk-ignore-file ban-drop-view, ban-drop-function -- a rollback: it removes exactly the Phase 3 monitoring objects

DROP VIEW IF EXISTS monitoring.playlist_sync_health;
DROP VIEW IF EXISTS monitoring.processing_pipeline_status;
DROP VIEW IF EXISTS monitoring.pipeline_stats;
DROP FUNCTION IF EXISTS public.get_stuck_processing_items(interval, interval, integer);
DROP FUNCTION IF EXISTS public.get_pipeline_stats(interval);
