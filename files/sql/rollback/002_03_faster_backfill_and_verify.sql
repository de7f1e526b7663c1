-- Rollback of Phase 2 / step 3: nothing to undo on its own. dbops.p2_backfill and dbops.p2_compare
-- keep their faster bodies (same signatures, same results) until the rollback of 002_01 removes
-- the whole engine.
SELECT 1;
