-- Rollback of files/sql/repeatable/002/10_locks.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function -- a rollback: it removes exactly these engine objects

DROP FUNCTION IF EXISTS dbops.p2_fence(text);
DROP FUNCTION IF EXISTS dbops.p2_lock(text, regclass [], text, text);
DROP FUNCTION IF EXISTS dbops.p2_lock_unblock(jsonb, boolean);
DROP FUNCTION IF EXISTS dbops.p2_lock_text(jsonb);
DROP FUNCTION IF EXISTS dbops.p2_lock_list(jsonb);
DROP FUNCTION IF EXISTS dbops.p2_lock_holders(jsonb);
DROP FUNCTION IF EXISTS dbops.p2_stmt_targets(text);
DROP FUNCTION IF EXISTS dbops.p2_lock_conflicts(text, text);
DROP FUNCTION IF EXISTS dbops.p2_lock_mode(text);
