-- Guide Performance Validation / Resource Monitoring: check index health.
-- kind: proof
SELECT * FROM monitoring.index_usage
WHERE usage_status = 'UNUSED' OR usage_status = 'LOW_USAGE'
ORDER BY pg_relation_size(indexrelid) DESC;
