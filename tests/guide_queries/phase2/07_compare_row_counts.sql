-- Guide 2.5 Data Verification: compare row counts (bcfy_calls_raw_nonpartitioned exists between dbops.p2_swap and dbops.p2_finalize).
-- when: swapped
SELECT COUNT(*) FROM bcfy_calls_raw AS new_count;
SELECT COUNT(*) FROM bcfy_calls_raw_nonpartitioned AS old_count;
