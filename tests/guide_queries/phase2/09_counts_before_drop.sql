-- Guide 2.6 Drop Old Non-Partitioned Tables: BEFORE DROPPING, verify row counts match.
-- when: swapped
SELECT
  (SELECT COUNT(*) FROM bcfy_calls_raw) as new_table,
  (SELECT COUNT(*) FROM bcfy_calls_raw_nonpartitioned) as old_table;
