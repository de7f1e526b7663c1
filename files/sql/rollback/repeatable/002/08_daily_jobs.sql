-- Rollback of files/sql/repeatable/002/08_daily_jobs.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP FUNCTION IF EXISTS public.cleanup_old_data(integer);
DROP FUNCTION IF EXISTS public.maintain_partitions();
