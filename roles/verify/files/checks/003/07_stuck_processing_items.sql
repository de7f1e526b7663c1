-- Guide 3.2 Verify New Features ("Check for stuck items"), repeated in Monitoring Queries (Pipeline status).
-- kind: proof
SELECT * FROM get_stuck_processing_items();
