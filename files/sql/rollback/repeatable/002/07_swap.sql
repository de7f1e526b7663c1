-- Rollback of files/sql/repeatable/002/07_swap.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP FUNCTION IF EXISTS dbops.p2_status();
DROP FUNCTION IF EXISTS dbops.p2_abort(text);
DROP FUNCTION IF EXISTS dbops.p2_rollback_check(text);
DROP FUNCTION IF EXISTS dbops.p2_finalize(text);
DROP FUNCTION IF EXISTS dbops.p2_rollback(text, boolean);
DROP FUNCTION IF EXISTS dbops.p2_swap(text, boolean);
DROP FUNCTION IF EXISTS dbops.p2_repoint_views(jsonb);
DROP FUNCTION IF EXISTS dbops.p2_dependent_views(regclass);
DROP FUNCTION IF EXISTS dbops.p2_trigger_state(text);
