-- Server facts the checks and the report use (read-only; roles/preflight, tasks/server.yml).
-- table_data_bytes: heap size of all user tables and materialized views (no indexes), to size the backup.
SELECT current_setting('server_version_num')::int AS version_num,
       current_setting('server_version') AS version,
       pg_is_in_recovery() AS in_recovery,
       current_setting('default_transaction_read_only') = 'on' AS read_only,
       current_user AS login_role,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
       current_database() AS database,
       pg_database_size(current_database()) AS database_bytes,
       coalesce((SELECT sum(pg_table_size(c.oid)) FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')), 0)::bigint
         AS table_data_bytes
