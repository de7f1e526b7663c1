-- Rollback of files/sql/repeatable/002/04_prepare.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP FUNCTION IF EXISTS dbops.p2_prepare(text);
DROP FUNCTION IF EXISTS dbops.p2_match_props(text, regclass, regclass);
