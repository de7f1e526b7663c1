-- Phase 2 engine: who may run the engine's functions (issue 18 item 11). Last of the phase's
-- repeatable files, so it covers every function the files before it create.
--
-- The engine's trigger functions are SECURITY DEFINER (they act with the owner's rights, like
-- PostgreSQL's own RI triggers) and its steps change the application's tables: no role but the
-- owner (and the roles that are members of it: the migration runs as one) may execute them. Until
-- now PUBLIC could, and a role with USAGE on dbops attached dbops.p2_ref_action to a table of its
-- own naming another table as the "child", and deleted that table's rows as the owner. Firing a
-- trigger needs no EXECUTE privilege (it is checked when the trigger is created), so the
-- application's writes are not affected. Functions created later by the owner in dbops get the
-- same default (ALTER DEFAULT PRIVILEGES); the generated sync functions revoke it themselves
-- (dbops.p2_sync_functions), whoever creates them. The two read-only helpers that
-- monitoring.partition_health calls stay executable by everyone who may read that view.

REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA dbops FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA dbops REVOKE EXECUTE ON ROUTINES FROM PUBLIC;
GRANT EXECUTE ON FUNCTION dbops.p2_has_rows(regclass), dbops.p2_part_bounds(regclass) TO PUBLIC;
