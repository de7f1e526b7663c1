-- dbops:no-transaction
-- Rollback of Phase 2 / step 2: drop the (call_uid, started_at) unique index of bcfy_calls_raw.
-- The ingester must first be back on "ON CONFLICT (call_uid) DO NOTHING": without this index,
-- "ON CONFLICT (call_uid, started_at)" has no arbiter on the non-partitioned table and fails.
-- Refuses while bcfy_calls_raw is converted or being converted (the index is the arbiter there
-- until the swap, and the old table's after a rollback). Dropped without blocking writes.
DO $$
BEGIN
    IF to_regclass('dbops.p2_state') IS NOT NULL
       AND EXISTS (SELECT 1 FROM dbops.p2_state WHERE table_name = 'bcfy_calls_raw') THEN
        RAISE EXCEPTION 'bcfy_calls_raw is being converted (dbops.p2_state): undo the conversion first';
    END IF;
END
$$;

DROP INDEX CONCURRENTLY IF EXISTS public.bcfy_calls_raw_call_uid_started_at_key;
