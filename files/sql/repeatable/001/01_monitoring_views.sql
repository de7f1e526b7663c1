-- Phase 1's `monitoring` views (7) and pg_stat_statements_current_db(): read-only views over the
-- statistics views. Creates no lock on application tables: views only read pg_catalog / pg_stat_*
-- at query time. Everything works for a non-superuser member of pg_monitor (RDS: the master user,
-- a member of rds_superuser).
--
-- Partitioned tables (Phase 2) are handled: table_health shows one row per logical table (a
-- partitioned table summed over its partitions), table_bloat one row per heap (vacuum works per
-- partition), index_usage one row per logical index (a partitioned index summed over its partitions).

CREATE SCHEMA IF NOT EXISTS monitoring;

-- One row per logical table: plain tables, and partitioned tables summed over their leaf partitions
-- (partitions themselves are not listed here; see monitoring.table_bloat).
CREATE OR REPLACE VIEW monitoring.table_health AS
SELECT
    n.nspname AS schemaname,
    c.relname AS tablename,
    CASE c.relkind WHEN 'p' THEN 'partitioned table' ELSE 'table' END AS table_type,
    s.partitions,
    pg_size_pretty(s.total_bytes) AS total_size,
    pg_size_pretty(s.table_bytes) AS table_size,
    pg_size_pretty(s.index_bytes) AS indexes_size,
    s.total_bytes,
    s.live_rows,
    s.dead_rows,
    round(100.0 * s.dead_rows / nullif(s.live_rows + s.dead_rows, 0), 2) AS dead_ratio_pct,
    s.seq_scan,
    s.idx_scan,
    round(100.0 * s.idx_scan / nullif(s.seq_scan + s.idx_scan, 0), 2) AS idx_scan_pct,
    s.last_vacuum,
    s.last_autovacuum,
    s.last_analyze,
    s.last_autoanalyze
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
CROSS JOIN LATERAL (
    SELECT
        CASE WHEN c.relkind = 'p' THEN count(*) END AS partitions,
        coalesce(sum(pg_total_relation_size(l.relid)), 0)::bigint AS total_bytes,
        coalesce(sum(pg_table_size(l.relid)), 0)::bigint AS table_bytes,
        coalesce(sum(pg_indexes_size(l.relid)), 0)::bigint AS index_bytes,
        coalesce(sum(st.n_live_tup), 0)::bigint AS live_rows,
        coalesce(sum(st.n_dead_tup), 0)::bigint AS dead_rows,
        coalesce(sum(st.seq_scan), 0)::bigint AS seq_scan,
        coalesce(sum(st.idx_scan), 0)::bigint AS idx_scan,
        max(st.last_vacuum) AS last_vacuum,
        max(st.last_autovacuum) AS last_autovacuum,
        max(st.last_analyze) AS last_analyze,
        max(st.last_autoanalyze) AS last_autoanalyze
    FROM (
        SELECT c.oid AS relid WHERE c.relkind = 'r'
        UNION ALL
        SELECT t.relid FROM pg_partition_tree(c.oid) AS t WHERE c.relkind = 'p' AND t.isleaf
    ) AS l
    LEFT JOIN pg_stat_all_tables AS st ON st.relid = l.relid
) AS s
WHERE c.relkind IN ('r', 'p')
  AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_toast'
ORDER BY s.total_bytes DESC, n.nspname, c.relname;

COMMENT ON VIEW monitoring.table_health IS
    'Size, row counts, scan mix and vacuum/analyze times per table (relkind r and p; a partitioned table is summed over its leaf partitions, last_* = most recent among them). Largest first. Row counts are statistics estimates.';

-- One row per index (partitioned indexes summed over their partitions).
CREATE OR REPLACE VIEW monitoring.index_usage AS
SELECT
    n.nspname AS schemaname,
    ct.relname AS tablename,
    ci.relname AS indexname,
    i.indexrelid,
    am.amname AS index_type,
    s.idx_scan,
    s.idx_tup_read,
    s.idx_tup_fetch,
    pg_size_pretty(s.size_bytes) AS size,
    s.size_bytes,
    i.indisunique AS is_unique,
    i.indisprimary AS is_primary,
    EXISTS (
        SELECT 1 FROM pg_constraint AS con
        WHERE con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x')
    ) AS backs_constraint,
    i.indisvalid AS is_valid,
    CASE
        WHEN NOT i.indisvalid THEN 'INVALID'
        WHEN s.idx_scan = 0 THEN 'UNUSED'
        WHEN s.idx_scan < 100 THEN 'LOW_USAGE'
        ELSE 'ACTIVE'
    END AS usage_status,
    (SELECT d.stats_reset FROM pg_stat_database AS d WHERE d.datname = current_database()) AS stats_since
FROM pg_index AS i
JOIN pg_class AS ci ON ci.oid = i.indexrelid
JOIN pg_class AS ct ON ct.oid = i.indrelid
JOIN pg_namespace AS n ON n.oid = ci.relnamespace
JOIN pg_am AS am ON am.oid = ci.relam
CROSS JOIN LATERAL (
    SELECT
        coalesce(sum(st.idx_scan), 0)::bigint AS idx_scan,
        coalesce(sum(st.idx_tup_read), 0)::bigint AS idx_tup_read,
        coalesce(sum(st.idx_tup_fetch), 0)::bigint AS idx_tup_fetch,
        coalesce(sum(pg_relation_size(l.relid)), 0)::bigint AS size_bytes
    FROM (
        SELECT ci.oid AS relid WHERE ci.relkind = 'i'
        UNION ALL
        SELECT t.relid FROM pg_partition_tree(ci.oid) AS t WHERE ci.relkind = 'I' AND t.isleaf
    ) AS l
    LEFT JOIN pg_stat_all_indexes AS st ON st.indexrelid = l.relid
) AS s
WHERE ci.relkind IN ('i', 'I')
  AND NOT ci.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_toast'
ORDER BY s.idx_scan, s.size_bytes DESC, n.nspname, ci.relname;

COMMENT ON VIEW monitoring.index_usage IS
    'Index scans since stats_since (NULL: since the statistics were created). usage_status: INVALID (failed/in-progress concurrent build: drop or rebuild), UNUSED (0 scans), LOW_USAGE (< 100 scans), ACTIVE. Unique/primary indexes (backs_constraint) enforce constraints even when UNUSED. Partitioned indexes are summed over their partitions.';

-- One row per heap (plain tables and leaf partitions): vacuum works per heap.
CREATE OR REPLACE VIEW monitoring.table_bloat AS
SELECT
    st.schemaname,
    st.relname AS tablename,
    CASE WHEN c.relispartition THEN
        (SELECT inh.inhparent::regclass::text FROM pg_inherits AS inh WHERE inh.inhrelid = c.oid LIMIT 1)
    END AS partition_of,
    st.n_live_tup AS live_rows,
    st.n_dead_tup AS dead_rows,
    round(100.0 * st.n_dead_tup / nullif(st.n_live_tup + st.n_dead_tup, 0), 2) AS dead_ratio_pct,
    pg_size_pretty(pg_table_size(st.relid)) AS table_size,
    pg_size_pretty((pg_table_size(st.relid) * st.n_dead_tup / nullif(st.n_live_tup + st.n_dead_tup, 0))::bigint)
        AS est_bloat_size,
    (pg_table_size(st.relid) * st.n_dead_tup / nullif(st.n_live_tup + st.n_dead_tup, 0))::bigint
        AS est_bloat_bytes,
    st.last_vacuum,
    st.last_autovacuum,
    st.autovacuum_count,
    CASE
        WHEN st.n_dead_tup < 1000 THEN 'HEALTHY'
        WHEN st.n_dead_tup >= 0.20 * (st.n_live_tup + st.n_dead_tup) THEN 'CRITICAL'
        WHEN st.n_dead_tup >= 0.10 * (st.n_live_tup + st.n_dead_tup) THEN 'WARNING'
        ELSE 'HEALTHY'
    END AS status
FROM pg_stat_user_tables AS st
JOIN pg_class AS c ON c.oid = st.relid
WHERE c.relkind = 'r'
ORDER BY st.n_dead_tup DESC, st.schemaname, st.relname;

COMMENT ON VIEW monitoring.table_bloat IS
    'ESTIMATE of bloat from the dead-tuple counters (n_dead_tup / (n_live_tup + n_dead_tup)), not a physical page inspection (pgstattuple); est_bloat = table size x dead ratio. status: CRITICAL >= 20% dead (autovacuum''s default trigger, so it is falling behind), WARNING >= 10%, HEALTHY otherwise or under 1000 dead rows. One row per heap: partitions are listed individually (partition_of).';

-- Client connections grouped like the guide's connection-pool query, with pool-pressure columns.
CREATE OR REPLACE VIEW monitoring.connections AS
SELECT
    a.datname,
    a.usename,
    a.application_name,
    a.state,
    count(*) AS connection_count,
    count(*) FILTER (WHERE a.wait_event_type = 'Lock') AS waiting_on_lock,
    max(now() - a.state_change) AS longest_in_state,
    min(a.backend_start) AS oldest_connection,
    round(100.0 * count(*) / current_setting('max_connections')::integer, 1) AS pct_of_max_connections
FROM pg_stat_activity AS a
WHERE a.backend_type = 'client backend'
GROUP BY a.datname, a.usename, a.application_name, a.state
ORDER BY connection_count DESC, a.datname, a.usename, a.application_name;

COMMENT ON VIEW monitoring.connections IS
    'Client connections per database, user, application and state; pct_of_max_connections against max_connections. Members of pg_monitor see every session.';

-- Statements or transactions running for more than 30 seconds (idle-in-transaction included: they
-- hold locks and block vacuum). blocked_by lists the pids holding the locks a session waits for.
CREATE OR REPLACE VIEW monitoring.long_running_queries AS
SELECT
    a.pid,
    a.datname,
    a.usename,
    a.application_name,
    a.client_addr,
    a.backend_type,
    a.state,
    a.wait_event_type,
    a.wait_event,
    pg_blocking_pids(a.pid) AS blocked_by,
    a.xact_start,
    a.query_start,
    now() - a.query_start AS query_duration,
    now() - a.xact_start AS xact_duration,
    a.query
FROM pg_stat_activity AS a
WHERE a.pid <> pg_backend_pid()
  AND a.state <> 'idle'
  AND a.backend_type NOT IN ('walsender', 'parallel worker')
  AND a.backend_type NOT LIKE 'logical replication%'
  AND now() - coalesce(a.xact_start, a.query_start) > interval '30 seconds'
ORDER BY coalesce(a.xact_start, a.query_start);

COMMENT ON VIEW monitoring.long_running_queries IS
    'Sessions whose current transaction (or statement) started more than 30 seconds ago and that are not idle, oldest first; includes idle in transaction and autovacuum workers. blocked_by = pg_blocking_pids(pid).';

CREATE OR REPLACE VIEW monitoring.database_size AS
SELECT
    d.datname AS database_name,
    pg_size_pretty(sz.size_bytes) AS size,
    sz.size_bytes,
    d.datname = current_database() AS is_current
FROM pg_database AS d
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN has_database_privilege(d.oid, 'CONNECT') OR pg_has_role('pg_read_all_stats', 'USAGE')
        THEN pg_database_size(d.oid)
    END AS size_bytes
) AS sz
WHERE NOT d.datistemplate
ORDER BY sz.size_bytes DESC NULLS LAST, d.datname;

COMMENT ON VIEW monitoring.database_size IS
    'Size of every non-template database, largest first (size NULL where the caller may neither connect nor read all statistics).';

-- pg_stat_statements is read through a function so that the view exists (and returns no rows, with a
-- NOTICE saying why) when the extension is missing or not preloaded: a view over the extension's view
-- could not be created without it and would be dropped with it. Handles both column sets
-- (PostgreSQL 13+: *_exec_time; 12: *_time) and whatever schema the extension lives in.
CREATE OR REPLACE FUNCTION monitoring.pg_stat_statements_current_db()
RETURNS TABLE (
    queryid bigint,
    username name,
    calls bigint,
    total_time_ms numeric,
    mean_time_ms numeric,
    min_time_ms numeric,
    max_time_ms numeric,
    stddev_time_ms numeric,
    rows bigint,
    shared_blks_hit bigint,
    shared_blks_read bigint,
    cache_hit_pct numeric,
    query text
)
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    ext_schema name;
    time_suffix text;
BEGIN
    SELECT e.extnamespace::regnamespace::name INTO ext_schema
    FROM pg_extension AS e WHERE e.extname = 'pg_stat_statements';
    IF ext_schema IS NULL THEN
        RAISE NOTICE 'monitoring.slow_queries: extension pg_stat_statements is not installed in database %; no rows. An rds_superuser (superuser) must run CREATE EXTENSION pg_stat_statements.', current_database();
        RETURN;
    END IF;
    time_suffix := CASE
        WHEN EXISTS (SELECT 1 FROM pg_attribute
                     WHERE attrelid = format('%I.pg_stat_statements', ext_schema)::regclass
                       AND attname = 'total_exec_time' AND NOT attisdropped)
        THEN 'exec_time' ELSE 'time' END;
    RETURN QUERY EXECUTE format(
        $q$
        SELECT s.queryid, r.rolname, s.calls,
               round(s.total_%1$s::numeric, 2), round(s.mean_%1$s::numeric, 2),
               round(s.min_%1$s::numeric, 2), round(s.max_%1$s::numeric, 2),
               round(s.stddev_%1$s::numeric, 2), s.rows,
               s.shared_blks_hit, s.shared_blks_read,
               round(100.0 * s.shared_blks_hit / nullif(s.shared_blks_hit + s.shared_blks_read, 0), 2),
               s.query
        FROM %2$I.pg_stat_statements AS s
        LEFT JOIN pg_roles AS r ON r.oid = s.userid
        WHERE s.dbid = (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database())
        $q$, time_suffix, ext_schema);
EXCEPTION
    WHEN object_not_in_prerequisite_state THEN
        -- "pg_stat_statements must be loaded via shared_preload_libraries"
        RAISE NOTICE 'monitoring.slow_queries: % ; no rows. Add pg_stat_statements to shared_preload_libraries (RDS: DB parameter group) and restart.', SQLERRM;
        RETURN;
END
$fn$;

COMMENT ON FUNCTION monitoring.pg_stat_statements_current_db() IS
    'Rows of pg_stat_statements for the current database, times in ms; no rows (and a NOTICE) when the extension is not installed or not preloaded. Backs monitoring.slow_queries.';

CREATE OR REPLACE VIEW monitoring.slow_queries AS
SELECT
    q.queryid,
    q.username,
    q.calls,
    q.total_time_ms,
    q.mean_time_ms,
    q.min_time_ms,
    q.max_time_ms,
    q.stddev_time_ms,
    q.rows,
    q.shared_blks_hit,
    q.shared_blks_read,
    q.cache_hit_pct,
    q.query
FROM monitoring.pg_stat_statements_current_db() AS q
ORDER BY q.mean_time_ms DESC NULLS LAST, q.calls DESC;

COMMENT ON VIEW monitoring.slow_queries IS
    'Statements of this database from pg_stat_statements, slowest mean execution time first (times in ms, since the last pg_stat_statements_reset()). Returns NO ROWS, with a NOTICE saying why, when pg_stat_statements is not installed in this database (CREATE EXTENSION needs rds_superuser) or not in shared_preload_libraries.';

-- Verification: the seven views answer.
DO $$
DECLARE
    v text;
    missing text[] := '{}';
BEGIN
    FOREACH v IN ARRAY ARRAY['table_health', 'index_usage', 'table_bloat', 'connections',
                             'long_running_queries', 'database_size', 'slow_queries'] LOOP
        IF to_regclass('monitoring.' || v) IS NULL THEN
            missing := missing || v;
        ELSE
            EXECUTE format('SELECT 1 FROM monitoring.%I LIMIT 0', v);
        END IF;
    END LOOP;
    IF cardinality(missing) > 0 THEN
        RAISE EXCEPTION 'monitoring views missing: %', array_to_string(missing, ', ');
    END IF;
    RAISE NOTICE 'Monitoring views created successfully';
    -- 001_01..001_03 (applied before this file) refuse an incomplete phase: this is the guide's last line.
    RAISE NOTICE 'Phase 1 Migration Complete! ✓';
END
$$;
