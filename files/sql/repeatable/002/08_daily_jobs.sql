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
-- After each lock timeout (issue 18 item 10) it reads who holds what the step's statements lock
-- (dbops.p2_stmt_targets, p2_lock_unblock: pid, role, application, state, transaction age, query)
-- and says so in a NOTICE per retry and in err; when the only holders are autovacuum workers not
-- preventing wraparound, PostgreSQL is made to cancel them once per step (a probe no application
-- query waits behind, see 10_locks.sql) and the step is tried again at once; an anti-wraparound
-- one is waited for (the retries go on, the next run tries again).
-- Under a run lock (scanner.dbops.step sets dbops.run_lock_id) each attempt first checks this run
-- still holds it, inside the step's transaction (dbops.p2_fence; raises, ending the job, if not).
CREATE OR REPLACE PROCEDURE dbops.p2_daily_try(
    stmts text [], lock_wait text, lock_retries integer, INOUT err text DEFAULT NULL, INOUT n bigint DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
DECLARE
    st record;
    tg jsonb;
    u jsonb;
    probed boolean := false;
    wait_for text := lock_wait;
    tries integer := greatest(lock_retries, 1);
BEGIN
    FOR attempt IN 1 .. tries LOOP
        PERFORM dbops.p2_fence('before a step of a daily job (the steps before it are committed)');
        PERFORM pg_catalog.set_config('lock_timeout', wait_for, true);
        SELECT * INTO st FROM dbops.p2_daily_step(stmts);
        EXIT WHEN st.err IS NULL OR pg_catalog.left(st.err, 5) <> '55P03';
        ROLLBACK;
        wait_for := lock_wait;
        IF tg IS NULL THEN
            tg := (SELECT coalesce(pg_catalog.jsonb_agg(x), '[]')
                   FROM pg_catalog.unnest(stmts) s, pg_catalog.jsonb_array_elements(dbops.p2_stmt_targets(s)) x);
        END IF;
        u := dbops.p2_lock_unblock(tg, NOT probed);
        probed := probed OR u ->> 'action' IN ('cancelled', 'finished', 'not_cancelled', 'extend');
        IF u ->> 'action' = 'extend' THEN
            wait_for := u ->> 'lock_timeout';
        END IF;
        COMMIT;
        IF u ->> 'action' IN ('cancelled', 'finished') THEN
            RAISE NOTICE 'autovacuum: %: %', pg_catalog.left(stmts[1], 60), u ->> 'text';
        ELSIF attempt < tries THEN
            RAISE NOTICE 'retry % of % after: %: lock not available (lock_timeout %): %', attempt, tries - 1,
                pg_catalog.left(stmts[1], 60), lock_wait, u ->> 'text';
        END IF;
        IF u ->> 'action' NOT IN ('cancelled', 'finished', 'released', 'extend') THEN
            PERFORM pg_catalog.pg_sleep(LEAST(0.02 * attempt, 0.3));
        END IF;
    END LOOP;
    err := st.err || CASE WHEN pg_catalog.left(st.err, 5) = '55P03' AND u IS NOT NULL
                          THEN ' (' || (u ->> 'text') || ')' ELSE '' END;
    n := st.n;
    COMMIT;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Daily job 1: maintain_partitions()
-- ---------------------------------------------------------------------------------------------
-- The triggers maintain_partitions() switches off on a DEFAULT partition while it moves rows out of
-- it, with their mode (issue 18 item 9): the engine's and the application's, that is the
-- partition's own non-internal triggers and the clones of its parent's row triggers
-- (tgparentid <> 0). PostgreSQL 13 and 14 mark those clones tgisinternal (15+ do not): picking
-- NOT tgisinternal alone left the engine's clones on there, and the move fired the reverse sync
-- and the reference action (the transcripts of every moved call SET NULL). Never a trigger that
-- implements a constraint other than a constraint trigger: the RI triggers of a native foreign
-- key (internal; on 15+ clones too, tgconstraint -> contype 'f') and the recheck triggers of a
-- deferrable unique / primary key / exclusion constraint keep checking the moved rows (disabling
-- them needs a superuser). The owner may disable a clone on 13 and 14 as on 15 (tried on 13.23
-- and 14.23). Triggers already disabled are left alone.
CREATE OR REPLACE FUNCTION dbops.p2_move_triggers(dflt regclass)
RETURNS TABLE (tgname name, tgenabled "char")
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.tgname, t.tgenabled
    FROM pg_trigger t LEFT JOIN pg_constraint k ON k.oid = t.tgconstraint
    WHERE t.tgrelid = dflt AND t.tgenabled <> 'D'
      AND (NOT t.tgisinternal OR t.tgparentid <> 0)
      AND (t.tgconstraint = 0 OR k.contype = 't')
    ORDER BY t.tgname
$$;

-- For every partitioned policy table (and every shadow being backfilled): create the missing
-- partitions from the current one to now + premake, and move rows that landed in the DEFAULT
-- partition into a partition of their own. One transaction per partition (committed at once).
--  * A future partition is built as a plain table and ATTACHed (SHARE UPDATE EXCLUSIVE on the
--    parent: reads and writes go on; the DEFAULT partition is briefly locked).
--    Built LIKE the parent INCLUDING ALL but comments, identity, indexes (ATTACH makes the
--    partition's own) and statistics: defaults, constraints, generated columns, storage and, from
--    14, compression (naming INCLUDING COMPRESSION is a syntax error on 13).
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
--    mode (ALTER TABLE <default> DISABLE / ENABLE TRIGGER; which ones: dbops.p2_move_triggers,
--    the clones of the parent's triggers included, the triggers of native foreign keys and
--    deferrable unique constraints not). Why this and nothing the triggers check:
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
-- Every partition it attaches (future or moved-to) gets, in the ATTACH's transaction,
-- dbops.p2_protect_partition (02_references.sql: the TRUNCATE block a leaf needs, statement
-- triggers not being cloned).
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
    prune jsonb;
    pruned bigint := 0;
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
                    format('CREATE TABLE public.%I (LIKE %s INCLUDING ALL EXCLUDING COMMENTS EXCLUDING IDENTITY '
                           'EXCLUDING INDEXES EXCLUDING STATISTICS)', pname, par),
                    -- the parent's owner and settings (a DO block: its ROW_COUNT of 0 keeps the moved-row count)
                    format('DO $adopt$ BEGIN PERFORM dbops.p2_adopt_partition(%L::regclass, %L::regclass); END $adopt$',
                           par::text, format('public.%I', pname)),
                    format('ALTER TABLE %s ATTACH PARTITION public.%I FOR VALUES FROM (%s) TO (%s)',
                           par, pname, dbops.p2_lit(b), dbops.p2_lit(dbops.p2_next(unit, b))),
                    -- the leaf's TRUNCATE block, in the ATTACH's transaction
                    format('DO $protect$ BEGIN PERFORM dbops.p2_protect_partition(%L::regclass); END $protect$',
                           format('public.%I', pname))];
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
                    format('CREATE TABLE public.%I (LIKE %s INCLUDING ALL EXCLUDING COMMENTS EXCLUDING IDENTITY '
                           'EXCLUDING INDEXES EXCLUDING STATISTICS)', pname, par),
                    -- the parent's owner and settings (a DO block: its ROW_COUNT of 0 keeps the moved-row count)
                    format('DO $adopt$ BEGIN PERFORM dbops.p2_adopt_partition(%L::regclass, %L::regclass); END $adopt$',
                           par::text, format('public.%I', pname))];
                -- every trigger of DEFAULT (engine and application, clones included) off for the move,
                -- back to its mode after
                FOR tg IN SELECT t.tgname, t.tgenabled FROM dbops.p2_move_triggers(dflt) t LOOP
                    stmts := stmts || format('ALTER TABLE %s DISABLE TRIGGER %I', dflt, tg.tgname);
                END LOOP;
                stmts := stmts || format('WITH d AS (DELETE FROM %1$s WHERE %2$I >= %3$s AND %2$I < %4$s RETURNING %5$s) '
                                         'INSERT INTO public.%6$I (%5$s) SELECT %5$s FROM d',
                                         dflt, tcol, dbops.p2_lit(b), dbops.p2_lit(dbops.p2_next(unit, b)), cols, pname);
                FOR tg IN SELECT t.tgname, t.tgenabled FROM dbops.p2_move_triggers(dflt) t LOOP
                    stmts := stmts || format('ALTER TABLE %s ENABLE %sTRIGGER %I', dflt,
                                             CASE tg.tgenabled WHEN 'A' THEN 'ALWAYS ' WHEN 'R' THEN 'REPLICA ' ELSE '' END,
                                             tg.tgname);
                END LOOP;
                stmts := stmts || format('ALTER TABLE %s ATTACH PARTITION public.%I FOR VALUES FROM (%s) TO (%s)',
                                         par, pname, dbops.p2_lit(b), dbops.p2_lit(dbops.p2_next(unit, b)))
                               -- the leaf's TRUNCATE block (a DO block: its ROW_COUNT of 0 keeps the moved-row count)
                               || format('DO $protect$ BEGIN PERFORM dbops.p2_protect_partition(%L::regclass); END $protect$',
                                         format('public.%I', pname));
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
    -- the key touches of the trigger-emulated constraints no snapshot needs any more (02_references.sql),
    -- in batches, each committed
    LOOP
        BEGIN
            prune := dbops.p2_touch_prune(10000);
        EXCEPTION WHEN lock_not_available OR query_canceled THEN
            GET STACKED DIAGNOSTICS step_err = MESSAGE_TEXT;
            errors := errors || jsonb_build_object('table', 'dbops.p2_key_touches', 'partition', 'dbops.p2_key_touches',
                                                   'error', step_err);
            EXIT;
        END;
        pruned := pruned + (prune ->> 'deleted')::bigint;
        COMMIT;
        EXIT WHEN NOT (prune ->> 'more')::boolean;
    END LOOP;
    result := jsonb_build_object('created', created, 'moved_from_default', moved, 'errors', errors,
                                 'tables', checked, 'key_touches_pruned', pruned,
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
-- Is detached the table cleanup_old_data() detached and recorded in dbops.p2_detached, and still
-- the same relation: same oid and name, a plain table in public, a partition of nothing, owned by
-- the role recorded at the DETACH, which still owns the parent, itself still the table of that
-- name? With prove, may it be dropped: its recorded range lies entirely before now() - retention
-- of the table's current enabled policy, and no row of it is outside that range (or NULL).
-- Raises an error saying why not (cleanup_old_data runs it as a step and records the error).
CREATE OR REPLACE FUNCTION dbops.p2_detached_check(detached oid, prove boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d record;
    c record;
    cutoff timestamptz;
    bad boolean;
BEGIN
    SELECT * INTO d FROM dbops.p2_detached WHERE rel = detached;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'relation % is not recorded in dbops.p2_detached: cleanup_old_data() did not detach it', detached;
    END IF;
    SELECT x.relname, x.relnamespace, x.relkind, x.relispartition, x.relowner INTO c FROM pg_class x WHERE x.oid = detached;
    IF NOT FOUND THEN
        RAISE EXCEPTION '% (oid %), detached from %, no longer exists', d.relname, detached, d.table_name;
    END IF;
    IF c.relname <> d.relname OR c.relnamespace <> 'public'::regnamespace OR c.relkind <> 'r' OR c.relispartition
       OR c.relowner <> d.owner OR to_regclass(format('public.%I', d.table_name)) IS DISTINCT FROM d.parent::regclass
       OR d.owner IS DISTINCT FROM (SELECT p.relowner FROM pg_class p WHERE p.oid = d.parent) THEN
        RAISE EXCEPTION '% (oid %) is no longer the table detached from % as recorded (public.%, a plain table and '
                        'no partition, owned by %, the owner of %): not touched', detached::regclass, detached,
                        d.table_name, d.relname, pg_get_userbyid(d.owner), d.table_name;
    END IF;
    IF prove THEN
        cutoff := (SELECT now() - p.retention FROM public.app_retention_policies p
                   WHERE p.table_name = d.table_name AND p.enabled);
        IF cutoff IS NULL OR d.range_end > cutoff THEN
            RAISE EXCEPTION 'not expired under the current policy of % (range end %, cutoff %)', d.table_name,
                dbops.p2_lit(d.range_end), coalesce(dbops.p2_lit(cutoff), 'no enabled policy');
        END IF;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %1$s WHERE %2$I >= $1) OR EXISTS (SELECT 1 FROM %1$s WHERE %2$I < $2) '
                       'OR EXISTS (SELECT 1 FROM %1$s WHERE %2$I IS NULL)', detached::regclass, d.time_column)
            INTO bad USING d.range_end, d.range_start;
        IF bad THEN
            RAISE EXCEPTION 'rows of % outside its recorded range [%, %)', d.relname,
                coalesce(dbops.p2_lit(d.range_start), 'MINVALUE'), dbops.p2_lit(d.range_end);
        END IF;
    END IF;
END
$$;

-- Drops whole partitions whose upper bound is older than now() - retention (no mass DELETE),
-- at most max_partitions per table per run (the first run after a conversion has a backlog:
-- call it again until "dropped" is empty). Non-partitioned policy tables (the poll log) are
-- trimmed with DELETE. Tables whose conversion is not finalized are skipped (their old copy
-- would diverge), plain tables too.
-- Per expired partition (issue 9 item 6), each step its own short transaction; nothing is
-- changed before every check passed, and the drop comes last (issue 18 item 8):
--   1. DETACH PARTITION (ACCESS EXCLUSIVE on the parent for a catalog change, no scan; waits at
--      most lock_wait, retried) and, in the same transaction, its row in dbops.p2_detached (oid,
--      name, parent, owner, time column, bounds), COMMIT. A partition not owned by its parent's
--      owner is not detached (error). DETACH in its concurrent form cannot run in a function or
--      procedure (PostgreSQL refuses it there), so the short plain DETACH it is.
--      A transaction that checked a reference to a row of that partition holds FOR KEY SHARE on
--      it (ROW SHARE on the parent): the DETACH waits for it, so after the COMMIT no new
--      reference to those rows can appear (the reference check no longer finds them).
--   2. check (dbops.p2_detached_check, the table locked): still the recorded relation; its
--      recorded bounds entirely older than now() - retention of the current policy; no row of it
--      outside them (or NULL); no NO ACTION / RESTRICT reference to its rows. A refusal keeps the
--      table detached with every reference to its rows intact, and the error gives the ATTACH
--      that puts it back (the next run forgets a re-attached table).
--   3. the referencing rows (transcripts / processing_state -> calls) get the reference's ON
--      DELETE action (SET NULL / SET DEFAULT / CASCADE) in batches of batch_rows keys read from
--      the detached table, one COMMIT per batch, no lock on any parent. A batch that fails (a
--      lock held too long) leaves the table detached: the next run finishes it.
--   4. DROP TABLE (locks only the detached table) and the row's DELETE, after the identity check
--      again, in one transaction.
-- Killed or failed anywhere, the next run finds the recorded tables first and finishes them.
-- It acts on nothing else (issue 18 item 7): it used to find them by a table comment
-- ('dbops:retention-detached {...}'), which any role that may create a table in public can write
-- on a table of its own (PUBLIC could up to PostgreSQL 14), holding live call_uids whose references
-- the job then cleared. Who wrote a comment cannot be told, so a table carrying that former mark
-- and not recorded is adopted (recorded with source 'legacy-marker', the mark removed, reported
-- under "adopted") only when its owner is the owner of the policy table the mark names (that role
-- can delete those calls, clearing the same references, anyway: it gains nothing), it is a plain
-- table and no partition, its name is a partition name of that table (<table>_p..., <table>_h...)
-- and it has the time column; then it goes through the same checks. Any other marked table is left
-- alone and reported under "ignored" (with a WARNING); its comment is not removed.
CREATE OR REPLACE PROCEDURE public.cleanup_old_data(
    max_partitions integer DEFAULT 50, batch_rows integer DEFAULT 5000, lock_wait text DEFAULT '100ms',
    lock_retries integer DEFAULT 30, raise_on_error boolean DEFAULT true, INOUT result jsonb DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
DECLARE
    marker constant text := 'dbops:retention-detached ';   -- the former code's mark: read only to adopt
    pols jsonb;
    pol jsonb;
    par regclass;
    rel regclass;
    relid oid;
    rk char;
    stp text;
    todo jsonb;
    cands jsonb;
    cand jsonb;
    meta jsonb;
    why text;
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
    dropped jsonb := '[]';
    resumed jsonb := '[]';
    adopted jsonb := '[]';
    ignored jsonb := '[]';
    forgotten jsonb := '[]';
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
    -- tables the former code detached and marked with a comment: adopted under the rule above, or ignored
    SELECT coalesce(jsonb_agg(jsonb_build_object('rel', c.oid, 'name', c.relname, 'relkind', c.relkind,
                                                 'partition', c.relispartition, 'owner', c.relowner,
                                                 'description', d.description) ORDER BY c.relname), '[]')
    INTO cands
    FROM pg_class c JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
    WHERE c.relnamespace = 'public'::regnamespace AND d.description LIKE marker || '%'
      AND NOT EXISTS (SELECT 1 FROM dbops.p2_detached x WHERE x.rel = c.oid);
    FOR cand IN SELECT * FROM jsonb_array_elements(cands) LOOP
        why := NULL;
        BEGIN
            meta := substr(cand ->> 'description', length(marker) + 1)::jsonb;
            meta := jsonb_build_object('table', meta ->> 'table', 'time_column', meta ->> 'time_column',
                                       'range_start', (meta ->> 'range_start')::timestamptz,
                                       'range_end', (meta ->> 'range_end')::timestamptz);
        EXCEPTION WHEN OTHERS THEN
            why := 'unreadable mark: ' || SQLERRM;
        END;
        IF why IS NULL AND (meta ->> 'table' IS NULL OR meta ->> 'time_column' IS NULL OR meta ->> 'range_end' IS NULL) THEN
            why := 'the mark names no table, time_column or range_end';
        END IF;
        IF why IS NULL THEN
            par := to_regclass(format('public.%I', meta ->> 'table'));
            why := CASE
                WHEN NOT EXISTS (SELECT 1 FROM public.app_retention_policies p
                                 WHERE p.table_name = meta ->> 'table' AND p.partition_interval IS NOT NULL)
                    THEN format('%s has no partitioned retention policy', meta ->> 'table')
                WHEN par IS NULL OR (SELECT c.relkind FROM pg_class c WHERE c.oid = par) <> 'p'
                    THEN format('%s is not a partitioned table', meta ->> 'table')
                WHEN (cand ->> 'owner')::oid <> (SELECT c.relowner FROM pg_class c WHERE c.oid = par)
                    THEN format('owner %s is not the owner of %s (%s)', pg_get_userbyid((cand ->> 'owner')::oid),
                                meta ->> 'table', (SELECT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid = par))
                WHEN cand ->> 'relkind' <> 'r' OR (cand ->> 'partition')::boolean
                    THEN 'not a plain table, or a partition'
                WHEN left(cand ->> 'name', length(meta ->> 'table') + 2) NOT IN (meta ->> 'table' || '_p', meta ->> 'table' || '_h')
                    THEN format('not a partition name of %s', meta ->> 'table')
                WHEN NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = (cand ->> 'rel')::oid AND a.attnum > 0
                                 AND NOT a.attisdropped AND a.attname = meta ->> 'time_column')
                    THEN format('no column %s', meta ->> 'time_column')
            END;
        END IF;
        IF why IS NOT NULL THEN
            ignored := ignored || jsonb_build_object('table', cand ->> 'name', 'reason', why);
            RAISE WARNING 'cleanup_old_data: public.% carries the mark of a detached partition but is ignored: %',
                quote_ident(cand ->> 'name'), why;
            CONTINUE;
        END IF;
        CALL dbops.p2_daily_try(ARRAY[
                format('INSERT INTO dbops.p2_detached (rel, relname, table_name, parent, owner, time_column, range_start, '
                       'range_end, source) SELECT c.oid, c.relname, %L, %s, c.relowner, %L, %L, %L, ''legacy-marker'' '
                       'FROM pg_class c WHERE c.oid = %s', meta ->> 'table', par::oid, meta ->> 'time_column',
                       meta ->> 'range_start', meta ->> 'range_end', (cand ->> 'rel')::oid),
                format('COMMENT ON TABLE %s IS NULL', (cand ->> 'rel')::oid::regclass)], lock_wait, lock_retries, step_err, step_n);
        IF step_err IS NULL THEN
            adopted := adopted || jsonb_build_object('partition', cand ->> 'name', 'table', meta ->> 'table');
        ELSE
            errors := errors || jsonb_build_object('table', meta ->> 'table', 'partition', cand ->> 'name',
                                                   'error', 'adopting the marked table: ' || step_err);
        END IF;
    END LOOP;
    -- the work list: first what an earlier run detached and did not drop, then what expired now
    SELECT coalesce(jsonb_agg(jsonb_build_object('rel', d.rel, 'name', d.relname, 'table', d.table_name, 'parent', d.parent,
                                                 'time_column', d.time_column, 'range_start', d.range_start,
                                                 'range_end', d.range_end, 'detached', true) ORDER BY d.relname), '[]')
    INTO todo
    FROM dbops.p2_detached d;
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
        relid := (item ->> 'rel')::oid;
        rel := relid::regclass;
        fail := NULL;
        n := 0;
        item_t0 := clock_timestamp();
        refs := coalesce((SELECT jsonb_agg(to_jsonb(f) ORDER BY f.child_table, f.conname) FROM dbops.p2_refs f
                          WHERE f.parent_table = item ->> 'table'
                            AND to_regclass(format('public.%I', f.child_table)) IS NOT NULL), '[]');
        IF (item ->> 'detached')::boolean THEN
            -- a recorded table an operator attached again (what a refused drop's error says) or dropped: forgotten
            why := CASE WHEN NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = relid) THEN 'no longer exists'
                        WHEN EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = relid
                                     AND i.inhparent = (item ->> 'parent')::oid)
                            THEN format('a partition of %s again', item ->> 'table') END;
            IF why IS NOT NULL THEN
                CALL dbops.p2_daily_try(ARRAY[format('DELETE FROM dbops.p2_detached WHERE rel = %s', relid)],
                                        lock_wait, lock_retries, step_err, step_n);
                IF step_err IS NULL THEN
                    forgotten := forgotten || jsonb_build_object('partition', item ->> 'name', 'table', item ->> 'table',
                                                                 'reason', why);
                ELSE
                    errors := errors || jsonb_build_object('table', item ->> 'table', 'partition', item ->> 'name',
                                                           'error', step_err);
                END IF;
                CONTINUE;
            END IF;
            resumed := resumed || to_jsonb(item ->> 'name');
        ELSE
            -- 1. detach (short lock on the parent, no scan) and record it, one transaction
            IF (SELECT c.relowner FROM pg_class c WHERE c.oid = relid)
               <> (SELECT c.relowner FROM pg_class c WHERE c.oid = (item ->> 'parent')::oid) THEN
                errors := errors || jsonb_build_object('table', item ->> 'table', 'partition', item ->> 'name',
                    'error', format('not detached: owned by %s, not by the owner of %s (ALTER TABLE public.%I OWNER TO %I)',
                                    (SELECT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid = relid), item ->> 'table',
                                    item ->> 'name', (SELECT pg_get_userbyid(c.relowner) FROM pg_class c
                                                      WHERE c.oid = (item ->> 'parent')::oid)));
                CONTINUE;
            END IF;
            CALL dbops.p2_daily_try(ARRAY[
                    format('ALTER TABLE %s DETACH PARTITION %s', (item ->> 'parent')::oid::regclass, rel),
                    format('INSERT INTO dbops.p2_detached (rel, relname, table_name, parent, owner, time_column, range_start, '
                           'range_end) SELECT c.oid, c.relname, %L, %s, c.relowner, %L, %L, %L FROM pg_class c WHERE c.oid = %s',
                           item ->> 'table', item ->> 'parent', item ->> 'time_column', item ->> 'range_start',
                           item ->> 'range_end', relid)], lock_wait, lock_retries, step_err, step_n);
            IF step_err IS NOT NULL THEN
                errors := errors || jsonb_build_object('table', item ->> 'table', 'partition', item ->> 'name',
                                                       'error', 'detach: ' || step_err);
                CONTINUE;
            END IF;
        END IF;
        -- 2. check, before anything is changed: the recorded table (locked), expired under the current
        --    policy, no row outside its range; no NO ACTION / RESTRICT reference still used
        CALL dbops.p2_daily_try(ARRAY[format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', rel),
                                      format('SELECT dbops.p2_detached_check(%s)', relid)],
                                lock_wait, lock_retries, step_err, step_n);
        fail := regexp_replace(step_err, '^P0001: ', '');
        FOR ref IN SELECT * FROM jsonb_array_elements(refs) LOOP
            EXIT WHEN fail IS NOT NULL;
            IF jsonb_array_length(ref -> 'parent_cols') <> 1 OR ref ->> 'on_delete' NOT IN ('n', 'd', 'c', 'a', 'r') THEN
                fail := format('reference %s (on delete %s) not supported by cleanup', ref ->> 'conname', ref ->> 'on_delete');
            ELSIF ref ->> 'on_delete' IN ('a', 'r') THEN   -- NO ACTION / RESTRICT: must be unused
                EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.%I c JOIN %s p ON c.%I = p.%I)',
                               ref ->> 'child_table', rel, ref -> 'child_cols' ->> 0, ref -> 'parent_cols' ->> 0) INTO bad;
                IF bad THEN
                    fail := format('rows of %s still reference %s (%s: no action)', ref ->> 'child_table',
                                   item ->> 'name', ref ->> 'conname');
                END IF;
            END IF;
        END LOOP;
        IF fail IS NOT NULL THEN
            COMMIT;
            errors := errors || jsonb_build_object('table', item ->> 'table', 'partition', item ->> 'name',
                'error', fail || format('; %s stays detached (not dropped), every reference to its rows intact: the next run '
                                        'checks it again; to keep it instead: ALTER TABLE public.%I ATTACH PARTITION public.%I '
                                        'FOR VALUES FROM (%s) TO (%L)', item ->> 'name', item ->> 'table', item ->> 'name',
                                        coalesce(quote_literal(item ->> 'range_start'), 'MINVALUE'), item ->> 'range_end'));
            CONTINUE;
        END IF;
        -- 3. references, in batches, one COMMIT each, no parent locked
        FOR ref IN SELECT * FROM jsonb_array_elements(refs) LOOP
            EXIT WHEN fail IS NOT NULL;
            CONTINUE WHEN ref ->> 'on_delete' IN ('a', 'r');
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
        IF fail IS NOT NULL THEN
            COMMIT;
            errors := errors || jsonb_build_object('table', item ->> 'table', 'partition', item ->> 'name',
                'error', fail || format('; %s stays detached (not dropped), %s reference(s) to its rows cleared so far: '
                                        'the next run finishes it', item ->> 'name', n));
            CONTINUE;
        END IF;
        -- 4. drop, after the identity check again, and forget it, one transaction
        cnt := (SELECT greatest(c.reltuples, 0)::bigint FROM pg_class c WHERE c.oid = relid);
        CALL dbops.p2_daily_try(ARRAY[format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', rel),
                                      format('SELECT dbops.p2_detached_check(%s, false)', relid),
                                      format('DROP TABLE %s', rel),
                                      format('DELETE FROM dbops.p2_detached WHERE rel = %s', relid)],
                                lock_wait, lock_retries, step_err, step_n);
        IF step_err IS NOT NULL THEN
            errors := errors || jsonb_build_object('table', item ->> 'table', 'partition', item ->> 'name',
                                                   'error', 'drop: ' || step_err || ' (detached, references cleared: the next run drops it)');
            CONTINUE;
        END IF;
        dropped := dropped || jsonb_build_object('partition', item ->> 'name', 'table', item ->> 'table',
                                                 'range_end', item -> 'range_end', 'rows_estimate', cnt,
                                                 'references_cleared', n,
                                                 'seconds', round(extract(epoch FROM clock_timestamp() - item_t0)::numeric, 3));
    END LOOP;
    result := jsonb_build_object('dropped', dropped, 'resumed', resumed, 'adopted', adopted, 'forgotten', forgotten,
                                 'ignored', ignored, 'deleted', deleted, 'skipped', skipped, 'errors', errors,
                                 'changed', jsonb_array_length(dropped) + jsonb_array_length(adopted)
                                            + jsonb_array_length(forgotten) > 0
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
