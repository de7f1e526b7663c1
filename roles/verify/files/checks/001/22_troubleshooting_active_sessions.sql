-- Guide Troubleshooting, "Slow Migration" solution 1: check server resources.
-- kind: info (server activity)
SELECT pid, usename, application_name, state FROM pg_stat_activity WHERE state != 'idle';
