-- Rollback of files/sql/repeatable/002/09_partition_health.sql: drops exactly the objects it creates (no CASCADE: anything built on them stops
-- the rollback with an error naming it).
-- squawk-ignore-file ban-drop-function, ban-drop-view -- a rollback: it removes exactly these engine objects

DROP VIEW IF EXISTS monitoring.partition_health;
