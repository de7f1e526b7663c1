-- What the performance tests depend on (read-only; roles/validate, tasks/catalog.yml): whether
-- bcfy_calls_raw is partitioned and its partitions, the GIN indexes, row counts (planner estimates,
-- else a count capped at 5 M rows), whether dbops.perf_baseline exists, and the server version.
SELECT (SELECT c.relkind::text FROM pg_class AS c WHERE c.oid = to_regclass('public.bcfy_calls_raw')) AS calls_kind,
       (SELECT coalesce(string_agg(c.relname, ',' ORDER BY c.relname), '') FROM pg_inherits AS i
          JOIN pg_class AS c ON c.oid = i.inhrelid
         WHERE i.inhparent = to_regclass('public.bcfy_calls_raw')
           AND (SELECT k.relkind FROM pg_class AS k WHERE k.oid = i.inhparent) = 'p') AS calls_partitions,
       to_regclass('public.transcripts_tsv_gin_idx') IS NOT NULL AS gin_index,
       (SELECT coalesce(string_agg(c.relname, ',' ORDER BY c.relname), '') FROM pg_class AS c
          JOIN pg_am AS a ON a.oid = c.relam
         WHERE a.amname = 'gin' AND c.relkind IN ('i', 'I')
           AND c.relnamespace = 'public'::regnamespace) AS gin_indexes,
       coalesce(nullif((SELECT sum(greatest(c.reltuples, 0))::bigint FROM pg_partition_tree(to_regclass('public.bcfy_calls_raw')) AS t
                          JOIN pg_class AS c ON c.oid = t.relid WHERE t.isleaf), 0),
                (SELECT count(*) FROM (SELECT 1 FROM public.bcfy_calls_raw LIMIT 5000000) AS s)) AS calls_rows,
       coalesce(nullif((SELECT sum(greatest(c.reltuples, 0))::bigint FROM pg_partition_tree(to_regclass('public.transcripts')) AS t
                          JOIN pg_class AS c ON c.oid = t.relid WHERE t.isleaf), 0),
                (SELECT count(*) FROM (SELECT 1 FROM public.transcripts LIMIT 5000000) AS s)) AS transcripts_rows,
       to_regclass('dbops.perf_baseline') IS NOT NULL AS baseline_table,
       current_setting('server_version') AS server_version
