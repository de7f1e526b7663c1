-- Guide Maintenance Operations, Daily (and Troubleshooting "Disk Space Errors" 3): enforce retention, create future partitions.
-- when: any
SELECT cleanup_old_data();  -- Enforce retention policies
SELECT maintain_partitions();  -- Create future partitions
