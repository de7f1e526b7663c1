-- The capability map: what this PostgreSQL major can do where majors differ, computed ONCE per run
-- from server_version_num (roles/preflight, tasks/server.yml sets it as the fact preflight_capabilities;
-- every role reads that fact, none compares versions itself). Inside the database the engine reads the
-- same map from dbops.p2_capabilities() (files/sql/repeatable/002/01_helpers.sql; a test checks they agree). Pure arithmetic on the parameter, no
-- catalog read, so it answers for any version number (tests feed it 120000 or 190000 without such a server).
-- Parameters: version_num (server_version_num), min_version_num, max_major.
-- refusal: NULL when the server is in the supported range, else the message preflight fails with.
WITH v AS (
    SELECT %(version_num)s::int AS num, %(min_version_num)s::int AS min_num, %(max_major)s::int AS max_major
), c AS (
    SELECT num, num / 10000 AS major, min_num, max_major,
           -- ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY (14+). Not a fallback: the project detaches
           -- with the plain form on every major (the concurrent one cannot run inside a function).
           num >= 140000 AS detach_concurrently,
           -- publications of a schema, FOR TABLES IN SCHEMA (pg_publication_namespace, 15+).
           num >= 150000 AS publication_schemas,
           -- pg_stat_checkpointer (17+): checkpoint counters left pg_stat_bgwriter.
           num >= 170000 AS stat_checkpointer,
           -- pg_stat_statements *_exec_time columns (13+; 12 had *_time).
           num >= 130000 AS pgss_exec_time,
           -- pg_available_extension_versions.trusted (13+).
           num >= 130000 AS trusted_extensions,
           -- NOT NULL constraints are rows of pg_constraint (contype 'n') from 18.
           num >= 180000 AS not_null_constraints,
           -- pg_stat_io (16+).
           num >= 160000 AS stat_io
      FROM v
)
SELECT num AS version_num, major,
       format('PostgreSQL %%s to %%s', min_num / 10000, max_major) AS supported_range,
       CASE
         WHEN num < min_num THEN format(
           'PostgreSQL %%s (server_version_num %%s) is older than this project supports (PostgreSQL %%s to %%s, tested on '
           '13, 15, 17 and 18). Upgrade the server first (RDS: a major version upgrade); nothing was changed.',
           major, num, min_num / 10000, max_major)
         WHEN major > max_major THEN format(
           'PostgreSQL %%s (server_version_num %%s) is newer than this project supports (PostgreSQL %%s to %%s, tested on '
           '13, 15, 17 and 18): catalog views and DDL rules change between majors and this one was never run. '
           'Use a release of this project that supports it; nothing was changed.',
           major, num, min_num / 10000, max_major)
       END AS refusal,
       detach_concurrently, publication_schemas, stat_checkpointer, pgss_exec_time, trusted_extensions, not_null_constraints, stat_io
  FROM c
