-- What the maintenance can use in this database (read-only; roles/maintenance, tasks/probe.yml).
-- Named arg: tables = maintenance_vacuum_tables joined with ','; vacuum_tables keeps the ones that exist.
SELECT current_user AS db_user,
       EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'maintain_partitions' AND prokind = 'p'
                 AND pronamespace = 'public'::regnamespace) AS maintain,
       EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'cleanup_old_data' AND prokind = 'p'
                 AND pronamespace = 'public'::regnamespace) AS cleanup,
       to_regclass('monitoring.table_bloat') IS NOT NULL AND to_regclass('monitoring.index_usage') IS NOT NULL AS monitoring,
       to_regclass('public.app_retention_policies') IS NOT NULL AS policies,
       to_regclass('public.bcfy_calls_raw') IS NOT NULL AS calls,
       EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'get_stuck_processing_items'
                 AND pronamespace = 'public'::regnamespace AND pronargs = pronargdefaults) AS stuck_fn,
       (SELECT coalesce(string_agg(to_regclass('public.' || quote_ident(x.t))::text, ',' ORDER BY x.o), '')
          FROM unnest(string_to_array(%(tables)s, ',')) WITH ORDINALITY AS x (t, o)
         WHERE to_regclass('public.' || quote_ident(x.t)) IS NOT NULL) AS vacuum_tables,
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_cron') AS cron,
       coalesce((SELECT has_schema_privilege(n.oid, 'USAGE') FROM pg_namespace AS n WHERE n.nspname = 'cron'), false) AS cron_usage,
       to_char(now() AT TIME ZONE 'UTC', 'FMDay') AS weekday_utc
