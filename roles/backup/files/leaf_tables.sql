-- The relations pg_dump must name for each backup table: the table itself and, when it is
-- partitioned, every leaf partition (pg_dump --table does not follow partitions on PostgreSQL 15).
-- A plain table is its own only leaf. A table that does not exist is still named, so pg_dump
-- (and the backup's proof) reports it. The names come as one comma-separated string: the query
-- module passes a list parameter as quoted text, not as an array.
SELECT DISTINCT format('%%I.%%I', n.nspname, c.relname) AS rel
FROM unnest(string_to_array(%(tables)s, ',')) AS t (name)
CROSS JOIN LATERAL pg_partition_tree(to_regclass(format('public.%%I', t.name))) AS p
JOIN pg_class AS c ON c.oid = p.relid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
UNION
SELECT format('public.%%I', t.name)
FROM unnest(string_to_array(%(tables)s, ',')) AS t (name)
ORDER BY 1;
