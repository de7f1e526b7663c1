-- Phase 2 engine, step 2: the backfill. Each batch first tries a plain INSERT ... SELECT in a
-- subtransaction (ON CONFLICT's speculative insertion cost ~40 % of the copy on narrow tables);
-- a row the capture trigger already wrote (unique_violation) undoes that batch and the rest of
-- the call uses INSERT ... ON CONFLICT DO NOTHING. NULL partition keys are counted once at the
-- end from the source (index on the key column), not per batch.

-- ---------------------------------------------------------------------------------------------
-- Step 2: backfill (procedure: one COMMIT per batch)
-- ---------------------------------------------------------------------------------------------
-- CALL dbops.p2_backfill('bcfy_calls_raw', 5000, 60);   -- from an autocommit session
-- Keyset pagination on the primary key. Each batch: take the table's advisory lock exclusively
-- (try-lock, never queued: writers are not made to wait behind a waiting batch), copy
-- (pk > last AND pk <= next) with the partition key derived as in the sync trigger,
-- ON CONFLICT DO NOTHING (a row the trigger already wrote is newer), record progress, COMMIT.
-- UPDATE / DELETE on the source wait for the running batch (one batch, milliseconds), so a batch
-- can neither resurrect a row deleted meanwhile nor overwrite a newer version.
-- Returns after max_seconds (at least one batch); killed at any point, it resumes from last_key.
CREATE OR REPLACE PROCEDURE dbops.p2_backfill(
    tbl text, batch_rows integer DEFAULT 5000, max_seconds integer DEFAULT 60, INOUT result jsonb DEFAULT NULL
)
LANGUAGE plpgsql
AS $fn$
DECLARE
    st dbops.p2_state;
    t0 timestamptz := clock_timestamp();
    tb timestamptz;
    nxt text;
    n_src bigint;
    n_null bigint := 0;
    n_ins bigint;
    waits integer := 0;
    nb integer := 0;
    rows_now bigint := 0;
    lockkey integer := hashtext(format('public.%I', tbl));
    keyq text;
    sel text;
    rng text;
    n_keys bigint;
    fast boolean := true;
    fallbacks integer := 0;
    finished boolean := false;
BEGIN
    -- A procedure that COMMITs cannot have a SET clause: turn JIT off for this (the engine's own)
    -- session. Batches read one table and write a partitioned one; compiling them costs more than
    -- it saves.
    PERFORM set_config('jit', 'off', false);
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'p2_backfill: needs READ COMMITTED (each batch takes a fresh snapshot after its lock)';
    END IF;
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF NOT FOUND OR st.step IN ('shadow_created') THEN
        RAISE EXCEPTION 'p2_backfill: % is not prepared (run dbops.p2_prepare first)', tbl;
    END IF;
    IF st.step NOT IN ('prepared', 'backfilling') THEN
        result := jsonb_build_object('status', 'done', 'changed', false, 'table', tbl, 'step', st.step, 'rows_done', st.rows_done,
                                     'null_key_rows', st.null_key_rows);
        RETURN;
    END IF;
    IF st.step = 'prepared' THEN
        UPDATE dbops.p2_state SET step = 'backfilling', backfill_started_at = now(), updated_at = now()
        WHERE table_name = tbl;
        COMMIT;
    END IF;
    LOOP
        EXIT WHEN nb + waits > 0 AND clock_timestamp() - t0 >= make_interval(secs => max_seconds);
        IF NOT pg_try_advisory_xact_lock(80620, lockkey) THEN
            waits := waits + 1;
            PERFORM pg_sleep(0.02);
            CONTINUE;
        END IF;
        tb := clock_timestamp();
        SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
        keyq := format('SELECT max(k)::text, count(*) FROM (SELECT %1$I AS k FROM public.%2$I %3$s ORDER BY %1$I LIMIT %4$s) s',
                       st.pk_col, tbl,
                       CASE WHEN st.last_key IS NULL THEN '' ELSE format('WHERE %I > $1::%s', st.pk_col, st.pk_type) END,
                       batch_rows);
        EXECUTE keyq INTO nxt, n_keys USING st.last_key;
        IF nxt IS NULL THEN
            UPDATE dbops.p2_state SET step = 'backfilled', backfill_done_at = now(), updated_at = now(),
                   lock_waits = lock_waits + waits, rows_total = rows_done
            WHERE table_name = tbl;
            finished := true;
            COMMIT;
            EXIT;
        END IF;
        sel := (SELECT string_agg(CASE WHEN c = st.key_col THEN format('(%s) AS %I', st.key_expr, c) ELSE quote_ident(c) END,
                                  ', ' ORDER BY o) FROM unnest(st.ins_cols) WITH ORDINALITY u (c, o));
        rng := format('%s %I <= $2::%s',
                      CASE WHEN st.last_key IS NULL THEN '' ELSE format('%I > $1::%s AND', st.pk_col, st.pk_type) END,
                      st.pk_col, st.pk_type);
        n_ins := NULL;
        IF fast THEN
            -- Fast path: a plain INSERT ... SELECT (no speculative insertion). A row the capture
            -- trigger already wrote makes it fail with unique_violation: the subtransaction is
            -- undone and this call continues on the ON CONFLICT path.
            BEGIN
                EXECUTE format('WITH ins AS (INSERT INTO public.%I (%s) SELECT %s FROM public.%I WHERE %s RETURNING 1) '
                               'SELECT count(*) FROM ins', st.shadow_name, dbops.p2_collist(st.ins_cols), sel, tbl, rng)
                    INTO n_ins USING st.last_key, nxt;
                n_src := n_ins;
            EXCEPTION WHEN unique_violation THEN
                fast := false;
                n_ins := NULL;
                fallbacks := fallbacks + 1;
            END;
        END IF;
        IF n_ins IS NULL THEN
            EXECUTE format('WITH ins AS (INSERT INTO public.%I (%s) SELECT %s FROM public.%I WHERE %s '
                           'ON CONFLICT (%I, %I) DO NOTHING RETURNING 1) SELECT count(*) FROM ins',
                           st.shadow_name, dbops.p2_collist(st.ins_cols), sel, tbl, rng, st.pk_col, st.key_col)
                INTO n_ins USING st.last_key, nxt;
            n_src := greatest(n_keys, n_ins);
        END IF;
        nb := nb + 1;
        rows_now := rows_now + n_src;
        UPDATE dbops.p2_state
        SET last_key = nxt, rows_done = rows_done + n_src, rows_copied = rows_copied + n_ins,
            batches = batches + 1,
            backfill_seconds = backfill_seconds + extract(epoch FROM clock_timestamp() - tb)::numeric,
            rows_total = greatest(rows_total, rows_done + n_src), updated_at = now()
        WHERE table_name = tbl;
        COMMIT;
    END LOOP;
    IF finished THEN
        -- NULL partition keys (derived with key_expr), counted once from the source's key column
        IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = format('public.%I', tbl)::regclass
                     AND attname = st.key_col AND NOT attnotnull) THEN
            EXECUTE format('SELECT count(*) FROM public.%I WHERE %I IS NULL', tbl, st.key_col) INTO n_null;
        END IF;
        UPDATE dbops.p2_state SET null_key_rows = n_null WHERE table_name = tbl;
        COMMIT;
        -- autovacuum never analyzes a partitioned parent: do it once here (samples, reads only)
        EXECUTE format('ANALYZE public.%I', st.shadow_name);
        COMMIT;
    ELSIF waits > 0 THEN
        UPDATE dbops.p2_state SET lock_waits = lock_waits + waits WHERE table_name = tbl;
        COMMIT;
    END IF;
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    result := jsonb_build_object(
        'status', CASE WHEN finished THEN 'done' ELSE 'in progress' END, 'changed', rows_now > 0 OR finished,
        'table', tbl, 'step', st.step,
        'rows_done', st.rows_done, 'rows_total', st.rows_total,
        'pct', CASE WHEN coalesce(st.rows_total, 0) > 0
                    THEN round(100.0 * least(st.rows_done, st.rows_total) / st.rows_total, 1) END,
        'rows_this_call', rows_now, 'batches_this_call', nb, 'lock_waits_this_call', waits,
        'fast_path', fast, 'fast_path_fallbacks', fallbacks,
        'rows_per_second', CASE WHEN extract(epoch FROM clock_timestamp() - t0) > 0
                                THEN round(rows_now / extract(epoch FROM clock_timestamp() - t0)::numeric) END,
        'null_key_rows', st.null_key_rows, 'last_key', st.last_key,
        'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
    PERFORM dbops.p2_log(tbl, 'backfill', result);
    COMMIT;
END
$fn$;
