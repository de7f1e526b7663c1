-- Phase 1 / step 3: the `monitoring` schema, pg_stat_statements, and the check that Phase 1 is complete.
-- dbops:supersedes sha256:433bc81372acdfac13c5b0790cc287b6555308f56e9414dcd2c09e85c9140725
--
-- Runs in one transaction. The seven read-only views and their helper function are code, in
-- files/sql/repeatable/001/01_monitoring_views.sql (re-applied whenever it changes). The superseded
-- checksum above is the earlier text of this file, which also created the views: a database that
-- applied it has everything this text creates, so its ledger row is re-stamped, not re-run.

-- pg_stat_statements feeds monitoring.slow_queries. Creating it needs rds_superuser on RDS (superuser
-- elsewhere) and shared_preload_libraries = pg_stat_statements (RDS default parameter group has it).
-- Without the privilege: a notice, and slow_queries returns no rows until someone creates it.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements') THEN
        CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
        RAISE NOTICE 'Created extension pg_stat_statements';
    END IF;
EXCEPTION
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'pg_stat_statements not created (%): monitoring.slow_queries stays empty until an rds_superuser runs CREATE EXTENSION pg_stat_statements in this database', SQLERRM;
    WHEN undefined_file THEN
        RAISE NOTICE 'pg_stat_statements is not available on this server (%): monitoring.slow_queries stays empty', SQLERRM;
END
$$;

CREATE SCHEMA IF NOT EXISTS monitoring;
COMMENT ON SCHEMA monitoring IS
    'Read-only health views for operators (scanner-dbops Phase 1). Thresholds are documented on each view.';

-- Phase 1 is complete: every index valid and every CHECK validated, checked by name (so the
-- check also holds once Phase 2 has copied the indexes and constraints onto partitions).
DO $$
DECLARE
    missing text[] := '{}';
BEGIN
    SELECT array_agg(e.name ORDER BY e.name) INTO missing
    FROM unnest(ARRAY['bcfy_calls_raw_pending_idx', 'bcfy_calls_raw_fetched_at_idx',
                      'bcfy_calls_raw_feed_started_idx', 'bcfy_calls_raw_tg_started_idx',
                      'transcripts_tsv_gin_idx', 'transcripts_created_at_idx',
                      'api_call_metrics_timestamp_idx', 'api_call_metrics_endpoint_timestamp_idx',
                      'bcfy_playlist_poll_log_poll_started_at_idx',
                      'processing_state_status_updated_at_idx']) AS e(name)
    WHERE NOT EXISTS (SELECT 1 FROM pg_index AS i
                      WHERE i.indexrelid = to_regclass('public.' || e.name) AND i.indisvalid);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'Phase 1 is incomplete: index(es) missing or INVALID: %', array_to_string(missing, ', ')
            USING HINT = 'Run 001_01_indexes.sql again.';
    END IF;

    SELECT array_agg(e.name ORDER BY e.name) INTO missing
    FROM unnest(ARRAY['bcfy_calls_raw_duration_ms_check', 'bcfy_calls_raw_size_bytes_check',
                      'bcfy_calls_raw_ended_at_check', 'transcripts_confidence_check',
                      'transcripts_duration_seconds_check', 'api_call_metrics_status_code_check',
                      'api_call_metrics_duration_ms_check', 'system_logs_duration_ms_check',
                      'bcfy_playlist_poll_log_poll_ended_at_check']) AS e(name)
    WHERE NOT coalesce((SELECT bool_and(c.convalidated) FROM pg_constraint AS c
                        WHERE c.connamespace = 'public'::regnamespace AND c.contype = 'c'
                          AND c.conname = e.name), false);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'Phase 1 is incomplete: CHECK constraint(s) missing or NOT VALID: %', array_to_string(missing, ', ')
            USING HINT = 'Run 001_02_check_constraints.sql again.';
    END IF;
END
$$;
