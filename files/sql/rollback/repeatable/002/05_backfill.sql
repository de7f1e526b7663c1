-- Rollback of files/sql/repeatable/002/05_backfill.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP PROCEDURE IF EXISTS dbops.p2_backfill(text, integer, integer, jsonb, jsonb);
DROP FUNCTION IF EXISTS dbops.p2_backfill_health(text, jsonb, pg_lsn, timestamptz);
DROP FUNCTION IF EXISTS dbops.p2_vacuum_plan(text);
