-- Baseline: the police-scanner production schema as it stands before Phase 1
-- (see ../shared/spec/PRODUCTION_FACTS.md). Used by the embedded demo database,
-- Molecule and the test suite. Never applied to production.
-- Idempotent: safe to re-run on a database that already has it.

CREATE TABLE IF NOT EXISTS bcfy_playlists (
    uuid uuid PRIMARY KEY,
    name text,
    sync boolean DEFAULT false,
    descr text,
    ts bigint,
    last_seen bigint,
    last_pos bigint NOT NULL DEFAULT 0,
    listeners integer,
    public boolean DEFAULT true,
    max_groups integer,
    num_groups integer,
    ctids jsonb,
    groups_json jsonb,
    fetched_at timestamptz DEFAULT now(),
    raw_json jsonb
);

CREATE TABLE IF NOT EXISTS bcfy_playlist_poll_log (
    uuid uuid,
    poll_started_at timestamptz DEFAULT now(),
    poll_ended_at timestamptz,
    success boolean DEFAULT false,
    notes text,
    PRIMARY KEY (uuid, poll_started_at)
);

CREATE TABLE IF NOT EXISTS bcfy_calls_raw (
    call_uid text PRIMARY KEY,
    group_id text,
    ts bigint,
    feed_id integer,
    tg_id bigint,
    tag_id integer,
    node_id bigint,
    sid bigint,
    site_id bigint,
    freq double precision,
    src bigint,
    url text,
    started_at timestamptz,
    ended_at timestamptz,
    duration_ms bigint,
    size_bytes bigint,
    fetched_at timestamptz DEFAULT now(),
    raw_json jsonb,
    processed boolean DEFAULT false,
    last_attempt timestamptz,
    error text,
    playlist_uuid uuid,
    s3_key_v2 text,
    CONSTRAINT bcfy_calls_raw_group_id_ts_key UNIQUE (group_id, ts)
);

CREATE INDEX IF NOT EXISTS bcfy_calls_raw_feed_id_idx ON bcfy_calls_raw (feed_id);
CREATE INDEX IF NOT EXISTS bcfy_calls_raw_tg_id_idx ON bcfy_calls_raw (tg_id);
CREATE INDEX IF NOT EXISTS bcfy_calls_raw_tag_id_idx ON bcfy_calls_raw (tag_id);
CREATE INDEX IF NOT EXISTS bcfy_calls_raw_started_at_idx ON bcfy_calls_raw (started_at);
CREATE INDEX IF NOT EXISTS bcfy_calls_raw_node_id_idx ON bcfy_calls_raw (node_id);
CREATE INDEX IF NOT EXISTS bcfy_calls_raw_sid_idx ON bcfy_calls_raw (sid);
CREATE INDEX IF NOT EXISTS bcfy_calls_raw_site_id_idx ON bcfy_calls_raw (site_id);
CREATE INDEX IF NOT EXISTS bcfy_calls_raw_playlist_uuid_idx
    ON bcfy_calls_raw (playlist_uuid) WHERE playlist_uuid IS NOT NULL;
CREATE INDEX IF NOT EXISTS bcfy_calls_raw_playlist_started_idx
    ON bcfy_calls_raw (playlist_uuid, started_at DESC) WHERE playlist_uuid IS NOT NULL;
CREATE INDEX IF NOT EXISTS bcfy_calls_raw_s3_key_v2_idx
    ON bcfy_calls_raw (s3_key_v2) WHERE s3_key_v2 IS NOT NULL;

CREATE TABLE IF NOT EXISTS transcripts (
    id bigserial PRIMARY KEY,
    recording_id bigint,
    text text,
    words jsonb,
    language text,
    model_name text,
    created_at timestamptz DEFAULT now(),
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', coalesce(text, ''))) STORED,
    duration_seconds numeric NOT NULL,
    confidence numeric NOT NULL,
    call_uid text UNIQUE,
    s3_bucket text,
    s3_key text,
    s3_key_v2 text,
    CONSTRAINT transcripts_call_fk FOREIGN KEY (call_uid)
        REFERENCES bcfy_calls_raw (call_uid) ON DELETE SET NULL
);

CREATE INDEX IF NOT EXISTS transcripts_language_model_idx ON transcripts (language, model_name);
CREATE INDEX IF NOT EXISTS transcripts_recording_id_idx ON transcripts (recording_id);
CREATE INDEX IF NOT EXISTS transcripts_call_uid_idx ON transcripts (call_uid) WHERE call_uid IS NOT NULL;
-- The production btree index on tsv: useless for @@ full-text search (Phase 1 replaces it with GIN).
CREATE INDEX IF NOT EXISTS transcripts_tsv_idx ON transcripts (tsv);

CREATE TABLE IF NOT EXISTS api_call_metrics (
    id bigserial PRIMARY KEY,
    "timestamp" timestamptz NOT NULL DEFAULT now(),
    endpoint text NOT NULL,
    method text DEFAULT 'GET',
    status_code integer,
    duration_ms integer,
    response_size integer,
    cache_hit boolean DEFAULT false,
    error text
);

CREATE TABLE IF NOT EXISTS system_logs (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    component text NOT NULL,
    event_type text NOT NULL,
    message text,
    metadata jsonb,
    duration_ms integer
);

CREATE INDEX IF NOT EXISTS system_logs_created_at_idx ON system_logs (created_at DESC);
CREATE INDEX IF NOT EXISTS system_logs_component_idx ON system_logs (component);
CREATE INDEX IF NOT EXISTS system_logs_event_type_idx ON system_logs (event_type);

CREATE TABLE IF NOT EXISTS processing_state (
    id bigserial PRIMARY KEY,
    call_uid text UNIQUE REFERENCES bcfy_calls_raw (call_uid) ON DELETE SET NULL,
    recording_id bigint,
    status text NOT NULL CHECK (status IN ('queued', 'downloaded', 'transcribed', 'indexed', 'error')),
    last_error text,
    updated_at timestamptz DEFAULT now()
);

CREATE OR REPLACE FUNCTION processing_state_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

-- Not CREATE OR REPLACE TRIGGER: that is PostgreSQL 14+, and the baseline also loads on 13.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'processing_state'::regclass AND tgname = 'processing_state_updated_at') THEN
        CREATE TRIGGER processing_state_updated_at
            BEFORE UPDATE ON processing_state
            FOR EACH ROW EXECUTE FUNCTION processing_state_touch_updated_at();
    END IF;
END
$$;
