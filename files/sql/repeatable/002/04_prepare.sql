-- Step 1 of a table's conversion: dbops.p2_prepare(table) builds the partitioned shadow and
-- starts the capture trigger. Ansible calls it once per table (scanner.dbops.step).

-- ---------------------------------------------------------------------------------------------
-- The partitioned copy takes the plain table's properties (prepare, and again at the swap)
-- ---------------------------------------------------------------------------------------------
-- src: the plain table, dst: the partitioned one (named <tbl>_p, before the swap's renames).
-- Owner (parent and every partition: whoever runs the engine creates them, a member of the owner
-- role on RDS), privileges (p2_copy_grants: grants and revokes), table and column comments, storage /
-- autovacuum settings (on each partition: a partitioned parent holds none) and replica identity.
-- Catalog-only, no data touched; changes only what differs (a second call does nothing).
CREATE OR REPLACE FUNCTION dbops.p2_match_props(tbl text, src regclass, dst regclass) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s record;
    d record;
    r record;
    ri_dst regclass;
    ri_part regclass;
    n_parts integer := 0;
    n_acl integer;
    n_comments integer := 0;
    n_ri integer := 0;
BEGIN
    SELECT c.relowner, c.relreplident, obj_description(c.oid, 'pg_class') AS descr INTO s FROM pg_class c WHERE c.oid = src;
    SELECT c.relowner, c.relreplident, obj_description(c.oid, 'pg_class') AS descr INTO d FROM pg_class c WHERE c.oid = dst;
    IF d.relowner <> s.relowner THEN
        EXECUTE format('ALTER TABLE %s OWNER TO %I', dst, pg_get_userbyid(s.relowner));
    END IF;
    -- only the partitions whose owner or settings differ (one catalog query: the swap runs this under its lock)
    FOR r IN
        WITH m AS (SELECT coalesce(c.reloptions, '{}') AS o, coalesce(t.reloptions, '{}') AS tt
                   FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid = src)
        SELECT c.oid::regclass AS part
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid LEFT JOIN pg_class t ON t.oid = c.reltoastrelid, m
        WHERE i.inhparent = dst
          AND (c.relowner <> s.relowner
               OR NOT (coalesce(c.reloptions, '{}') @> m.o AND coalesce(c.reloptions, '{}') <@ m.o)
               OR NOT (coalesce(t.reloptions, '{}') @> m.tt AND coalesce(t.reloptions, '{}') <@ m.tt))
        ORDER BY c.oid
    LOOP
        IF dbops.p2_adopt_partition(dst, r.part, src) THEN
            n_parts := n_parts + 1;
        END IF;
    END LOOP;
    n_acl := dbops.p2_copy_grants(src, dst);
    IF d.descr IS DISTINCT FROM s.descr THEN
        EXECUTE format('COMMENT ON TABLE %s IS %L', dst, s.descr);
        n_comments := n_comments + 1;
    END IF;
    FOR r IN SELECT a.attname, col_description(src, a.attnum) AS want, col_description(dst, b.attnum) AS have
             FROM pg_attribute a JOIN pg_attribute b ON b.attrelid = dst AND b.attname = a.attname AND NOT b.attisdropped
             WHERE a.attrelid = src AND a.attnum > 0 AND NOT a.attisdropped LOOP
        IF r.want IS DISTINCT FROM r.have THEN
            EXECUTE format('COMMENT ON COLUMN %s.%I IS %L', dst, r.attname, r.want);
            n_comments := n_comments + 1;
        END IF;
    END LOOP;
    -- replica identity: DEFAULT (the primary key), FULL, NOTHING, or USING INDEX (the copy of that index)
    IF s.relreplident = 'i' THEN
        SELECT to_regclass(format('public.%I', o.shadow_name)) INTO ri_dst
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN dbops.p2_objects o ON o.table_name = tbl AND o.orig_name = ic.relname
        WHERE i.indrelid = src AND i.indisreplident;
    END IF;
    FOR r IN SELECT dst AS rel, d.relreplident AS have, NULL::regclass AS parent_idx
             UNION ALL
             SELECT c.oid::regclass, c.relreplident, NULL FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = dst AND (s.relreplident = 'i' OR c.relreplident <> s.relreplident) LOOP
        IF s.relreplident = 'i' AND ri_dst IS NOT NULL THEN
            IF r.rel = dst THEN
                ri_part := ri_dst;
            ELSE
                SELECT ci.indexrelid::regclass INTO ri_part FROM pg_inherits ih JOIN pg_index ci ON ci.indexrelid = ih.inhrelid
                WHERE ih.inhparent = ri_dst AND ci.indrelid = r.rel;
            END IF;
            IF ri_part IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = ri_part AND indisreplident) THEN
                EXECUTE format('ALTER TABLE %s REPLICA IDENTITY USING INDEX %I', r.rel,
                               (SELECT relname FROM pg_class WHERE oid = ri_part));
                n_ri := n_ri + 1;
            END IF;
        ELSIF s.relreplident IN ('d', 'f', 'n') AND r.have <> s.relreplident THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY %s', r.rel,
                           CASE s.relreplident WHEN 'd' THEN 'DEFAULT' WHEN 'f' THEN 'FULL' ELSE 'NOTHING' END);
            n_ri := n_ri + 1;
        END IF;
    END LOOP;
    RETURN jsonb_build_object('owner', pg_get_userbyid(s.relowner), 'owner_changed', d.relowner <> s.relowner,
                              'partitions_adjusted', n_parts, 'privilege_changes', n_acl, 'comment_changes', n_comments,
                              'replica_identity_changes', n_ri);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Step 1: prepare
-- ---------------------------------------------------------------------------------------------
-- Creates public.<tbl>_p (same columns, order, types, defaults, generated column, NOT NULL,
-- CHECK constraints, comments, grants; PK / unique keys extended with the partition key; every
-- other index), its partitions from the oldest row to now + premake and a DEFAULT partition,
-- then (last, under lock_timeout) the sync trigger on the source. Returns {"status": "retry"}
-- when the trigger could not get its lock: the shadow is kept, call again.
CREATE OR REPLACE FUNCTION dbops.p2_prepare(tbl text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    pol public.app_retention_policies;
    cfg dbops.p2_config;
    st dbops.p2_state;
    src oid;
    shadow text := tbl || '_p';
    twin text := tbl || '_nonpartitioned';
    v_pk_col text;
    v_pk_type text;
    v_key_col text;
    key_nullable boolean;
    v_unit text;
    v_key_expr text;
    fallback timestamptz;
    v_ins_cols text [] := '{}';
    v_all_cols text [] := '{}';
    coldefs text [] := '{}';
    r record;
    coldef text;
    lo timestamptz;
    hi timestamptz;
    b timestamptz;
    e timestamptz;
    hist_end timestamptz;
    nhist integer := 0;
    nparts integer := 0;
    v_warnings jsonb := '[]';
    v_guards jsonb := '[]';
    v_seqs jsonb := '[]';
    cols text [];
    newcols text [];
    newpk text [];
    prefix text;
    rest text;
    p1 integer;
    p2 integer;
    tmpname text;
    fwd text;
    rev text;
    t0 timestamptz := clock_timestamp();
    res jsonb;
    shadow_made boolean := false;
BEGIN
    SELECT * INTO pol FROM public.app_retention_policies WHERE table_name = tbl;
    IF NOT FOUND OR pol.partition_interval IS NULL THEN
        RAISE EXCEPTION 'p2_prepare: no partitioning policy for "%" in app_retention_policies', tbl;
    END IF;
    SELECT * INTO cfg FROM dbops.p2_config WHERE table_name = tbl;
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl FOR UPDATE;

    IF FOUND AND st.step <> 'shadow_created' THEN
        RETURN jsonb_build_object('status', 'already prepared', 'changed', false, 'table', tbl, 'step', st.step);
    END IF;

    IF NOT FOUND THEN
        -- ---------------------------------------------------------------- preconditions
        src := to_regclass(format('public.%I', tbl));
        IF src IS NULL THEN
            RAISE EXCEPTION 'p2_prepare: table public.% does not exist', tbl;
        END IF;
        IF (SELECT relkind FROM pg_class WHERE oid = src) <> 'r' THEN
            RAISE EXCEPTION 'p2_prepare: public.% is not a plain table (already partitioned?)', tbl;
        END IF;
        IF EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = src OR inhparent = src) THEN
            RAISE EXCEPTION 'p2_prepare: public.% takes part in inheritance: not supported', tbl;
        END IF;
        IF to_regclass(format('public.%I', shadow)) IS NOT NULL OR to_regclass(format('public.%I', twin)) IS NOT NULL
           OR to_regclass(format('public.%I', tbl || '_default')) IS NOT NULL THEN
            RAISE EXCEPTION 'p2_prepare: public.%, public.% or public.% already exists (left over?)',
                shadow, twin, tbl || '_default';
        END IF;
        IF NOT pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = src), 'USAGE') THEN
            RAISE EXCEPTION 'p2_prepare: % is not a member of %, the owner of public.%: the partitioned table could not be given to that owner',
                current_user, pg_get_userbyid((SELECT relowner FROM pg_class WHERE oid = src)), tbl
                USING HINT = format('Run the engine as the owner, or GRANT %I TO %I (a member that inherits its privileges: the RDS setup, docs/RDS.md).',
                                    pg_get_userbyid((SELECT relowner FROM pg_class WHERE oid = src)), current_user);
        END IF;
        IF NOT has_schema_privilege((SELECT relowner FROM pg_class WHERE oid = src), 'public', 'CREATE') THEN
            RAISE EXCEPTION 'p2_prepare: %, the owner of public.%, has no CREATE privilege on schema public: the partitioned table could not be given to it',
                pg_get_userbyid((SELECT relowner FROM pg_class WHERE oid = src)), tbl
                USING HINT = format('GRANT CREATE ON SCHEMA public TO %I;', pg_get_userbyid((SELECT relowner FROM pg_class WHERE oid = src)));
        END IF;
        IF (SELECT relrowsecurity FROM pg_class WHERE oid = src) THEN
            RAISE EXCEPTION 'p2_prepare: row level security on public.% is not supported', tbl;
        END IF;
        IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = src AND attnum > 0 AND NOT attisdropped
                   AND attidentity <> '') THEN
            RAISE EXCEPTION 'p2_prepare: identity columns on public.% are not supported', tbl;
        END IF;
        IF EXISTS (SELECT 1 FROM pg_depend d JOIN pg_rewrite rw ON rw.oid = d.objid
                   JOIN pg_class v ON v.oid = rw.ev_class
                   WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = src AND v.oid <> src
                     AND v.relkind = 'm') THEN
            RAISE EXCEPTION 'p2_prepare: a materialized view depends on public.%: drop it first', tbl;
        END IF;
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) INTO v_pk_col, v_pk_type
        FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
        WHERE c.conrelid = src AND c.contype = 'p' AND cardinality(c.conkey) = 1;
        IF v_pk_col IS NULL THEN
            RAISE EXCEPTION 'p2_prepare: public.% needs a single-column primary key (keyset backfill)', tbl;
        END IF;
        SELECT a.attname, NOT a.attnotnull INTO v_key_col, key_nullable
        FROM pg_attribute a WHERE a.attrelid = src AND a.attname = pol.time_column AND NOT a.attisdropped
          AND a.atttypid = 'timestamptz'::regtype;
        IF v_key_col IS NULL THEN
            RAISE EXCEPTION 'p2_prepare: public.%.% is missing or not timestamptz', tbl, pol.time_column;
        END IF;
        IF cfg.app_key_index IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pg_index i WHERE i.indexrelid = to_regclass(format('public.%I', cfg.app_key_index))
              AND i.indrelid = src AND i.indisvalid AND i.indisunique) THEN
            RAISE EXCEPTION 'p2_prepare: unique index public.% is missing or INVALID on public.%', cfg.app_key_index, tbl
                USING HINT = 'Apply files/sql/002_02_calls_app_key.sql first (an INVALID index left by an '
                             'interrupted build must be dropped, then the file re-run).';
        END IF;
        v_unit := pol.partition_interval;
        fallback := date_trunc('second', now());
        IF key_nullable THEN
            v_key_expr := format('coalesce((%s)::timestamptz, %s::timestamptz)',
                                 coalesce(cfg.null_key_expr, quote_ident(v_key_col)), dbops.p2_lit(fallback));
        ELSE
            v_key_expr := quote_ident(v_key_col);
            fallback := NULL;
        END IF;

        -- ---------------------------------------------------------------- the shadow table
        FOR r IN
            SELECT a.attname::text AS attname, format_type(a.atttypid, a.atttypmod) AS typ, a.attnotnull,
                   a.attgenerated, pg_get_expr(d.adbin, d.adrelid) AS def,
                   CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                        THEN format('%I.%I', cn.nspname, co.collname) END AS coll
            FROM pg_attribute a
            JOIN pg_type t ON t.oid = a.atttypid
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            LEFT JOIN pg_collation co ON co.oid = a.attcollation
            LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
            WHERE a.attrelid = src AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum
        LOOP
            coldef := format('%I %s', r.attname, r.typ);
            IF r.coll IS NOT NULL THEN
                coldef := coldef || ' COLLATE ' || r.coll;
            END IF;
            IF r.attgenerated = 's' THEN
                coldef := coldef || format(' GENERATED ALWAYS AS (%s) STORED', r.def);
            ELSIF r.def IS NOT NULL THEN
                coldef := coldef || ' DEFAULT ' || r.def;
            END IF;
            IF r.attnotnull OR r.attname = v_key_col THEN
                coldef := coldef || ' NOT NULL';
            END IF;
            coldefs := coldefs || coldef;
            v_all_cols := v_all_cols || r.attname;
            IF r.attgenerated = '' THEN
                v_ins_cols := v_ins_cols || r.attname;
            END IF;
        END LOOP;
        EXECUTE format('CREATE TABLE public.%I (%s) PARTITION BY RANGE (%I)',
                       shadow, array_to_string(coldefs, ', '), v_key_col);

        -- constraints: PK / UNIQUE extended with the partition key, CHECK as they are
        FOR r IN
            SELECT c.conname::text AS conname, c.contype, c.condeferrable, c.conindid::regclass::text AS idx,
                   (SELECT relname::text FROM pg_class WHERE oid = c.conindid) AS idxname,
                   pg_get_constraintdef(c.oid) AS def,
                   ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k (n, o)
                         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o) AS cols
            FROM pg_constraint c WHERE c.conrelid = src
            ORDER BY c.contype = 'p' DESC, c.conname
        LOOP
            IF r.contype IN ('p', 'u') THEN
                IF r.condeferrable THEN
                    RAISE EXCEPTION 'p2_prepare: deferrable constraint % is not supported', r.conname;
                END IF;
                newcols := r.cols;
                IF NOT v_key_col = ANY (newcols) THEN
                    newcols := newcols || v_key_col;
                END IF;
                IF r.contype = 'p' THEN
                    newpk := newcols;
                END IF;
                IF r.def ~ 'INCLUDE|WITH \(' THEN
                    v_warnings := v_warnings || to_jsonb(format('%s: INCLUDE / storage parameters not copied', r.conname));
                END IF;
                tmpname := dbops.p2_name(r.idxname, '_p2');
                EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT %I %s %s(%s)', shadow, tmpname,
                               CASE r.contype WHEN 'p' THEN 'PRIMARY KEY' ELSE 'UNIQUE' END,
                               CASE WHEN r.def LIKE '%NULLS NOT DISTINCT%' THEN 'NULLS NOT DISTINCT ' ELSE '' END,
                               dbops.p2_collist(newcols));
                INSERT INTO dbops.p2_objects VALUES (tbl, r.idxname, tmpname, dbops.p2_name(r.idxname, '_np'),
                    CASE r.contype WHEN 'p' THEN 'primary key' ELSE 'unique' END, r.def);
                -- the old key loses its partition-wide index: guard it (skip a lone column fed by a sequence)
                IF NOT v_key_col = ANY (r.cols) AND NOT (cardinality(r.cols) = 1 AND EXISTS (
                        SELECT 1 FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                        WHERE d.adrelid = src AND a.attname = r.cols[1]
                          AND pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%')) THEN
                    v_guards := v_guards || jsonb_build_object('name', r.conname, 'cols', to_jsonb(r.cols));
                END IF;
            ELSIF r.contype = 'c' THEN
                EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT %I %s', shadow, r.conname, r.def);
            ELSIF r.contype = 'x' THEN
                RAISE EXCEPTION 'p2_prepare: exclusion constraint % is not supported', r.conname;
            END IF;
            -- 'f': recorded in dbops.p2_refs below; 't': engine reference triggers (p2_apply_refs)
        END LOOP;
        IF newpk IS NULL THEN
            RAISE EXCEPTION 'p2_prepare: primary key of public.% not found', tbl;
        END IF;

        -- every other valid index, built now on the empty shadow (cheap, nobody reads it yet)
        FOR r IN
            SELECT ic.relname::text AS idxname, i.indisunique, i.indisvalid, i.indpred IS NOT NULL AS partial,
                   i.indexprs IS NOT NULL AS has_expr, pg_get_indexdef(i.indexrelid) AS def,
                   ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k (n, o)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                         WHERE k.o <= i.indnkeyatts ORDER BY k.o) AS cols
            FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
            WHERE i.indrelid = src
              AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = src)
            ORDER BY ic.relname
        LOOP
            IF NOT r.indisvalid THEN
                v_warnings := v_warnings || to_jsonb(format('index %s is INVALID on the source: not copied', r.idxname));
                CONTINUE;
            END IF;
            prefix := format('CREATE %sINDEX %I ON public.%I ', CASE WHEN r.indisunique THEN 'UNIQUE ' ELSE '' END,
                             r.idxname, tbl);
            IF left(r.def, length(prefix)) <> prefix THEN
                RAISE EXCEPTION 'p2_prepare: unexpected definition of index %: %', r.idxname, r.def;
            END IF;
            rest := substr(r.def, length(prefix) + 1);
            IF r.indisunique THEN
                IF NOT r.partial AND NOT r.has_expr AND NOT v_key_col = ANY (r.cols)
                   AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v_guards) g WHERE g ->> 'name' = r.idxname) THEN
                    v_guards := v_guards || jsonb_build_object('name', r.idxname, 'cols', to_jsonb(r.cols));
                END IF;
                IF NOT v_key_col = ANY (r.cols) THEN
                    p1 := strpos(rest, '(');
                    p2 := dbops.p2_close_paren(rest, p1);
                    rest := left(rest, p2 - 1) || ', ' || quote_ident(v_key_col) || substr(rest, p2);
                    r.cols := r.cols || v_key_col;
                END IF;
                IF NOT r.partial AND NOT r.has_expr AND r.cols @> newpk AND r.cols <@ newpk THEN
                    v_warnings := v_warnings || to_jsonb(format(
                        'index %s duplicates the new primary key (%s): not copied, the primary key is the arbiter',
                        r.idxname, array_to_string(newpk, ', ')));
                    CONTINUE;
                END IF;
            END IF;
            tmpname := dbops.p2_name(r.idxname, '_p2');
            EXECUTE format('CREATE %sINDEX %I ON public.%I %s', CASE WHEN r.indisunique THEN 'UNIQUE ' ELSE '' END,
                           tmpname, shadow, rest);
            INSERT INTO dbops.p2_objects VALUES (tbl, r.idxname, tmpname, dbops.p2_name(r.idxname, '_np'),
                CASE WHEN r.indisunique THEN 'unique' ELSE 'index' END, r.def);
        END LOOP;

        -- comments, grants, column statistics targets
        EXECUTE format('COMMENT ON TABLE public.%I IS %L', shadow, obj_description(src, 'pg_class'));
        FOR r IN SELECT a.attname, col_description(src, a.attnum) AS descr, a.attstattarget
                 FROM pg_attribute a WHERE a.attrelid = src AND a.attnum > 0 AND NOT a.attisdropped LOOP
            IF r.descr IS NOT NULL THEN
                EXECUTE format('COMMENT ON COLUMN public.%I.%I IS %L', shadow, r.attname, r.descr);
            END IF;
            IF r.attstattarget > 0 THEN
                EXECUTE format('ALTER TABLE public.%I ALTER COLUMN %I SET STATISTICS %s', shadow, r.attname, r.attstattarget);
            END IF;
        END LOOP;
        PERFORM dbops.p2_copy_grants(src, format('public.%I', shadow)::regclass);
        IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = src AND attacl IS NOT NULL) THEN
            v_warnings := v_warnings || to_jsonb('column-level privileges are not copied'::text);
        END IF;
        IF EXISTS (SELECT 1 FROM pg_publication_rel WHERE prrelid = src) THEN
            v_warnings := v_warnings || to_jsonb('the table is in a publication: add the partitioned table after the swap'::text);
        END IF;
        IF EXISTS (SELECT 1 FROM pg_statistic_ext WHERE stxrelid = src) THEN
            v_warnings := v_warnings || to_jsonb('extended statistics are not copied'::text);
        END IF;

        -- sequences owned by a column (bigserial): same sequence, ownership moves at the swap
        SELECT coalesce(jsonb_agg(jsonb_build_object('seq', format('%I.%I', sn.nspname, s.relname), 'col', a.attname)), '[]')
        INTO v_seqs
        FROM pg_depend d
        JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        JOIN pg_namespace sn ON sn.oid = s.relnamespace
        JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
          AND d.refobjid = src AND d.deptype = 'a';

        -- ---------------------------------------------------------------- partitions
        IF key_nullable THEN
            EXECUTE format('SELECT least((SELECT min(%1$I) FROM public.%2$I), (SELECT min(%3$s) FROM public.%2$I WHERE %1$I IS NULL)),'
                           ' greatest((SELECT max(%1$I) FROM public.%2$I), (SELECT max(%3$s) FROM public.%2$I WHERE %1$I IS NULL))',
                           v_key_col, tbl, v_key_expr) INTO lo, hi;
        ELSE
            EXECUTE format('SELECT min(%1$I), max(%1$I) FROM public.%2$I', v_key_col, tbl) INTO lo, hi;
        END IF;
        lo := dbops.p2_bucket(v_unit, least(coalesce(lo, now()), now()));
        hi := greatest(dbops.p2_bucket(v_unit, coalesce(hi, now())),
                       dbops.p2_next(v_unit, dbops.p2_bucket(v_unit, now()), pol.premake::integer));
        -- History the retention drops anyway (issue 11): for a daily or weekly table, the range entirely
        -- older than the retention cutoff (up to the unit boundary at or before now() - retention) goes
        -- into monthly partitions <table>_hYYYY_MM, which the first cleanup_old_data() drops whole, so
        -- the converted table starts with about as many partitions as it keeps (system_logs: ~45
        -- instead of ~400 for 13 months of history), and every query plans fewer of them.
        hist_end := CASE WHEN v_unit IN ('day', 'week') AND pol.retention IS NOT NULL
                         THEN least(dbops.p2_bucket(v_unit, now() - pol.retention), hi) END;
        b := lo;
        WHILE hist_end IS NOT NULL AND b < hist_end LOOP
            nhist := nhist + 1;
            b := least(dbops.p2_next('month', dbops.p2_bucket('month', b)), hist_end);
        END LOOP;
        nparts := nhist;
        WHILE b <= hi LOOP
            nparts := nparts + 1;
            b := dbops.p2_next(v_unit, b);
        END LOOP;
        IF nparts > coalesce(cfg.max_initial_partitions, 1000) THEN
            RAISE EXCEPTION 'p2_prepare: % % partitions needed for public.% (% .. %): above max_initial_partitions',
                nparts, v_unit, tbl, lo, hi
                USING HINT = 'Check the oldest / newest values of the partition key, or raise dbops.p2_config.max_initial_partitions.';
        END IF;
        b := lo;
        WHILE hist_end IS NOT NULL AND b < hist_end LOOP
            e := least(dbops.p2_next('month', dbops.p2_bucket('month', b)), hist_end);
            tmpname := dbops.p2_name(tbl, '_h' || to_char(b AT TIME ZONE 'UTC', 'YYYY_MM'));
            IF to_regclass(format('public.%I', tmpname)) IS NOT NULL THEN
                RAISE EXCEPTION 'p2_prepare: public.% already exists', tmpname;
            END IF;
            EXECUTE format('CREATE TABLE public.%I PARTITION OF public.%I FOR VALUES FROM (%s) TO (%s)',
                           tmpname, shadow, dbops.p2_lit(b), dbops.p2_lit(e));
            b := e;
        END LOOP;
        WHILE b <= hi LOOP
            IF to_regclass(format('public.%I', dbops.p2_part_name(tbl, v_unit, b))) IS NOT NULL THEN
                RAISE EXCEPTION 'p2_prepare: public.% already exists', dbops.p2_part_name(tbl, v_unit, b);
            END IF;
            EXECUTE format('CREATE TABLE public.%I PARTITION OF public.%I FOR VALUES FROM (%s) TO (%s)',
                           dbops.p2_part_name(tbl, v_unit, b), shadow, dbops.p2_lit(b),
                           dbops.p2_lit(dbops.p2_next(v_unit, b)));
            b := dbops.p2_next(v_unit, b);
        END LOOP;
        EXECUTE format('CREATE TABLE public.%I PARTITION OF public.%I DEFAULT', tbl || '_default', shadow);
        -- owner, privileges, comments, storage settings, replica identity of the source (again at the swap)
        PERFORM dbops.p2_match_props(tbl, src, format('public.%I', shadow)::regclass);

        -- ---------------------------------------------------------------- references
        PERFORM dbops.p2_capture_refs(tbl);

        fwd := dbops.p2_name('p2_fwd_' || tbl, '');
        rev := dbops.p2_name('p2_rev_' || tbl, '');
        INSERT INTO dbops.p2_state (table_name, step, shadow_name, twin_name, pk_col, pk_type, key_col, unit,
                                    key_expr, null_key_fallback, ins_cols, all_cols, fwd_function, rev_function,
                                    sequences, guards, warnings, range_from, range_to, partitions_created, rows_total)
        VALUES (tbl, 'shadow_created', shadow, twin, v_pk_col, v_pk_type, v_key_col, v_unit,
                v_key_expr, fallback, v_ins_cols, v_all_cols, fwd, rev,
                v_seqs, v_guards, v_warnings, lo, dbops.p2_next(v_unit, hi), nparts,
                greatest((SELECT reltuples::bigint FROM pg_class WHERE oid = src), 0))
        RETURNING * INTO st;
        PERFORM dbops.p2_sync_functions(tbl);
        shadow_made := true;
    END IF;

    -- -------------------------------------------------------------------- the sync trigger
    -- SHARE ROW EXCLUSIVE on the source: waits for writers in flight, blocks new ones while it
    -- waits (bounded by lock_timeout), held only until this transaction commits (right after).
    BEGIN
        PERFORM dbops.p2_default_lock_timeout();
        EXECUTE format('CREATE TRIGGER p2_sync_fwd AFTER INSERT OR UPDATE OR DELETE ON public.%I '
                       'FOR EACH ROW EXECUTE FUNCTION dbops.%I()', tbl, st.fwd_function);
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = format('public.%I', tbl)::regclass
                       AND tgname = 'p2_block_truncate') THEN
            -- (a table referenced through a trigger pair has its guard already)
            EXECUTE format('CREATE TRIGGER p2_block_truncate BEFORE TRUNCATE ON public.%I '
                           'FOR EACH STATEMENT EXECUTE FUNCTION dbops.p2_block_truncate()', tbl);
        END IF;
        UPDATE dbops.p2_state SET step = 'prepared', prepared_at = now(), updated_at = now()
        WHERE table_name = tbl;
        res := jsonb_build_object('status', 'prepared', 'changed', true, 'table', tbl, 'shadow', st.shadow_name,
                                  'partitions', st.partitions_created, 'unit', st.unit,
                                  'history_partitions', (SELECT count(*) FROM pg_inherits ih JOIN pg_class c ON c.oid = ih.inhrelid
                                                         WHERE ih.inhparent = to_regclass(format('public.%I', st.shadow_name))
                                                           AND c.relname ~ '_h[0-9]{4}_[0-9]{2}$'),
                                  'range_from', st.range_from, 'range_to', st.range_to,
                                  'rows_estimate', st.rows_total, 'guards', st.guards, 'warnings', st.warnings,
                                  'null_key_fallback', st.null_key_fallback,
                                  'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
    EXCEPTION WHEN lock_not_available THEN
        res := jsonb_build_object('status', 'retry', 'changed', shadow_made, 'table', tbl, 'step', 'shadow_created',
                                  'reason', 'lock_not_available: the sync trigger could not lock the source; call again');
    END;
    RETURN dbops.p2_log(tbl, 'prepare', res);
END
$fn$;
