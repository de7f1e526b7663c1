-- corrected: the guide's manual renames leave the index names, sequences, triggers and views on the wrong table and re-add transcripts_call_fk with a full validation under lock; dbops.p2_rollback swaps back in one short transaction (the old table is complete: the reverse trigger kept it in sync), then the foreign keys are validated without blocking.
-- when: rollback
-- Guide 2.8 Rollback Plan.
SELECT dbops.p2_rollback('bcfy_calls_raw');
SELECT dbops.p2_validate_refs();
