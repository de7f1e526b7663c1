-- Phase 2 engine, step 3: verification, per partition range, in one snapshot.
-- dbops.p2_compare groups rows by range with date_trunc(unit, key, 'UTC') inline: dbops.p2_bucket()
-- is the same expression, but its SET search_path keeps it from being inlined (4x slower per row,
-- measured on 200 000 rows over 397 daily ranges); it runs with jit = off, because JIT-compiling
-- every partition's scan took 9 s of a query that needs 0.9 s.

-- ---------------------------------------------------------------------------------------------
-- The columns of the two copies must be the same (issue 18 item 6): a column added to one copy
-- only (DDL during the conversion, or on the live table while swapped) would be dropped from the
-- live table by the swap, or its values dropped by finalize or a rollback. NULL when both have the
-- same columns with the same types (generated ones included), else what differs and what to do.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dbops.p2_column_diff(a regclass, b regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH ca AS (SELECT attname::text AS col, format_type(atttypid, atttypmod) AS typ, attgenerated
                FROM pg_attribute WHERE attrelid = a AND attnum > 0 AND NOT attisdropped),
    cb AS (SELECT attname::text AS col, format_type(atttypid, atttypmod) AS typ, attgenerated
           FROM pg_attribute WHERE attrelid = b AND attnum > 0 AND NOT attisdropped),
    d AS (
        SELECT format('column %I %s only in %s', ca.col, ca.typ, a) AS what, ca.col, 1 AS o
        FROM ca LEFT JOIN cb USING (col) WHERE cb.col IS NULL
        UNION ALL
        SELECT format('column %I %s only in %s', cb.col, cb.typ, b), cb.col, 2
        FROM cb LEFT JOIN ca USING (col) WHERE ca.col IS NULL
        UNION ALL
        SELECT format('column %I is %s%s in %s but %s%s in %s', ca.col, ca.typ,
                      CASE WHEN ca.attgenerated <> '' THEN ' (generated)' ELSE '' END, a, cb.typ,
                      CASE WHEN cb.attgenerated <> '' THEN ' (generated)' ELSE '' END, b), ca.col, 3
        FROM ca JOIN cb USING (col) WHERE ca.typ <> cb.typ OR ca.attgenerated <> cb.attgenerated)
    SELECT string_agg(what, '; ' ORDER BY o, col) FROM d
$$;

-- Raises when the two copies' columns differ, naming what differs; step says which step refused.
CREATE OR REPLACE FUNCTION dbops.p2_require_same_columns(step text, a regclass, b regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    diff text := dbops.p2_column_diff(a, b);
BEGIN
    IF diff IS NOT NULL THEN
        RAISE EXCEPTION '%: % and % no longer have the same columns: %', step, a, b, diff
            USING HINT = format('Nothing was changed. Make the columns the same on both copies (ALTER TABLE ... ADD COLUMN / '
                                'ALTER COLUMN ... TYPE on the one that lacks it; while converting, before the swap, the '
                                'simplest is dbops.p2_abort(%L) and a new conversion), then run the step again. '
                                'No DDL on a table while it converts (docs/PHASE2_DESIGN.md, Limits).',
                                (SELECT relname FROM pg_class WHERE oid = a)),
                  ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Step 3: verify
-- ---------------------------------------------------------------------------------------------
-- Per partition range: row count and checksum, source vs shadow (after the swap: the old
-- table vs the partitioned one), in ONE query, hence one snapshot, in which the synchronous
-- trigger keeps both sides equal. Raises naming the table and the first differing range.
CREATE OR REPLACE FUNCTION dbops.p2_verify(tbl text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st dbops.p2_state;
    res jsonb;
    m jsonb;
    t0 timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF NOT FOUND OR st.step NOT IN ('backfilled', 'verified', 'swapped') THEN
        RAISE EXCEPTION 'p2_verify: % is not backfilled (step %)', tbl, coalesce(st.step, 'none');
    END IF;
    IF st.step = 'swapped' THEN
        PERFORM dbops.p2_require_same_columns('p2_verify', format('public.%I', st.twin_name)::regclass,
                                              format('public.%I', tbl)::regclass);
        res := dbops.p2_compare(tbl, st.twin_name, tbl);
    ELSE
        PERFORM dbops.p2_require_same_columns('p2_verify', format('public.%I', tbl)::regclass,
                                              format('public.%I', st.shadow_name)::regclass);
        res := dbops.p2_compare(tbl, tbl, st.shadow_name);
    END IF;
    res := res || jsonb_build_object('table', tbl, 'step', st.step,
                                     'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
    IF jsonb_array_length(res -> 'mismatches') > 0 THEN
        m := res -> 'mismatches' -> 0;
        PERFORM dbops.p2_log(tbl, 'verify failed', res);
        RAISE EXCEPTION 'p2_verify: % differs in % range(s); first [%, %): % rows / % rows in %',
            tbl, jsonb_array_length(res -> 'mismatches'), m ->> 'range_start', m ->> 'range_end',
            m ->> 'source_rows', m ->> 'target_rows', res ->> 'target'
            USING DETAIL = (res -> 'mismatches')::text;
    END IF;
    res := res || jsonb_build_object('status', 'ok', 'changed', st.step = 'backfilled');
    UPDATE dbops.p2_state
    SET step = CASE WHEN step = 'backfilled' THEN 'verified' ELSE step END,
        verified_at = now(), verify_result = res, updated_at = now()
    WHERE table_name = tbl;
    RETURN dbops.p2_log(tbl, 'verify', res);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Comparison of two tables per partition range: count and checksum in ONE query (one snapshot)
-- ---------------------------------------------------------------------------------------------
-- src is the plain table (its partition key derived with key_expr, NULL keys included), dst the
-- partitioned one. The checksum is the sum of a 64-bit hash of each row's text over every column
-- the two tables share now (the generated tsv included: both sides compute it; columns added to
-- both after prepare, e.g. by Phase 3, included). Ranges are the partition buckets.
CREATE OR REPLACE FUNCTION dbops.p2_compare(tbl text, src text, dst text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
    st dbops.p2_state;
    dflt regclass;
    cols text [];
    res jsonb;
BEGIN
    SELECT * INTO STRICT st FROM dbops.p2_state WHERE table_name = tbl;
    dflt := to_regclass(format('public.%I', tbl || '_default'));
    -- the columns both tables have now (Phase 3 adds columns to both copies after a swap)
    cols := dbops.p2_shared_cols(format('public.%I', src)::regclass, format('public.%I', dst)::regclass, false);
    EXECUTE format($q$
        WITH s AS (
            SELECT date_trunc(%1$L, %2$s, 'UTC') AS b, count(*) AS n,
                   sum(hashtextextended(ROW(%3$s)::text, 0)::numeric) AS h,
                   count(*) FILTER (WHERE %4$I IS NULL) AS nk
            FROM public.%5$I GROUP BY 1),
        d AS (
            SELECT date_trunc(%1$L, %4$I, 'UTC') AS b, count(*) AS n,
                   sum(hashtextextended(ROW(%6$s)::text, 0)::numeric) AS h,
                   count(*) FILTER (WHERE tableoid = %7$s) AS nd
            FROM public.%8$I GROUP BY 1),
        j AS (
            SELECT b, coalesce(s.n, 0) AS sn, coalesce(d.n, 0) AS dn, coalesce(s.h, 0) AS sh,
                   coalesce(d.h, 0) AS dh, coalesce(s.nk, 0) AS nk, coalesce(d.nd, 0) AS nd
            FROM s FULL JOIN d USING (b))
        SELECT jsonb_build_object(
            'source', %5$L, 'target', %8$L,
            'source_rows', coalesce(sum(sn), 0), 'target_rows', coalesce(sum(dn), 0),
            'ranges', count(*), 'null_key_rows', coalesce(sum(nk), 0),
            'default_partition_rows', coalesce(sum(nd), 0),
            'mismatches', coalesce(jsonb_agg(jsonb_build_object(
                'range_start', b, 'range_end', dbops.p2_next(%1$L, b),
                'source_rows', sn, 'target_rows', dn, 'source_checksum', sh::text,
                'target_checksum', dh::text) ORDER BY b) FILTER (WHERE sn <> dn OR sh <> dh), '[]'))
        FROM j $q$,
        st.unit, st.key_expr, dbops.p2_collist(cols, st.key_col, st.key_expr), st.key_col, src,
        dbops.p2_collist(cols), coalesce(dflt::oid, 0), dst)
    INTO res;
    RETURN res || jsonb_build_object(
        'columns_compared', cardinality(cols),
        'columns_only_in_source', to_jsonb(ARRAY(
            SELECT c FROM unnest(dbops.p2_shared_cols(format('public.%I', src)::regclass,
                                                      format('public.%I', src)::regclass, false)) c
            WHERE c <> ALL (cols))),
        'columns_only_in_target', to_jsonb(ARRAY(
            SELECT c FROM unnest(dbops.p2_shared_cols(format('public.%I', dst)::regclass,
                                                      format('public.%I', dst)::regclass, false)) c
            WHERE c <> ALL (cols))));
END
$$;
