CREATE SCHEMA IF NOT EXISTS monitoring;

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
