-- The phase's indexes, constraints and views as found (read-only; roles/verify, tasks/objects.yml),
-- plus every INVALID index and every constraint not validated, in any table.
-- Named args: comma-separated names from vars/phase<NNN>.yml (indexes, replaced, constraints, views).
SELECT
  coalesce((SELECT array_agg(c.relname ORDER BY c.relname) FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('i', 'I') AND c.relname = ANY(string_to_array(%(indexes)s, ','))), '{}')
    AS indexes_present,
  coalesce((SELECT array_agg(c.relname ORDER BY c.relname) FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('i', 'I') AND c.relname = ANY(string_to_array(%(replaced)s, ','))), '{}')
    AS replaced_present,
  coalesce((SELECT array_agg(i.indexrelid::regclass::text ORDER BY 1) FROM pg_index i
            WHERE NOT i.indisvalid), '{}') AS invalid_indexes,
  coalesce((SELECT array_agg(conname ORDER BY conname) FROM pg_constraint
            WHERE conname = ANY(string_to_array(%(constraints)s, ',')) AND connamespace = 'public'::regnamespace), '{}')
    AS constraints_present,
  coalesce((SELECT array_agg(conrelid::regclass || '.' || conname ORDER BY 1) FROM pg_constraint
            WHERE NOT convalidated AND connamespace = 'public'::regnamespace), '{}') AS not_validated,
  coalesce((SELECT array_agg(schemaname || '.' || viewname ORDER BY 1) FROM pg_views
            WHERE schemaname || '.' || viewname = ANY(string_to_array(%(views)s, ','))), '{}') AS views_present
