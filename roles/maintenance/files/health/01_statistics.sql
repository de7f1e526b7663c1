-- Health checks over the statistics (read-only; run by roles/maintenance, tasks/health.yml).
-- Needs Phase 1's monitoring views. Parameters (psycopg2 named args) come from the role's variables.
-- One row, one column `findings`: a jsonb array of {check, severity (ok|warning|critical), summary, rows}.
WITH bloat AS (
    SELECT b.schemaname, b.tablename, b.partition_of, b.live_rows, b.dead_rows, b.dead_ratio_pct,
           b.est_bloat_size, b.last_vacuum, b.last_autovacuum,
           CASE
               -- a small heap is never a finding, whatever its share of dead rows: autovacuum cleans it
               -- in passing (a few-MB partition with 1 500 dead rows is not worth a failed job)
               WHEN b.dead_rows < %(bloat_min_dead_rows)s THEN 'ok'
               WHEN coalesce(b.est_bloat_bytes, 0) < %(bloat_min_dead_bytes)s::bigint THEN 'ok'
               WHEN b.dead_ratio_pct >= %(bloat_critical_pct)s THEN 'critical'
               WHEN b.dead_ratio_pct >= %(bloat_warning_pct)s THEN 'warning'
               ELSE 'ok'
           END AS severity
    FROM monitoring.table_bloat AS b
),

bloat_bad AS (
    SELECT * FROM bloat WHERE severity <> 'ok'
),

unused AS (
    SELECT u.schemaname, u.tablename, u.indexname, u.index_type, u.size, u.size_bytes, u.idx_scan,
           u.stats_since
    FROM monitoring.index_usage AS u
    WHERE u.usage_status = 'UNUSED'
      AND NOT u.is_primary
      AND NOT u.is_unique
      AND NOT u.backs_constraint
      AND u.size_bytes >= %(unused_index_min_bytes)s::bigint
),

-- The statement of a long-running session goes into job logs and reports: never its literals (they can
-- hold personal data or secrets). query_id (PostgreSQL 14+ with compute_query_id; it matches
-- pg_stat_statements.queryid; read through to_jsonb so that 12 and 13 answer NULL) identifies it, and in
-- its text every dollar-quoted body, quoted string and number is replaced by ? (a literal left open by a
-- text cut at track_activity_query_size is redacted to the end: over-redaction is the safe side).
long_q AS (
    SELECT a.pid, a.datname, a.usename, a.application_name, a.state, a.wait_event_type, a.wait_event,
           round(extract(EPOCH FROM now() - coalesce(a.xact_start, a.query_start)))::bigint AS seconds,
           to_jsonb(a) ->> 'query_id' AS query_id,
           left(regexp_replace(regexp_replace(regexp_replace(a.query,
                    '(\$[A-Za-z_0-9]*?\$).*?(\1|$)', '?', 'g'),
                    '[A-Za-z]?&?''([^''\\]|''''|\\.)*(''|$)', '?', 'g'),
                    '\m[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?\M', '?', 'g'), 200) AS query
    FROM pg_stat_activity AS a
    WHERE a.pid <> pg_backend_pid()
      AND a.backend_type = 'client backend'
      AND a.state <> 'idle'
      AND now() - coalesce(a.xact_start, a.query_start) > make_interval(secs => %(long_warning_seconds)s)
)

SELECT jsonb_build_array(
    (SELECT jsonb_build_object(
        'check', 'table_bloat',
        'severity', CASE WHEN bool_or(x.severity = 'critical') THEN 'critical'
                         WHEN count(*) > 0 THEN 'warning' ELSE 'ok' END,
        'summary', CASE WHEN count(*) = 0
            THEN 'no table or partition has over ' || %(bloat_warning_pct)s || '%% dead rows (of at least '
                 || %(bloat_min_dead_rows)s || ' rows and ' || pg_size_pretty(%(bloat_min_dead_bytes)s::bigint) || ')'
            ELSE count(*) || ' table(s)/partition(s) over the dead-row threshold, worst '
                 || (array_agg(x.schemaname || '.' || x.tablename || ' ' || x.dead_ratio_pct || '%% dead ('
                               || x.dead_rows || ' rows, about ' || x.est_bloat_size || ')'
                               ORDER BY x.dead_ratio_pct DESC))[1]
                 || ': VACUUM ANALYZE it and check autovacuum'
        END,
        'rows', coalesce(jsonb_agg(to_jsonb(x) ORDER BY x.dead_ratio_pct DESC)
                         FILTER (WHERE x.rn <= %(max_rows)s), '[]'))
     FROM (SELECT bb.*, row_number() OVER (ORDER BY bb.dead_ratio_pct DESC) AS rn FROM bloat_bad AS bb) AS x),
    (SELECT jsonb_build_object(
        'check', 'unused_indexes',
        'severity', CASE WHEN count(*) > 0 THEN 'warning' ELSE 'ok' END,
        'summary', CASE WHEN count(*) = 0
            THEN 'no unused non-unique index of ' || pg_size_pretty(%(unused_index_min_bytes)s::bigint) || ' or more'
            ELSE count(*) || ' unused index(es) of ' || pg_size_pretty(%(unused_index_min_bytes)s::bigint)
                 || ' or more (' || pg_size_pretty(sum(x.size_bytes)::bigint) || ' in all, scans counted since '
                 || coalesce(max(x.stats_since)::text, 'the statistics were created')
                 || '): review before dropping, a monthly job may need them'
        END,
        'rows', coalesce(jsonb_agg(to_jsonb(x) ORDER BY x.size_bytes DESC) FILTER (WHERE x.rn <= %(max_rows)s), '[]'))
     FROM (SELECT uu.*, row_number() OVER (ORDER BY uu.size_bytes DESC) AS rn FROM unused AS uu) AS x),
    (SELECT jsonb_build_object(
        'check', 'long_running_queries',
        'severity', CASE WHEN max(x.seconds) > %(long_critical_seconds)s THEN 'critical'
                         WHEN count(*) > 0 THEN 'warning' ELSE 'ok' END,
        'summary', CASE WHEN count(*) = 0
            THEN 'no statement or transaction running longer than ' || %(long_warning_seconds)s || ' s'
            ELSE count(*) || ' session(s) running longer than ' || %(long_warning_seconds)s || ' s, longest pid '
                 || (array_agg(x.pid ORDER BY x.seconds DESC))[1] || ' ('
                 || (array_agg(coalesce(x.usename::text, '?') || ', ' || x.state ORDER BY x.seconds DESC))[1] || ') for '
                 || max(x.seconds) || ' s: '
                 || (array_agg(left(coalesce(x.query, ''), 80) ORDER BY x.seconds DESC))[1]
        END,
        'rows', coalesce(jsonb_agg(to_jsonb(x) ORDER BY x.seconds DESC) FILTER (WHERE x.rn <= %(max_rows)s), '[]'))
     FROM (SELECT lq.*, row_number() OVER (ORDER BY lq.seconds DESC) AS rn FROM long_q AS lq) AS x)
) AS findings;
