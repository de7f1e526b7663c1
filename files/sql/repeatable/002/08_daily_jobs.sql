-- The two daily jobs pg_cron (or playbooks/maintenance.yml) runs: maintain_partitions() and
-- cleanup_old_data(). Both read public.app_retention_policies.

-- ---------------------------------------------------------------------------------------------
-- Daily job 1: maintain_partitions()
-- ---------------------------------------------------------------------------------------------
-- For every partitioned policy table (and every shadow being backfilled): create the missing
-- partitions from the current one to now + premake, and move rows that landed in the DEFAULT
-- partition into a partition of their own. New partitions are built as plain tables and then
-- ATTACHed (SHARE UPDATE EXCLUSIVE on the parent: reads and writes go on; the DEFAULT partition
-- is briefly locked). One sub-transaction per partition: a lock timeout is reported, the
-- next run retries. Concurrent calls serialize on an advisory lock; a second run creates nothing.
-- Moving rows out of DEFAULT is not a logical change, so the engine's row triggers on the DEFAULT
-- partition must not fire on it (the reverse sync would delete the rows from the old copy, the
-- reference action would SET NULL the transcripts of a moved call). They are disabled on that
-- partition around the one moving statement, in this transaction, then enabled again
-- (ALTER TABLE <default> DISABLE / ENABLE TRIGGER). Why this and nothing the triggers check:
--  * a custom setting the triggers honour (what this did before: dbops.p2_internal_move) can be
--    SET by any session, which then switched integrity off, also after finalize;
--  * the trigger checking the call stack (GET DIAGNOSTICS ... PG_CONTEXT) for this function is
--    not sound: the context is text and an identifier may contain newlines, so any role with
--    TEMP (PUBLIC's default) can create pg_temp."<newline>PL/pgSQL function
--    public.maintain_partitions() line 9 at X<newline>"() and pass even a line-anchored check
--    (tried on PostgreSQL 15); and any trigger a user adds to the table runs "inside" this
--    function during the move;
--  * a per-transaction secret in a table only the engine's owner can read: the application role
--    may own every table (RDS: `scan`), then it can read the secret;
--  * DISABLE TRIGGER needs ownership of the partition, checked by PostgreSQL (an owner can drop
--    the triggers anyway: nobody gains anything); it is transactional and takes SHARE ROW
--    EXCLUSIVE on the DEFAULT partition, so no other session writes to it, or sees the triggers
--    off, before this transaction ends with them back on (the ATTACH below locks that partition
--    ACCESS EXCLUSIVE anyway); the other partitions keep their own (enabled) trigger clones; and
--    the application's writes pay nothing, the trigger functions test no setting at all.
-- Triggers of other schemas (the application's own) fire on the move as before.
CREATE OR REPLACE FUNCTION public.maintain_partitions() RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pol record;
    par regclass;
    base text;
    dflt regclass;
    b timestamptz;
    cur timestamptz;
    pname text;
    cols text;
    n bigint;
    created jsonb := '[]';
    moved jsonb := '[]';
    errors jsonb := '[]';
    checked jsonb := '[]';
    buckets timestamptz [];
    tg_names text [];
    tg_modes text [];
    t0 timestamptz := clock_timestamp();
BEGIN
    PERFORM pg_advisory_xact_lock(80622, 1);
    PERFORM dbops.p2_default_lock_timeout();
    FOR pol IN SELECT p.*, a.attname IS NOT NULL AS col_ok
               FROM public.app_retention_policies p
               LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(format('public.%I', p.table_name))
                                       AND a.attname = p.time_column
               WHERE p.partition_interval IS NOT NULL AND p.enabled ORDER BY p.table_name LOOP
        base := pol.table_name;
        FOR par IN SELECT c.oid::regclass FROM pg_class c
                   WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'p'
                     AND c.relname IN (base, base || '_p') AND NOT c.relispartition LOOP
            checked := checked || to_jsonb(par::text);
            -- future partitions
            cur := dbops.p2_bucket(pol.partition_interval, now());
            FOR i IN 0 .. pol.premake LOOP
                b := dbops.p2_next(pol.partition_interval, cur, i);
                pname := dbops.p2_part_name(base, pol.partition_interval, b);
                CONTINUE WHEN EXISTS (SELECT 1 FROM pg_inherits ih
                                      WHERE ih.inhparent = par AND ih.inhrelid = to_regclass(format('public.%I', pname)));
                CONTINUE WHEN EXISTS (
                    SELECT 1 FROM pg_inherits ih, dbops.p2_part_bounds(ih.inhrelid) pb
                    WHERE ih.inhparent = par AND pb.range_start <= b AND pb.range_end > b);
                BEGIN
                    EXECUTE format('CREATE TABLE public.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                                   'INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMPRESSION)', pname, par);
                    PERFORM dbops.p2_adopt_partition(par, format('public.%I', pname)::regclass);   -- parent's owner, settings
                    EXECUTE format('ALTER TABLE %s ATTACH PARTITION public.%I FOR VALUES FROM (%s) TO (%s)',
                                   par, pname, dbops.p2_lit(b), dbops.p2_lit(dbops.p2_next(pol.partition_interval, b)));
                    created := created || to_jsonb(pname);
                EXCEPTION WHEN OTHERS THEN
                    errors := errors || jsonb_build_object('partition', pname, 'error', SQLERRM);
                END;
            END LOOP;
            -- rows in the DEFAULT partition: give them a partition
            SELECT ih.inhrelid::regclass INTO dflt FROM pg_inherits ih, dbops.p2_part_bounds(ih.inhrelid) pb
            WHERE ih.inhparent = par AND pb.is_default;
            CONTINUE WHEN dflt IS NULL OR NOT dbops.p2_has_rows(dflt);
            SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO cols
            FROM pg_attribute a WHERE a.attrelid = par AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
            -- the buckets are read first: ALTER TABLE refuses a table an open loop query still reads
            EXECUTE format('SELECT array_agg(k ORDER BY k) FROM (SELECT DISTINCT dbops.p2_bucket(%L, %I) AS k FROM %s) s',
                           pol.partition_interval, pol.time_column, dflt) INTO buckets;
            FOREACH b IN ARRAY coalesce(buckets, '{}') LOOP
                pname := dbops.p2_part_name(base, pol.partition_interval, b);
                BEGIN
                    EXECUTE format('CREATE TABLE public.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                                   'INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMPRESSION)', pname, par);
                    PERFORM dbops.p2_adopt_partition(par, format('public.%I', pname)::regclass);   -- parent's owner, settings
                    -- the engine's triggers on DEFAULT off for the move (see above), each back to its mode
                    SELECT coalesce(array_agg(tg.tgname::text ORDER BY tg.tgname), '{}'),
                           coalesce(array_agg(tg.tgenabled::text ORDER BY tg.tgname), '{}')
                    INTO tg_names, tg_modes
                    FROM pg_trigger tg JOIN pg_proc fn ON fn.oid = tg.tgfoid
                    WHERE tg.tgrelid = dflt AND fn.pronamespace = 'dbops'::regnamespace AND tg.tgenabled <> 'D';
                    FOR i IN 1 .. cardinality(tg_names) LOOP
                        EXECUTE format('ALTER TABLE %s DISABLE TRIGGER %I', dflt, tg_names[i]);
                    END LOOP;
                    EXECUTE format('WITH d AS (DELETE FROM %1$s WHERE %2$I >= %3$s AND %2$I < %4$s RETURNING %5$s) '
                                   'INSERT INTO public.%6$I (%5$s) SELECT %5$s FROM d',
                                   dflt, pol.time_column, dbops.p2_lit(b),
                                   dbops.p2_lit(dbops.p2_next(pol.partition_interval, b)), cols, pname);
                    GET DIAGNOSTICS n = ROW_COUNT;
                    FOR i IN 1 .. cardinality(tg_names) LOOP
                        EXECUTE format('ALTER TABLE %s ENABLE %sTRIGGER %I', dflt,
                                       CASE tg_modes[i] WHEN 'A' THEN 'ALWAYS ' WHEN 'R' THEN 'REPLICA ' ELSE '' END,
                                       tg_names[i]);
                    END LOOP;
                    EXECUTE format('ALTER TABLE %s ATTACH PARTITION public.%I FOR VALUES FROM (%s) TO (%s)',
                                   par, pname, dbops.p2_lit(b),
                                   dbops.p2_lit(dbops.p2_next(pol.partition_interval, b)));
                    moved := moved || jsonb_build_object('partition', pname, 'rows', n);
                EXCEPTION WHEN OTHERS THEN
                    errors := errors || jsonb_build_object('partition', pname, 'error', SQLERRM,
                                                           'default_partition', dflt::text);
                END;
            END LOOP;
        END LOOP;
    END LOOP;
    RETURN jsonb_build_object('created', created, 'moved_from_default', moved, 'errors', errors,
                              'tables', checked,
                              'changed', jsonb_array_length(created) + jsonb_array_length(moved) > 0,
                              'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
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
-- A function is one transaction and keeps its locks until it returns, so the work is ordered:
--   A. without any table lock: the referencing rows of every expired partition of a referenced
--      table (transcripts / processing_state -> calls) get the constraint's ON DELETE action
--      (SET NULL), in batches of 5000 keys;
--   B. then, per partition: lock the parent (ONLY) and the partition (the order DROP TABLE uses),
--      apply the action once more to rows referenced since A (none can appear under the lock),
--      DROP TABLE. The ACCESS EXCLUSIVE locks of B last until the end of the run: B is short.
-- One sub-transaction per partition: a lock timeout is reported, the next run retries.
CREATE OR REPLACE FUNCTION public.cleanup_old_data(max_partitions integer DEFAULT 50) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pol record;
    par regclass;
    part record;
    ref record;
    st text;
    keys text [];
    last_k text;
    n bigint;
    cnt bigint;
    ptype text;
    refd boolean;
    todo jsonb := '[]';
    item jsonb;
    failed text [] := '{}';
    nulled jsonb := '{}';
    dropped jsonb := '[]';
    deleted jsonb := '{}';
    skipped jsonb := '[]';
    errors jsonb := '[]';
    t0 timestamptz := clock_timestamp();
BEGIN
    PERFORM pg_advisory_xact_lock(80622, 2);
    PERFORM dbops.p2_default_lock_timeout();
    -- what expired
    FOR pol IN SELECT * FROM public.app_retention_policies WHERE enabled ORDER BY table_name LOOP
        par := to_regclass(format('public.%I', pol.table_name));
        IF par IS NULL THEN
            skipped := skipped || jsonb_build_object('table', pol.table_name, 'reason', 'missing');
            CONTINUE;
        END IF;
        IF pol.partition_interval IS NULL THEN
            IF (SELECT relkind FROM pg_class WHERE oid = par) = 'r' THEN
                EXECUTE format('DELETE FROM %s WHERE %I < $1', par, pol.time_column) USING now() - pol.retention;
                GET DIAGNOSTICS n = ROW_COUNT;
                deleted := deleted || jsonb_build_object(pol.table_name, n);
            END IF;
            CONTINUE;
        END IF;
        IF (SELECT relkind FROM pg_class WHERE oid = par) <> 'p' THEN
            skipped := skipped || jsonb_build_object('table', pol.table_name, 'reason', 'not partitioned yet');
            CONTINUE;
        END IF;
        SELECT s.step INTO st FROM dbops.p2_state s WHERE s.table_name = pol.table_name;
        IF st IS NOT NULL AND st <> 'finalized' THEN
            skipped := skipped || jsonb_build_object('table', pol.table_name,
                                                     'reason', format('conversion in progress (step %s)', st));
            CONTINUE;
        END IF;
        SELECT todo || coalesce(jsonb_agg(jsonb_build_object(
                   'table', pol.table_name, 'parent', par::oid, 'rel', x.rel::oid, 'name', x.relname,
                   'range_end', x.range_end) ORDER BY x.range_end), '[]')
        INTO todo
        FROM (SELECT ih.inhrelid::regclass AS rel, c.relname, pb.range_end
              FROM pg_inherits ih JOIN pg_class c ON c.oid = ih.inhrelid,
                   dbops.p2_part_bounds(ih.inhrelid) pb
              WHERE ih.inhparent = par AND NOT pb.is_default AND pb.range_end <= now() - pol.retention
              ORDER BY pb.range_end LIMIT max_partitions) x;
    END LOOP;

    -- A. referencing rows, in batches, no table lock
    FOR item IN SELECT * FROM jsonb_array_elements(todo) LOOP
        BEGIN
            n := 0;
            FOR ref IN SELECT f.* FROM dbops.p2_refs f WHERE f.parent_table = item ->> 'table'
                       AND to_regclass(format('public.%I', f.child_table)) IS NOT NULL LOOP
                IF cardinality(ref.parent_cols) <> 1 OR ref.on_delete NOT IN ('n', 'd', 'c', 'a', 'r') THEN
                    RAISE EXCEPTION 'reference % (on delete %) not supported by cleanup', ref.conname, ref.on_delete;
                END IF;
                CONTINUE WHEN ref.on_delete IN ('a', 'r');   -- NO ACTION / RESTRICT: checked in B
                SELECT format_type(a.atttypid, a.atttypmod) INTO ptype FROM pg_attribute a
                WHERE a.attrelid = (item ->> 'rel')::oid AND a.attname = ref.parent_cols[1];
                last_k := NULL;
                LOOP
                    EXECUTE format('SELECT array_agg(k::text ORDER BY k), max(k)::text FROM '
                                   '(SELECT %1$I AS k FROM %2$s %3$s ORDER BY %1$I LIMIT 5000) s',
                                   ref.parent_cols[1], (item ->> 'rel')::oid::regclass,
                                   CASE WHEN last_k IS NULL THEN ''
                                        ELSE format('WHERE %I > $1::%s', ref.parent_cols[1], ptype) END)
                        INTO keys, last_k USING last_k;
                    EXIT WHEN keys IS NULL;
                    EXECUTE format('%s public.%I c %s WHERE c.%I = ANY ($1::%s[])',
                                   CASE WHEN ref.on_delete = 'c' THEN 'DELETE FROM' ELSE 'UPDATE' END,
                                   ref.child_table,
                                   CASE ref.on_delete WHEN 'n' THEN format('SET %I = NULL', ref.child_cols[1])
                                                      WHEN 'd' THEN format('SET %I = DEFAULT', ref.child_cols[1])
                                                      ELSE '' END,
                                   ref.child_cols[1], ptype) USING keys;
                    GET DIAGNOSTICS cnt = ROW_COUNT;
                    n := n + cnt;
                END LOOP;
            END LOOP;
            nulled := nulled || jsonb_build_object(item ->> 'name', n);
        EXCEPTION WHEN OTHERS THEN
            failed := failed || (item ->> 'name');
            errors := errors || jsonb_build_object('partition', item ->> 'name', 'error', SQLERRM);
        END;
    END LOOP;

    -- B. lock, last references, drop
    FOR item IN SELECT * FROM jsonb_array_elements(todo) LOOP
        CONTINUE WHEN (item ->> 'name') = ANY (failed);
        BEGIN
            n := coalesce((nulled ->> (item ->> 'name'))::bigint, 0);
            EXECUTE format('LOCK TABLE ONLY %s IN ACCESS EXCLUSIVE MODE', (item ->> 'parent')::oid::regclass);
            EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', (item ->> 'rel')::oid::regclass);
            FOR ref IN SELECT f.* FROM dbops.p2_refs f WHERE f.parent_table = item ->> 'table'
                       AND to_regclass(format('public.%I', f.child_table)) IS NOT NULL LOOP
                IF ref.on_delete IN ('a', 'r') THEN
                    EXECUTE format('SELECT EXISTS (SELECT 1 FROM public.%I c JOIN %s p ON c.%I = p.%I)',
                                   ref.child_table, (item ->> 'rel')::oid::regclass,
                                   ref.child_cols[1], ref.parent_cols[1]) INTO refd;
                    IF refd THEN
                        RAISE EXCEPTION 'rows of % still reference % (%: no action)', ref.child_table,
                            item ->> 'name', ref.conname;
                    END IF;
                    CONTINUE;
                END IF;
                EXECUTE format('%s public.%I c %s WHERE c.%I IN (SELECT p.%I FROM %s p)',
                               CASE WHEN ref.on_delete = 'c' THEN 'DELETE FROM' ELSE 'UPDATE' END,
                               ref.child_table,
                               CASE ref.on_delete WHEN 'n' THEN format('SET %I = NULL', ref.child_cols[1])
                                                  WHEN 'd' THEN format('SET %I = DEFAULT', ref.child_cols[1])
                                                  ELSE '' END,
                               ref.child_cols[1], ref.parent_cols[1], (item ->> 'rel')::oid::regclass);
                GET DIAGNOSTICS cnt = ROW_COUNT;
                n := n + cnt;
            END LOOP;
            SELECT greatest(c.reltuples, 0)::bigint INTO cnt FROM pg_class c WHERE c.oid = (item ->> 'rel')::oid;
            EXECUTE format('DROP TABLE %s', (item ->> 'rel')::oid::regclass);
            dropped := dropped || jsonb_build_object('partition', item ->> 'name', 'table', item ->> 'table',
                                                     'range_end', item -> 'range_end', 'rows_estimate', cnt,
                                                     'references_cleared', n);
        EXCEPTION WHEN OTHERS THEN
            errors := errors || jsonb_build_object('partition', item ->> 'name', 'error', SQLERRM);
        END;
    END LOOP;
    RETURN jsonb_build_object('dropped', dropped, 'deleted', deleted, 'skipped', skipped, 'errors', errors,
                              'changed', jsonb_array_length(dropped) > 0
                                         OR EXISTS (SELECT 1 FROM jsonb_each_text(deleted) e WHERE e.value::bigint > 0),
                              'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
END
$$;
