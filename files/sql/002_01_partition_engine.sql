-- Phase 2 / step 1: the online partitioning engine (one transaction, idempotent: CREATE OR REPLACE).
--
-- Installs, and changes no application table:
--   * public.app_retention_policies   interval / retention / premake per table (the guide reads it)
--   * dbops.p2_config                 engine knobs per table (NULL partition-key policy, app key index)
--   * dbops.p2_state, p2_objects, p2_refs, p2_events   engine state, index-name map, references, log
--   * dbops.p2_prepare / p2_backfill (procedure) / p2_verify / p2_swap / p2_rollback / p2_finalize /
--     p2_abort / p2_validate_refs / p2_status   the steps Ansible runs, one short call each
--   * public.maintain_partitions(), public.cleanup_old_data()   the daily pg_cron jobs
--   * monitoring.partition_health     one row per partition
-- The conversion of a table only starts when Ansible calls dbops.p2_prepare(<table>).
-- Design, locks and failure modes: docs/PHASE2_DESIGN.md.
-- Every engine function works in UTC (date_trunc(..., 'UTC'), AT TIME ZONE 'UTC'): partition
-- boundaries never depend on the session's TimeZone.

CREATE SCHEMA IF NOT EXISTS dbops;
CREATE SCHEMA IF NOT EXISTS monitoring;

-- ---------------------------------------------------------------------------------------------
-- Configuration
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS public.app_retention_policies (
    table_name text PRIMARY KEY,
    time_column text NOT NULL,
    partition_interval text CHECK (partition_interval IN ('day', 'week', 'month')),
    retention interval NOT NULL CHECK (retention > interval '0'),
    premake bigint NOT NULL DEFAULT 3 CHECK (premake BETWEEN 1 AND 366),
    enabled boolean NOT NULL DEFAULT true,
    notes text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE public.app_retention_policies IS
    'Partitioning and retention per table (Phase 2). partition_interval NULL = not partitioned: '
    'cleanup_old_data() deletes rows older than retention (small tables only). premake = future '
    'partitions kept ahead by maintain_partitions(). enabled = false: both daily jobs skip the table.';

INSERT INTO public.app_retention_policies (table_name, time_column, partition_interval, retention, premake, notes)
VALUES
    ('bcfy_calls_raw', 'started_at', 'month', interval '90 days', 3, 'one row per radio call'),
    ('transcripts', 'created_at', 'month', interval '180 days', 3, 'one row per transcribed call'),
    ('api_call_metrics', 'timestamp', 'week', interval '30 days', 4, 'ISO weeks (Monday 00:00 UTC)'),
    ('system_logs', 'created_at', 'day', interval '30 days', 7, 'service event log'),
    ('bcfy_playlist_poll_log', 'poll_started_at', NULL, interval '30 days', 3, 'not partitioned: DELETE')
ON CONFLICT (table_name) DO NOTHING;

CREATE TABLE IF NOT EXISTS dbops.p2_config (
    table_name text PRIMARY KEY,
    null_key_expr text,
    app_key_index text,
    max_initial_partitions bigint NOT NULL DEFAULT 1000 CHECK (max_initial_partitions > 0)
);

COMMENT ON TABLE dbops.p2_config IS
    'Phase 2 engine knobs. null_key_expr: SQL over the table''s own columns giving the partition key '
    'of a row whose time column is NULL (the engine adds a constant fallback: the prepare time). '
    'app_key_index: a unique index on (old key, partition key) that must exist and be valid on the '
    'source before p2_prepare (the application''s new ON CONFLICT arbiter).';

INSERT INTO dbops.p2_config (table_name, null_key_expr, app_key_index)
VALUES
    ('bcfy_calls_raw', 'coalesce(started_at, to_timestamp(ts::double precision), fetched_at)',
     'bcfy_calls_raw_call_uid_started_at_key'),
    ('transcripts', NULL, NULL),
    ('api_call_metrics', NULL, NULL),
    ('system_logs', NULL, NULL)
ON CONFLICT (table_name) DO NOTHING;

-- ---------------------------------------------------------------------------------------------
-- State
-- ---------------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS dbops.p2_state (
    table_name text PRIMARY KEY,
    step text NOT NULL CHECK (step IN ('shadow_created', 'prepared', 'backfilling', 'backfilled',
                                       'verified', 'swapped', 'finalized')),
    shadow_name text NOT NULL,
    twin_name text NOT NULL,
    pk_col text NOT NULL,
    pk_type text NOT NULL,
    key_col text NOT NULL,
    unit text NOT NULL,
    key_expr text NOT NULL,
    null_key_fallback timestamptz,
    ins_cols text [] NOT NULL,
    all_cols text [] NOT NULL,
    fwd_function text NOT NULL,
    rev_function text NOT NULL,
    sequences jsonb NOT NULL DEFAULT '[]',
    guards jsonb NOT NULL DEFAULT '[]',
    user_triggers jsonb NOT NULL DEFAULT '[]',
    warnings jsonb NOT NULL DEFAULT '[]',
    range_from timestamptz,
    range_to timestamptz,
    partitions_created bigint,
    rows_total bigint,
    rows_done bigint NOT NULL DEFAULT 0,
    rows_copied bigint NOT NULL DEFAULT 0,
    null_key_rows bigint NOT NULL DEFAULT 0,
    last_key text,
    batches bigint NOT NULL DEFAULT 0,
    lock_waits bigint NOT NULL DEFAULT 0,
    backfill_seconds numeric NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    prepared_at timestamptz,
    backfill_started_at timestamptz,
    backfill_done_at timestamptz,
    verified_at timestamptz,
    swapped_at timestamptz,
    rolled_back_at timestamptz,
    finalized_at timestamptz,
    verify_result jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE dbops.p2_state IS
    'Phase 2: one row per table being (or already) converted to RANGE partitions. step: '
    'shadow_created -> prepared -> backfilling -> backfilled -> verified -> swapped -> finalized '
    '(p2_rollback: swapped -> backfilled; p2_abort deletes the row).';

-- Index names: the shadow builds every index under a temporary name; the swap gives the
-- partitioned table the original names and the old table the twin names (rollback: reverse).
CREATE TABLE IF NOT EXISTS dbops.p2_objects (
    table_name text NOT NULL,
    orig_name text NOT NULL,
    shadow_name text NOT NULL,
    twin_name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('primary key', 'unique', 'index')),
    definition text NOT NULL,
    PRIMARY KEY (table_name, orig_name)
);

-- Foreign keys that involve a table the engine converts, as they were before Phase 2 (the
-- definition is kept to restore them on rollback).
CREATE TABLE IF NOT EXISTS dbops.p2_refs (
    child_table text NOT NULL,
    conname text NOT NULL,
    parent_table text NOT NULL,
    child_cols text [] NOT NULL,
    parent_cols text [] NOT NULL,
    on_delete text NOT NULL,
    on_update text NOT NULL,
    definition text NOT NULL,
    captured_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (child_table, conname)
);

CREATE TABLE IF NOT EXISTS dbops.p2_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    table_name text,
    action text NOT NULL,
    result jsonb
);

-- ---------------------------------------------------------------------------------------------
-- Small helpers
-- ---------------------------------------------------------------------------------------------

-- An identifier of at most 63 bytes: base || suffix, shortened with a hash when too long.
CREATE OR REPLACE FUNCTION dbops.p2_name(base text, suffix text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN octet_length(base || suffix) <= 63 THEN base || suffix
                ELSE left(base, 63 - octet_length(suffix) - 9) || '_' || left(md5(base), 8) || suffix END
$$;

-- A timestamptz as an unambiguous UTC SQL literal: '2025-01-01 00:00:00+00'.
CREATE OR REPLACE FUNCTION dbops.p2_lit(ts timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT quote_literal(to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00')
$$;

-- Start of the partition (day / ISO week / month, UTC) that holds ts.
CREATE OR REPLACE FUNCTION dbops.p2_bucket(unit text, ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT date_trunc(unit, ts, 'UTC')
$$;

-- Start of the partition n units after the one starting at b (calendar arithmetic in UTC).
CREATE OR REPLACE FUNCTION dbops.p2_next(unit text, b timestamptz, n integer DEFAULT 1) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ((b AT TIME ZONE 'UTC') + n * ('1 ' || unit)::interval) AT TIME ZONE 'UTC'
$$;

-- Partition name: <table>_pYYYY_MM (month), <table>_pIYYY_IW (ISO week), <table>_pYYYY_MM_DD (day).
CREATE OR REPLACE FUNCTION dbops.p2_part_name(base text, unit text, b timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT dbops.p2_name(base, '_p' || to_char(b AT TIME ZONE 'UTC',
        CASE unit WHEN 'month' THEN 'YYYY_MM' WHEN 'week' THEN 'IYYY_IW' ELSE 'YYYY_MM_DD' END))
$$;

-- Bounds of a range partition of a timestamptz key (NULLs for DEFAULT / MINVALUE / MAXVALUE).
CREATE OR REPLACE FUNCTION dbops.p2_part_bounds(
    rel regclass, OUT range_start timestamptz, OUT range_end timestamptz, OUT is_default boolean
)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    b text;
    m text [];
BEGIN
    SELECT pg_get_expr(c.relpartbound, c.oid) INTO b FROM pg_class c WHERE c.oid = rel;
    is_default := (b = 'DEFAULT');
    m := regexp_match(b, '^FOR VALUES FROM \((.*)\) TO \((.*)\)$');
    IF m IS NOT NULL THEN
        IF m[1] LIKE '''%' THEN range_start := trim(BOTH '''' FROM m[1])::timestamptz; END IF;
        IF m[2] LIKE '''%' THEN range_end := trim(BOTH '''' FROM m[2])::timestamptz; END IF;
    END IF;
END
$$;

-- Does the relation hold at least one row (used for DEFAULT partitions: cheap when empty).
CREATE OR REPLACE FUNCTION dbops.p2_has_rows(rel regclass) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', rel) INTO r;
    RETURN r;
END
$$;

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

-- Position of the parenthesis closing the one at position p (quotes respected).
CREATE OR REPLACE FUNCTION dbops.p2_close_paren(s text, p integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    depth integer := 0;
    q text := NULL;
    ch text;
BEGIN
    FOR i IN p .. length(s) LOOP
        ch := substr(s, i, 1);
        IF q IS NOT NULL THEN
            IF ch = q THEN q := NULL; END IF;
        ELSIF ch IN ('''', '"') THEN
            q := ch;
        ELSIF ch = '(' THEN
            depth := depth + 1;
        ELSIF ch = ')' THEN
            depth := depth - 1;
            IF depth = 0 THEN RETURN i; END IF;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION dbops.p2_log(tbl text, action text, result jsonb) RETURNS jsonb
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO dbops.p2_events (table_name, action, result) VALUES (tbl, action, result);
    SELECT result;
$$;

-- The caller (Ansible) sets lock_timeout; a step that takes locks on busy tables never waits
-- forever: when the session has none, 500 ms for this transaction. Keep it below
-- deadlock_timeout (1 s): when a swap and an application transaction wait for each other, the
-- swap times out (and is retried) before the deadlock detector could pick the application.
CREATE OR REPLACE FUNCTION dbops.p2_default_lock_timeout(dflt text DEFAULT '500ms') RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF current_setting('lock_timeout') IN ('0', '0ms', '0s') THEN
        PERFORM set_config('lock_timeout', dflt, true);
    END IF;
    RETURN current_setting('lock_timeout');
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Trigger functions shared by every converted table (SECURITY DEFINER: they act with the
-- engine owner's rights, like PostgreSQL's own RI triggers act with the table owner's)
-- ---------------------------------------------------------------------------------------------

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
    IF current_setting('dbops.p2_internal_move', true) = 'on' THEN
        RETURN NULL;
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
    IF current_setting('dbops.p2_internal_move', true) = 'on' THEN
        RETURN NULL;
    END IF;
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
    IF current_setting('dbops.p2_internal_move', true) = 'on' THEN
        RETURN NEW;
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

-- Table privileges of src granted the same way on dst (idempotent; the owner's are implicit).
CREATE OR REPLACE FUNCTION dbops.p2_copy_grants(src regclass, dst regclass) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN SELECT a.grantee, a.privilege_type, a.is_grantable, c.relowner
             FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = src LOOP
        CONTINUE WHEN r.grantee = r.relowner;
        EXECUTE format('GRANT %s ON %s TO %s%s', r.privilege_type, dst,
                       CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END,
                       CASE WHEN r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
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

-- ---------------------------------------------------------------------------------------------
-- Comparison of two tables per partition range: count and checksum in ONE query (one snapshot)
-- ---------------------------------------------------------------------------------------------
-- src is the plain table (its partition key derived with key_expr, NULL keys included), dst the
-- partitioned one. The checksum is the sum of a 64-bit hash of each row's text over every column
-- (the generated tsv included: both sides compute it). Ranges are the partition buckets.
CREATE OR REPLACE FUNCTION dbops.p2_compare(tbl text, src text, dst text) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    st dbops.p2_state;
    dflt regclass;
    res jsonb;
BEGIN
    SELECT * INTO STRICT st FROM dbops.p2_state WHERE table_name = tbl;
    dflt := to_regclass(format('public.%I', tbl || '_default'));
    EXECUTE format($q$
        WITH s AS (
            SELECT dbops.p2_bucket(%1$L, %2$s) AS b, count(*) AS n,
                   sum(hashtextextended(ROW(%3$s)::text, 0)::numeric) AS h,
                   count(*) FILTER (WHERE %4$I IS NULL) AS nk
            FROM public.%5$I GROUP BY 1),
        d AS (
            SELECT dbops.p2_bucket(%1$L, %4$I) AS b, count(*) AS n,
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
        st.unit, st.key_expr, dbops.p2_collist(st.all_cols, st.key_col, st.key_expr), st.key_col, src,
        dbops.p2_collist(st.all_cols), coalesce(dflt::oid, 0), dst)
    INTO res;
    RETURN res;
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
    sel text;
    upd_set text;
    rev_set text;
    dk_old text;
    dk_new text;
    lockkey integer;
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
            RAISE EXCEPTION 'p2_prepare: run the engine as the owner of public.% (or a member of its role)', tbl;
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
        b := lo;
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

        -- ---------------------------------------------------------------- references
        PERFORM dbops.p2_capture_refs(tbl);

        -- ---------------------------------------------------------------- sync functions
        -- forward: source -> shadow, every row change, same transaction. UPDATE / DELETE take a
        -- shared advisory lock that a backfill batch takes exclusively (see p2_backfill).
        lockkey := hashtext(format('public.%I', tbl));
        sel := dbops.p2_collist(v_ins_cols, v_key_col, v_key_expr);
        dk_old := format('(SELECT %s FROM (SELECT OLD.*) s)', v_key_expr);
        dk_new := format('(SELECT %s FROM (SELECT NEW.*) s)', v_key_expr);
        SELECT string_agg(format('%1$I = EXCLUDED.%1$I', c), ', ') INTO upd_set
        FROM unnest(v_ins_cols) c WHERE c NOT IN (v_pk_col, v_key_col);
        SELECT string_agg(format('%1$I = EXCLUDED.%1$I', c), ', ') INTO rev_set
        FROM unnest(v_ins_cols) c WHERE c <> v_pk_col;
        fwd := dbops.p2_name('p2_fwd_' || tbl, '');
        rev := dbops.p2_name('p2_rev_' || tbl, '');
        EXECUTE format($f$
CREATE OR REPLACE FUNCTION dbops.%1$I() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
-- generated by dbops.p2_prepare(%2$L): keeps public.%3$I equal to public.%2$I
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_advisory_xact_lock_shared(80620, %4$s);
        IF TG_OP = 'DELETE' THEN
            DELETE FROM public.%3$I t WHERE t.%5$I = OLD.%5$I AND t.%6$I = %7$s;
            RETURN NULL;
        END IF;
        IF OLD.%5$I IS DISTINCT FROM NEW.%5$I OR %7$s IS DISTINCT FROM %8$s THEN
            DELETE FROM public.%3$I t WHERE t.%5$I = OLD.%5$I AND t.%6$I = %7$s;
        END IF;
    END IF;
    INSERT INTO public.%3$I AS t (%9$s) SELECT %10$s FROM (SELECT NEW.*) s
    ON CONFLICT (%5$I, %6$I) DO %11$s;
    RETURN NULL;
END
$body$
$f$, fwd, tbl, shadow, lockkey, v_pk_col, v_key_col, dk_old, dk_new, dbops.p2_collist(v_ins_cols), sel,
            coalesce('UPDATE SET ' || upd_set, 'NOTHING'));
        -- reverse (installed by the swap): partitioned table -> old table, so a rollback loses nothing
        EXECUTE format($f$
CREATE OR REPLACE FUNCTION dbops.%1$I() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
-- generated by dbops.p2_prepare(%2$L): after the swap, keeps public.%3$I equal to public.%2$I
BEGIN
    IF current_setting('dbops.p2_internal_move', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        DELETE FROM public.%3$I t WHERE t.%4$I = OLD.%4$I;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.%4$I IS DISTINCT FROM NEW.%4$I THEN
        DELETE FROM public.%3$I t WHERE t.%4$I = OLD.%4$I;
    END IF;
    INSERT INTO public.%3$I AS t (%5$s) SELECT %5$s FROM (SELECT NEW.*) s
    ON CONFLICT (%4$I) DO %6$s;
    RETURN NULL;
END
$body$
$f$, rev, tbl, twin, v_pk_col, dbops.p2_collist(v_ins_cols), coalesce('UPDATE SET ' || rev_set, 'NOTHING'));

        INSERT INTO dbops.p2_state (table_name, step, shadow_name, twin_name, pk_col, pk_type, key_col, unit,
                                    key_expr, null_key_fallback, ins_cols, all_cols, fwd_function, rev_function,
                                    sequences, guards, warnings, range_from, range_to, partitions_created, rows_total)
        VALUES (tbl, 'shadow_created', shadow, twin, v_pk_col, v_pk_type, v_key_col, v_unit,
                v_key_expr, fallback, v_ins_cols, v_all_cols, fwd, rev,
                v_seqs, v_guards, v_warnings, lo, dbops.p2_next(v_unit, hi), nparts,
                greatest((SELECT reltuples::bigint FROM pg_class WHERE oid = src), 0))
        RETURNING * INTO st;
        shadow_made := true;
    END IF;

    -- -------------------------------------------------------------------- the sync trigger
    -- SHARE ROW EXCLUSIVE on the source: waits for writers in flight, blocks new ones while it
    -- waits (bounded by lock_timeout), held only until this transaction commits (right after).
    BEGIN
        PERFORM dbops.p2_default_lock_timeout();
        EXECUTE format('CREATE TRIGGER p2_sync_fwd AFTER INSERT OR UPDATE OR DELETE ON public.%I '
                       'FOR EACH ROW EXECUTE FUNCTION dbops.%I()', tbl, st.fwd_function);
        EXECUTE format('CREATE TRIGGER p2_block_truncate BEFORE TRUNCATE ON public.%I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION dbops.p2_block_truncate()', tbl);
        UPDATE dbops.p2_state SET step = 'prepared', prepared_at = now(), updated_at = now()
        WHERE table_name = tbl;
        res := jsonb_build_object('status', 'prepared', 'changed', true, 'table', tbl, 'shadow', st.shadow_name,
                                  'partitions', st.partitions_created, 'unit', st.unit,
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

-- ---------------------------------------------------------------------------------------------
-- Step 2: backfill (procedure: one COMMIT per batch)
-- ---------------------------------------------------------------------------------------------
-- CALL dbops.p2_backfill('bcfy_calls_raw', 5000, 60);   -- from an autocommit session
-- Keyset pagination on the primary key. Each batch: take the table's advisory lock exclusively
-- (try-lock, never queued: writers are not made to wait behind a waiting batch), copy
-- (pk > last AND pk <= next) with the partition key derived as in the sync trigger,
-- ON CONFLICT DO NOTHING (a row the trigger already wrote is newer), record progress, COMMIT.
-- UPDATE / DELETE on the source wait for the running batch (one batch, milliseconds), so a batch
-- can neither resurrect a row deleted meanwhile nor overwrite a newer version.
-- Returns after max_seconds (at least one batch); killed at any point, it resumes from last_key.
CREATE OR REPLACE PROCEDURE dbops.p2_backfill(
    tbl text, batch_rows integer DEFAULT 5000, max_seconds integer DEFAULT 60, INOUT result jsonb DEFAULT NULL
)
LANGUAGE plpgsql
AS $fn$
DECLARE
    st dbops.p2_state;
    t0 timestamptz := clock_timestamp();
    tb timestamptz;
    nxt text;
    n_src bigint;
    n_null bigint;
    n_ins bigint;
    waits integer := 0;
    nb integer := 0;
    rows_now bigint := 0;
    lockkey integer := hashtext(format('public.%I', tbl));
    keyq text;
    copyq text;
    finished boolean := false;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'p2_backfill: needs READ COMMITTED (each batch takes a fresh snapshot after its lock)';
    END IF;
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF NOT FOUND OR st.step IN ('shadow_created') THEN
        RAISE EXCEPTION 'p2_backfill: % is not prepared (run dbops.p2_prepare first)', tbl;
    END IF;
    IF st.step NOT IN ('prepared', 'backfilling') THEN
        result := jsonb_build_object('status', 'done', 'changed', false, 'table', tbl, 'step', st.step, 'rows_done', st.rows_done,
                                     'null_key_rows', st.null_key_rows);
        RETURN;
    END IF;
    IF st.step = 'prepared' THEN
        UPDATE dbops.p2_state SET step = 'backfilling', backfill_started_at = now(), updated_at = now()
        WHERE table_name = tbl;
        COMMIT;
    END IF;
    LOOP
        EXIT WHEN nb + waits > 0 AND clock_timestamp() - t0 >= make_interval(secs => max_seconds);
        IF NOT pg_try_advisory_xact_lock(80620, lockkey) THEN
            waits := waits + 1;
            PERFORM pg_sleep(0.02);
            CONTINUE;
        END IF;
        tb := clock_timestamp();
        SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
        keyq := format('SELECT max(k)::text FROM (SELECT %1$I AS k FROM public.%2$I %3$s ORDER BY %1$I LIMIT %4$s) s',
                       st.pk_col, tbl,
                       CASE WHEN st.last_key IS NULL THEN '' ELSE format('WHERE %I > $1::%s', st.pk_col, st.pk_type) END,
                       batch_rows);
        EXECUTE keyq INTO nxt USING st.last_key;
        IF nxt IS NULL THEN
            UPDATE dbops.p2_state SET step = 'backfilled', backfill_done_at = now(), updated_at = now(),
                   lock_waits = lock_waits + waits, rows_total = rows_done
            WHERE table_name = tbl;
            finished := true;
            COMMIT;
            EXIT;
        END IF;
        copyq := format($q$
            WITH src AS (
                SELECT %1$s, (%2$I IS NULL) AS p2_null_key FROM public.%3$I
                WHERE %4$s %5$I <= $2::%6$s),
            ins AS (
                INSERT INTO public.%7$I (%8$s) SELECT %8$s FROM src
                ON CONFLICT (%5$I, %2$I) DO NOTHING RETURNING 1)
            SELECT (SELECT count(*) FROM src), (SELECT count(*) FROM src WHERE p2_null_key), (SELECT count(*) FROM ins)$q$,
            (SELECT string_agg(CASE WHEN c = st.key_col THEN format('(%s) AS %I', st.key_expr, c) ELSE quote_ident(c) END,
                               ', ' ORDER BY o) FROM unnest(st.ins_cols) WITH ORDINALITY u (c, o)),
            st.key_col, tbl,
            CASE WHEN st.last_key IS NULL THEN '' ELSE format('%I > $1::%s AND', st.pk_col, st.pk_type) END,
            st.pk_col, st.pk_type, st.shadow_name, dbops.p2_collist(st.ins_cols));
        EXECUTE copyq INTO n_src, n_null, n_ins USING st.last_key, nxt;
        nb := nb + 1;
        rows_now := rows_now + n_src;
        UPDATE dbops.p2_state
        SET last_key = nxt, rows_done = rows_done + n_src, rows_copied = rows_copied + n_ins,
            null_key_rows = null_key_rows + n_null, batches = batches + 1,
            backfill_seconds = backfill_seconds + extract(epoch FROM clock_timestamp() - tb)::numeric,
            rows_total = greatest(rows_total, rows_done + n_src), updated_at = now()
        WHERE table_name = tbl;
        COMMIT;
    END LOOP;
    IF finished THEN
        -- autovacuum never analyzes a partitioned parent: do it once here (samples, reads only)
        EXECUTE format('ANALYZE public.%I', st.shadow_name);
        COMMIT;
    ELSIF waits > 0 THEN
        UPDATE dbops.p2_state SET lock_waits = lock_waits + waits WHERE table_name = tbl;
        COMMIT;
    END IF;
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    result := jsonb_build_object(
        'status', CASE WHEN finished THEN 'done' ELSE 'in progress' END, 'changed', rows_now > 0 OR finished,
        'table', tbl, 'step', st.step,
        'rows_done', st.rows_done, 'rows_total', st.rows_total,
        'pct', CASE WHEN coalesce(st.rows_total, 0) > 0
                    THEN round(100.0 * least(st.rows_done, st.rows_total) / st.rows_total, 1) END,
        'rows_this_call', rows_now, 'batches_this_call', nb, 'lock_waits_this_call', waits,
        'rows_per_second', CASE WHEN extract(epoch FROM clock_timestamp() - t0) > 0
                                THEN round(rows_now / extract(epoch FROM clock_timestamp() - t0)::numeric) END,
        'null_key_rows', st.null_key_rows, 'last_key', st.last_key,
        'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
    PERFORM dbops.p2_log(tbl, 'backfill', result);
    COMMIT;
END
$fn$;

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
    PERFORM dbops.p2_default_lock_timeout();
    t0 := clock_timestamp();
    EXECUTE format('LOCK TABLE public.%I, public.%I IN ACCESS EXCLUSIVE MODE', tbl, st.shadow_name);
    IF cardinality(dbops.p2_child_tables(tbl)) > 0 THEN   -- their foreign keys become triggers
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', array_to_string(dbops.p2_child_tables(tbl), ', '));
    END IF;
    t_lock := clock_timestamp();
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = format('public.%I', tbl)::regclass
                   AND tgname = 'p2_sync_fwd' AND tgenabled IN ('O', 'A')) THEN
        RAISE EXCEPTION 'p2_swap: the sync trigger of % is missing or disabled: the shadow cannot be trusted', tbl;
    END IF;
    IF recount THEN
        EXECUTE format('SELECT (SELECT count(*) FROM public.%I), (SELECT count(*) FROM public.%I)', tbl, st.shadow_name)
            INTO n_src, n_dst;
        IF n_src <> n_dst THEN
            RAISE EXCEPTION 'p2_swap: % has % rows, % has %: not swapped', tbl, n_src, st.shadow_name, n_dst;
        END IF;
    END IF;
    views := dbops.p2_dependent_views(format('public.%I', tbl)::regclass);
    FOR t IN SELECT tg.tgname, pg_get_triggerdef(tg.oid) AS def FROM pg_trigger tg
             JOIN pg_proc p ON p.oid = tg.tgfoid
             WHERE tg.tgrelid = format('public.%I', tbl)::regclass AND NOT tg.tgisinternal
               AND p.pronamespace <> 'dbops'::regnamespace
    LOOP
        utrig := utrig || jsonb_build_object('name', t.tgname, 'def', t.def);
    END LOOP;

    PERFORM dbops.p2_copy_grants(format('public.%I', tbl)::regclass, format('public.%I', st.shadow_name)::regclass);
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
        EXECUTE format('ALTER TABLE public.%I DISABLE TRIGGER %I', st.twin_name, g ->> 'name');
    END LOOP;
    views := dbops.p2_repoint_views(views);
    refs := dbops.p2_apply_refs();

    UPDATE dbops.p2_state SET step = 'swapped', swapped_at = now(), user_triggers = utrig, updated_at = now()
    WHERE table_name = tbl;
    RETURN dbops.p2_log(tbl, 'swap', jsonb_build_object(
        'status', 'swapped', 'changed', true, 'table', tbl, 'old_table', st.twin_name,
        'rows', n_src, 'recount', recount, 'views_repointed', views, 'references', refs,
        'guards', st.guards, 'user_triggers', utrig,
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
    EXECUTE format('LOCK TABLE public.%I, public.%I IN ACCESS EXCLUSIVE MODE', tbl, st.twin_name);
    IF cardinality(dbops.p2_child_tables(tbl)) > 0 THEN   -- their references change form again
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', array_to_string(dbops.p2_child_tables(tbl), ', '));
    END IF;
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
        EXECUTE format('ALTER TABLE public.%I ENABLE TRIGGER %I', st.twin_name, g ->> 'name');
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
    RETURN dbops.p2_log(tbl, 'rollback', jsonb_build_object(
        'status', 'rolled back', 'changed', true, 'table', tbl, 'partitioned_table_kept_as', st.shadow_name,
        'rows', n_old, 'views_repointed', views, 'references', refs,
        'next', 'SELECT dbops.p2_validate_refs();  -- validates the foreign keys re-added NOT VALID',
        'lock_wait_ms', round(extract(epoch FROM t_lock - t0)::numeric * 1000, 1),
        'locked_ms', round(extract(epoch FROM clock_timestamp() - t_lock)::numeric * 1000, 1)));
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
    EXECUTE format('DROP TABLE public.%I', st.twin_name);
    EXECUTE format('DROP FUNCTION IF EXISTS dbops.%I()', st.fwd_function);
    EXECUTE format('DROP FUNCTION IF EXISTS dbops.%I()', st.rev_function);
    UPDATE dbops.p2_state SET step = 'finalized', finalized_at = now(), updated_at = now() WHERE table_name = tbl;
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
    PERFORM dbops.p2_default_lock_timeout();
    EXECUTE format('DROP TRIGGER IF EXISTS p2_sync_fwd ON public.%I', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS p2_block_truncate ON public.%I', tbl);
    EXECUTE format('DROP TABLE IF EXISTS public.%I', st.shadow_name);
    EXECUTE format('DROP FUNCTION IF EXISTS dbops.%I()', st.fwd_function);
    EXECUTE format('DROP FUNCTION IF EXISTS dbops.%I()', st.rev_function);
    DELETE FROM dbops.p2_objects WHERE table_name = tbl;
    DELETE FROM dbops.p2_state WHERE table_name = tbl;
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

-- ---------------------------------------------------------------------------------------------
-- Daily job 1: maintain_partitions()
-- ---------------------------------------------------------------------------------------------
-- For every partitioned policy table (and every shadow being backfilled): create the missing
-- partitions from the current one to now + premake, and move rows that landed in the DEFAULT
-- partition into a partition of their own. New partitions are built as plain tables and then
-- ATTACHed (SHARE UPDATE EXCLUSIVE on the parent: reads and writes go on; the DEFAULT partition
-- is briefly locked). One sub-transaction per partition: a lock timeout is reported, the
-- next run retries. Concurrent calls serialize on an advisory lock; a second run creates nothing.
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
    r record;
    created jsonb := '[]';
    moved jsonb := '[]';
    errors jsonb := '[]';
    checked jsonb := '[]';
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
            FOR r IN EXECUTE format('SELECT DISTINCT dbops.p2_bucket(%L, %I) AS b FROM %s ORDER BY 1',
                                    pol.partition_interval, pol.time_column, dflt) LOOP
                pname := dbops.p2_part_name(base, pol.partition_interval, r.b);
                BEGIN
                    PERFORM set_config('dbops.p2_internal_move', 'on', true);
                    EXECUTE format('CREATE TABLE public.%I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS '
                                   'INCLUDING GENERATED INCLUDING STORAGE INCLUDING COMPRESSION)', pname, par);
                    EXECUTE format('WITH d AS (DELETE FROM %1$s WHERE %2$I >= %3$s AND %2$I < %4$s RETURNING %5$s) '
                                   'INSERT INTO public.%6$I (%5$s) SELECT %5$s FROM d',
                                   dflt, pol.time_column, dbops.p2_lit(r.b),
                                   dbops.p2_lit(dbops.p2_next(pol.partition_interval, r.b)), cols, pname);
                    GET DIAGNOSTICS n = ROW_COUNT;
                    EXECUTE format('ALTER TABLE %s ATTACH PARTITION public.%I FOR VALUES FROM (%s) TO (%s)',
                                   par, pname, dbops.p2_lit(r.b),
                                   dbops.p2_lit(dbops.p2_next(pol.partition_interval, r.b)));
                    PERFORM set_config('dbops.p2_internal_move', 'off', true);
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

-- ---------------------------------------------------------------------------------------------
-- monitoring.partition_health: one row per partition of every partitioned table in public
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE VIEW monitoring.partition_health AS
SELECT
    pc.relname::text AS parent,
    c.relname::text AS partition,
    pb.range_start,
    pb.range_end,
    pb.is_default,
    CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END AS rows_estimate,
    pg_total_relation_size(c.oid) AS total_size,
    pg_size_pretty(pg_total_relation_size(c.oid)) AS total_size_pretty,
    CASE WHEN pb.is_default THEN dbops.p2_has_rows(c.oid) END AS default_has_rows,
    rp.retention,
    CASE
        WHEN pb.is_default AND dbops.p2_has_rows(c.oid) THEN 'DEFAULT_HAS_ROWS'
        WHEN pb.range_end <= now() - rp.retention THEN 'EXPIRED'
        WHEN pb.range_start > now() THEN 'FUTURE'
        ELSE 'OK'
    END AS status
FROM pg_inherits ih
JOIN pg_class c ON c.oid = ih.inhrelid
JOIN pg_class pc ON pc.oid = ih.inhparent AND pc.relkind = 'p'
JOIN pg_namespace n ON n.oid = pc.relnamespace AND n.nspname = 'public'
CROSS JOIN LATERAL dbops.p2_part_bounds(c.oid) pb
LEFT JOIN public.app_retention_policies rp ON rp.table_name = regexp_replace(pc.relname, '_p$', '');

COMMENT ON VIEW monitoring.partition_health IS
    'Phase 2: one row per partition (parent, bounds, estimated rows, total_size in bytes for ORDER BY '
    'and total_size_pretty). status: DEFAULT_HAS_ROWS (rows outside every range: maintain_partitions() '
    'moves them), EXPIRED (older than retention: cleanup_old_data() drops it), FUTURE, OK.';
