-- Rollback of Phase 3 / step 3 (after rollback/repeatable/003/ dropped the views and functions).
-- The monitoring schema stays unless Phase 3 left it empty (Phase 1 owns it; when Phase 1 was
-- skipped, 003_03 created it).

DO $$
BEGIN
    IF to_regnamespace('monitoring') IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_class WHERE relnamespace = to_regnamespace('monitoring')
        UNION ALL SELECT 1 FROM pg_proc WHERE pronamespace = to_regnamespace('monitoring')
        UNION ALL SELECT 1 FROM pg_type WHERE typnamespace = to_regnamespace('monitoring')) THEN
        DROP SCHEMA monitoring;
        RAISE NOTICE 'monitoring schema removed (it was empty)';
    END IF;
    RAISE NOTICE 'Phase 3 monitoring functions and views removed';
END
$$;
