-- Rollback of files/sql/repeatable/002/99_privileges.sql: the schema's default privileges for
-- functions back to PostgreSQL's (the functions themselves are dropped by the other rollbacks).

ALTER DEFAULT PRIVILEGES IN SCHEMA dbops GRANT EXECUTE ON ROUTINES TO PUBLIC;
