-- Rollback of files/sql/repeatable/002/01_helpers.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP FUNCTION IF EXISTS dbops.p2_adopt_partition(regclass, regclass, regclass);
DROP FUNCTION IF EXISTS dbops.p2_default_lock_timeout(text);
DROP FUNCTION IF EXISTS dbops.p2_log(text, text, jsonb);
DROP FUNCTION IF EXISTS dbops.p2_close_paren(text, integer);
DROP FUNCTION IF EXISTS dbops.p2_has_rows(regclass);
DROP FUNCTION IF EXISTS dbops.p2_part_bounds(regclass);
DROP FUNCTION IF EXISTS dbops.p2_part_name(text, text, timestamptz);
DROP FUNCTION IF EXISTS dbops.p2_next(text, timestamptz, integer);
DROP FUNCTION IF EXISTS dbops.p2_bucket(text, timestamptz);
DROP FUNCTION IF EXISTS dbops.p2_lit(timestamptz);
DROP FUNCTION IF EXISTS dbops.p2_name(text, text);
DROP FUNCTION IF EXISTS dbops.p2_capabilities(integer);
