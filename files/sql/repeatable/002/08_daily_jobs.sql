-- The two daily jobs pg_cron (or playbooks/maintenance.yml) runs: maintain_partitions() and
-- cleanup_old_data(). Both read public.app_retention_policies.
--
-- Both are PROCEDUREs (CALL maintain_partitions(); CALL cleanup_old_data();) run on their own in
-- autocommit, as pg_cron and the maintenance role run them: they COMMIT after every short step, so
-- no lock outlives its step (a function is one transaction: every lock it takes is kept until it
-- returns, which is what blocked ingest and the API, issue 9 items 6 and 7). They were functions
-- (SELECT ...) before: the DROP FUNCTION below removes those on upgrade.
-- Errors (issue 9 item 11): each table / partition / bucket is its own step; a failing one is
-- recorded and the others are still done; at the end the job RAISEs an error listing them (after
-- committing the rest), so cron.job_run_details records the run as failed. The maintenance role
-- passes raise_on_error => false and reads the same list from the result (its health check
-- reports it, and fails the play).
-- Lock-taking statements wait at most lock_wait (lock_timeout) and are retried up to
-- lock_retries times with a short pause (an ACCESS EXCLUSIVE request queued behind a long query
-- makes the application wait behind it: never longer than lock_wait per attempt).

-- squawk-ignore-file ban-drop-function -- replaces the former function versions by the procedures
DROP FUNCTION IF EXISTS public.cleanup_old_data(integer);
DROP FUNCTION IF EXISTS public.maintain_partitions();

-- One step of a daily job: the statements run in one subtransaction (all or nothing) with the
-- caller's lock_timeout; returns NULL and the rows the statements changed, or the error as
-- 'SQLSTATE: message'. The calling procedure COMMITs (a procedure cannot COMMIT inside an
-- exception block, a function called from it can catch).
CREATE OR REPLACE FUNCTION dbops.p2_daily_step(stmts text [], OUT err text, OUT n bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s text;
    c bigint;
BEGIN
    n := 0;
    BEGIN
        FOREACH s IN ARRAY stmts LOOP
            EXECUTE s;
            GET DIAGNOSTICS c = ROW_COUNT;
            n := n + c;
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        err := SQLSTATE || ': ' || SQLERRM;
        n := 0;
    END;
END
$$;

-- One step with its lock wait bounded and retried: dbops.p2_daily_step with lock_timeout =
-- lock_wait; a lock timeout (55P03) is rolled back and tried again after a short pause, up to
-- lock_retries times; then COMMIT (the step's locks end here). err/n as p2_daily_step's.
-- A procedure (it ends transactions), CALLed by the daily procedures; no SET clause, which would
-- forbid its COMMIT: every name in it is schema-qualified.
CREATE OR REPLACE PROCEDURE dbops.p2_daily_try(
    stmts text [], lock_wait text, lock_retries integer, INOUT err text DEFAULT NULL, INOUT n bigint DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
DECLARE
    st record;
BEGIN
    FOR attempt IN 1 .. greatest(lock_retries, 1) LOOP
        PERFORM pg_catalog.set_config('lock_timeout', lock_wait, true);
        SELECT * INTO st FROM dbops.p2_daily_step(stmts);
        EXIT WHEN st.err IS NULL OR pg_catalog.left(st.err, 5) <> '55P03';
        ROLLBACK;
        PERFORM pg_catalog.pg_sleep(LEAST(0.02 * attempt, 0.3));
    END LOOP;
    err := st.err;
    n := st.n;
    COMMIT;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Daily job 1: maintain_partitions()
-- ---------------------------------------------------------------------------------------------
-- For every partitioned policy table (and every shadow being backfilled): create the missing
-- partitions from the current one to now + premake, and move rows that landed in the DEFAULT
-- partition into a partition of their own. One transaction per partition (committed at once).
--  * A future partition is built as a plain table and ATTACHed (SHARE UPDATE EXCLUSIVE on the
--    parent: reads and writes go on; the DEFAULT partition is briefly locked).
--  * Rows in DEFAULT, per bucket (issue 9 item 7), in one short transaction:
--      LOCK TABLE ONLY <parent> IN EXCLUSIVE MODE, LOCK TABLE <default> IN EXCLUSIVE MODE
--      (reads go on; writes wait), CREATE TABLE <new>, the triggers of DEFAULT off, DELETE ...
--      RETURNING -> INSERT INTO <new>, triggers back on, ATTACH <new>, COMMIT.
--    The parent lock conflicts with every writer (ROW EXCLUSIVE) and with SELECT FOR UPDATE /
--    SHARE (ROW SHARE): a writer that already touched a DEFAULT row has committed before the
--    move starts (its new values are moved), and one that arrives during the move waits for the
--    parent lock before it is planned, so it is planned after the COMMIT, with the new partition:
--    it finds the row there and applies its change. Locking only DEFAULT is not enough: an
--    UPDATE through the parent is planned (partitions pruned) before it waits for DEFAULT, then
--    finds the row deleted and reports UPDATE 0 (its change lost; tested).
--    Writes to the whole table wait for the move, so it is bounded: a bucket with more than
--    max_move_rows rows in DEFAULT is not moved (reported as an error: move it in a quiet hour
--    with a larger max_move_rows), and the lock is only waited for lock_wait.
--    Moving rows is not a logical change, so no trigger of DEFAULT fires on it: the engine's (the
--    reverse sync would delete the rows from the old copy, the reference action would SET NULL
--    the transcripts of a moved call) and the application's own. They are disabled on that
--    partition for the moving statement, in this transaction, then enabled again each in its
--    mode (ALTER TABLE <default> DISABLE / ENABLE TRIGGER; internal (constraint) triggers are
--    not touched). Why this and nothing the triggers check:
--     * a custom setting the triggers honour (what this did before: dbops.p2_internal_move) can be
--       SET by any session, which then switched integrity off, also after finalize;
--     * the trigger checking the call stack (GET DIAGNOSTICS ... PG_CONTEXT) for this procedure
--       is not sound: the context is text and an identifier may contain newlines, so any role
--       with TEMP (PUBLIC's default) can forge it;
--     * a per-transaction secret in a table only the engine's owner can read: the application
--       role may own every table (RDS: `scan`), then it can read the secret;
--     * DISABLE TRIGGER needs ownership of the partition, checked by PostgreSQL (an owner can drop
--       the triggers anyway: nobody gains anything); it is transactional and the EXCLUSIVE lock
--       this transaction holds on DEFAULT keeps every other writer out until the triggers are
--       back on; the other partitions keep their own (enabled) trigger clones; and the
--       application's writes pay nothing, the trigger functions test no setting at all.
-- Concurrent calls serialize on an advisory lock; a second run creates nothing.
CREATE OR REPLACE PROCEDURE public.maintain_partitions(
    lock_wait text DEFAULT '100ms', lock_retries integer DEFAULT 30, max_move_rows bigint DEFAULT 10000,
    raise_on_error boolean DEFAULT true, INOUT result jsonb DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
DECLARE
    pols jsonb;
    pol jsonb;
    pars regclass [];
    par regclass;
    base text;
    unit text;
    tcol text;
    dflt regclass;
    b timestamptz;
    cur timestamptz;
    pname text;
    cols text;
    stmts text [];
    step_err text;
    step_n bigint;
    cnt bigint;
    created jsonb := '[]';
    moved jsonb := '[]';
    errors jsonb := '[]';
    checked jsonb := '[]';
    buckets jsonb;
    bk jsonb;
    tg record;
    old_path text := current_setting('search_path');
    t0 timestamptz := clock_timestamp();
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'maintain_partitions: needs READ COMMITTED';
    END IF;
    PERFORM pg_advisory_lock(80622, 1);
    PERFORM set_config('search_path', 'pg_catalog, pg_temp', false);
    PERFORM set_config('jit', 'off', false);
    COMMIT;   -- fails with "invalid transaction termination" inside BEGIN ... : CALL it on its own
    SELECT coalesce(jsonb_agg(to_jsonb(p) || jsonb_build_object('col_ok', a.attname IS NOT NULL)
                              ORDER BY p.table_name), '[]')
    INTO pols
    FROM public.app_retention_policies p
    LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(format('public.%I', p.table_name))
                            AND a.attname = p.time_column
    WHERE p.partition_interval IS NOT NULL AND p.enabled;
    FOR pol IN SELECT * FROM jsonb_array_elements(pols) LOOP
        base := pol ->> 'table_name';
        unit := pol ->> 'partition_interval';
        tcol := pol ->> 'time_column';
        SELECT coalesce(array_agg(c.oid::regclass ORDER BY c.relname), '{}') INTO pars FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'p'
          AND c.relname IN (base, base || '_p') AND NOT c.relispartition;
        FOREACH par IN ARRAY pars LOOP
            checked := checked || to_jsonb(par::text);
            -- future partitions: one short transaction each
            cur := dbops.p2_bucket(unit, now());
            FOR i IN 0 .. (pol ->> 'premake')::integer LOOP
                b := dbops.p2_next(unit, cur, i);
                pname := dbops.p2_part_name(base, unit, b);
                CONTINUE WHEN EXISTS (SELECT 1 FROM pg_inherits ih
                                      WHERE ih.inhparent = par AND ih.inhrelid = to_regclass(format('public.%I', pname)));
                CONTINUE WHEN EXISTS (
                    SELECT 1 FROM pg_inherits ih, dbops.p2_part_bounds(ih.inhrelid) pb
                    WHERE ih.inhparent = par AND pb.range_start <= b AND pb.range_end > b);
                stmts := ARRAY[
                    format('CREATE TABLE public.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                           'INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMPRESSION)', pname, par),
                    -- the parent's owner and settings (a DO block: its ROW_COUNT of 0 keeps the moved-row count)
                    format('DO $adopt$ BEGIN PERFORM dbops.p2_adopt_partition(%L::regclass, %L::regclass); END $adopt$',
                           par::text, format('public.%I', pname)),
                    format('ALTER TABLE %s ATTACH PARTITION public.%I FOR VALUES FROM (%s) TO (%s)',
                           par, pname, dbops.p2_lit(b), dbops.p2_lit(dbops.p2_next(unit, b)))];
                CALL dbops.p2_daily_try(stmts, lock_wait, lock_retries, step_err, step_n);
                IF step_err IS NULL THEN
                    created := created || to_jsonb(pname);
                ELSE
                    errors := errors || jsonb_build_object('table', base, 'partition', pname, 'error', step_err);
                END IF;
            END LOOP;
            -- rows in the DEFAULT partition: give them a partition, one bucket per transaction
            SELECT ih.inhrelid::regclass INTO dflt FROM pg_inherits ih, dbops.p2_part_bounds(ih.inhrelid) pb
            WHERE ih.inhparent = par AND pb.is_default;
            CONTINUE WHEN dflt IS NULL OR NOT dbops.p2_has_rows(dflt);
            IF NOT (pol ->> 'col_ok')::boolean THEN
                errors := errors || jsonb_build_object('table', base, 'partition', dflt::text,
                    'error', format('time column %s of app_retention_policies is not a column of %s', tcol, par));
                CONTINUE;
            END IF;
            SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO cols
            FROM pg_attribute a WHERE a.attrelid = par AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
            EXECUTE format('SELECT coalesce(jsonb_agg(jsonb_build_object(''b'', k, ''n'', n) ORDER BY k), ''[]'') '
                           'FROM (SELECT dbops.p2_bucket(%L, %I) AS k, count(*) AS n FROM %s GROUP BY 1) s '
                           'WHERE k IS NOT NULL', unit, tcol, dflt) INTO buckets;
            COMMIT;
            FOR bk IN SELECT * FROM jsonb_array_elements(buckets) LOOP
                b := (bk ->> 'b')::timestamptz;
                pname := dbops.p2_part_name(base, unit, b);
                IF (bk ->> 'n')::bigint > max_move_rows THEN
                    errors := errors || jsonb_build_object('table', base, 'partition', pname, 'default_partition', dflt::text,
                        'error', format('%s rows of %s in %s: more than max_move_rows (%s), writes to %s would wait for the '
                                        'whole move; run CALL maintain_partitions(max_move_rows => %s) in a quiet hour',
                                        bk ->> 'n', pname, dflt, max_move_rows, par, bk ->> 'n'));
                    CONTINUE;
                END IF;
                stmts := ARRAY[
                    format('LOCK TABLE ONLY %s IN EXCLUSIVE MODE', par),
                    format('LOCK TABLE %s IN EXCLUSIVE MODE', dflt),
                    format('CREATE TABLE public.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                           'INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMPRESSION)', pname, par),
                    -- the parent's owner and settings (a DO block: its ROW_COUNT of 0 keeps the moved-row count)
                    format('DO $adopt$ BEGIN PERFORM dbops.p2_adopt_partition(%L::regclass, %L::regclass); END $adopt$',
                           par::text, format('public.%I', pname))];
                -- every trigger of DEFAULT (engine and application) off for the move, back to its mode after
                FOR tg IN SELECT t.tgname, t.tgenabled FROM pg_trigger t
                          WHERE t.tgrelid = dflt AND NOT t.tgisinternal AND t.tgenabled <> 'D' ORDER BY t.tgname LOOP
                    stmts := stmts || format('ALTER TABLE %s DISABLE TRIGGER %I', dflt, tg.tgname);
                END LOOP;
                stmts := stmts || format('WITH d AS (DELETE FROM %1$s WHERE %2$I >= %3$s AND %2$I < %4$s RETURNING %5$s) '
                                         'INSERT INTO public.%6$I (%5$s) SELECT %5$s FROM d',
                                         dflt, tcol, dbops.p2_lit(b), dbops.p2_lit(dbops.p2_next(unit, b)), cols, pname);
                FOR tg IN SELECT t.tgname, t.tgenabled FROM pg_trigger t
                          WHERE t.tgrelid = dflt AND NOT t.tgisinternal AND t.tgenabled <> 'D' ORDER BY t.tgname LOOP
                    stmts := stmts || format('ALTER TABLE %s ENABLE %sTRIGGER %I', dflt,
                                             CASE tg.tgenabled WHEN 'A' THEN 'ALWAYS ' WHEN 'R' THEN 'REPLICA ' ELSE '' END,
                                             tg.tgname);
                END LOOP;
                stmts := stmts || format('ALTER TABLE %s ATTACH PARTITION public.%I FOR VALUES FROM (%s) TO (%s)',
                                         par, pname, dbops.p2_lit(b), dbops.p2_lit(dbops.p2_next(unit, b)));
                CALL dbops.p2_daily_try(stmts, lock_wait, lock_retries, step_err, step_n);
                IF step_err IS NULL THEN
                    moved := moved || jsonb_build_object('partition', pname, 'rows', step_n);
                ELSE
                    errors := errors || jsonb_build_object('table', base, 'partition', pname, 'error', step_err,
                                                           'default_partition', dflt::text);
                END IF;
            END LOOP;
        END LOOP;
    END LOOP;
    result := jsonb_build_object('created', created, 'moved_from_default', moved, 'errors', errors,
                                 'tables', checked,
                                 'changed', jsonb_array_length(created) + jsonb_array_length(moved) > 0,
                                 'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
    PERFORM set_config('search_path', old_path, false);
    PERFORM pg_advisory_unlock(80622, 1);
    COMMIT;
    IF raise_on_error AND jsonb_array_length(errors) > 0 THEN
        RAISE EXCEPTION 'maintain_partitions: % step(s) failed, the others were done: %', jsonb_array_length(errors),
            (SELECT string_agg(format('%s: %s', e ->> 'partition', e ->> 'error'), '; ') FROM jsonb_array_elements(errors) e)
            USING HINT = 'A lock timeout is retried by the next run; for anything else fix what the message names. '
                         'Result: ' || result::text;
    END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Daily job 2: cleanup_old_data()
-- ---------------------------------------------------------------------------------------------
-- Drops whole partitions whose upper bound is older than now() - retention (no mass DELETE),
-- at most max_partitions per table per run (the first run after a conversion has a backlog:
-- call it again until "dropped" is empty). Non-partitioned policy tables (the poll log) are
-- trimmed with DELETE. Tables whose conversion is not finalized are skipped (their old copy
-- would diverge), plain tables too.
-- Per expired partition (issue 9 item 6), each step its own short transaction:
--   1. DETACH PARTITION (ACCESS EXCLUSIVE on the parent for a catalog change, no scan; waits at
--      most lock_wait, retried) and mark the detached table (COMMENT 'dbops:retention-detached
--      {...}' with its parent and bounds), COMMIT. DETACH in its concurrent form cannot run in a
--      function or procedure (PostgreSQL refuses it there), so the short plain DETACH it is.
--      A transaction that checked a reference to a row of that partition holds FOR KEY SHARE on
--      it (ROW SHARE on the parent): the DETACH waits for it, so after the COMMIT no new
--      reference to those rows can appear (the reference check no longer finds them).
--   2. the referencing rows (transcripts / processing_state -> calls) get the reference's ON
--      DELETE action (SET NULL / SET DEFAULT / CASCADE) in batches of batch_rows keys read from
--      the detached table, one COMMIT per batch, no lock on any parent; a NO ACTION / RESTRICT
--      reference still used stops the drop (error; the table stays detached, named in it).
--   3. proof, then DROP TABLE (locks only the detached table): the recorded bounds are entirely
--      older than now() - retention of the current policy, and no row of the table is outside
--      them (or NULL). Otherwise the table is kept and the error says how to re-attach it.
-- Killed or failed anywhere, the next run finds the marked tables first and finishes them.
CREATE OR REPLACE PROCEDURE public.cleanup_old_data(
    max_partitions integer DEFAULT 50, batch_rows integer DEFAULT 5000, lock_wait text DEFAULT '100ms',
    lock_retries integer DEFAULT 30, raise_on_error boolean DEFAULT true, INOUT result jsonb DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
DECLARE
    marker constant text := 'dbops:retention-detached ';
    pols jsonb;
    pol jsonb;
    par regclass;
    rel regclass;
    rk char;
    stp text;
    todo jsonb;
    item jsonb;
    refs jsonb;
    ref jsonb;
    ptype text;
    keys text [];
    last_k text;
    prev_k text;
    q text;
    n bigint;
    cnt bigint;
    bad boolean;
    fail text;
    step_err text;
    step_n bigint;
    cutoff timestamptz;
    dropped jsonb := '[]';
    resumed jsonb := '[]';
    deleted jsonb := '{}';
    skipped jsonb := '[]';
    errors jsonb := '[]';
    old_path text := current_setting('search_path');
    t0 timestamptz := clock_timestamp();
    item_t0 timestamptz;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'cleanup_old_data: needs READ COMMITTED (each batch takes a fresh snapshot)';
    END IF;
    PERFORM pg_advisory_lock(80622, 2);
    PERFORM set_config('search_path', 'pg_catalog, pg_temp', false);
    PERFORM set_config('jit', 'off', false);
    COMMIT;   -- fails with "invalid transaction termination" inside BEGIN ... : CALL it on its own
    SELECT coalesce(jsonb_agg(to_jsonb(p) ORDER BY p.table_name), '[]') INTO pols
    FROM public.app_retention_policies p WHERE p.enabled;
    -- the work list: first what an earlier run detached and did not drop, then what expired now
    SELECT coalesce(jsonb_agg((substr(d.description, length(marker) + 1))::jsonb
                              || jsonb_build_object('rel', c.oid, 'name', c.relname, 'detached', true)
                              ORDER BY c.relname), '[]')
    INTO todo
    FROM pg_class c JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
      AND d.description LIKE marker || '{%';
    resumed := coalesce((SELECT jsonb_agg(e ->> 'name') FROM jsonb_array_elements(todo) e), '[]');
    FOR pol IN SELECT * FROM jsonb_array_elements(pols) LOOP
        par := to_regclass(format('public.%I', pol ->> 'table_name'));
        rk := (SELECT c.relkind FROM pg_class c WHERE c.oid = par);
        IF par IS NULL THEN
            skipped := skipped || jsonb_build_object('table', pol ->> 'table_name', 'reason', 'missing');
        ELSIF pol ->> 'partition_interval' IS NULL THEN
            IF rk = 'r' THEN
                CALL dbops.p2_daily_try(ARRAY[format('DELETE FROM %s WHERE %I < %s', par, pol ->> 'time_column',
                                                     dbops.p2_lit(now() - (pol ->> 'retention')::interval))],
                                        lock_wait, lock_retries, step_err, step_n);
                IF step_err IS NULL THEN
                    deleted := deleted || jsonb_build_object(pol ->> 'table_name', step_n);
                ELSE
                    errors := errors || jsonb_build_object('table', pol ->> 'table_name', 'error', step_err);
                END IF;
            END IF;
        ELSIF rk <> 'p' THEN
            skipped := skipped || jsonb_build_object('table', pol ->> 'table_name', 'reason', 'not partitioned yet');
        ELSE
            SELECT s.step INTO stp FROM dbops.p2_state s WHERE s.table_name = pol ->> 'table_name';
            IF stp IS NOT NULL AND stp <> 'finalized' THEN
                skipped := skipped || jsonb_build_object('table', pol ->> 'table_name',
                                                         'reason', format('conversion in progress (step %s)', stp));
            ELSE
                SELECT todo || coalesce(jsonb_agg(jsonb_build_object(
                           'table', pol ->> 'table_name', 'parent', par::oid, 'rel', x.rel::oid, 'name', x.relname,
                           'time_column', pol ->> 'time_column', 'range_start', x.range_start,
                           'range_end', x.range_end, 'detached', false) ORDER BY x.range_end), '[]')
                INTO todo
                FROM (SELECT ih.inhrelid::regclass AS rel, c.relname, pb.range_start, pb.range_end
                      FROM pg_inherits ih JOIN pg_class c ON c.oid = ih.inhrelid,
                           dbops.p2_part_bounds(ih.inhrelid) pb
                      WHERE ih.inhparent = par AND NOT pb.is_default
                        AND pb.range_end <= now() - (pol ->> 'retention')::interval
                      ORDER BY pb.range_end LIMIT max_partitions) x;
            END IF;
        END IF;
    END LOOP;
    COMMIT;

    FOR item IN SELECT * FROM jsonb_array_elements(todo) LOOP
        rel := (item ->> 'rel')::oid::regclass;
        fail := NULL;
        n := 0;
        item_t0 := clock_timestamp();
        refs := coalesce((SELECT jsonb_agg(to_jsonb(f) ORDER BY f.child_table, f.conname) FROM dbops.p2_refs f
                          WHERE f.parent_table = item ->> 'table'
                            AND to_regclass(format('public.%I', f.child_table)) IS NOT NULL), '[]');
        -- 1. detach (short lock on the parent, no scan), mark, COMMIT
        IF NOT (item ->> 'detached')::boolean THEN
            CALL dbops.p2_daily_try(ARRAY[
                    format('ALTER TABLE %s DETACH PARTITION %s', (item ->> 'parent')::oid::regclass, rel),
                    format('COMMENT ON TABLE %s IS %L', rel,
                           marker || (item - 'rel' - 'name' - 'parent' - 'detached'
                                      || jsonb_build_object('detached_at', now()))::text)], lock_wait, lock_retries, step_err, step_n);
            IF step_err IS NOT NULL THEN
                errors := errors || jsonb_build_object('table', item ->> 'table', 'partition', item ->> 'name',
                                                       'error', 'detach: ' || step_err);
                CONTINUE;
            END IF;
        END IF;
        -- 2. references, in batches, one COMMIT each, no parent locked
        FOR ref IN SELECT * FROM jsonb_array_elements(refs) LOOP
            EXIT WHEN fail IS NOT NULL;
            IF jsonb_array_length(ref -> 'parent_cols') <> 1 OR ref ->> 'on_delete' NOT IN ('n', 'd', 'c', 'a', 'r') THEN
                fail := format('reference %s (on delete %s) not supported by cleanup', ref ->> 'conname', ref ->> 'on_delete');
                EXIT;
            END IF;
            IF ref ->> 'on_delete' IN ('a', 'r') THEN   -- NO ACTION / RESTRICT: must be unused
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.%I c JOIN %s p ON c.%I = p.%I)',
                               ref ->> 'child_table', rel, ref -> 'child_cols' ->> 0, ref -> 'parent_cols' ->> 0) INTO bad;
                IF bad THEN
                    fail := format('rows of %s still reference %s (%s: no action)', ref ->> 'child_table',
                                   item ->> 'name', ref ->> 'conname');
                END IF;
                CONTINUE;
            END IF;
            SELECT format_type(a.atttypid, a.atttypmod) INTO ptype FROM pg_attribute a
            WHERE a.attrelid = rel AND a.attname = ref -> 'parent_cols' ->> 0;
            q := format('%s public.%I c %s WHERE c.%I = ANY (%%L::%s[])',
                        CASE WHEN ref ->> 'on_delete' = 'c' THEN 'DELETE FROM' ELSE 'UPDATE' END,
                        ref ->> 'child_table',
                        CASE ref ->> 'on_delete' WHEN 'n' THEN format('SET %I = NULL', ref -> 'child_cols' ->> 0)
                                                 WHEN 'd' THEN format('SET %I = DEFAULT', ref -> 'child_cols' ->> 0)
                                                 ELSE '' END,
                        ref -> 'child_cols' ->> 0, ptype);
            last_k := NULL;
            LOOP
                prev_k := last_k;
                EXECUTE format('SELECT array_agg(k::text ORDER BY k), max(k)::text FROM '
                               '(SELECT %1$I AS k FROM %2$s %3$s ORDER BY %1$I LIMIT %4$s) s',
                               ref -> 'parent_cols' ->> 0, rel,
                               CASE WHEN last_k IS NULL THEN '' ELSE format('WHERE %I > $1::%s', ref -> 'parent_cols' ->> 0, ptype) END,
                               greatest(batch_rows, 1))
                    INTO keys, last_k USING last_k;
                EXIT WHEN keys IS NULL;
                CALL dbops.p2_daily_try(ARRAY[format(q, keys::text)], lock_wait, lock_retries, step_err, step_n);
                IF step_err IS NOT NULL THEN
                    fail := format('clearing %s: %s', ref ->> 'conname', step_err);
                    EXIT;
                END IF;
                n := n + step_n;
            END LOOP;
        END LOOP;
        -- 3. proof, then drop
        IF fail IS NULL THEN
            cutoff := (SELECT now() - (p ->> 'retention')::interval FROM jsonb_array_elements(pols) p
                       WHERE p ->> 'table_name' = item ->> 'table');
            IF cutoff IS NULL OR (item ->> 'range_end')::timestamptz > cutoff THEN
                fail := format('not expired under the current policy of %s (range end %s, cutoff %s)',
                               item ->> 'table', item ->> 'range_end', coalesce(cutoff::text, 'no enabled policy'));
            ELSE
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM %1$s WHERE %2$I >= $1) OR EXISTS (SELECT 1 FROM %1$s WHERE %2$I < $2) '
                               'OR EXISTS (SELECT 1 FROM %1$s WHERE %2$I IS NULL)', rel, item ->> 'time_column')
                    INTO bad USING (item ->> 'range_end')::timestamptz, (item ->> 'range_start')::timestamptz;
                IF bad THEN
                    fail := format('rows of %s outside its recorded range [%s, %s)', item ->> 'name',
                                   item ->> 'range_start', item ->> 'range_end');
                END IF;
            END IF;
        END IF;
        IF fail IS NOT NULL THEN
            COMMIT;
            errors := errors || jsonb_build_object('table', item ->> 'table', 'partition', item ->> 'name',
                'error', fail || format('; %s stays detached (not dropped): the next run retries; to keep it instead: '
                                        'COMMENT ON TABLE public.%I IS NULL; ALTER TABLE public.%I ATTACH PARTITION public.%I '
                                        'FOR VALUES FROM (%L) TO (%L)', item ->> 'name', item ->> 'name', item ->> 'table',
                                        item ->> 'name', item ->> 'range_start', item ->> 'range_end'));
            CONTINUE;
        END IF;
        cnt := (SELECT greatest(c.reltuples, 0)::bigint FROM pg_class c WHERE c.oid = rel);
        CALL dbops.p2_daily_try(ARRAY[format('DROP TABLE %s', rel)], lock_wait, lock_retries, step_err, step_n);
        IF step_err IS NOT NULL THEN
            errors := errors || jsonb_build_object('table', item ->> 'table', 'partition', item ->> 'name',
                                                   'error', 'drop: ' || step_err || ' (detached, the next run drops it)');
            CONTINUE;
        END IF;
        dropped := dropped || jsonb_build_object('partition', item ->> 'name', 'table', item ->> 'table',
                                                 'range_end', item -> 'range_end', 'rows_estimate', cnt,
                                                 'references_cleared', n,
                                                 'seconds', round(extract(epoch FROM clock_timestamp() - item_t0)::numeric, 3));
    END LOOP;
    result := jsonb_build_object('dropped', dropped, 'resumed', resumed, 'deleted', deleted, 'skipped', skipped,
                                 'errors', errors,
                                 'changed', jsonb_array_length(dropped) > 0
                                            OR EXISTS (SELECT 1 FROM jsonb_each_text(deleted) e WHERE e.value::bigint > 0),
                                 'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
    PERFORM set_config('search_path', old_path, false);
    PERFORM pg_advisory_unlock(80622, 2);
    COMMIT;
    IF raise_on_error AND jsonb_array_length(errors) > 0 THEN
        RAISE EXCEPTION 'cleanup_old_data: % step(s) failed, the others were done: %', jsonb_array_length(errors),
            (SELECT string_agg(format('%s: %s', coalesce(e ->> 'partition', e ->> 'table'), e ->> 'error'), '; ')
             FROM jsonb_array_elements(errors) e)
            USING HINT = 'A lock timeout is retried by the next run; for anything else fix what the message names. '
                         'Result: ' || result::text;
    END IF;
END
$$;
