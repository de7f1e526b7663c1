-- Rollback of Phase 2 / step 1: remove the engine's state and configuration tables, in one
-- transaction. Runs after rollback/002_preconditions.sql (refuses while a table is converted) and
-- after the engine's code was dropped (rollback/repeatable/002/).
-- Schema dbops stays (the migration ledger lives there); schema monitoring is removed only if
-- this left it empty (Phase 1 not installed). The pg_cron jobs calling the daily
-- procedures were unscheduled by rollback/repeatable/002/08_daily_jobs.sql.
-- squawk-ignore-file ban-drop-table -- a rollback: it removes exactly the Phase 2 engine tables

DROP TABLE IF EXISTS dbops.p2_events;
DROP TABLE IF EXISTS dbops.p2_refs;
DROP TABLE IF EXISTS dbops.p2_objects;
DROP TABLE IF EXISTS dbops.p2_state;
DROP TABLE IF EXISTS dbops.p2_config;
DROP TABLE IF EXISTS public.app_retention_policies;

DO $$
BEGIN
    IF to_regnamespace('monitoring') IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_class WHERE relnamespace = to_regnamespace('monitoring')
        UNION ALL SELECT 1 FROM pg_proc WHERE pronamespace = to_regnamespace('monitoring')
        UNION ALL SELECT 1 FROM pg_type WHERE typnamespace = to_regnamespace('monitoring')) THEN
        DROP SCHEMA monitoring;
        RAISE NOTICE 'monitoring schema removed (it was empty)';
    END IF;
END
$$;
