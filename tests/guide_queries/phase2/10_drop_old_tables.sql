-- corrected: a bare DROP TABLE of an old table while its reverse-sync trigger still writes to it makes every write to the new table fail; dbops.p2_finalize re-verifies (counts + checksums per range), drops the trigger, then the table.
-- when: finalize
-- Guide 2.6 Drop Old Non-Partitioned Tables (run only after the verification above; Ansible asks for confirmation).
SELECT dbops.p2_finalize('bcfy_calls_raw');
SELECT dbops.p2_finalize('transcripts');
SELECT dbops.p2_finalize('api_call_metrics');
SELECT dbops.p2_finalize('system_logs');
