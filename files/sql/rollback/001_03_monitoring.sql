-- Rollback of Phase 1 / step 3: drop the monitoring views and their helper function, then the
-- monitoring schema if nothing else lives in it. No CASCADE: an object someone built on these
-- views makes the rollback stop with an error that names it, instead of silently disappearing.
-- pg_stat_statements is kept (other tools use it; dropping it would discard its statistics).
-- squawk-ignore-file ban-drop-view, ban-drop-function -- a rollback: it removes exactly the Phase 1 monitoring objects

DROP VIEW IF EXISTS monitoring.slow_queries;
DROP FUNCTION IF EXISTS monitoring.pg_stat_statements_current_db();
DROP VIEW IF EXISTS monitoring.database_size;
DROP VIEW IF EXISTS monitoring.long_running_queries;
DROP VIEW IF EXISTS monitoring.connections;
DROP VIEW IF EXISTS monitoring.table_bloat;
DROP VIEW IF EXISTS monitoring.index_usage;
DROP VIEW IF EXISTS monitoring.table_health;

DO $$
BEGIN
    IF to_regnamespace('monitoring') IS NULL THEN
        RAISE NOTICE 'monitoring schema already absent';
        RETURN;
    END IF;
    DROP SCHEMA monitoring;
    RAISE NOTICE 'monitoring schema removed';
EXCEPTION
    WHEN dependent_objects_still_exist THEN
        RAISE NOTICE 'monitoring schema kept: it holds objects Phase 1 did not create (%)', SQLERRM;
END
$$;
