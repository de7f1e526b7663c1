-- Rollback of files/sql/repeatable/002/08_daily_jobs.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it). The former function versions are dropped too (a database rolled back before the
-- procedures replaced them).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

-- The pg_cron jobs that call these procedures (roles/schedule, or the guide's own cron.schedule) would
-- fail every night once they are gone: unschedule them. Only where pg_cron is there and usable by this
-- role (it sees and may unschedule its own jobs); PL/pgSQL plans the cron statement only when it runs.
DO $$
DECLARE
    n integer;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron')
       AND EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'cron' AND has_schema_privilege(oid, 'USAGE')) THEN
        SELECT count(cron.unschedule(j.jobid)) INTO n FROM cron.job j
        WHERE j.database = current_database() AND j.command ~* '\m(maintain_partitions|cleanup_old_data)\M';
        RAISE NOTICE 'pg_cron: % job(s) calling maintain_partitions / cleanup_old_data unscheduled', n;
    END IF;
END
$$;

DROP PROCEDURE IF EXISTS public.cleanup_old_data(integer, integer, text, integer, boolean, jsonb);
DROP PROCEDURE IF EXISTS public.maintain_partitions(text, integer, bigint, boolean, jsonb);
DROP FUNCTION IF EXISTS dbops.p2_detached_check(oid, boolean);
DROP FUNCTION IF EXISTS dbops.p2_move_triggers(regclass);
DROP PROCEDURE IF EXISTS dbops.p2_daily_try(text [], text, integer, text, bigint);
DROP FUNCTION IF EXISTS dbops.p2_daily_step(text []);
DROP FUNCTION IF EXISTS public.cleanup_old_data(integer);
DROP FUNCTION IF EXISTS public.maintain_partitions();
