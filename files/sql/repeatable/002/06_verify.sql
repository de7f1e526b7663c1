-- Phase 2 engine, step 3: verification, per partition range, in one snapshot.
-- dbops.p2_compare groups rows by range with date_trunc(unit, key, 'UTC') inline: dbops.p2_bucket()
-- is the same expression, but its SET search_path keeps it from being inlined (4x slower per row,
-- measured on 200 000 rows over 397 daily ranges); it runs with jit = off, because JIT-compiling
-- every partition's scan took 9 s of a query that needs 0.9 s.

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
        res := dbops.p2_compare(tbl, st.twin_name, tbl);
    ELSE
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
