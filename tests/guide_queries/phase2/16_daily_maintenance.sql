-- Guide Maintenance Operations, Daily (and Troubleshooting "Disk Space Errors" 3): enforce retention, create future partitions.
-- when: any
-- Corrected: CALL instead of the guide's SELECT (the daily jobs are procedures that commit between short steps, see docs/PHASE2_DESIGN.md).
CALL cleanup_old_data();  -- Enforce retention policies
CALL maintain_partitions();  -- Create future partitions
