-- Phase 2 engine: what keeps integrity while a table is partitioned: the shared trigger
-- functions (TRUNCATE block, reference checks and actions, global uniqueness), the capture and
-- re-application of foreign keys around a swap, and the copy of table privileges.

-- ---------------------------------------------------------------------------------------------
-- Trigger functions shared by every converted table (SECURITY DEFINER: they act with the
-- engine owner's rights, like PostgreSQL's own RI triggers act with the table owner's)
-- ---------------------------------------------------------------------------------------------
-- They check every row whoever writes it: no session setting switches them off (they once
-- skipped rows while a custom setting, dbops.p2_internal_move, was 'on', and any session could
-- SET it). The one write that must not fire them, maintain_partitions() moving rows out of a
-- DEFAULT partition, disables the engine's triggers on that partition for that statement,
-- inside its own transaction (08_daily_jobs.sql says why that is sound).

-- Statement trigger: TRUNCATE would bypass the row-level sync triggers.
CREATE OR REPLACE FUNCTION dbops.p2_block_truncate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE of % is blocked while its Phase 2 conversion is in progress', TG_TABLE_NAME
        USING HINT = 'Finish (dbops.p2_finalize) or cancel (dbops.p2_abort) the conversion first.';
END
$$;

-- Reference check on the referencing (child) side, replacing a foreign key whose referenced
-- table is partitioned (a FK must reference a unique key that includes the partition key).
-- Args: constraint name, referenced table (qualified), child columns, parent columns (csv).
-- MATCH SIMPLE like the FK it replaces; FOR KEY SHARE on the referenced row, like RI_FKey_check.
CREATE OR REPLACE FUNCTION dbops.p2_ref_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ccols text [] := string_to_array(TG_ARGV[2], ',');
    pcols text [] := string_to_array(TG_ARGV[3], ',');
    anynull boolean;
    unchanged boolean := false;
    hit integer;
    vals text;
BEGIN
    EXECUTE format('SELECT %s, ROW(%s)::text',
                   (SELECT string_agg(format('($1).%I IS NULL', c), ' OR ') FROM unnest(ccols) c),
                   (SELECT string_agg(format('($1).%I', c), ', ') FROM unnest(ccols) c))
        INTO anynull, vals USING NEW;
    IF anynull THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        EXECUTE format('SELECT ROW(%s) IS NOT DISTINCT FROM ROW(%s)',
                       (SELECT string_agg(format('($1).%I', c), ', ') FROM unnest(ccols) c),
                       (SELECT string_agg(format('($2).%I', c), ', ') FROM unnest(ccols) c))
            INTO unchanged USING NEW, OLD;
        IF unchanged THEN
            RETURN NULL;
        END IF;
    END IF;
    EXECUTE format('SELECT 1 FROM %s p WHERE %s LIMIT 1 FOR KEY SHARE OF p', TG_ARGV[1],
                   (SELECT string_agg(format('p.%I = ($1).%I', pcols[i], ccols[i]), ' AND ')
                    FROM generate_subscripts(ccols, 1) i))
        INTO hit USING NEW;
    IF hit IS NULL THEN
        RAISE foreign_key_violation USING
            MESSAGE = format('insert or update on table "%s" violates foreign key constraint "%s"',
                             TG_TABLE_NAME, TG_ARGV[0]),
            DETAIL = format('Key (%s)=%s is not present in table "%s".', TG_ARGV[2], vals,
                            split_part(TG_ARGV[1], '.', 2)),
            CONSTRAINT = TG_ARGV[0];
    END IF;
    RETURN NULL;
END
$$;

-- Referential action on the referenced (parent) side: AFTER DELETE / UPDATE OF key columns.
-- Args: constraint name, child table (qualified), child cols, parent cols, on_delete, on_update
-- (pg_constraint codes: a = no action, r = restrict, c = cascade, n = set null, d = set default).
-- A row moved to another partition by an UPDATE fires AFTER DELETE on the old partition: the
-- action only runs when no row with the old key remains.
CREATE OR REPLACE FUNCTION dbops.p2_ref_action() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    child text := TG_ARGV[1];
    ccols text [] := string_to_array(TG_ARGV[2], ',');
    pcols text [] := string_to_array(TG_ARGV[3], ',');
    action text := CASE TG_OP WHEN 'DELETE' THEN TG_ARGV[4] ELSE TG_ARGV[5] END;
    parent text;
    match_old text;
    still boolean;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        EXECUTE format('SELECT ROW(%s) IS NOT DISTINCT FROM ROW(%s)',
                       (SELECT string_agg(format('($1).%I', c), ', ') FROM unnest(pcols) c),
                       (SELECT string_agg(format('($2).%I', c), ', ') FROM unnest(pcols) c))
            INTO still USING NEW, OLD;
        IF still THEN
            RETURN NULL;
        END IF;
    END IF;
    -- the parent table as the statement sees it (the trigger may be cloned on a partition;
    -- pg_partition_ancestors() has no row for a plain table)
    SELECT format('%I.%I', n2.nspname, c2.relname) INTO parent
    FROM pg_partition_ancestors(TG_RELID) a (relid)
    JOIN pg_class c2 ON c2.oid = a.relid JOIN pg_namespace n2 ON n2.oid = c2.relnamespace
    WHERE NOT c2.relispartition;
    parent := coalesce(parent, format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME));
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s p WHERE %s)', parent,
                   (SELECT string_agg(format('p.%I = ($1).%I', c, c), ' AND ') FROM unnest(pcols) c))
        INTO still USING OLD;
    IF still THEN
        RETURN NULL;
    END IF;
    match_old := (SELECT string_agg(format('c.%I = ($1).%I', ccols[i], pcols[i]), ' AND ')
                  FROM generate_subscripts(ccols, 1) i);
    IF action IN ('a', 'r') THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s c WHERE %s)', child, match_old) INTO still USING OLD;
        IF still THEN
            RAISE foreign_key_violation USING
                MESSAGE = format('update or delete on table "%s" violates foreign key constraint "%s" on table "%s"',
                                 split_part(parent, '.', 2), TG_ARGV[0], split_part(child, '.', 2)),
                CONSTRAINT = TG_ARGV[0];
        END IF;
    ELSIF action = 'n' OR action = 'd' THEN
        EXECUTE format('UPDATE %s c SET %s WHERE %s', child,
                       (SELECT string_agg(format('%I = %s', c, CASE action WHEN 'n' THEN 'NULL' ELSE 'DEFAULT' END), ', ')
                        FROM unnest(ccols) c), match_old) USING OLD;
    ELSIF action = 'c' AND TG_OP = 'DELETE' THEN
        EXECUTE format('DELETE FROM %s c WHERE %s', child, match_old) USING OLD;
    ELSIF action = 'c' THEN
        EXECUTE format('UPDATE %s c SET %s WHERE %s', child,
                       (SELECT string_agg(format('%I = ($2).%I', ccols[i], pcols[i]), ', ')
                        FROM generate_subscripts(ccols, 1) i), match_old) USING OLD, NEW;
    END IF;
    RETURN NULL;
END
$$;

-- Global uniqueness of a unique key that lost its partition-wide index (a unique index of a
-- partitioned table must include the partition key): BEFORE INSERT / UPDATE OF the key columns.
-- Args: constraint name, table (qualified), key columns, primary-key columns (csv).
-- Concurrent inserts of the same key serialize on a transaction advisory lock, then look the key
-- up with a fresh snapshot (READ COMMITTED), so two sessions cannot both pass.
CREATE OR REPLACE FUNCTION dbops.p2_guard_unique() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cols text [] := string_to_array(TG_ARGV[2], ',');
    pk text [] := string_to_array(TG_ARGV[3], ',');
    anynull boolean;
    unchanged boolean := false;
    vals text;
    hit integer;
BEGIN
    EXECUTE format('SELECT %s, ROW(%s)::text',
                   (SELECT string_agg(format('($1).%I IS NULL', c), ' OR ') FROM unnest(cols) c),
                   (SELECT string_agg(format('($1).%I', c), ', ') FROM unnest(cols) c))
        INTO anynull, vals USING NEW;
    IF anynull THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        EXECUTE format('SELECT ROW(%s) IS NOT DISTINCT FROM ROW(%s)',
                       (SELECT string_agg(format('($1).%I', c), ', ') FROM unnest(cols) c),
                       (SELECT string_agg(format('($2).%I', c), ', ') FROM unnest(cols) c))
            INTO unchanged USING NEW, OLD;
        IF unchanged THEN
            RETURN NEW;
        END IF;
    END IF;
    PERFORM pg_advisory_xact_lock(80621, hashtext(TG_ARGV[1] || ':' || TG_ARGV[0] || ':' || vals));
    EXECUTE format('SELECT 1 FROM %s t WHERE %s AND ROW(%s) IS DISTINCT FROM ROW(%s)%s LIMIT 1',
                   TG_ARGV[1],
                   (SELECT string_agg(format('t.%I = ($1).%I', c, c), ' AND ') FROM unnest(cols) c),
                   (SELECT string_agg(format('t.%I', c), ', ') FROM unnest(pk) c),
                   (SELECT string_agg(format('($1).%I', c), ', ') FROM unnest(pk) c),
                   CASE WHEN TG_OP = 'UPDATE' THEN
                       format(' AND ROW(%s) IS DISTINCT FROM ROW(%s)',
                              (SELECT string_agg(format('t.%I', c), ', ') FROM unnest(pk) c),
                              (SELECT string_agg(format('($2).%I', c), ', ') FROM unnest(pk) c))
                   ELSE '' END)
        INTO hit USING NEW, OLD;
    IF hit IS NOT NULL THEN
        RAISE unique_violation USING
            MESSAGE = format('duplicate key value violates unique constraint "%s"', TG_ARGV[0]),
            DETAIL = format('Key (%s)=%s already exists.', TG_ARGV[2], vals),
            CONSTRAINT = TG_ARGV[0];
    END IF;
    RETURN NEW;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- References: native FK while both tables are plain, trigger pair once either is partitioned
-- ---------------------------------------------------------------------------------------------

-- Capture the foreign keys that involve public.<tbl> (either side), once: the first capture is
-- the pre-Phase-2 definition, used by rollback.
CREATE OR REPLACE FUNCTION dbops.p2_capture_refs(tbl text) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    INSERT INTO dbops.p2_refs (child_table, conname, parent_table, child_cols, parent_cols,
                               on_delete, on_update, definition)
    SELECT cc.relname, c.conname, pc.relname,
           ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k (n, o)
                 JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
           ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k (n, o)
                 JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o),
           c.confdeltype::text, c.confupdtype::text,
           regexp_replace(pg_get_constraintdef(c.oid), '\s+NOT VALID$', '')
    FROM pg_constraint c
    JOIN pg_class cc ON cc.oid = c.conrelid
    JOIN pg_class pc ON pc.oid = c.confrelid
    WHERE c.contype = 'f'
      AND cc.relnamespace = 'public'::regnamespace AND pc.relnamespace = 'public'::regnamespace
      AND (cc.relname = tbl OR pc.relname = tbl)
      -- the engine's own copies (old tables kept after a swap, shadows) are not logical tables
      AND NOT EXISTS (SELECT 1 FROM dbops.p2_state s
                      WHERE cc.relname IN (s.twin_name, s.shadow_name) OR pc.relname IN (s.twin_name, s.shadow_name))
    ON CONFLICT (child_table, conname) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Bring every recorded reference into the form that fits the current tables: a native foreign
-- key (added NOT VALID, validate later with dbops.p2_validate_refs()) when child and parent are
-- both plain tables, else the trigger pair (dbops.p2_ref_check on the child, p2_ref_action on
-- the parent). Objects left on other relations (the old table after a swap) are removed.
-- Idempotent. Runs inside p2_swap / p2_rollback, which hold the locks.
CREATE OR REPLACE FUNCTION dbops.p2_apply_refs() RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    t record;
    child regclass;
    parent regclass;
    native boolean;
    fk record;
    act_name text;
    done jsonb := '[]';
BEGIN
    FOR r IN SELECT * FROM dbops.p2_refs ORDER BY child_table, conname LOOP
        child := to_regclass(format('public.%I', r.child_table));
        parent := to_regclass(format('public.%I', r.parent_table));
        IF child IS NULL OR parent IS NULL THEN
            done := done || jsonb_build_object('constraint', r.conname, 'form', 'skipped: table missing');
            CONTINUE;
        END IF;
        act_name := dbops.p2_name('p2ref_' || r.conname, '');
        native := (SELECT relkind FROM pg_class WHERE oid = child) = 'r'
                  AND (SELECT relkind FROM pg_class WHERE oid = parent) = 'r';
        -- trigger-form objects on relations where they no longer belong
        FOR t IN SELECT tg.tgname, tg.tgrelid::regclass AS rel FROM pg_trigger tg
                 WHERE tg.tgparentid = 0
                   AND ((tg.tgfoid = 'dbops.p2_ref_check()'::regprocedure AND tg.tgname = r.conname
                         AND (native OR tg.tgrelid <> child))
                     OR (tg.tgfoid = 'dbops.p2_ref_action()'::regprocedure AND tg.tgname = act_name
                         AND (native OR tg.tgrelid <> parent)))
        LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', t.tgname, t.rel);
        END LOOP;
        SELECT c.oid, c.confrelid INTO fk FROM pg_constraint c
        WHERE c.conrelid = child AND c.conname = r.conname AND c.contype = 'f';
        IF native THEN
            IF fk.oid IS NOT NULL AND fk.confrelid <> parent THEN
                EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', child, r.conname);
                fk := NULL;
            END IF;
            IF fk.oid IS NULL THEN
                EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I %s NOT VALID', child, r.conname, r.definition);
                done := done || jsonb_build_object('constraint', r.conname, 'form', 'foreign key (NOT VALID)');
            ELSE
                done := done || jsonb_build_object('constraint', r.conname, 'form', 'foreign key');
            END IF;
        ELSE
            IF fk.oid IS NOT NULL THEN
                EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', child, r.conname);
            END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = child AND tgname = r.conname) THEN
                EXECUTE format('CREATE CONSTRAINT TRIGGER %I AFTER INSERT OR UPDATE OF %s ON %s '
                               'FOR EACH ROW EXECUTE FUNCTION dbops.p2_ref_check(%L, %L, %L, %L)',
                               r.conname, dbops.p2_collist(r.child_cols), child, r.conname,
                               format('public.%I', r.parent_table),
                               array_to_string(r.child_cols, ','), array_to_string(r.parent_cols, ','));
            END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = parent AND tgname = act_name) THEN
                EXECUTE format('CREATE TRIGGER %I AFTER DELETE OR UPDATE OF %s ON %s '
                               'FOR EACH ROW EXECUTE FUNCTION dbops.p2_ref_action(%L, %L, %L, %L, %L, %L)',
                               act_name, dbops.p2_collist(r.parent_cols), parent, r.conname,
                               format('public.%I', r.child_table),
                               array_to_string(r.child_cols, ','), array_to_string(r.parent_cols, ','),
                               r.on_delete, r.on_update);
            END IF;
            done := done || jsonb_build_object('constraint', r.conname, 'form', 'triggers');
        END IF;
    END LOOP;
    RETURN done;
END
$$;

-- Table privileges of dst made equal to those of src (idempotent): what src has and dst lacks is
-- granted, what dst has and src lacks is revoked (a REVOKE made between prepare and swap is carried).
-- Both owners are normally the same (p2_match_props sets it first); when they differ, the owners'
-- own entries are left alone. Returns the number of GRANT / REVOKE statements run.
CREATE OR REPLACE FUNCTION dbops.p2_copy_grants(src regclass, dst regclass) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    n integer := 0;
    owners oid [];
BEGIN
    SELECT array_agg(DISTINCT relowner) INTO owners FROM pg_class WHERE oid IN (src, dst);
    FOR r IN
        WITH s AS (SELECT a.grantee, a.privilege_type, a.is_grantable
                   FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a WHERE c.oid = src),
        d AS (SELECT a.grantee, a.privilege_type, a.is_grantable
              FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a WHERE c.oid = dst)
        SELECT * FROM (
            SELECT 'REVOKE' AS op, * FROM (SELECT * FROM d EXCEPT SELECT * FROM s) x
            UNION ALL
            SELECT 'GRANT' AS op, * FROM (SELECT * FROM s EXCEPT SELECT * FROM d) y) z
        WHERE cardinality(owners) = 1 OR z.grantee <> ALL (owners)
        ORDER BY op DESC, grantee, privilege_type
    LOOP
        EXECUTE format('%s %s ON %s %s %s%s', r.op, r.privilege_type, dst, CASE r.op WHEN 'GRANT' THEN 'TO' ELSE 'FROM' END,
                       CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END,
                       CASE WHEN r.op = 'GRANT' AND r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;

-- The tables whose rows reference public.<tbl> (their reference objects change at a swap).
CREATE OR REPLACE FUNCTION dbops.p2_child_tables(tbl text) RETURNS text []
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(DISTINCT format('public.%I', f.child_table)), '{}')
    FROM dbops.p2_refs f
    WHERE f.parent_table = tbl AND f.child_table <> tbl
      AND to_regclass(format('public.%I', f.child_table)) IS NOT NULL
$$;

-- VALIDATE the foreign keys p2_apply_refs re-added NOT VALID (after a rollback). SHARE UPDATE
-- EXCLUSIVE on the child, ROW SHARE on the parent: reads and writes go on during the scan.
CREATE OR REPLACE FUNCTION dbops.p2_validate_refs() RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    done jsonb := '[]';
BEGIN
    FOR r IN SELECT c.conrelid::regclass AS rel, c.conname
             FROM dbops.p2_refs f
             JOIN pg_constraint c ON c.conrelid = to_regclass(format('public.%I', f.child_table))
                                 AND c.conname = f.conname AND c.contype = 'f'
             WHERE NOT c.convalidated
    LOOP
        EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', r.rel, r.conname);
        done := done || to_jsonb(r.conname::text);
    END LOOP;
    RETURN dbops.p2_log(NULL, 'validate_refs', jsonb_build_object('validated', done,
                                                                 'changed', jsonb_array_length(done) > 0));
END
$$;
