-- Phase 3 / step 3: the `monitoring` schema the pipeline views live in (Phase 1 creates it too;
-- Phase 3 does not need Phase 1). The functions and views are code, in
-- files/sql/repeatable/003/01_pipeline_monitoring.sql (re-applied whenever it changes).
-- dbops:supersedes sha256:fb7bb51f699458edb0c621dd618fab23fbd758829fe1d3f4af5d84a47ce47e56
-- (the earlier text of this file, which also created them: its ledger row is re-stamped, not re-run)

CREATE SCHEMA IF NOT EXISTS monitoring;
