-- Guide Maintenance Operations, Monthly: review partition health.
-- when: any
-- kind: proof
SELECT * FROM monitoring.partition_health
ORDER BY total_size DESC;
