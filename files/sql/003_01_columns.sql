-- dbops:no-transaction
-- Phase 3 / step 1: state-tracking columns (guide 3.2: "\d bcfy_playlists", "\d bcfy_calls_raw",
-- "\d processing_state").
--
--   bcfy_playlists    last_synced_at timestamptz, sync_error_count integer NOT NULL DEFAULT 0,
--                     last_error_message text
--   bcfy_calls_raw    processing_stage text DEFAULT 'pending', retry_count integer NOT NULL DEFAULT 0
--   processing_state  created_at timestamptz DEFAULT now() (NULL for existing rows),
--                     retry_count integer DEFAULT 0, max_retries integer DEFAULT 3
--
-- Online: every default added with a column is a constant, so ADD COLUMN only writes the catalog
-- (PostgreSQL 11+ "fast default"): no table rewrite, no scan, even with NOT NULL. The ACCESS EXCLUSIVE lock lasts milliseconds; the runner bounds the wait
-- with lock_timeout and retries. One DO block (one transaction) per table: one lock at a time.
-- On a partitioned bcfy_calls_raw (after Phase 2) the column goes to every partition with the same
-- (fast) default, and partitions created later by maintain_partitions() (CREATE TABLE ... LIKE the
-- parent INCLUDING DEFAULTS INCLUDING CONSTRAINTS, then ATTACH) get it too.
--
-- Existing rows read processing_stage = 'pending' (the default; no UPDATE of 2.5 M rows): the
-- monitoring functions of 003_03 read a 'pending' row with processed = true as completed.
--
-- Idempotent, and safe where some columns already exist (some production copies have them):
-- ADD COLUMN IF NOT EXISTS leaves an existing column as it is (its type and default are not changed;
-- the verification below reports a type mismatch). dbops.p3_added_columns records the columns this
-- phase really added: rollback_phase3 (with rollback_phase3_drop_columns) drops only those.
--
-- While Phase 2 is swapped but not finalized, the old copy bcfy_calls_raw_nonpartitioned gets the
-- same columns: a rollback of Phase 2 then gives the application back a table it can still write
-- (values written meanwhile are not copied back: the reverse-sync trigger has a fixed column list
-- and leaves the new columns at their defaults).

-- Refuse while a Phase 2 conversion is mid-flight (shadow prepared, backfilling, not swapped): the
-- engine mirrors the column list of prepare time, so DDL on a converting table is not allowed.
DO $$
DECLARE
    busy text;
BEGIN
    IF to_regclass('dbops.p2_state') IS NOT NULL THEN
        SELECT string_agg(format('%s (%s)', s.table_name, s.step), ', ' ORDER BY s.table_name) INTO busy
        FROM dbops.p2_state AS s
        WHERE s.step NOT IN ('swapped', 'finalized');
        IF busy IS NOT NULL THEN
            RAISE EXCEPTION 'Phase 3 refused: a Phase 2 conversion is in progress: %', busy
                USING HINT = 'Finish it with playbooks/phase2.yml or undo it with playbooks/rollback_phase2.yml, then run Phase 3.';
        END IF;
    END IF;
END
$$;

-- The ledger's schema (the runner creates it; a plain psql run may not have it yet).
CREATE SCHEMA IF NOT EXISTS dbops;
CREATE TABLE IF NOT EXISTS dbops.p3_added_columns (
    table_name text NOT NULL,
    column_name text NOT NULL,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, column_name)
);
COMMENT ON TABLE dbops.p3_added_columns IS
'Columns Phase 3 added (columns that existed before are not listed): what rollback_phase3 with rollback_phase3_drop_columns=true drops.';

DO $$
BEGIN
    INSERT INTO dbops.p3_added_columns (table_name, column_name)
    SELECT 'bcfy_playlists', c
    FROM unnest(ARRAY['last_synced_at', 'sync_error_count', 'last_error_message']) AS c
    WHERE NOT EXISTS (SELECT 1 FROM pg_attribute
                      WHERE attrelid = 'public.bcfy_playlists'::regclass AND attname = c AND NOT attisdropped)
    ON CONFLICT DO NOTHING;
    ALTER TABLE public.bcfy_playlists
        ADD COLUMN IF NOT EXISTS last_synced_at timestamptz,
        ADD COLUMN IF NOT EXISTS sync_error_count integer NOT NULL DEFAULT 0,
        ADD COLUMN IF NOT EXISTS last_error_message text;
END
$$;

DO $$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['bcfy_calls_raw', 'bcfy_calls_raw_nonpartitioned'] LOOP
        CONTINUE WHEN to_regclass('public.' || tbl) IS NULL;
        INSERT INTO dbops.p3_added_columns (table_name, column_name)
        SELECT tbl, c
        FROM unnest(ARRAY['processing_stage', 'retry_count']) AS c
        WHERE NOT EXISTS (SELECT 1 FROM pg_attribute
                          WHERE attrelid = to_regclass('public.' || tbl) AND attname = c AND NOT attisdropped)
        ON CONFLICT DO NOTHING;
        EXECUTE format('ALTER TABLE public.%I
                            ADD COLUMN IF NOT EXISTS processing_stage text DEFAULT %L,
                            ADD COLUMN IF NOT EXISTS retry_count integer NOT NULL DEFAULT 0', tbl, 'pending');
    END LOOP;
END
$$;

-- processing_state.created_at: existing rows keep NULL (their creation time is unknown; stamping
-- them with the migration time would lie), new rows get now(). Added without a default, then the
-- default is set: both are catalog-only. A created_at that existed before is left as it is.
DO $$
DECLARE
    added_created_at boolean;
BEGIN
    added_created_at := NOT EXISTS (SELECT 1 FROM pg_attribute
                                    WHERE attrelid = 'public.processing_state'::regclass
                                      AND attname = 'created_at' AND NOT attisdropped);
    INSERT INTO dbops.p3_added_columns (table_name, column_name)
    SELECT 'processing_state', c
    FROM unnest(ARRAY['created_at', 'retry_count', 'max_retries']) AS c
    WHERE NOT EXISTS (SELECT 1 FROM pg_attribute
                      WHERE attrelid = 'public.processing_state'::regclass AND attname = c AND NOT attisdropped)
    ON CONFLICT DO NOTHING;
    ALTER TABLE public.processing_state
        ADD COLUMN IF NOT EXISTS created_at timestamptz,
        ADD COLUMN IF NOT EXISTS retry_count integer DEFAULT 0,
        ADD COLUMN IF NOT EXISTS max_retries integer DEFAULT 3;
    IF added_created_at THEN
        ALTER TABLE public.processing_state ALTER COLUMN created_at SET DEFAULT now();
    END IF;
END
$$;

-- Verification: every column is there with the expected type.
DO $$
DECLARE
    expected CONSTANT text[][] := ARRAY[
        ['bcfy_playlists', 'last_synced_at', 'timestamp with time zone'],
        ['bcfy_playlists', 'sync_error_count', 'integer'],
        ['bcfy_playlists', 'last_error_message', 'text'],
        ['bcfy_calls_raw', 'processing_stage', 'text'],
        ['bcfy_calls_raw', 'retry_count', 'integer'],
        ['processing_state', 'created_at', 'timestamp with time zone'],
        ['processing_state', 'retry_count', 'integer'],
        ['processing_state', 'max_retries', 'integer']
    ];
    found text;
    problems text[] := '{}';
BEGIN
    FOR n IN 1 .. array_length(expected, 1) LOOP
        SELECT c.data_type INTO found
        FROM information_schema.columns AS c
        WHERE c.table_schema = 'public' AND c.table_name = expected[n][1] AND c.column_name = expected[n][2];
        IF found IS DISTINCT FROM expected[n][3] THEN
            problems := problems || format('%s.%s (%s, expected %s)', expected[n][1], expected[n][2],
                                           coalesce(found, 'missing'), expected[n][3]);
        ELSE
            RAISE NOTICE '✓ Column %.% %', expected[n][1], expected[n][2], found;
        END IF;
    END LOOP;
    IF cardinality(problems) > 0 THEN
        RAISE EXCEPTION 'Phase 3 columns missing or of another type: %', array_to_string(problems, ', ')
            USING HINT = 'A column that existed before Phase 3 with another type is left alone: convert it, then re-run.';
    END IF;
    RAISE NOTICE 'All Phase 3 columns present';
END
$$;
