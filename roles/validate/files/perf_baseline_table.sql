-- The performance baseline Phase 1 saves before its migrations (roles/validate, tasks/baseline.yml)
-- and playbooks/validate.yml compares with. Project bookkeeping, like dbops.schema_migrations.
CREATE SCHEMA IF NOT EXISTS dbops;

CREATE TABLE IF NOT EXISTS dbops.perf_baseline (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    taken_at timestamptz NOT NULL DEFAULT now(),
    label text NOT NULL,
    run_id text,
    taken_by text NOT NULL DEFAULT current_user,
    -- squawk-ignore prefer-bigint-over-int
    repetitions integer NOT NULL CHECK (repetitions > 0),  -- runs per test: a handful, never near 2^31
    catalog jsonb NOT NULL DEFAULT '{}',
    tests jsonb NOT NULL
);

COMMENT ON TABLE dbops.perf_baseline IS
    'Timings (median ms of EXPLAIN ANALYZE, planning + execution) and plan summaries of the guide''s '
    'Performance Validation tests, taken before a phase changed anything; validate.yml compares with the latest row.';
