-- dbops:no-transaction
-- Phase 2 / step 2: the ingester's new ON CONFLICT arbiter, on the table as it is today.
--
-- After the conversion the primary key of bcfy_calls_raw is (call_uid, started_at): a unique key
-- of a partitioned table must contain the partition key, so "ON CONFLICT (call_uid)" would find
-- no arbiter. This unique index gives the same statement form an arbiter BEFORE the conversion:
--     INSERT INTO bcfy_calls_raw (...) VALUES (...) ON CONFLICT (call_uid, started_at) DO NOTHING
-- works before and after the swap, so the application switches at its own pace, before Phase 2.
-- (call_uid alone stays unique: the primary key today, a guard trigger after the swap.)
-- The application must always set started_at: with NULL, the new arbiter never matches and the
-- insert of an existing call fails on the primary key instead of doing nothing.
-- dbops.p2_prepare('bcfy_calls_raw') refuses to start while this index is missing or INVALID.
-- Built without blocking writes (SHARE UPDATE EXCLUSIVE), hence outside a transaction.
-- After the swap the partitioned table's primary key is the arbiter and this index (left on the
-- old table) is dropped with it by dbops.p2_finalize: do not re-run this file after the swap
-- (an index cannot be built this way on a partitioned table); the ledger runs it once.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS bcfy_calls_raw_call_uid_started_at_key
    ON public.bcfy_calls_raw (call_uid, started_at);
