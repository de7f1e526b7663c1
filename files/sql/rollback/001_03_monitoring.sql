-- Rollback of Phase 1 / step 3: the monitoring schema, if nothing else lives in it (the views were
-- dropped before, by rollback/repeatable/001/). pg_stat_statements is kept (other tools use it;
-- dropping it would discard its statistics).

DO $$
BEGIN
    IF to_regnamespace('monitoring') IS NULL THEN
        RAISE NOTICE 'monitoring schema already absent';
        RETURN;
    END IF;
    DROP SCHEMA monitoring;
    RAISE NOTICE 'monitoring schema removed';
EXCEPTION
    WHEN dependent_objects_still_exist THEN
        RAISE NOTICE 'monitoring schema kept: it holds objects Phase 1 did not create (%)', SQLERRM;
END
$$;
