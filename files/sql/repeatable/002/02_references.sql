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

-- Under REPEATABLE READ and SERIALIZABLE a trigger's queries see the transaction's snapshot, not
-- the latest committed state that PostgreSQL's own unique indexes and RI triggers check against
-- (ri_triggers.c runs them with the latest snapshot and a crosscheck against the transaction's:
-- a row the transaction cannot see raises 40001). The functions below get the same answer from
-- dbops.p2_key_touches (002_04_key_touches.sql): dbops.p2_touch() upserts (ns, key); the row
-- lock serializes the writers of one key, and when the row was written by a transaction this
-- one's snapshot does not see, PostgreSQL raises "could not serialize access due to concurrent
-- update" (40001) itself. docs/PHASE2_DESIGN.md, "Integrity under every isolation level", lists
-- what each isolation level and statement kind gets.
CREATE OR REPLACE FUNCTION dbops.p2_touch(ns text, key text) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO dbops.p2_key_touches AS k (h) VALUES (hashtextextended(ns || '|' || key, 0))
    ON CONFLICT (h) DO UPDATE SET xid = pg_current_xact_id()
$$;

-- The table a trigger's relation belongs to: the root of its partition tree, or itself.
CREATE OR REPLACE FUNCTION dbops.p2_root(rel oid) RETURNS regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(pg_partition_root(rel), rel)::regclass
$$;

-- Trigger arguments are only trusted when they are the engine's own record: the engine's
-- functions are not executable by PUBLIC (11_privileges.sql), and each call checks that its
-- trigger sits on the table the record names, with the record's arguments (a role that could
-- attach dbops.p2_ref_action to a table of its own, with another table as the "child", deleted
-- that table's rows as the engine's owner).
CREATE OR REPLACE FUNCTION dbops.p2_ref_args_ok(rel oid, side text, args text []) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    -- the table's name through the catalog caches (current), not a query of pg_class: a
    -- REPEATABLE READ writer whose snapshot predates the swap would still see the old names
    SELECT EXISTS (
        SELECT 1
        FROM dbops.p2_refs f
        WHERE f.conname = args[1]
          AND dbops.p2_root(rel)::text = format('public.%I', CASE side WHEN 'child' THEN f.child_table ELSE f.parent_table END)
          AND args[2] = format('public.%I', CASE side WHEN 'child' THEN f.parent_table ELSE f.child_table END)
          AND args[3] = array_to_string(f.child_cols, ',') AND args[4] = array_to_string(f.parent_cols, ',')
          AND (side = 'child' OR (args[5] = f.on_delete AND args[6] = f.on_update)))
$$;

-- A trigger of an engine function that the engine's record does not hold. Under READ COMMITTED
-- the record is read in a fresh snapshot: refused (42501). Under REPEATABLE READ / SERIALIZABLE
-- the record is read in the transaction's snapshot, which may predate the step that installed the
-- trigger (prepare, swap, rollback): a serialization failure (40001), which the client retries in
-- a new snapshot, where it passes, or is refused again if the trigger really is not the engine's.
CREATE OR REPLACE FUNCTION dbops.p2_refuse_trigger(fn text, rel oid, args text []) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE serialization_failure USING
            MESSAGE = 'could not serialize access due to a concurrent Phase 2 step',
            DETAIL = format('%s: the trigger on %s with arguments %s is not in the engine''s record as this '
                            'transaction''s snapshot sees it (a conversion step committed after it was taken).',
                            fn, rel::regclass, array_to_string(args, ', ')),
            HINT = 'Retry the transaction.';
    END IF;
    RAISE insufficient_privilege USING
        MESSAGE = format('%s: trigger on %s with arguments %s is not one the engine installed', fn,
                         rel::regclass, array_to_string(args, ', ')),
        HINT = 'The engine''s trigger functions only act for the references and keys recorded in dbops.p2_refs / dbops.p2_state.';
END
$$;

-- Statement trigger: TRUNCATE would bypass the row-level triggers. On the source during its
-- conversion, on the partitioned table and each of its partitions while swapped (the reverse
-- sync), and on every partition of a table referenced through a trigger-pair reference (a
-- native foreign key refuses TRUNCATE of the referenced table, and statement triggers are not
-- cloned to partitions: dbops.p2_truncate_guards installs one per partition).
CREATE OR REPLACE FUNCTION dbops.p2_block_truncate() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    root regclass := dbops.p2_root(TG_RELID);
    rname text := (parse_ident(root::text))[2];   -- current name (catalog cache), whatever the snapshot
    child text;
BEGIN
    IF EXISTS (SELECT 1 FROM dbops.p2_state s WHERE s.table_name = rname AND s.step <> 'finalized') THEN
        RAISE EXCEPTION 'TRUNCATE of % is blocked while its Phase 2 conversion is in progress', TG_TABLE_NAME
            USING HINT = 'Finish (dbops.p2_finalize) or cancel (dbops.p2_abort) the conversion first.';
    END IF;
    SELECT f.child_table INTO child FROM dbops.p2_refs f
    JOIN pg_trigger tg ON tg.tgrelid = root AND tg.tgfoid = 'dbops.p2_ref_action()'::regprocedure
                      AND tg.tgname = dbops.p2_name('p2ref_' || f.conname, '')
    WHERE f.parent_table = rname
    ORDER BY f.child_table LIMIT 1;
    IF child IS NOT NULL THEN
        RAISE feature_not_supported USING
            MESSAGE = 'cannot truncate a table referenced in a foreign key constraint',
            DETAIL = format('Table "%s" references "%s".', child, rname),
            HINT = 'Delete the rows instead (the reference''s action runs), or let cleanup_old_data() detach and drop expired partitions.';
    END IF;
    RETURN NULL;
END
$$;

-- TRUNCATE guards of public.<tbl>: the table itself while it converts, is swapped or is referenced
-- through a trigger pair; each leaf partition while swapped or referenced. Missing guards are
-- created, guards no longer needed on partitions are dropped (the table's own is also managed by
-- prepare / swap / rollback / abort). Tables the engine neither converts nor references through
-- triggers are not touched. Idempotent, catalog only; the caller holds or takes the locks
-- (CREATE TRIGGER: SHARE ROW EXCLUSIVE). Returns the number of triggers created or dropped.
CREATE OR REPLACE FUNCTION dbops.p2_truncate_guards(tbl text) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel regclass := to_regclass(format('public.%I', tbl));
    step text := (SELECT s.step FROM dbops.p2_state s WHERE s.table_name = tbl);
    referenced boolean;
    need_root boolean;
    need_leaf boolean;
    r record;
    n integer := 0;
BEGIN
    IF rel IS NULL THEN
        RETURN 0;
    END IF;
    referenced := EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = rel AND tg.tgparentid = 0
                          AND tg.tgfoid = 'dbops.p2_ref_action()'::regprocedure);
    IF step IS NULL AND NOT referenced
       AND NOT EXISTS (SELECT 1 FROM pg_partition_tree(rel) t JOIN pg_trigger tg ON tg.tgrelid = t.relid
                       WHERE tg.tgname = 'p2_block_truncate') THEN
        RETURN 0;
    END IF;
    need_root := referenced OR coalesce(step, 'finalized') <> 'finalized';
    need_leaf := referenced OR step = 'swapped';
    FOR r IN SELECT t.relid, t.relid = rel AS is_root,
                    EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = t.relid AND tg.tgname = 'p2_block_truncate') AS has
             FROM pg_partition_tree(rel) t
             WHERE t.relid = rel OR t.isleaf
             UNION ALL   -- a plain table has no partition tree row on PostgreSQL 13
             SELECT rel, true, EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = rel AND tg.tgname = 'p2_block_truncate')
             WHERE NOT EXISTS (SELECT 1 FROM pg_partition_tree(rel))
    LOOP
        IF (CASE WHEN r.is_root THEN need_root ELSE need_leaf END) AND NOT r.has THEN
            EXECUTE format('CREATE TRIGGER p2_block_truncate BEFORE TRUNCATE ON %s '
                           'FOR EACH STATEMENT EXECUTE FUNCTION dbops.p2_block_truncate()', r.relid::regclass);
            n := n + 1;
        ELSIF NOT (CASE WHEN r.is_root THEN need_root ELSE need_leaf END) AND r.has THEN
            EXECUTE format('DROP TRIGGER p2_block_truncate ON %s', r.relid::regclass);
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END
$$;

-- One new partition (maintain_partitions, after its ATTACH): the guards of its table.
CREATE OR REPLACE FUNCTION dbops.p2_protect_partition(part regclass) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    root regclass := dbops.p2_root(part);
BEGIN
    IF root = part OR (SELECT relnamespace FROM pg_class WHERE oid = root) <> 'public'::regnamespace THEN
        RETURN false;
    END IF;
    RETURN dbops.p2_truncate_guards((SELECT relname::text FROM pg_class WHERE oid = root)) > 0;
END
$$;

-- Reference check on the referencing (child) side, replacing a foreign key whose referenced
-- table is partitioned (a FK must reference a unique key that includes the partition key).
-- Args: constraint name, referenced table (qualified), child columns, parent columns (csv).
-- MATCH SIMPLE like the FK it replaces; FOR KEY SHARE on the referenced row, like RI_FKey_check
-- (under REPEATABLE READ / SERIALIZABLE a referenced row deleted or re-keyed since the snapshot
-- raises 40001 there, as in RI_FKey_check). Then the new reference is touched
-- ('r:<constraint>', key): a REPEATABLE READ / SERIALIZABLE transaction deleting or re-keying that
-- row whose snapshot predates this one's commit gets 40001 from its own touch in p2_ref_action,
-- where PostgreSQL's crosscheck snapshot raises it for a native foreign key.
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
    IF NOT dbops.p2_ref_args_ok(TG_RELID, 'child', TG_ARGV[0:5]) THEN
        PERFORM dbops.p2_refuse_trigger('dbops.p2_ref_check', TG_RELID, TG_ARGV[0:5]);
    END IF;
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
    PERFORM dbops.p2_touch('r:' || TG_ARGV[0], vals);
    RETURN NULL;
END
$$;

-- A row of a partitioned parent moved to another partition by an UPDATE fires AFTER DELETE on
-- its old partition and AFTER INSERT on the new one, never AFTER UPDATE (PostgreSQL 15 fires the
-- update action for its own foreign keys, not for user triggers). So that a move that also
-- changes the referenced key gets the reference's ON UPDATE rule (NO ACTION: refused while
-- referenced), not its ON DELETE action, this BEFORE UPDATE OF <key> trigger (WHEN the key
-- changes) notes the old key and the new values for this transaction; p2_ref_action takes the
-- note back, on the DELETE of a move or the UPDATE of a row that stayed. A note can only turn a
-- DELETE into the stricter or equally checked UPDATE rule (the child's own check trigger still
-- checks every new reference): a session writing one itself gains nothing.
-- Args: as p2_ref_action.
CREATE OR REPLACE FUNCTION dbops.p2_ref_move() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pcols text [] := string_to_array(TG_ARGV[3], ',');
    oldkey text;
    newvals jsonb;
    notes jsonb := coalesce(nullif(current_setting('dbops.p2_ref_moves', true), ''), '{}')::jsonb;
BEGIN
    IF NOT dbops.p2_ref_args_ok(TG_RELID, 'parent', TG_ARGV[0:5]) THEN
        PERFORM dbops.p2_refuse_trigger('dbops.p2_ref_move', TG_RELID, TG_ARGV[0:5]);
    END IF;
    EXECUTE format('SELECT ROW(%s)::text, jsonb_build_object(%s)',
                   (SELECT string_agg(format('($1).%I', c), ', ') FROM unnest(pcols) c),
                   (SELECT string_agg(format('%L, ($2).%I', c, c), ', ') FROM unnest(pcols) c))
        INTO oldkey, newvals USING OLD, NEW;
    PERFORM set_config('dbops.p2_ref_moves',
                       jsonb_set(notes, ARRAY[TG_ARGV[0] || ':' || oldkey], newvals)::text, true);
    RETURN NEW;
END
$$;

-- Referential action on the referenced (parent) side: AFTER DELETE / UPDATE OF key columns.
-- Args: constraint name, child table (qualified), child cols, parent cols, on_delete, on_update
-- (pg_constraint codes: a = no action, r = restrict, c = cascade, n = set null, d = set default).
-- A row moved to another partition keeping its key fires AFTER DELETE on the old partition: the
-- action only runs when no row with the old key remains. A move that changes the key is an
-- UPDATE (p2_ref_move's note). Under REPEATABLE READ / SERIALIZABLE the old key is touched
-- first: a reference to it committed after this transaction's snapshot (invisible to the
-- action's statements below) raises 40001, as PostgreSQL's crosscheck snapshot does.
CREATE OR REPLACE FUNCTION dbops.p2_ref_action() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    child text := TG_ARGV[1];
    ccols text [] := string_to_array(TG_ARGV[2], ',');
    pcols text [] := string_to_array(TG_ARGV[3], ',');
    op text := TG_OP;
    action text;
    parent text;
    match_old text;
    still boolean;
    oldkey text;
    note text;
    notes jsonb;
    newvals jsonb;
BEGIN
    IF NOT dbops.p2_ref_args_ok(TG_RELID, 'parent', TG_ARGV[0:5]) THEN
        PERFORM dbops.p2_refuse_trigger('dbops.p2_ref_action', TG_RELID, TG_ARGV[0:5]);
    END IF;
    EXECUTE format('SELECT ROW(%s)::text', (SELECT string_agg(format('($1).%I', c), ', ') FROM unnest(pcols) c))
        INTO oldkey USING OLD;
    notes := nullif(current_setting('dbops.p2_ref_moves', true), '')::jsonb;
    note := TG_ARGV[0] || ':' || oldkey;
    IF notes ? note THEN   -- a key change noted by p2_ref_move: this row is done, drop the note
        newvals := notes -> note;
        PERFORM set_config('dbops.p2_ref_moves', (notes - note)::text, true);
        op := 'UPDATE';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        EXECUTE format('SELECT ROW(%s) IS NOT DISTINCT FROM ROW(%s)',
                       (SELECT string_agg(format('($1).%I', c), ', ') FROM unnest(pcols) c),
                       (SELECT string_agg(format('($2).%I', c), ', ') FROM unnest(pcols) c))
            INTO still USING NEW, OLD;
        IF still THEN
            RETURN NULL;
        END IF;
        newvals := to_jsonb(NEW);
    END IF;
    action := CASE op WHEN 'DELETE' THEN TG_ARGV[4] ELSE TG_ARGV[5] END;
    -- the parent table as the statement sees it (the trigger may be cloned on a partition)
    parent := dbops.p2_root(TG_RELID)::text;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s p WHERE %s)', parent,
                   (SELECT string_agg(format('p.%I = ($1).%I', c, c), ' AND ') FROM unnest(pcols) c))
        INTO still USING OLD;
    IF still THEN
        RETURN NULL;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM dbops.p2_touch('r:' || TG_ARGV[0], oldkey);
    END IF;
    match_old := (SELECT string_agg(format('c.%I = ($1).%I', ccols[i], pcols[i]), ' AND ')
                  FROM generate_subscripts(ccols, 1) i);
    IF action IN ('a', 'r') THEN
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s c WHERE %s)', child, match_old) INTO still USING OLD;
        IF still THEN
            RAISE foreign_key_violation USING
                MESSAGE = format('update or delete on table "%s" violates foreign key constraint "%s" on table "%s"',
                                 split_part(parent, '.', 2), TG_ARGV[0], split_part(child, '.', 2)),
                DETAIL = format('Key (%s)=%s is still referenced from table "%s".', TG_ARGV[3], oldkey,
                                split_part(child, '.', 2)),
                CONSTRAINT = TG_ARGV[0];
        END IF;
    ELSIF action = 'n' OR action = 'd' THEN
        EXECUTE format('UPDATE %s c SET %s WHERE %s', child,
                       (SELECT string_agg(format('%I = %s', c, CASE action WHEN 'n' THEN 'NULL' ELSE 'DEFAULT' END), ', ')
                        FROM unnest(ccols) c), match_old) USING OLD;
    ELSIF action = 'c' AND op = 'DELETE' THEN
        EXECUTE format('DELETE FROM %s c WHERE %s', child, match_old) USING OLD;
    ELSIF action = 'c' THEN
        EXECUTE format('UPDATE %s c SET %s WHERE %s', child,
                       (SELECT string_agg(format('%I = (jsonb_populate_record(NULL::%s, $2)).%I', ccols[i], parent, pcols[i]), ', ')
                        FROM generate_subscripts(ccols, 1) i), match_old) USING OLD, newvals;
    END IF;
    RETURN NULL;
END
$$;

-- Global uniqueness of a unique key that lost its partition-wide index (a unique index of a
-- partitioned table must include the partition key): BEFORE INSERT / UPDATE OF the key columns.
-- Args: constraint name, table (qualified), key columns, primary-key columns (csv).
-- The key is touched first (dbops.p2_touch): a concurrent writer of the same key makes this one
-- wait for its end, as a unique index does, and under REPEATABLE READ / SERIALIZABLE a writer
-- that committed after this transaction's snapshot raises 40001. Then the lookup, FOR KEY SHARE:
-- under READ COMMITTED a fresh snapshot sees every committed row; a row found that a concurrent
-- transaction deleted is waited for (READ COMMITTED: gone, no conflict) or raises 40001
-- (REPEATABLE READ: its snapshot still holds the row, the index would not).
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
    IF NOT EXISTS (SELECT 1 FROM dbops.p2_state s, jsonb_array_elements(s.guards) g
                   WHERE format('public.%I', s.table_name) = TG_ARGV[1]
                     AND dbops.p2_root(TG_RELID)::text = TG_ARGV[1]
                     AND g ->> 'name' = TG_ARGV[0]
                     AND (SELECT string_agg(c, ',') FROM jsonb_array_elements_text(g -> 'cols') c) = TG_ARGV[2]
                     AND array_to_string(ARRAY[s.pk_col, s.key_col], ',') = TG_ARGV[3]) THEN
        PERFORM dbops.p2_refuse_trigger('dbops.p2_guard_unique', TG_RELID, TG_ARGV[0:5]);
    END IF;
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
    PERFORM dbops.p2_touch('u:' || TG_ARGV[1] || ':' || TG_ARGV[0], vals);
    EXECUTE format('SELECT 1 FROM %s t WHERE %s AND ROW(%s) IS DISTINCT FROM ROW(%s)%s LIMIT 1 FOR KEY SHARE OF t',
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

-- Rows of dbops.p2_key_touches no snapshot can need any more (maintain_partitions() calls it,
-- committing between calls): those written by transactions that ended before the previous
-- prune, once every transaction that ran at the previous prune has ended (each holds its virtual
-- transaction id lock, visible to every role in pg_locks, from its start to its end). At most
-- batch_rows per call: {"more": true} until none is left, then it notes what runs now for the
-- next prune. Returns {"deleted": n, "more": bool, "waiting_for": [...]}.
CREATE OR REPLACE FUNCTION dbops.p2_touch_prune(batch_rows integer DEFAULT 10000) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    prev dbops.p2_key_touches_prune;
    left_running text [];
    d bigint := 0;
BEGIN
    SELECT * INTO prev FROM dbops.p2_key_touches_prune FOR UPDATE;
    IF FOUND THEN
        left_running := ARRAY(SELECT l.virtualxid FROM pg_locks l
                              WHERE l.locktype = 'virtualxid' AND l.granted AND l.virtualxid = ANY (prev.vxids));
        IF cardinality(left_running) > 0 THEN
            RETURN jsonb_build_object('deleted', 0, 'more', false, 'changed', false, 'waiting_for', to_jsonb(left_running));
        END IF;
        DELETE FROM dbops.p2_key_touches k
        WHERE k.h IN (SELECT x.h FROM dbops.p2_key_touches x WHERE x.xid < prev.oldest_xid LIMIT batch_rows);
        GET DIAGNOSTICS d = ROW_COUNT;
        IF d >= batch_rows THEN
            RETURN jsonb_build_object('deleted', d, 'more', true, 'changed', true, 'waiting_for', '[]'::jsonb);
        END IF;
    END IF;
    INSERT INTO dbops.p2_key_touches_prune (id, at, oldest_xid, vxids)
    VALUES (true, now(), pg_snapshot_xmin(pg_current_snapshot()),
            ARRAY(SELECT l.virtualxid FROM pg_locks l
                  WHERE l.locktype = 'virtualxid' AND l.granted AND l.pid <> pg_backend_pid()))
    ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at, oldest_xid = EXCLUDED.oldest_xid, vxids = EXCLUDED.vxids;
    RETURN jsonb_build_object('deleted', d, 'more', false, 'changed', d > 0, 'waiting_for', '[]'::jsonb);
END
$$;

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
    mv_name text;
    parents text [] := '{}';
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
        mv_name := dbops.p2_name('p2refmv_' || r.conname, '');
        parents := parents || r.parent_table;
        native := (SELECT relkind FROM pg_class WHERE oid = child) = 'r'
                  AND (SELECT relkind FROM pg_class WHERE oid = parent) = 'r';
        -- trigger-form objects on relations where they no longer belong
        FOR t IN SELECT tg.tgname, tg.tgrelid::regclass AS rel FROM pg_trigger tg
                 WHERE tg.tgparentid = 0
                   AND ((tg.tgfoid = 'dbops.p2_ref_check()'::regprocedure AND tg.tgname = r.conname
                         AND (native OR tg.tgrelid <> child))
                     OR (tg.tgfoid = 'dbops.p2_ref_action()'::regprocedure AND tg.tgname = act_name
                         AND (native OR tg.tgrelid <> parent))
                     OR (tg.tgfoid = 'dbops.p2_ref_move()'::regprocedure AND tg.tgname = mv_name
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
            IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = parent AND tgname = mv_name) THEN
                EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OF %s ON %s FOR EACH ROW '
                               'WHEN (ROW(%s) IS DISTINCT FROM ROW(%s)) '
                               'EXECUTE FUNCTION dbops.p2_ref_move(%L, %L, %L, %L, %L, %L)',
                               mv_name, dbops.p2_collist(r.parent_cols), parent,
                               dbops.p2_collist(r.parent_cols, prefix => 'OLD.'),
                               dbops.p2_collist(r.parent_cols, prefix => 'NEW.'), r.conname,
                               format('public.%I', r.child_table),
                               array_to_string(r.child_cols, ','), array_to_string(r.parent_cols, ','),
                               r.on_delete, r.on_update);
            END IF;
            done := done || jsonb_build_object('constraint', r.conname, 'form', 'triggers');
        END IF;
    END LOOP;
    -- the TRUNCATE guards of the referenced tables follow the form of their references
    PERFORM dbops.p2_truncate_guards(p) FROM (SELECT DISTINCT unnest(parents) AS p) x;
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

-- Databases converted by an earlier version of this file: bring the references to the current
-- form (the key-move trigger of each trigger-pair reference) and the TRUNCATE guards of every
-- converted table's partitions. Catalog only; nothing to do on a database not yet converted.
DO $$
DECLARE
    t text;
BEGIN
    IF EXISTS (SELECT 1 FROM dbops.p2_state WHERE step IN ('swapped', 'finalized')) THEN
        PERFORM dbops.p2_apply_refs();
    END IF;
    FOR t IN SELECT table_name FROM dbops.p2_state ORDER BY table_name LOOP
        PERFORM dbops.p2_truncate_guards(t);
    END LOOP;
END
$$;
