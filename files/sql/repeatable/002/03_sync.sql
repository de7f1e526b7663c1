-- Phase 2 engine: the per-table sync trigger functions. They are generated (not generic) so each
-- row change runs static SQL with the list of the columns both tables share: no per-row dynamic
-- SQL on the application's write path. Each function checks per row (one pg_attribute index scan)
-- that the two tables' columns are still those it was generated for; when a column was added or
-- dropped since (Phase 3 adds processing_stage, retry_count, ... to both copies after the swap), it
-- copies the row with dynamic SQL over the columns shared at that moment, until regenerated.
--   forward  dbops.p2_fwd_<table>   source -> shadow while the table is being converted
--   reverse  dbops.p2_rev_<table>   partitioned -> old copy after the swap, so a rollback loses nothing
-- Generated from dbops.p2_state by dbops.p2_sync_functions(table): at prepare, and again at the end
-- of this file for every table not yet finalized. Re-applying this file mid-conversion therefore
-- regenerates the functions the live triggers call from the new code, in the same transaction;
-- the triggers themselves are not touched (CREATE OR REPLACE FUNCTION takes no lock on the table).
-- The reverse function honours no session setting (it once skipped rows while
-- dbops.p2_internal_move was 'on', which any session could SET): maintain_partitions() disables
-- it on the DEFAULT partition while it moves rows out of it (08_daily_jobs.sql).

-- Comma-separated column list; key_col replaced by (key_expr) when key_expr is given.
CREATE OR REPLACE FUNCTION dbops.p2_collist(
    cols text [], key_col text DEFAULT NULL, key_expr text DEFAULT NULL, prefix text DEFAULT ''
) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(CASE WHEN c = key_col AND key_expr IS NOT NULL THEN '(' || key_expr || ')'
                           ELSE prefix || quote_ident(c) END, ', ' ORDER BY o)
    FROM unnest(cols) WITH ORDINALITY AS u (c, o)
$$;

-- Columns of src (attnum order) that dst also has, neither dropped; insertable => neither side
-- generated (what a sync trigger may write). The sync triggers and p2_compare use the columns the
-- two tables share NOW, not the list of prepare time: a column added to both after the swap (Phase
-- 3's processing_stage, retry_count, ...) is copied back and compared; one dropped from either side
-- is simply no longer copied.
CREATE OR REPLACE FUNCTION dbops.p2_shared_cols(src regclass, dst regclass, insertable boolean DEFAULT true)
RETURNS text []
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}')
    FROM pg_attribute a
    JOIN pg_attribute b ON b.attrelid = dst AND b.attname = a.attname AND b.attnum > 0 AND NOT b.attisdropped
    WHERE a.attrelid = src AND a.attnum > 0 AND NOT a.attisdropped
      AND (NOT insertable OR (a.attgenerated = '' AND b.attgenerated = ''))
$$;

-- Signature of the column sets of two tables (names and positions: an added, dropped or renamed
-- column changes it): baked into the generated sync functions, recomputed by them per row (one
-- index scan of pg_attribute, ~14 us measured, the cheapest check found that also sees a DROP
-- COLUMN: pg_class is not updated by it); when it differs
-- (a column was added or dropped since the function was generated) the row is copied with
-- dynamic SQL built from the columns shared at that moment (p2_sync_upsert_sql), until the
-- functions are regenerated (swap, rollback, re-apply of this file, p2_sync_refresh()).
CREATE OR REPLACE FUNCTION dbops.p2_colsig(a regclass, b regclass) RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT sum(hashtext(x.attname::text)::bigint + x.attnum)
    FROM pg_attribute x
    WHERE x.attrelid IN (a, b) AND x.attnum > 0 AND NOT x.attisdropped
$$;

-- The plain and the partitioned table of a conversion, whatever the step (NULL when missing):
-- before the swap (and after a rollback) public.<tbl> is plain and <tbl>_p partitioned; swapped,
-- public.<tbl> is partitioned and <tbl>_nonpartitioned plain.
CREATE OR REPLACE FUNCTION dbops.p2_pair(
    tbl text, OUT plain regclass, OUT part regclass
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st dbops.p2_state;
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF st.step = 'swapped' THEN
        plain := to_regclass(format('public.%I', st.twin_name));
        part := to_regclass(format('public.%I', tbl));
    ELSIF st.step <> 'finalized' THEN
        plain := to_regclass(format('public.%I', tbl));
        part := to_regclass(format('public.%I', st.shadow_name));
    END IF;
END
$$;

-- The upsert a sync trigger runs for NEW ($1), from the columns the two tables share now.
-- dir 'fwd': plain -> partitioned (derived key, conflict on (pk, key)); 'rev': partitioned -> plain.
CREATE OR REPLACE FUNCTION dbops.p2_sync_upsert_sql(tbl text, dir text) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st dbops.p2_state;
    plain regclass;
    part regclass;
    cols text [];
    upd text;
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF FOUND THEN
        SELECT * INTO plain, part FROM dbops.p2_pair(tbl);
        cols := dbops.p2_shared_cols(plain, part);
    END IF;
    IF plain IS NULL OR part IS NULL OR cardinality(cols) = 0 THEN
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            -- REPEATABLE READ / SERIALIZABLE: the state and the catalog as this transaction's
            -- snapshot sees them predate the step that installed the trigger (prepare, swap)
            RAISE serialization_failure USING
                MESSAGE = 'could not serialize access due to a concurrent Phase 2 step',
                DETAIL = format('The sync of public.%I started after this transaction''s snapshot was taken.', tbl),
                HINT = 'Retry the transaction.';
        END IF;
        RAISE EXCEPTION 'p2 sync of %: plain or partitioned table missing (step %)', tbl, coalesce(st.step, 'none');
    END IF;
    IF dir = 'fwd' THEN
        SELECT string_agg(format('%1$I = EXCLUDED.%1$I', c), ', ') INTO upd
        FROM unnest(cols) c WHERE c NOT IN (st.pk_col, st.key_col);
        RETURN format('INSERT INTO %s AS t (%s) SELECT %s FROM (SELECT ($1).*) s ON CONFLICT (%I, %I) DO %s',
                      part, dbops.p2_collist(cols), dbops.p2_collist(cols, st.key_col, st.key_expr),
                      st.pk_col, st.key_col, coalesce('UPDATE SET ' || upd, 'NOTHING'));
    END IF;
    SELECT string_agg(format('%1$I = EXCLUDED.%1$I', c), ', ') INTO upd
    FROM unnest(cols) c WHERE c <> st.pk_col;
    RETURN format('INSERT INTO %s AS t (%s) SELECT %s FROM (SELECT ($1).*) s ON CONFLICT (%I) DO %s',
                  plain, dbops.p2_collist(cols), dbops.p2_collist(cols), st.pk_col,
                  coalesce('UPDATE SET ' || upd, 'NOTHING'));
END
$$;

CREATE OR REPLACE FUNCTION dbops.p2_sync_functions(tbl text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    st dbops.p2_state;
    pr record;
    cols text [];
    sig text;
    sigcheck text;
    sel text;
    upd_set text;
    rev_set text;
    dk_old text;
    dk_new text;
    lockkey integer;
    fwd_guard text := '';
    rev_guard text := '';
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'p2_sync_functions: public.% has no conversion state', tbl;
    END IF;
    -- the columns both tables share now, and their signature (checked by the function per row)
    pr := dbops.p2_pair(tbl);
    IF pr.plain IS NOT NULL AND pr.part IS NOT NULL THEN
        cols := dbops.p2_shared_cols(pr.plain, pr.part);
        sig := dbops.p2_colsig(pr.plain, pr.part)::text;
        sigcheck := format('(SELECT sum(hashtext(x.attname::text)::bigint + x.attnum)'
                           ' FROM pg_catalog.pg_attribute x WHERE x.attrelid IN (%s, %s) AND x.attnum > 0'
                           ' AND NOT x.attisdropped) IS DISTINCT FROM %s',
                           pr.plain::oid, pr.part::oid, sig);
        -- only the engine's own trigger may run them (issue 18 item 11): the plain table's
        -- forward trigger, the partitioned table's reverse trigger (fired on its partitions)
        fwd_guard := format('IF TG_RELID <> %s THEN PERFORM dbops.p2_refuse_trigger(%L, TG_RELID, TG_ARGV); END IF;',
                            pr.plain::oid, 'dbops.' || st.fwd_function);
        rev_guard := format('IF dbops.p2_root(TG_RELID) <> %s::regclass THEN PERFORM dbops.p2_refuse_trigger(%L, TG_RELID, TG_ARGV); END IF;',
                            pr.part::oid, 'dbops.' || st.rev_function);
    ELSE
        cols := st.ins_cols;
        sigcheck := 'true';   -- tables missing: the dynamic path names the problem
    END IF;
    -- forward: every row change, same transaction. UPDATE / DELETE take a shared advisory lock
    -- that a backfill batch takes exclusively (see p2_backfill).
    lockkey := hashtext(format('public.%I', st.table_name));
    sel := dbops.p2_collist(cols, st.key_col, st.key_expr);
    dk_old := format('(SELECT %s FROM (SELECT OLD.*) s)', st.key_expr);
    dk_new := format('(SELECT %s FROM (SELECT NEW.*) s)', st.key_expr);
    SELECT string_agg(format('%1$I = EXCLUDED.%1$I', c), ', ') INTO upd_set
    FROM unnest(cols) c WHERE c NOT IN (st.pk_col, st.key_col);
    SELECT string_agg(format('%1$I = EXCLUDED.%1$I', c), ', ') INTO rev_set
    FROM unnest(cols) c WHERE c <> st.pk_col;
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION dbops.%1$I() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
-- generated by dbops.p2_sync_functions(%2$L): keeps public.%3$I equal to public.%2$I
BEGIN
    %13$s
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_advisory_xact_lock_shared(80620, %4$s);
        IF (CASE WHEN TG_OP = 'DELETE' THEN true ELSE OLD.%5$I IS DISTINCT FROM NEW.%5$I OR %7$s IS DISTINCT FROM %8$s END) THEN
            DELETE FROM public.%3$I t WHERE t.%5$I = OLD.%5$I AND t.%6$I = %7$s;
            IF NOT FOUND AND pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
                -- REPEATABLE READ / SERIALIZABLE: a copy a backfill batch committed after this
                -- transaction's snapshot is invisible to the DELETE above. Writing the old row
                -- meets it: PostgreSQL raises 40001 on the invisible conflicting row (as for its
                -- own ON CONFLICT); when there is no copy at all, the probe row goes again.
                EXECUTE dbops.p2_sync_upsert_sql(%2$L, 'fwd') USING OLD;
                DELETE FROM public.%3$I t WHERE t.%5$I = OLD.%5$I AND t.%6$I = %7$s;
            END IF;
            IF TG_OP = 'DELETE' THEN
                RETURN NULL;
            END IF;
        END IF;
    END IF;
    IF %12$s THEN   -- columns added / dropped since generated: copy the columns shared now
        EXECUTE dbops.p2_sync_upsert_sql(%2$L, 'fwd') USING NEW;
        RETURN NULL;
    END IF;
    INSERT INTO public.%3$I AS t (%9$s) SELECT %10$s FROM (SELECT NEW.*) s
    ON CONFLICT (%5$I, %6$I) DO %11$s;
    RETURN NULL;
END
$body$
$f$, st.fwd_function, st.table_name, st.shadow_name, lockkey, st.pk_col, st.key_col, dk_old, dk_new,
        dbops.p2_collist(cols), sel, coalesce('UPDATE SET ' || upd_set, 'NOTHING'), sigcheck, fwd_guard);
    -- reverse (installed by the swap): partitioned table -> old table, so a rollback loses nothing
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION dbops.%1$I() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
-- generated by dbops.p2_sync_functions(%2$L): after the swap, keeps public.%3$I equal to public.%2$I
BEGIN
    %8$s
    IF TG_OP = 'DELETE' THEN
        DELETE FROM public.%3$I t WHERE t.%4$I = OLD.%4$I;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.%4$I IS DISTINCT FROM NEW.%4$I THEN
        DELETE FROM public.%3$I t WHERE t.%4$I = OLD.%4$I;
    END IF;
    IF %7$s THEN   -- columns added / dropped since generated: copy the columns shared now
        EXECUTE dbops.p2_sync_upsert_sql(%2$L, 'rev') USING NEW;
        RETURN NULL;
    END IF;
    INSERT INTO public.%3$I AS t (%5$s) SELECT %5$s FROM (SELECT NEW.*) s
    ON CONFLICT (%4$I) DO %6$s;
    RETURN NULL;
END
$body$
$f$, st.rev_function, st.table_name, st.twin_name, st.pk_col, dbops.p2_collist(cols),
        coalesce('UPDATE SET ' || rev_set, 'NOTHING'), sigcheck, rev_guard);
    -- SECURITY DEFINER functions: only their triggers run them (issue 18 item 11)
    EXECUTE format('REVOKE EXECUTE ON FUNCTION dbops.%I(), dbops.%I() FROM PUBLIC', st.fwd_function, st.rev_function);
END
$fn$;

-- Regenerate the sync functions of every table not finalized (after a column change the triggers
-- copy the right columns anyway, via the slower dynamic path; this brings back the static one).
-- Called by the migrate role after each phase's migrations; harmless at any time.
CREATE OR REPLACE FUNCTION dbops.p2_sync_refresh() RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
    done jsonb := '[]';
BEGIN
    FOR t IN SELECT table_name FROM dbops.p2_state WHERE step <> 'finalized' ORDER BY table_name LOOP
        PERFORM dbops.p2_sync_functions(t);
        done := done || to_jsonb(t);
    END LOOP;
    RETURN jsonb_build_object('changed', jsonb_array_length(done) > 0, 'regenerated', done);
END
$$;

DO $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT table_name FROM dbops.p2_state WHERE step <> 'finalized' ORDER BY table_name LOOP
        PERFORM dbops.p2_sync_functions(t);
        RAISE NOTICE 'sync trigger functions of public.% regenerated', t;
    END LOOP;
END
$$;
