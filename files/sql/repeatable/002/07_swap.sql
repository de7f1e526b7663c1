-- Phase 2 engine, steps 4-5: swap, rollback of a swap, finalize, abort, status.

-- ---------------------------------------------------------------------------------------------
-- Views that read a table follow its OID through a rename: re-point them by name
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dbops.p2_dependent_views(rel regclass) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'view', format('%I.%I', n.nspname, v.relname),
        'options', coalesce(array_to_string(v.reloptions, ', '), ''),
        'def', rtrim(pg_get_viewdef(v.oid), E'; \n'))), '[]')
    FROM (SELECT DISTINCT rw.ev_class FROM pg_depend d JOIN pg_rewrite rw ON rw.oid = d.objid
          WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
            AND d.refobjid = rel AND rw.ev_class <> rel) x
    JOIN pg_class v ON v.oid = x.ev_class AND v.relkind = 'v'
    JOIN pg_namespace n ON n.oid = v.relnamespace
$$;

CREATE OR REPLACE FUNCTION dbops.p2_repoint_views(views jsonb) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v jsonb;
    done jsonb := '[]';
BEGIN
    FOR v IN SELECT * FROM jsonb_array_elements(views) LOOP
        EXECUTE format('CREATE OR REPLACE VIEW %s %s AS %s', v ->> 'view',
                       CASE WHEN v ->> 'options' <> '' THEN 'WITH (' || (v ->> 'options') || ')' ELSE '' END,
                       v ->> 'def');
        done := done || to_jsonb(v ->> 'view');
    END LOOP;
    RETURN done;
END
$$;

-- ALTER TABLE ... <state> TRIGGER for a pg_trigger.tgenabled value.
CREATE OR REPLACE FUNCTION dbops.p2_trigger_state(tgenabled text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE tgenabled WHEN 'D' THEN 'DISABLE' WHEN 'R' THEN 'ENABLE REPLICA' WHEN 'A' THEN 'ENABLE ALWAYS' ELSE 'ENABLE' END
$$;

-- ---------------------------------------------------------------------------------------------
-- Step 4: swap (one short transaction)
-- ---------------------------------------------------------------------------------------------
-- ACCESS EXCLUSIVE on source and shadow, then on the referencing tables (the caller's
-- lock_timeout, 500 ms when none; Ansible
-- retries on lock_not_available), exact recount (recount => false skips it on huge tables),
-- renames (indexes, then tables), sequences, reverse sync trigger, unique-key guards, copied user
-- triggers, dependent views, references. Nothing is copied under the lock.
CREATE OR REPLACE FUNCTION dbops.p2_swap(tbl text, recount boolean DEFAULT true) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st dbops.p2_state;
    o record;
    g jsonb;
    t record;
    n_src bigint;
    n_dst bigint;
    views jsonb;
    utrig jsonb := '[]';
    refs jsonb;
    t0 timestamptz;
    t_lock timestamptz;
    pkcols text;
    props jsonb;
    pubwarn jsonb;
    schema_pubs oid[] := '{}';
    older text;
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl FOR UPDATE;
    IF FOUND AND st.step IN ('swapped', 'finalized') THEN
        RETURN jsonb_build_object('status', 'already swapped', 'changed', false, 'table', tbl, 'step', st.step,
                                  'swapped_at', st.swapped_at);
    END IF;
    IF NOT FOUND OR st.step <> 'verified' THEN
        RAISE EXCEPTION 'p2_swap: % must be verified first (step %)', tbl, coalesce(st.step, 'none')
            USING HINT = 'SELECT dbops.p2_verify(...) right before the swap.';
    END IF;
    -- snapshots older than the backfill's last batch do not see every copied row (issue 18)
    SELECT string_agg(format('pid %s (%s, %s)', l.pid, coalesce(nullif(a.application_name, ''), 'no application name'),
                             coalesce(a.state, 'state hidden')), ', ' ORDER BY l.pid)
    INTO older
    FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'virtualxid' AND l.granted AND l.virtualxid = ANY (st.backfill_vxids) AND l.pid <> pg_backend_pid()
      AND (a.pid IS NULL OR a.backend_xmin IS NOT NULL);
    IF older IS NOT NULL THEN
        RAISE lock_not_available USING
            MESSAGE = format('p2_swap: %s is waiting for transactions that began before its backfill finished: %s', tbl, older),
            DETAIL = 'A snapshot older than the last backfill batch does not see every copied row; after the swap such a '
                     'transaction would read the partitioned table without them (an online index build waits the same way).',
            HINT = 'Retried like a lock wait; end those transactions if they do not finish.';
    END IF;
    PERFORM dbops.p2_default_lock_timeout();
    t0 := clock_timestamp();
    -- table, shadow, then the tables referencing it (their foreign keys become triggers), in one LOCK;
    -- a failed attempt names its holders, a blocking autovacuum is let go (dbops.p2_lock, 10_locks.sql)
    PERFORM dbops.p2_lock(format('p2_swap(%s)', tbl), ARRAY[format('public.%I', tbl), format('public.%I', st.shadow_name)]::regclass []
                                                    || dbops.p2_child_tables(tbl)::regclass []);
    t_lock := clock_timestamp();
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = format('public.%I', tbl)::regclass
                   AND tgname = 'p2_sync_fwd' AND tgenabled IN ('O', 'A')) THEN
        RAISE EXCEPTION 'p2_swap: the sync trigger of % is missing or disabled: the shadow cannot be trusted', tbl;
    END IF;
    -- DDL since the verification (issue 18 item 6): the swap would drop a column from the live table
    PERFORM dbops.p2_require_same_columns('p2_swap', format('public.%I', tbl)::regclass,
                                          format('public.%I', st.shadow_name)::regclass);
    IF recount THEN
        EXECUTE format('SELECT (SELECT count(*) FROM public.%I), (SELECT count(*) FROM public.%I)', tbl, st.shadow_name)
            INTO n_src, n_dst;
        IF n_src <> n_dst THEN
            RAISE EXCEPTION 'p2_swap: % has % rows, % has %: not swapped', tbl, n_src, st.shadow_name, n_dst;
        END IF;
    END IF;
    views := dbops.p2_dependent_views(format('public.%I', tbl)::regclass);
    FOR t IN SELECT tg.tgname, pg_get_triggerdef(tg.oid) AS def, tg.tgenabled FROM pg_trigger tg
             JOIN pg_proc p ON p.oid = tg.tgfoid
             WHERE tg.tgrelid = format('public.%I', tbl)::regclass AND NOT tg.tgisinternal
               AND p.pronamespace <> 'dbops'::regnamespace
    LOOP
        utrig := utrig || jsonb_build_object('name', t.tgname, 'def', t.def, 'enabled', t.tgenabled);
    END LOOP;
    -- publications: the partitioned table is not in the old table's publications (FOR ALL TABLES /
    -- TABLES IN SCHEMA ones publish it, through its partitions unless publish_via_partition_root).
    -- Publications of a schema (pg_publication_namespace) exist from PostgreSQL 15 (capability map).
    IF (dbops.p2_capabilities() ->> 'publication_schemas')::boolean THEN
        EXECUTE 'SELECT coalesce(array_agg(pnpubid), ''{}'') FROM pg_publication_namespace '
                'WHERE pnnspid = ''public''::regnamespace' INTO schema_pubs;
    END IF;
    SELECT coalesce(jsonb_agg(format('public.%I is in publication %s (%s): %s', tbl, pb.pubname,
                                     CASE WHEN pb.puballtables THEN 'FOR ALL TABLES'
                                          WHEN pr.prrelid IS NOT NULL THEN 'FOR TABLE'
                                          ELSE 'FOR TABLES IN SCHEMA' END,
                                     CASE WHEN pr.prrelid IS NOT NULL
                                          THEN format('add the partitioned table after the swap (ALTER PUBLICATION %I ADD TABLE public.%I) '
                                                      'and refresh the subscriptions', pb.pubname, tbl)
                                          ELSE 'its changes are now published per partition unless publish_via_partition_root = true; '
                                               'check the subscribers' END)), '[]')
    INTO pubwarn
    FROM pg_publication pb
    LEFT JOIN pg_publication_rel pr ON pr.prpubid = pb.oid AND pr.prrelid = format('public.%I', tbl)::regclass
    WHERE pb.puballtables OR pr.prrelid IS NOT NULL
       OR pb.oid = ANY (schema_pubs);
    FOR g IN SELECT * FROM jsonb_array_elements(pubwarn) LOOP
        RAISE WARNING 'p2_swap: %', g #>> '{}';
    END LOOP;

    -- owner (parent, partitions), privileges as of now (grants and revokes since prepare), comments,
    -- storage / autovacuum settings, replica identity: catalog only, nothing done when unchanged
    props := dbops.p2_match_props(tbl, format('public.%I', tbl)::regclass, format('public.%I', st.shadow_name)::regclass);
    EXECUTE format('DROP TRIGGER p2_sync_fwd ON public.%I', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS p2_block_truncate ON public.%I', tbl);
    FOR o IN SELECT * FROM dbops.p2_objects WHERE table_name = tbl LOOP
        EXECUTE format('ALTER INDEX public.%I RENAME TO %I', o.orig_name, o.twin_name);
    END LOOP;
    EXECUTE format('ALTER TABLE public.%I RENAME TO %I', tbl, st.twin_name);
    FOR o IN SELECT * FROM dbops.p2_objects WHERE table_name = tbl LOOP
        EXECUTE format('ALTER INDEX public.%I RENAME TO %I', o.shadow_name, o.orig_name);
    END LOOP;
    EXECUTE format('ALTER TABLE public.%I RENAME TO %I', st.shadow_name, tbl);

    FOR g IN SELECT * FROM jsonb_array_elements(st.sequences) LOOP
        EXECUTE format('ALTER SEQUENCE %s OWNED BY public.%I.%I', g ->> 'seq', tbl, g ->> 'col');
    END LOOP;

    EXECUTE format('CREATE TRIGGER p2_sync_rev AFTER INSERT OR UPDATE OR DELETE ON public.%I '
                   'FOR EACH ROW EXECUTE FUNCTION dbops.%I()', tbl, st.rev_function);
    EXECUTE format('CREATE TRIGGER p2_block_truncate BEFORE TRUNCATE ON public.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION dbops.p2_block_truncate()', tbl);
    SELECT string_agg(quote_ident(c), ',') INTO pkcols
    FROM unnest(ARRAY[st.pk_col, st.key_col]) c;
    FOR g IN SELECT * FROM jsonb_array_elements(st.guards) LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF %s ON public.%I FOR EACH ROW '
                       'EXECUTE FUNCTION dbops.p2_guard_unique(%L, %L, %L, %L)',
                       dbops.p2_name('p2_guard_' || (g ->> 'name'), ''),
                       (SELECT string_agg(quote_ident(c), ', ') FROM jsonb_array_elements_text(g -> 'cols') c),
                       tbl, g ->> 'name', format('public.%I', tbl),
                       (SELECT string_agg(c, ',') FROM jsonb_array_elements_text(g -> 'cols') c),
                       array_to_string(ARRAY[st.pk_col, st.key_col], ','));
    END LOOP;
    -- user triggers: same definition on the partitioned table, disabled on the old one (it only
    -- receives the reverse sync; firing them twice would double their effects)
    FOR g IN SELECT * FROM jsonb_array_elements(utrig) LOOP
        EXECUTE g ->> 'def';
        IF g ->> 'enabled' <> 'O' THEN   -- same firing state as on the old table (disabled, replica, always)
            EXECUTE format('ALTER TABLE public.%I %s TRIGGER %I', tbl, dbops.p2_trigger_state(g ->> 'enabled'), g ->> 'name');
        END IF;
        EXECUTE format('ALTER TABLE public.%I DISABLE TRIGGER %I', st.twin_name, g ->> 'name');
    END LOOP;
    views := dbops.p2_repoint_views(views);
    refs := dbops.p2_apply_refs();

    UPDATE dbops.p2_state SET step = 'swapped', swapped_at = now(), user_triggers = utrig, updated_at = now()
    WHERE table_name = tbl;
    PERFORM dbops.p2_truncate_guards(tbl);   -- each partition: the reverse sync must see every change
    PERFORM dbops.p2_sync_functions(tbl);   -- the reverse function, for the columns both share now
    RETURN dbops.p2_log(tbl, 'swap', jsonb_build_object(
        'status', 'swapped', 'changed', true, 'table', tbl, 'old_table', st.twin_name,
        'rows', n_src, 'recount', recount, 'views_repointed', views, 'references', refs,
        'guards', st.guards, 'user_triggers', utrig, 'properties', props, 'warnings', pubwarn,
        'lock_wait_ms', round(extract(epoch FROM t_lock - t0)::numeric * 1000, 1),
        'locked_ms', round(extract(epoch FROM clock_timestamp() - t_lock)::numeric * 1000, 1)));
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Rollback of a swap (one short transaction): the old table, kept equal by the reverse trigger,
-- becomes public.<tbl> again; the partitioned one goes back to public.<tbl>_p with the forward
-- trigger, so it stays in sync (step 'backfilled': verify + swap again, or p2_abort to drop it).
-- Foreign keys come back NOT VALID (instant); run dbops.p2_validate_refs() afterwards.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dbops.p2_rollback(tbl text, recount boolean DEFAULT true) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st dbops.p2_state;
    o record;
    g jsonb;
    t record;
    n_new bigint;
    n_old bigint;
    views jsonb;
    refs jsonb;
    t0 timestamptz;
    t_lock timestamptz;
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl FOR UPDATE;
    IF NOT FOUND OR st.step IN ('shadow_created', 'prepared', 'backfilling', 'backfilled', 'verified') THEN
        RETURN jsonb_build_object('status', 'not swapped', 'changed', false, 'table', tbl, 'step', coalesce(st.step, 'none'),
                                  'hint', 'nothing to roll back; dbops.p2_abort(table) drops the shadow');
    END IF;
    IF st.step = 'finalized' THEN
        RAISE EXCEPTION 'p2_rollback: % is finalized: the old table was dropped', tbl
            USING HINT = 'Restore from the backup taken before Phase 2.';
    END IF;
    PERFORM dbops.p2_default_lock_timeout();
    t0 := clock_timestamp();
    -- table, old copy, then the tables referencing it (their references change form again), in one
    -- LOCK; a failed attempt names its holders, a blocking autovacuum is let go (dbops.p2_lock)
    PERFORM dbops.p2_lock(format('p2_rollback(%s)', tbl), ARRAY[format('public.%I', tbl), format('public.%I', st.twin_name)]::regclass []
                                                        || dbops.p2_child_tables(tbl)::regclass []);
    t_lock := clock_timestamp();
    IF recount THEN
        EXECUTE format('SELECT (SELECT count(*) FROM public.%I), (SELECT count(*) FROM public.%I)', tbl, st.twin_name)
            INTO n_new, n_old;
        IF n_new <> n_old THEN
            RAISE EXCEPTION 'p2_rollback: % has % rows, % has %: not rolled back', tbl, n_new, st.twin_name, n_old
                USING HINT = 'Run dbops.p2_verify to see the differing ranges.';
        END IF;
    END IF;
    views := dbops.p2_dependent_views(format('public.%I', tbl)::regclass);
    PERFORM dbops.p2_copy_grants(format('public.%I', tbl)::regclass, format('public.%I', st.twin_name)::regclass);
    FOR g IN SELECT * FROM jsonb_array_elements(st.user_triggers) LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON public.%I', g ->> 'name', tbl);
        EXECUTE format('ALTER TABLE public.%I %s TRIGGER %I', st.twin_name,
                       dbops.p2_trigger_state(coalesce(g ->> 'enabled', 'O')), g ->> 'name');
    END LOOP;
    FOR t IN SELECT tg.tgname FROM pg_trigger tg
             WHERE tg.tgrelid = format('public.%I', tbl)::regclass AND tg.tgparentid = 0
               AND (tg.tgname IN ('p2_sync_rev', 'p2_block_truncate')
                    OR tg.tgfoid = 'dbops.p2_guard_unique()'::regprocedure)
    LOOP
        EXECUTE format('DROP TRIGGER %I ON public.%I', t.tgname, tbl);
    END LOOP;
    FOR o IN SELECT * FROM dbops.p2_objects WHERE table_name = tbl LOOP
        EXECUTE format('ALTER INDEX public.%I RENAME TO %I', o.orig_name, o.shadow_name);
    END LOOP;
    EXECUTE format('ALTER TABLE public.%I RENAME TO %I', tbl, st.shadow_name);
    FOR o IN SELECT * FROM dbops.p2_objects WHERE table_name = tbl LOOP
        EXECUTE format('ALTER INDEX public.%I RENAME TO %I', o.twin_name, o.orig_name);
    END LOOP;
    EXECUTE format('ALTER TABLE public.%I RENAME TO %I', st.twin_name, tbl);
    FOR g IN SELECT * FROM jsonb_array_elements(st.sequences) LOOP
        EXECUTE format('ALTER SEQUENCE %s OWNED BY public.%I.%I', g ->> 'seq', tbl, g ->> 'col');
    END LOOP;
    EXECUTE format('CREATE TRIGGER p2_sync_fwd AFTER INSERT OR UPDATE OR DELETE ON public.%I '
                   'FOR EACH ROW EXECUTE FUNCTION dbops.%I()', tbl, st.fwd_function);
    EXECUTE format('CREATE TRIGGER p2_block_truncate BEFORE TRUNCATE ON public.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION dbops.p2_block_truncate()', tbl);
    views := dbops.p2_repoint_views(views);
    refs := dbops.p2_apply_refs();
    UPDATE dbops.p2_state SET step = 'backfilled', rolled_back_at = now(), swapped_at = NULL,
           verified_at = NULL, verify_result = NULL, user_triggers = '[]', updated_at = now()
    WHERE table_name = tbl;
    PERFORM dbops.p2_truncate_guards(tbl);
    PERFORM dbops.p2_sync_functions(tbl);   -- the forward function, for the columns both share now
    RETURN dbops.p2_log(tbl, 'rollback', jsonb_build_object(
        'status', 'rolled back', 'changed', true, 'table', tbl, 'partitioned_table_kept_as', st.shadow_name,
        'rows', n_old, 'views_repointed', views, 'references', refs,
        'next', 'SELECT dbops.p2_validate_refs();  -- validates the foreign keys re-added NOT VALID',
        'lock_wait_ms', round(extract(epoch FROM t_lock - t0)::numeric * 1000, 1),
        'locked_ms', round(extract(epoch FROM clock_timestamp() - t_lock)::numeric * 1000, 1)));
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Before a rollback drops the partitioned copy: both copies must hold the same rows and values
-- ---------------------------------------------------------------------------------------------
-- Swapped: the old plain copy (what the rollback gives back) vs the partitioned table; rolled back
-- (step backfilled / verified with rolled_back_at): the restored table vs <tbl>_p, about to be
-- dropped by p2_abort. Counts and checksums per range over every column the two share now (Phase
-- 3's columns included), in one snapshot, whatever the size; no lock beyond reads (call it outside
-- the swap's exclusive lock). Raises, naming the differing ranges, when they differ or when the
-- copy to be dropped has columns the kept one lacks. Nothing is changed either way.
CREATE OR REPLACE FUNCTION dbops.p2_rollback_check(tbl text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st dbops.p2_state;
    kept text;
    dropped text;
    res jsonb;
    ranges text;
    n integer;
    t0 timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF NOT FOUND OR st.step = 'finalized' OR (st.step <> 'swapped' AND st.rolled_back_at IS NULL) THEN
        RETURN jsonb_build_object('status', 'nothing to check', 'changed', false, 'table', tbl,
                                  'step', coalesce(st.step, 'none'));
    END IF;
    IF st.step = 'swapped' THEN
        kept := st.twin_name;
        dropped := tbl;
    ELSE
        kept := tbl;
        dropped := st.shadow_name;
    END IF;
    IF to_regclass(format('public.%I', dropped)) IS NULL THEN
        RETURN jsonb_build_object('status', 'nothing to check', 'changed', false, 'table', tbl, 'step', st.step);
    END IF;
    res := dbops.p2_compare(tbl, kept, dropped);
    res := res || jsonb_build_object('table', tbl, 'kept', kept, 'dropped_later', dropped,
                                     'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
    n := jsonb_array_length(res -> 'mismatches');
    IF n > 0 OR jsonb_array_length(res -> 'columns_only_in_target') > 0 THEN
        PERFORM dbops.p2_log(tbl, 'rollback check failed', res);
        SELECT string_agg(format('[%s, %s): %s rows in %s / %s rows in %s%s', m ->> 'range_start', m ->> 'range_end',
                                 m ->> 'source_rows', kept, m ->> 'target_rows', dropped,
                                 CASE WHEN m ->> 'source_rows' = m ->> 'target_rows' THEN ', values differ' ELSE '' END),
                          '; ' ORDER BY o)
        INTO ranges
        FROM jsonb_array_elements(res -> 'mismatches') WITH ORDINALITY AS x (m, o)
        WHERE o <= 20;
        RAISE EXCEPTION 'rollback of % refused: public.% and public.% differ in % range(s)%s%s',
            tbl, kept, dropped, n, CASE WHEN n > 0 THEN ': ' || ranges || CASE WHEN n > 20 THEN '; ...' ELSE '' END ELSE '' END,
            CASE WHEN jsonb_array_length(res -> 'columns_only_in_target') > 0
                 THEN format('; columns only in %s (their values would be lost): %s', dropped,
                             (SELECT string_agg(c, ', ') FROM jsonb_array_elements_text(res -> 'columns_only_in_target') c))
                 ELSE '' END
            USING DETAIL = res::text,
                  HINT = format('Nothing was changed or dropped. public.%s still holds what public.%s lacks: '
                                'find the rows of these ranges, bring public.%s up to date, then run the rollback again.',
                                dropped, kept, kept);
    END IF;
    res := res || jsonb_build_object('status', 'ok', 'changed', false);
    RETURN dbops.p2_log(tbl, 'rollback check', res);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Step 5: finalize (after the explicit confirmation Ansible asks for)
-- ---------------------------------------------------------------------------------------------
-- Re-verifies (one snapshot, no lock beyond reads), then drops the reverse trigger and the old
-- table. Rollback is impossible afterwards.
CREATE OR REPLACE FUNCTION dbops.p2_finalize(tbl text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st dbops.p2_state;
    v jsonb;
    fk record;
    size_freed bigint;
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF FOUND AND st.step = 'finalized' THEN
        RETURN jsonb_build_object('status', 'already finalized', 'changed', false, 'table', tbl,
                                  'finalized_at', st.finalized_at);
    END IF;
    IF NOT FOUND OR st.step <> 'swapped' THEN
        RAISE EXCEPTION 'p2_finalize: % is not swapped (step %)', tbl, coalesce(st.step, 'none');
    END IF;
    v := dbops.p2_verify(tbl);
    size_freed := pg_total_relation_size(format('public.%I', st.twin_name)::regclass);
    PERFORM dbops.p2_default_lock_timeout();
    -- every lock first, holding none yet: the table, its old copy and the old copies referencing it;
    -- a failed attempt names its holders, a blocking autovacuum is let go (dbops.p2_lock)
    PERFORM dbops.p2_lock(format('p2_finalize(%s)', tbl), ARRAY[format('public.%I', tbl), format('public.%I', st.twin_name)]::regclass []
        || ARRAY(SELECT DISTINCT c.conrelid::regclass FROM pg_constraint c, dbops.p2_state s
                 WHERE c.contype = 'f' AND c.confrelid = format('public.%I', st.twin_name)::regclass
                   AND c.conrelid <> c.confrelid AND s.step = 'swapped'
                   AND to_regclass(format('public.%I', s.twin_name)) = c.conrelid ORDER BY 1));
    EXECUTE format('DROP TRIGGER IF EXISTS p2_sync_rev ON public.%I', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS p2_block_truncate ON public.%I', tbl);
    -- foreign keys between old tables (one converted before the other) go with them
    FOR fk IN SELECT c.conname, c.conrelid::regclass AS rel FROM pg_constraint c
              WHERE c.contype = 'f' AND c.confrelid = format('public.%I', st.twin_name)::regclass
                AND c.conrelid <> c.confrelid
    LOOP
        IF NOT EXISTS (SELECT 1 FROM dbops.p2_state s WHERE s.step = 'swapped'
                       AND to_regclass(format('public.%I', s.twin_name)) = fk.rel) THEN
            RAISE EXCEPTION 'p2_finalize: % still references %', fk.rel, st.twin_name;
        END IF;
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.rel, fk.conname);
    END LOOP;
    -- its TOAST table is not locked by LOCK TABLE: an autovacuum of it is let go here
    PERFORM dbops.p2_lock(format('p2_finalize(%s)', tbl), ARRAY[format('public.%I', st.twin_name)]::regclass [],
                          stmt => format('DROP TABLE public.%I', st.twin_name));
    EXECUTE format('DROP FUNCTION IF EXISTS dbops.%I()', st.fwd_function);
    EXECUTE format('DROP FUNCTION IF EXISTS dbops.%I()', st.rev_function);
    UPDATE dbops.p2_state SET step = 'finalized', finalized_at = now(), updated_at = now() WHERE table_name = tbl;
    -- a table still referenced through triggers keeps its TRUNCATE guards (a native foreign key
    -- refuses TRUNCATE of the referenced table); the others' partitions lose theirs
    PERFORM dbops.p2_truncate_guards(tbl);
    RETURN dbops.p2_log(tbl, 'finalize', jsonb_build_object(
        'status', 'finalized', 'changed', true, 'table', tbl, 'dropped', st.twin_name, 'bytes_freed', size_freed,
        'rows', v -> 'target_rows', 'null_key_rows', v -> 'null_key_rows'));
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Cancel a conversion before the swap (or after a rollback): drop the trigger and the shadow.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dbops.p2_abort(tbl text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st dbops.p2_state;
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('status', 'nothing to abort', 'changed', false, 'table', tbl);
    END IF;
    IF st.step IN ('swapped', 'finalized') THEN
        RAISE EXCEPTION 'p2_abort: % is %: use dbops.p2_rollback first', tbl, st.step;
    END IF;
    -- after a rollback the partitioned copy was live: compare before dropping it (raises on a difference)
    PERFORM dbops.p2_rollback_check(tbl);
    PERFORM dbops.p2_default_lock_timeout();
    -- the table and its shadow first, holding none yet; a failed attempt names its holders (dbops.p2_lock)
    PERFORM dbops.p2_lock(format('p2_abort(%s)', tbl),
                          ARRAY(SELECT r FROM unnest(ARRAY[to_regclass(format('public.%I', tbl)),
                                                           to_regclass(format('public.%I', st.shadow_name))]) r
                                WHERE r IS NOT NULL));
    EXECUTE format('DROP TRIGGER IF EXISTS p2_sync_fwd ON public.%I', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS p2_block_truncate ON public.%I', tbl);
    EXECUTE format('DROP TABLE IF EXISTS public.%I', st.shadow_name);
    EXECUTE format('DROP FUNCTION IF EXISTS dbops.%I()', st.fwd_function);
    EXECUTE format('DROP FUNCTION IF EXISTS dbops.%I()', st.rev_function);
    DELETE FROM dbops.p2_objects WHERE table_name = tbl;
    DELETE FROM dbops.p2_state WHERE table_name = tbl;
    PERFORM dbops.p2_truncate_guards(tbl);
    RETURN dbops.p2_log(tbl, 'abort', jsonb_build_object('status', 'aborted', 'changed', true, 'table', tbl,
                                                         'dropped', st.shadow_name, 'was', st.step));
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Status: one row per partitioned policy table
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dbops.p2_status()
RETURNS TABLE (
    table_name text, step text, pct numeric, rows_done bigint, rows_total bigint, rows_per_second numeric,
    eta interval, null_key_rows bigint, lock_waits bigint, updated_at timestamptz, detail jsonb
)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.table_name,
           coalesce(s.step, CASE WHEN c.relkind = 'p' THEN 'partitioned (outside the engine)' ELSE 'not started' END),
           CASE WHEN s.step IN ('backfilled', 'verified', 'swapped', 'finalized') THEN 100.0
                WHEN coalesce(s.rows_total, 0) > 0 THEN round(100.0 * least(s.rows_done, s.rows_total) / s.rows_total, 1)
                WHEN s.step IS NOT NULL THEN 0.0 END,
           s.rows_done, s.rows_total,
           CASE WHEN s.backfill_seconds > 0 THEN round(s.rows_done / s.backfill_seconds) END,
           CASE WHEN s.step = 'backfilling' AND s.backfill_seconds > 0 AND s.rows_done > 0 AND s.rows_total > s.rows_done
                THEN make_interval(secs => (s.rows_total - s.rows_done) * s.backfill_seconds / s.rows_done) END,
           s.null_key_rows, s.lock_waits, s.updated_at,
           jsonb_strip_nulls(jsonb_build_object(
               'unit', coalesce(s.unit, p.partition_interval), 'shadow', s.shadow_name, 'last_key', s.last_key,
               'partitions', (SELECT count(*) FROM pg_inherits i
                              WHERE i.inhparent = to_regclass(format('public.%I',
                                  CASE WHEN s.step IN ('swapped', 'finalized') OR s.step IS NULL THEN p.table_name
                                       ELSE s.shadow_name END))),
               'old_table', CASE WHEN s.step = 'swapped' THEN s.twin_name END,
               'guards', s.guards, 'warnings', s.warnings, 'verified_at', s.verified_at,
               'swapped_at', s.swapped_at, 'finalized_at', s.finalized_at, 'rolled_back_at', s.rolled_back_at,
               'foreign_keys_not_valid', (
                   SELECT jsonb_agg(k.conname) FROM pg_constraint k JOIN dbops.p2_refs f ON f.conname = k.conname
                   WHERE k.contype = 'f' AND NOT k.convalidated
                     AND p.table_name IN (f.child_table, f.parent_table))))
    FROM public.app_retention_policies p
    LEFT JOIN dbops.p2_state s ON s.table_name = p.table_name
    LEFT JOIN pg_class c ON c.oid = to_regclass(format('public.%I', p.table_name))
    WHERE p.partition_interval IS NOT NULL
    ORDER BY p.table_name
$$;
