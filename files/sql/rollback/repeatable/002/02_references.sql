-- Rollback of files/sql/repeatable/002/02_references.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP FUNCTION IF EXISTS dbops.p2_validate_refs();
DROP FUNCTION IF EXISTS dbops.p2_child_tables(text);
DROP FUNCTION IF EXISTS dbops.p2_copy_grants(regclass, regclass);
DROP FUNCTION IF EXISTS dbops.p2_apply_refs();
DROP FUNCTION IF EXISTS dbops.p2_capture_refs(text);
DROP FUNCTION IF EXISTS dbops.p2_guard_unique();
DROP FUNCTION IF EXISTS dbops.p2_ref_action();
DROP FUNCTION IF EXISTS dbops.p2_ref_check();
DROP FUNCTION IF EXISTS dbops.p2_touch_prune(integer);
DROP FUNCTION IF EXISTS dbops.p2_ref_move();
DROP FUNCTION IF EXISTS dbops.p2_block_truncate();
DROP FUNCTION IF EXISTS dbops.p2_protect_partition(regclass);
DROP FUNCTION IF EXISTS dbops.p2_truncate_guards(text);
DROP FUNCTION IF EXISTS dbops.p2_refuse_trigger(text, oid, text []);
DROP FUNCTION IF EXISTS dbops.p2_ref_args_ok(oid, text, text []);
DROP FUNCTION IF EXISTS dbops.p2_root(oid);
DROP FUNCTION IF EXISTS dbops.p2_touch(text, text);
