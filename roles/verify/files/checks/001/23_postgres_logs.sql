-- corrected: there is no pg_log relation in PostgreSQL; this lists the server's log files instead (pg_monitor), see docs/GUIDE_QUERIES.md to read them.
-- kind: info (the server's log files: needs an existing log_directory and pg_monitor)
-- Guide Support & Contact, step 2: "Review PostgreSQL logs: SELECT * FROM pg_log;".
-- Reading log CONTENTS from SQL needs pg_read_file (superuser / pg_read_server_files): not on RDS.
--   RDS:   aws rds describe-db-log-files --db-instance-identifier <id>
--          aws rds download-db-log-file-portion --db-instance-identifier <id> \
--              --log-file-name error/postgresql.log.<YYYY-MM-DD-HH> --starting-token 0 --output text
--          (or CloudWatch Logs when the "postgresql" log export is enabled)
--   Local: the files below live in SHOW log_directory; tail them on the server.
SELECT name, size, modification FROM pg_ls_logdir() ORDER BY modification DESC;
