-- Runs before anything of Phase 2 is rolled back (scanner.dbops.migrate, state=rolled_back):
-- refuses while any table is converted or being converted, because a converted table's reference
-- and unique-key triggers run engine functions. Undo each table first:
--     SELECT dbops.p2_rollback('<table>');  SELECT dbops.p2_validate_refs();  SELECT dbops.p2_abort('<table>');
-- (a finalized table cannot be undone: its old copy is gone; restore from the pre-Phase-2 backup).

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
