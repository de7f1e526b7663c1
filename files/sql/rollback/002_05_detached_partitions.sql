-- Rollback of Phase 2 / step 5: drop the register of detached partitions (after
-- rollback/repeatable/002/08_daily_jobs.sql dropped the procedure that writes it). Its rows name
-- tables cleanup_old_data() detached from finalized tables, and rollback/002_preconditions.sql
-- refuses while a table is converted: it is empty here (a table it named would stay, plain).
-- squawk-ignore-file ban-drop-table -- a rollback: it removes exactly the table 002_05 creates

DROP TABLE IF EXISTS dbops.p2_detached;
