-- Rollback of files/sql/repeatable/002/06_verify.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP FUNCTION IF EXISTS dbops.p2_verify(text);
DROP FUNCTION IF EXISTS dbops.p2_compare(text, text, text);
DROP FUNCTION IF EXISTS dbops.p2_require_same_columns(text, regclass, regclass);
DROP FUNCTION IF EXISTS dbops.p2_column_diff(regclass, regclass);
