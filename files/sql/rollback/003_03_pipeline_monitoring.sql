-- Rollback of Phase 3 / step 3: drop the pipeline monitoring views and functions, in one transaction.
-- No CASCADE: an object someone built on them makes the rollback stop with an error naming it.
-- The monitoring schema stays unless Phase 3 left it empty (Phase 1 owns it; when Phase 1 was
-- skipped, 003_03 created it).
-- squawk-ignore-file ban-drop-view, ban-drop-function -- a rollback: it removes exactly the Phase 3 monitoring objects

DROP VIEW IF EXISTS monitoring.playlist_sync_health;
DROP VIEW IF EXISTS monitoring.processing_pipeline_status;
DROP VIEW IF EXISTS monitoring.pipeline_stats;
DROP FUNCTION IF EXISTS public.get_stuck_processing_items(interval, interval, integer);
DROP FUNCTION IF EXISTS public.get_pipeline_stats(interval);

DO $$
BEGIN
    IF to_regnamespace('monitoring') IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_class WHERE relnamespace = to_regnamespace('monitoring')
        UNION ALL SELECT 1 FROM pg_proc WHERE pronamespace = to_regnamespace('monitoring')
        UNION ALL SELECT 1 FROM pg_type WHERE typnamespace = to_regnamespace('monitoring')) THEN
        DROP SCHEMA monitoring;
        RAISE NOTICE 'monitoring schema removed (it was empty)';
    END IF;
    RAISE NOTICE 'Phase 3 monitoring functions and views removed';
END
$$;
