-- Rollback of files/sql/repeatable/002/03_sync.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP FUNCTION IF EXISTS dbops.p2_sync_refresh();
DROP FUNCTION IF EXISTS dbops.p2_sync_functions(text);
DROP FUNCTION IF EXISTS dbops.p2_sync_upsert_sql(text, text);
DROP FUNCTION IF EXISTS dbops.p2_pair(text);
DROP FUNCTION IF EXISTS dbops.p2_colsig(regclass, regclass);
DROP FUNCTION IF EXISTS dbops.p2_shared_cols(regclass, regclass, boolean);
DROP FUNCTION IF EXISTS dbops.p2_collist(text [], text, text, text);
