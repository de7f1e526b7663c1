-- Phase 2 engine: small pure helpers every other engine file calls (names, UTC partition
-- arithmetic, bounds, event log). Every engine function works in UTC (date_trunc(..., 'UTC'),
-- AT TIME ZONE 'UTC'): partition boundaries never depend on the session's TimeZone.

-- ---------------------------------------------------------------------------------------------
-- Small helpers
-- ---------------------------------------------------------------------------------------------

-- What this server's major can do where the engine's SQL differs between majors: the capability map
-- of roles/preflight/files/capabilities.sql (same names, same thresholds; tests/test_server_versions.py
-- checks they agree), read from server_version_num. The engine asks this, never the version itself.
CREATE OR REPLACE FUNCTION dbops.p2_capabilities(version_num integer DEFAULT NULL) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_build_object(
        'major', n / 10000,
        'detach_concurrently', n >= 140000,
        'publication_schemas', n >= 150000,
        'stat_checkpointer', n >= 170000,
        'not_null_constraints', n >= 180000)
    FROM (SELECT coalesce(version_num, current_setting('server_version_num')::integer) AS n) AS v
$$;

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


-- A partition as its parent's other partitions: the parent's owner (partitions created by whoever
-- runs the engine or maintain_partitions() would otherwise belong to that role: an RDS master user
-- granted the owner role, see docs/RDS.md), and the storage / autovacuum settings (reloptions, also
-- toast.*) of model, by default the parent's DEFAULT partition (a partitioned parent holds none:
-- the engine gives every partition those of the table it replaced). ALTER TABLE ... OWNER TO needs
-- the caller to be a member of the owner role (p2_prepare checks it). Returns true when it changed
-- something.
CREATE OR REPLACE FUNCTION dbops.p2_adopt_partition(parent regclass, part regclass, model regclass DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    want_owner oid;
    p record;
    m record;
    changed boolean := false;
BEGIN
    SELECT relowner INTO want_owner FROM pg_class WHERE oid = parent;
    IF model IS NULL THEN
        SELECT i.inhrelid INTO model FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = parent AND i.inhrelid <> part AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT';
    END IF;
    SELECT c.relowner, coalesce(c.reloptions, '{}') AS opts, coalesce(t.reloptions, '{}') AS topts INTO p
    FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid = part;
    IF p.relowner <> want_owner THEN
        EXECUTE format('ALTER TABLE %s OWNER TO %I', part, pg_get_userbyid(want_owner));
        changed := true;
    END IF;
    IF model IS NOT NULL THEN
        SELECT coalesce(c.reloptions, '{}') AS opts, coalesce(t.reloptions, '{}') AS topts INTO m
        FROM pg_class c LEFT JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid = model;
        IF NOT (p.opts @> m.opts AND p.opts <@ m.opts AND p.topts @> m.topts AND p.topts <@ m.topts) THEN
            IF cardinality(p.opts) + cardinality(p.topts) > 0 THEN
                EXECUTE format('ALTER TABLE %s RESET (%s)', part, (
                    SELECT string_agg(x, ', ') FROM (
                        SELECT split_part(o, '=', 1) AS x FROM unnest(p.opts) o
                        UNION ALL SELECT 'toast.' || split_part(o, '=', 1) FROM unnest(p.topts) o) y));
            END IF;
            IF cardinality(m.opts) + cardinality(m.topts) > 0 THEN
                EXECUTE format('ALTER TABLE %s SET (%s)', part, (
                    SELECT string_agg(x, ', ') FROM (
                        SELECT format('%s = %L', split_part(o, '=', 1), substr(o, strpos(o, '=') + 1)) AS x
                        FROM unnest(m.opts) o
                        UNION ALL
                        SELECT format('toast.%s = %L', split_part(o, '=', 1), substr(o, strpos(o, '=') + 1))
                        FROM unnest(m.topts) o) y));
            END IF;
            changed := true;
        END IF;
    END IF;
    RETURN changed;
END
$$;
