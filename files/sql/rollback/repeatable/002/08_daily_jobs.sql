-- Rollback of files/sql/repeatable/002/08_daily_jobs.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it). The former function versions are dropped too (a database rolled back before the
-- procedures replaced them).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP PROCEDURE IF EXISTS public.cleanup_old_data(integer, integer, text, integer, boolean, jsonb);
DROP PROCEDURE IF EXISTS public.maintain_partitions(text, integer, bigint, boolean, jsonb);
DROP PROCEDURE IF EXISTS dbops.p2_daily_try(text [], text, integer, text, bigint);
DROP FUNCTION IF EXISTS dbops.p2_daily_step(text []);
DROP FUNCTION IF EXISTS public.cleanup_old_data(integer);
DROP FUNCTION IF EXISTS public.maintain_partitions();
