-- Rollback of files/sql/repeatable/001/01_monitoring_views.sql: drops the seven views and their helper
-- function. No CASCADE: an object someone built on these views makes the rollback stop with an
-- error that names it, instead of silently disappearing.
-- squawk-ignore-file ban-drop-view, ban-drop-function -- a rollback: it removes exactly the Phase 1 monitoring objects

DROP VIEW IF EXISTS monitoring.slow_queries;
DROP FUNCTION IF EXISTS monitoring.pg_stat_statements_current_db();
DROP VIEW IF EXISTS monitoring.database_size;
DROP VIEW IF EXISTS monitoring.long_running_queries;
DROP VIEW IF EXISTS monitoring.connections;
DROP VIEW IF EXISTS monitoring.table_bloat;
DROP VIEW IF EXISTS monitoring.index_usage;
DROP VIEW IF EXISTS monitoring.table_health;
