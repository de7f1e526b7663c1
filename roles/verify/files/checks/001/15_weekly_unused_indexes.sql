-- Guide Maintenance Operations, Weekly: check for unused indexes.
-- kind: proof
SELECT * FROM monitoring.index_usage
WHERE usage_status = 'UNUSED'
AND indexname NOT LIKE 'bcfy_%_pkey';
