-- dbops:no-transaction
-- Rollback of Phase 3 / step 1: KEEPS the columns by default.
--
-- The application may already write last_synced_at, sync_error_count, processing_stage, retry_count
-- ... (guide 3.3): dropping them would break it. So by default this file only reports which
-- columns stay, and keeps dbops.p3_added_columns (what Phase 3 added) so that a later run can
-- still drop exactly those. Re-applying Phase 3 afterwards finds the columns and leaves them.
--
-- To drop them, the session must set dbops.rollback_phase3_drop_columns = on; rollback_phase3.yml
-- does that with -e rollback_phase3_drop_columns=true (libpq PGOPTIONS), by hand:
--   PGOPTIONS='-c dbops.rollback_phase3_drop_columns=on' psql -f files/sql/rollback/003_01_columns.sql
-- Then only the columns listed in dbops.p3_added_columns are dropped (columns that existed before
-- Phase 3 stay), with any constraint on them. DROP COLUMN is catalog-only (no rewrite, no scan) and
-- takes a short ACCESS EXCLUSIVE lock per table, bounded by lock_timeout. Idempotent.
-- squawk-ignore-file ban-drop-column -- opt-in only, and only the columns Phase 3 itself added

DO $$
DECLARE
    drop_columns CONSTANT boolean :=
        lower(coalesce(current_setting('dbops.rollback_phase3_drop_columns', true), '')) IN ('on', 'true', '1', 'yes');
    r record;
    kept text;
BEGIN
    IF to_regclass('dbops.p3_added_columns') IS NULL THEN
        RAISE NOTICE 'Phase 3 columns: nothing recorded (dbops.p3_added_columns is missing)';
        RETURN;
    END IF;
    IF NOT drop_columns THEN
        SELECT string_agg(a.table_name || '.' || a.column_name, ', ' ORDER BY a.table_name, a.column_name) INTO kept
        FROM dbops.p3_added_columns AS a;
        RAISE NOTICE 'Phase 3 columns kept (the application may write them): %', coalesce(kept, 'none');
        RETURN;
    END IF;
    -- A Phase 2 conversion prepared after Phase 3 copies these columns in its generated sync
    -- functions (fixed column lists): dropping them would break every write until finalize.
    IF to_regclass('dbops.p2_state') IS NOT NULL THEN
        SELECT string_agg(format('%s (%s)', s.table_name, s.step), ', ') INTO kept
        FROM dbops.p2_state AS s
        WHERE s.step <> 'finalized'
          AND EXISTS (SELECT 1 FROM dbops.p3_added_columns AS a
                      WHERE a.table_name IN (s.table_name, s.twin_name, s.shadow_name)
                        AND (a.column_name = ANY(s.all_cols) OR a.column_name = ANY(s.ins_cols)));
        IF kept IS NOT NULL THEN
            RAISE EXCEPTION 'Phase 3 columns not dropped: Phase 2 conversion(s) not finalized copy them: %', kept
                USING HINT = 'Finalize Phase 2 (playbooks/finalize_phase2.yml) first, or roll back without rollback_phase3_drop_columns.';
        END IF;
    END IF;
    FOR r IN
        SELECT a.table_name, array_agg(a.column_name ORDER BY a.column_name) AS cols
        FROM dbops.p3_added_columns AS a
        WHERE to_regclass('public.' || quote_ident(a.table_name)) IS NOT NULL
        GROUP BY a.table_name
        ORDER BY a.table_name
    LOOP
        EXECUTE format('ALTER TABLE public.%I %s', r.table_name,
                       (SELECT string_agg(format('DROP COLUMN IF EXISTS %I', c), ', ') FROM unnest(r.cols) AS c));
        RAISE NOTICE 'Dropped columns of %: %', r.table_name, array_to_string(r.cols, ', ');
    END LOOP;
    DROP TABLE dbops.p3_added_columns;
END
$$;
