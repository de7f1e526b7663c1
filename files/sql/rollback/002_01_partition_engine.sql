-- Rollback of Phase 2 / step 1: remove the partitioning engine (functions, state, config, the
-- daily-job functions and monitoring.partition_health), in one transaction.
-- Refuses while any table is converted or being converted: a converted table's reference and
-- unique-key triggers run engine functions. Undo each table first:
--     SELECT dbops.p2_rollback('<table>');  SELECT dbops.p2_validate_refs();  SELECT dbops.p2_abort('<table>');
-- (a finalized table cannot be undone: its old copy is gone; restore from the pre-Phase-2 backup).
-- Schema dbops stays (the migration ledger lives there); schema monitoring is removed only if
-- this left it empty (Phase 1 not installed). pg_cron jobs are unscheduled by the playbook.
-- squawk-ignore-file ban-drop-table, ban-drop-view, ban-drop-function -- a rollback: it removes exactly the Phase 2 engine objects

DO $$
DECLARE
    busy text;
BEGIN
    IF to_regclass('dbops.p2_state') IS NOT NULL THEN
        SELECT string_agg(format('%s (%s)', table_name, step), ', ') INTO busy FROM dbops.p2_state;
        IF busy IS NOT NULL THEN
            RAISE EXCEPTION 'Phase 2 rollback refused: converted or converting tables: %', busy
                USING HINT = 'Per table: dbops.p2_rollback(t), dbops.p2_validate_refs(), dbops.p2_abort(t).';
        END IF;
    END IF;
    SELECT string_agg(format('%s on %s', t.tgname, t.tgrelid::regclass), ', ') INTO busy
    FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
    WHERE p.pronamespace = to_regnamespace('dbops') AND p.proname LIKE 'p2\_%' AND t.tgparentid = 0;
    IF busy IS NOT NULL THEN
        RAISE EXCEPTION 'Phase 2 rollback refused: triggers still use engine functions: %', busy;
    END IF;
END
$$;

DROP VIEW IF EXISTS monitoring.partition_health;
DROP FUNCTION IF EXISTS public.cleanup_old_data(integer);
DROP FUNCTION IF EXISTS public.maintain_partitions();
DROP FUNCTION IF EXISTS dbops.p2_status();
DROP FUNCTION IF EXISTS dbops.p2_abort(text);
DROP FUNCTION IF EXISTS dbops.p2_finalize(text);
DROP FUNCTION IF EXISTS dbops.p2_rollback(text, boolean);
DROP FUNCTION IF EXISTS dbops.p2_swap(text, boolean);
DROP FUNCTION IF EXISTS dbops.p2_repoint_views(jsonb);
DROP FUNCTION IF EXISTS dbops.p2_dependent_views(regclass);
DROP FUNCTION IF EXISTS dbops.p2_verify(text);
DROP PROCEDURE IF EXISTS dbops.p2_backfill(text, integer, integer, jsonb);
DROP FUNCTION IF EXISTS dbops.p2_prepare(text);
DROP FUNCTION IF EXISTS dbops.p2_compare(text, text, text);
DROP FUNCTION IF EXISTS dbops.p2_validate_refs();
DROP FUNCTION IF EXISTS dbops.p2_child_tables(text);
DROP FUNCTION IF EXISTS dbops.p2_copy_grants(regclass, regclass);
DROP FUNCTION IF EXISTS dbops.p2_apply_refs();
DROP FUNCTION IF EXISTS dbops.p2_capture_refs(text);
DROP FUNCTION IF EXISTS dbops.p2_guard_unique();
DROP FUNCTION IF EXISTS dbops.p2_ref_action();
DROP FUNCTION IF EXISTS dbops.p2_ref_check();
DROP FUNCTION IF EXISTS dbops.p2_block_truncate();
DROP FUNCTION IF EXISTS dbops.p2_default_lock_timeout(text);
DROP FUNCTION IF EXISTS dbops.p2_log(text, text, jsonb);
DROP FUNCTION IF EXISTS dbops.p2_close_paren(text, integer);
DROP FUNCTION IF EXISTS dbops.p2_collist(text [], text, text, text);
DROP FUNCTION IF EXISTS dbops.p2_has_rows(regclass);
DROP FUNCTION IF EXISTS dbops.p2_part_bounds(regclass);
DROP FUNCTION IF EXISTS dbops.p2_part_name(text, text, timestamptz);
DROP FUNCTION IF EXISTS dbops.p2_next(text, timestamptz, integer);
DROP FUNCTION IF EXISTS dbops.p2_bucket(text, timestamptz);
DROP FUNCTION IF EXISTS dbops.p2_lit(timestamptz);
DROP FUNCTION IF EXISTS dbops.p2_name(text, text);
DROP TABLE IF EXISTS dbops.p2_events;
DROP TABLE IF EXISTS dbops.p2_refs;
DROP TABLE IF EXISTS dbops.p2_objects;
DROP TABLE IF EXISTS dbops.p2_state;
DROP TABLE IF EXISTS dbops.p2_config;
DROP TABLE IF EXISTS public.app_retention_policies;

DO $$
BEGIN
    IF to_regnamespace('monitoring') IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_class WHERE relnamespace = to_regnamespace('monitoring')
        UNION ALL SELECT 1 FROM pg_proc WHERE pronamespace = to_regnamespace('monitoring')
        UNION ALL SELECT 1 FROM pg_type WHERE typnamespace = to_regnamespace('monitoring')) THEN
        DROP SCHEMA monitoring;
        RAISE NOTICE 'monitoring schema removed (it was empty)';
    END IF;
END
$$;
