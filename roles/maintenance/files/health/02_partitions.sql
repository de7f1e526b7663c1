-- Partition health (read-only; run by roles/maintenance, tasks/health.yml). Needs Phase 2's
-- public.app_retention_policies. For every enabled policy table that is partitioned: holes in the
-- coverage from the first partition to the current interval, missing future partitions (current
-- interval to now + premake), and rows in the DEFAULT partition (must be 0).
-- Bounds are read with pg_get_expr(relpartbound) (no function of the engine needed); intervals
-- are computed in UTC like the engine (date_trunc(unit, ts, 'UTC')). DEFAULT partitions are
-- counted with a bounded count(*) through query_to_xml (dynamic SQL without creating a function).
WITH pol AS (
    SELECT p.table_name, p.partition_interval AS unit, p.premake, c.oid AS parent,
           ('1 ' || p.partition_interval)::interval AS step
    FROM public.app_retention_policies AS p
    JOIN pg_class AS c ON c.relname = p.table_name AND c.relnamespace = 'public'::regnamespace AND c.relkind = 'p'
    WHERE p.partition_interval IS NOT NULL AND p.enabled
),

not_partitioned AS (
    SELECT p.table_name
    FROM public.app_retention_policies AS p
    WHERE p.partition_interval IS NOT NULL AND p.enabled
      AND NOT EXISTS (SELECT 1 FROM pol WHERE pol.table_name = p.table_name)
),

parts AS (
    SELECT pol.table_name, k.oid AS rel, k.relname::text AS partition,
           pg_get_expr(k.relpartbound, k.oid) = 'DEFAULT' AS is_default,
           CASE WHEN m.b[1] = 'MINVALUE' THEN '-infinity' ELSE trim(BOTH '''' FROM m.b[1]) END::timestamptz AS range_start,
           CASE WHEN m.b[2] = 'MAXVALUE' THEN 'infinity' ELSE trim(BOTH '''' FROM m.b[2]) END::timestamptz AS range_end
    FROM pol
    JOIN pg_inherits AS i ON i.inhparent = pol.parent
    JOIN pg_class AS k ON k.oid = i.inhrelid
    LEFT JOIN LATERAL (
        SELECT regexp_match(pg_get_expr(k.relpartbound, k.oid), '^FOR VALUES FROM \((.*)\) TO \((.*)\)$') AS b
    ) AS m ON true
),

span AS (
    SELECT pol.table_name, pol.unit, pol.premake, pol.step,
           (SELECT min(p.range_start) FROM parts AS p
            WHERE p.table_name = pol.table_name AND NOT p.is_default AND p.range_start > '-infinity') AS first_start,
           date_trunc(pol.unit, now(), 'UTC') AT TIME ZONE 'UTC' AS current_start
    FROM pol
),

buckets AS (
    SELECT s.table_name, s.unit, g.t AT TIME ZONE 'UTC' AS bucket_start,
           (g.t + s.step) AT TIME ZONE 'UTC' AS bucket_end,
           g.t >= s.current_start AS ahead,
           g.t = s.current_start AS is_current
    FROM span AS s
    CROSS JOIN LATERAL generate_series(
        least(date_trunc(s.unit, coalesce(s.first_start, now()), 'UTC') AT TIME ZONE 'UTC', s.current_start),
        s.current_start + s.premake * s.step, s.step) AS g (t)
),

uncovered AS (
    SELECT b.*
    FROM buckets AS b
    WHERE NOT EXISTS (SELECT 1 FROM parts AS p
                      WHERE p.table_name = b.table_name AND NOT p.is_default
                        AND p.range_start <= b.bucket_start AND p.range_end > b.bucket_start)
       OR NOT EXISTS (SELECT 1 FROM parts AS p
                      WHERE p.table_name = b.table_name AND NOT p.is_default
                        AND p.range_start < b.bucket_end AND p.range_end >= b.bucket_end)
),

gaps AS (
    SELECT u.table_name, u.unit, u.bucket_start, u.bucket_end FROM uncovered AS u WHERE NOT u.ahead
),

future AS (
    SELECT u.table_name, u.unit, u.bucket_start, u.bucket_end, u.is_current FROM uncovered AS u WHERE u.ahead
),

dflt AS (
    SELECT p.table_name, p.partition,
           (xpath('/row/n/text()',
                  query_to_xml('SELECT count(*) AS n FROM (SELECT 1 FROM ' || p.rel::regclass::text
                               || ' LIMIT ' || %(default_count_cap)s::bigint || ') AS s', false, true, '')
           ))[1]::text::bigint AS row_count
    FROM parts AS p
    WHERE p.is_default
),

dflt_bad AS (
    SELECT * FROM dflt WHERE row_count > 0
),

scope AS (
    SELECT coalesce(string_agg(pol.table_name || ' (' || pol.unit || ')', ', ' ORDER BY pol.table_name), 'none')
           || coalesce('; not partitioned: ' || (SELECT string_agg(n.table_name, ', ' ORDER BY n.table_name)
                                                  FROM not_partitioned AS n), '') AS txt
    FROM pol
)

SELECT jsonb_build_array(
    (SELECT jsonb_build_object(
        'check', 'partition_gaps',
        'severity', CASE WHEN count(*) > 0 THEN 'critical' ELSE 'ok' END,
        'summary', CASE WHEN count(*) = 0
            THEN 'every interval from the first partition to now is covered: ' || (SELECT txt FROM scope)
            ELSE (SELECT count(*) FROM gaps) || ' interval(s) without a partition (their rows go to DEFAULT), first: '
                 || (array_agg(g.table_name || ' ' || g.bucket_start::date || ' .. ' || g.bucket_end::date
                               ORDER BY g.table_name, g.bucket_start))[1]
        END,
        'rows', coalesce(jsonb_agg(to_jsonb(g) ORDER BY g.table_name, g.bucket_start), '[]'))
     FROM (SELECT * FROM gaps ORDER BY table_name, bucket_start LIMIT %(max_rows)s) AS g),
    (SELECT jsonb_build_object(
        'check', 'future_partitions',
        'severity', CASE WHEN bool_or(f.is_current) THEN 'critical' WHEN count(*) > 0 THEN 'warning' ELSE 'ok' END,
        'summary', CASE WHEN count(*) = 0
            THEN 'current and premade future partitions present for ' || (SELECT count(*) FROM pol) || ' table(s)'
            ELSE (SELECT count(*) FROM future) || ' current/future interval(s) without a partition'
                 || CASE WHEN bool_or(f.is_current) THEN ' (including the CURRENT one: new rows go to DEFAULT)' ELSE '' END
                 || ', first: ' || (array_agg(f.table_name || ' ' || f.bucket_start::date ORDER BY f.bucket_start))[1]
                 || ': run maintain_partitions()'
        END,
        'rows', coalesce(jsonb_agg(to_jsonb(f) ORDER BY f.table_name, f.bucket_start), '[]'))
     FROM (SELECT * FROM future ORDER BY table_name, bucket_start LIMIT %(max_rows)s) AS f),
    (SELECT jsonb_build_object(
        'check', 'default_partition_rows',
        'severity', CASE WHEN count(*) > 0 THEN 'critical' ELSE 'ok' END,
        'summary', CASE WHEN count(*) = 0
            THEN (SELECT count(*) FROM dflt) || ' DEFAULT partition(s), all empty'
            ELSE string_agg(d.partition || ' holds ' || d.row_count
                            || CASE WHEN d.row_count >= %(default_count_cap)s::bigint THEN '+' ELSE '' END
                            || ' row(s)', ', ' ORDER BY d.partition)
                 || ' (must be 0): maintain_partitions() moves them into partitions; if it reported errors, see them'
        END,
        'rows', coalesce(jsonb_agg(to_jsonb(d) ORDER BY d.partition), '[]'))
     FROM dflt_bad AS d)
) AS findings;
