-- Demo data generator for the baseline (pre-Phase-1) schema of 01_schema.sql.
-- Used by the embedded demo database and the test suite. Never applied to production.
--
--   SELECT demo.seed(1000000);                      -- 1 M calls + proportional other tables
--   SELECT demo.seed(5000, p_seed => 7);            -- another deterministic data set
--   SELECT demo.seed(5000, p_reset => true);        -- TRUNCATE the seven tables first
--
-- Runs as the (non-superuser) owner of the tables. Re-running this file only (re)defines
-- the functions. demo.seed() is set-based (generate_series, one INSERT ... SELECT per table),
-- deterministic for a given (p_seed, p_anchor, knobs): every "random" value is a hash of the
-- row number or of the call_uid, so the result does not depend on plan or evaluation order.
-- Ids still come from the tables' sequences (TRUNCATE ... RESTART IDENTITY with p_reset).
--
-- Shape of the data (see shared/spec/PRODUCTION_FACTS.md):
--   * bcfy_playlists: p_playlists rows (a few hundred).
--   * bcfy_calls_raw: p_calls rows over p_months of history ending ~5 s before p_anchor, denser
--     toward now (cumulative share of calls up to time t is (t/T)^p_growth); the newest call is
--     always within the last minute. call_uid = group_id || '-' || ts with ts unique over the
--     whole table (so UNIQUE (group_id, ts) holds by construction). ~0.01 % legacy rows (and at
--     least 3 when p_calls >= 100) have NULL started_at/ended_at. Calls of the last 30 minutes
--     are not processed yet; ~0.3 % of the older ones carry a download error.
--   * transcripts: ~p_transcript_ratio of the processed calls, created 3 s .. 4 min after the
--     end of the call, short English radio traffic built from word lists.
--   * processing_state: 'indexed'/'transcribed' for each transcript, 'queued' for the
--     unprocessed calls, 'error' for the failed ones, 'downloaded' for recent untranscribed ones.
--   * api_call_metrics: p_metrics_per_call rows per call, system_logs: p_logs_per_call rows per
--     call, both over the same history with the same growth curve.
--   * bcfy_playlist_poll_log: p_polls_per_call rows per call over the last 45 days.
-- Every row satisfies the CHECK constraints a later migration adds (durations and sizes >= 0,
-- ended_at >= started_at, confidence in [0,1], status_code in 100..599, poll_ended_at >=
-- poll_started_at, last_pos >= 0).
--
-- Speed: with p_rebuild_indexes (default) the secondary indexes, PRIMARY KEY / UNIQUE and
-- FOREIGN KEY constraints of the seven tables are dropped before the bulk load and recreated
-- afterwards from their own pg_get_indexdef() / pg_get_constraintdef() text, so names and
-- definitions stay exactly those of 01_schema.sql and every row is checked against them when
-- they come back (any violation fails the whole seed, which then rolls back as one transaction).
-- Sorted index builds plus one validating join per foreign key are far cheaper than row-by-row
-- index upkeep and RI triggers. This holds ACCESS EXCLUSIVE locks until the seed commits:
-- demo databases only. Measured on the 2-core dev box (PostgreSQL 15, fsync on, other jobs
-- running): demo.seed(1000000) = 1 M calls, ~300 k transcripts, 4 M metrics, 2 M logs,
-- ~1.8 GB of WAL, 50-90 s wall clock, ~32 s of CPU in the backend (see the returned "steps").

CREATE SCHEMA IF NOT EXISTS demo;

-- A uniform double in [0, 1) from a 64-bit hash (53 significant bits). Inlined by the planner.
CREATE OR REPLACE FUNCTION demo.unit(h bigint) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ((h >> 11) & 9007199254740991)::double precision / 9007199254740992.0 $$;

-- A uniform double in [0, 1) for row number i and a salt: deterministic, order independent.
CREATE OR REPLACE FUNCTION demo.u(i bigint, salt bigint) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ((hashint8extended(i, salt) >> 11) & 9007199254740991)::double precision / 9007199254740992.0 $$;

-- Drop older overloads of demo.seed (a changed parameter list would otherwise make
-- "SELECT demo.seed(n)" ambiguous); the current one is (re)created just below.
-- Keep this identity-argument list in sync with the CREATE FUNCTION demo.seed below.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = 'demo'::regnamespace AND p.proname = 'seed'
          AND pg_get_function_identity_arguments(p.oid) <>
              'p_calls bigint, p_transcript_ratio double precision, p_metrics_per_call double precision, '
              'p_logs_per_call double precision, p_months integer, p_seed integer, p_playlists integer, '
              'p_groups integer, p_polls_per_call double precision, p_growth double precision, '
              'p_anchor timestamp with time zone, p_reset boolean, p_rebuild_indexes boolean'
    LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION demo.seed(
    p_calls bigint,
    p_transcript_ratio double precision DEFAULT 0.30,  -- share of processed calls transcribed
    p_metrics_per_call double precision DEFAULT 4,     -- api_call_metrics rows per call
    p_logs_per_call double precision DEFAULT 2,        -- system_logs rows per call
    p_months integer DEFAULT 13,                       -- months of history up to p_anchor
    p_seed integer DEFAULT 42,                         -- same seed (and anchor) => same data
    p_playlists integer DEFAULT 300,                   -- bcfy_playlists rows
    p_groups integer DEFAULT 2000,                     -- distinct talkgroups (group_id / tg_id)
    p_polls_per_call double precision DEFAULT 0.05,    -- bcfy_playlist_poll_log rows per call
    p_growth double precision DEFAULT 2.0,             -- >= 1: how much denser recent months are
    p_anchor timestamptz DEFAULT now(),                -- "now" of the data set
    p_reset boolean DEFAULT false,                     -- TRUNCATE the seven tables first
    p_rebuild_indexes boolean DEFAULT true             -- drop/recreate indexes and key constraints around the load
) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, public
SET work_mem = '256MB'
SET maintenance_work_mem = '512MB'
AS $fn$
DECLARE
    c_tables constant text[] := ARRAY['bcfy_playlists', 'bcfy_playlist_poll_log', 'bcfy_calls_raw',
        'transcripts', 'processing_state', 'api_call_metrics', 'system_logs'];
    v_s bigint := p_seed::bigint * 1000;          -- salt base: salts are v_s + k
    v_t0 timestamptz := clock_timestamp();
    v_step timestamptz;
    v_steps jsonb := '{}';
    v_counts jsonb := '{}';
    v_end_ts bigint;         -- ts of the newest call
    v_start_ts bigint;       -- oldest possible ts
    v_span bigint;           -- v_end_ts - v_start_ts
    v_start_ep double precision;
    v_end_ep double precision;
    v_kinv double precision; -- 1 / effective growth exponent
    v_metrics bigint := round(p_calls * p_metrics_per_call);
    v_logs bigint := round(p_calls * p_logs_per_call);
    v_polls_each bigint;
    v_poll_window interval := interval '45 days';
    v_idx_defs text[] := '{}';
    v_idx_names text[] := '{}';
    v_key_add text[] := '{}';   -- PRIMARY KEY / UNIQUE constraints to re-add
    v_fk_add text[] := '{}';    -- FOREIGN KEY constraints to re-add
    v_con_drop text[] := '{}';
    v_def text;
    v_name text;
    v_t text;
    -- per talkgroup attributes (index g+1 for g in 0 .. p_groups-1)
    v_g_sid int[];
    v_g_tg int[];
    v_g_feed int[];
    v_g_node int[];
    v_g_tag int[];
    v_g_freq double precision[];
    v_g_pl int[];            -- playlist number, -1 = in no playlist
    v_pl_uuid uuid[];        -- playlist uuid by playlist number + 1
    -- word lists for the transcripts
    v_units text[] := ARRAY['Unit', 'Engine', 'Medic', 'Ladder', 'Car', 'Adam', 'Truck', 'Rescue',
        'Squad', 'Battalion', 'Sector', 'Patrol', 'Sam', 'Lincoln', 'Ambulance', 'Tower'];
    v_agencies text[] := ARRAY['County police', 'City police', 'Sheriff', 'Fire', 'EMS', 'State police',
        'Metro police', 'Highway patrol', 'Fire and EMS', 'Transit police'];
    v_incidents text[] := ARRAY['a traffic stop', 'a motor vehicle accident', 'a domestic disturbance',
        'a structure fire', 'a medical emergency', 'a suspicious vehicle', 'an alarm activation',
        'a welfare check', 'a shoplifting in progress', 'a noise complaint', 'a brush fire',
        'a reckless driver', 'an unresponsive person', 'a fall with injury', 'a vehicle fire',
        'a burglary report', 'a police assist', 'a traffic hazard', 'a gas leak', 'a missing person',
        'a hit and run', 'a fight in progress', 'a chest pain call', 'a stolen vehicle'];
    v_streets text[] := ARRAY['Main', 'Oak', 'Maple', 'Washington', 'Lincoln', 'Park', 'Elm', 'Lake',
        'Hill', 'Pine', 'Cedar', 'Church', 'Market', 'Broad', 'Jefferson', 'Highland', 'River',
        'Center', 'Franklin', 'Madison', 'Walnut', 'Spring', 'Ridge', 'Mill'];
    v_suffixes text[] := ARRAY['Street', 'Avenue', 'Road', 'Boulevard', 'Drive', 'Lane', 'Highway', 'Parkway'];
    v_phrases text[] := ARRAY['respond to', 'en route to', 'requesting backup for', 'on scene of',
        'clear of', 'start for', 'assist with', 'be advised of'];
    v_statuses text[] := ARRAY['on scene, will advise', 'clear, back in service',
        'code 4, no further assistance needed', 'requesting a tow truck',
        'one in custody, en route to county jail', 'requesting police for traffic control',
        'patient transported to County General', 'need an additional unit for traffic',
        'out on a traffic stop', '10-4, en route', 'requesting a supervisor', 'fire is knocked down',
        'negative contact, clearing', 'show me available'];
    v_colors text[] := ARRAY['black', 'white', 'silver', 'red', 'blue', 'gray', 'green', 'tan'];
    v_vehicles text[] := ARRAY['sedan', 'pickup', 'SUV', 'minivan', 'motorcycle', 'box truck', 'coupe', 'van'];
    v_cities text[] := ARRAY['Chicago', 'Cook County', 'Houston', 'Phoenix', 'Dallas', 'San Diego',
        'Denver', 'Seattle', 'Boston', 'Atlanta', 'Miami-Dade', 'Orange County', 'King County',
        'Philadelphia', 'Columbus', 'Nashville', 'Portland', 'Las Vegas', 'Baltimore', 'Milwaukee'];
    v_kinds text[] := ARRAY['Police', 'Fire/EMS', 'Public Safety', 'Sheriff', 'All Agencies', 'Metro Police'];
    v_tags int[] := ARRAY[2, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 1, 6, 7, 8, 9, 12, 14, 15, 16, 17, 23,
        25, 26, 29, 31, 33, 34, 37];
    v_endpoints text[] := ARRAY['/calls/v1/live/', '/calls/v1/live/', '/calls/v1/live/', '/calls/v1/live/',
        '/calls/v1/live/', '/calls/v1/live/', '/calls/v1/live/', '/calls/v1/live/', '/calls/v1/playlist_get/',
        '/calls/v1/playlist_get/', '/calls/v1/playlist_get/', '/calls/v1/playlist_live/',
        '/calls/v1/playlist_live/', '/calls/v1/group_archives/', '/calls/v1/group_archives/',
        '/calls/v1/call_info/', '/audio/download', '/audio/download', '/audio/download', '/auth/v1/token'];
    v_components text[] := ARRAY['ingester', 'ingester', 'ingester', 'ingester', 'poller', 'poller', 'poller',
        'poller', 'audio-worker', 'audio-worker', 'audio-worker', 'transcriber', 'transcriber',
        'transcriber', 'api', 'api', 'api', 'api', 'indexer', 'scheduler'];
    v_api_paths text[] := ARRAY['/api/calls', '/api/calls', '/api/calls', '/api/transcripts/search',
        '/api/transcripts/search', '/api/dashboard/stats', '/api/feeds', '/api/playlists', '/api/calls/live',
        '/health'];
    v_exists boolean;
    v_nonempty text[] := '{}';
    v_rebuild boolean := false;
    v_pl_since bigint;       -- calls before this ts predate playlists (NULL playlist_uuid)
    v_growth_inv double precision;  -- 1 / p_growth
    v_rows bigint;
BEGIN
    IF p_calls IS NULL OR p_calls < 0 THEN
        RAISE EXCEPTION 'demo.seed: p_calls must be >= 0 (got %)', p_calls;
    END IF;
    IF NOT (p_transcript_ratio BETWEEN 0 AND 1) OR p_metrics_per_call < 0 OR p_logs_per_call < 0
       OR p_polls_per_call < 0 OR p_months < 1 OR p_playlists < 1 OR p_groups NOT BETWEEN 1 AND 65000
       OR p_growth < 1 OR p_anchor IS NULL OR p_seed IS NULL THEN
        RAISE EXCEPTION 'demo.seed: invalid knob: need ratio in [0,1], per-call rates >= 0, months >= 1, '
            'playlists >= 1, groups in 1..65000, growth >= 1, non-NULL anchor and seed';
    END IF;

    -- Time frame. ts is unix seconds; the newest call is 5 s before the anchor.
    v_end_ts := floor(extract(epoch FROM p_anchor))::bigint - 5;
    v_start_ts := floor(extract(epoch FROM p_anchor - make_interval(months => p_months)))::bigint;
    v_span := v_end_ts - v_start_ts;
    v_start_ep := v_start_ts;
    v_end_ep := extract(epoch FROM p_anchor) - 1;
    v_pl_since := v_start_ts + v_span / 4;
    v_growth_inv := 1.0 / p_growth;
    -- Call i (0-based) starts at v_start_ts + floor(v_span * ((i+1)/n)^(1/k)). The gap between two
    -- consecutive calls is at least v_span / (k n), so with k <= 0.9 v_span / n every ts is distinct
    -- (and UNIQUE (group_id, ts) holds whatever the group). k is lowered for very large n.
    v_kinv := 1.0 / least(p_growth, 0.9 * v_span / greatest(p_calls, 1));
    IF v_kinv > 1 THEN
        RAISE EXCEPTION 'demo.seed: % calls do not fit in % months with one call per second; raise p_months',
            p_calls, p_months;
    END IF;
    v_polls_each := CASE WHEN p_calls * p_polls_per_call > 0
                         THEN greatest(1, round(p_calls * p_polls_per_call / p_playlists))::bigint ELSE 0 END;
    -- at least one second between two polls of the same playlist
    v_polls_each := least(v_polls_each, extract(epoch FROM v_poll_window)::bigint);

    -- Refuse to mix with existing data unless asked to replace it.
    FOREACH v_t IN ARRAY c_tables LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I)', v_t) INTO v_exists;
        IF v_exists THEN
            v_nonempty := v_nonempty || v_t;
        END IF;
    END LOOP;
    IF p_reset THEN
        TRUNCATE bcfy_playlists, bcfy_playlist_poll_log, processing_state, transcripts, bcfy_calls_raw,
                 api_call_metrics, system_logs RESTART IDENTITY;
    ELSIF cardinality(v_nonempty) > 0 THEN
        RAISE EXCEPTION 'demo.seed: tables already hold data (%)', array_to_string(v_nonempty, ', ')
            USING HINT = 'SELECT demo.seed(n, p_reset => true) truncates them first.';
    END IF;

    -- Bulk-load speedup: drop the secondary indexes, the foreign keys and the PRIMARY KEY / UNIQUE
    -- constraints of the seven tables now (the sequences stay: ids still come from them); after the load
    -- they are recreated from their own pg_get_indexdef() / pg_get_constraintdef() text, so names
    -- and definitions are exactly those of 01_schema.sql, and the data is checked against every
    -- one of them (a duplicate key or a dangling reference makes the whole seed fail and roll back).
    -- Sorted index builds and one join per foreign key are much cheaper than row-by-row upkeep.
    -- Only on plain tables (a partitioned table's indexes cascade to its partitions).
    IF p_rebuild_indexes THEN
        SELECT NOT EXISTS (SELECT 1 FROM unnest(c_tables) x JOIN pg_class r ON r.oid = to_regclass(x)
                           WHERE r.relkind <> 'r')
        INTO v_rebuild;
    END IF;
    IF v_rebuild THEN
        SELECT coalesce(array_agg(pg_get_indexdef(i.indexrelid) ORDER BY i.indexrelid), '{}'),
               coalesce(array_agg(i.indexrelid::regclass::text ORDER BY i.indexrelid), '{}')
        INTO v_idx_defs, v_idx_names
        FROM pg_index i
        WHERE i.indrelid IN (SELECT to_regclass(x) FROM unnest(c_tables) x)
          AND NOT EXISTS (SELECT 1 FROM pg_constraint k
                          WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid
                            AND k.contype IN ('p', 'u', 'x'));
        WITH t AS (SELECT to_regclass(x) AS rel FROM unnest(c_tables) x),
        k AS (
            SELECT k.oid, k.contype, k.conname, k.conrelid
            FROM pg_constraint k
            WHERE (k.contype = 'f' AND (k.conrelid IN (SELECT rel FROM t) OR k.confrelid IN (SELECT rel FROM t)))
               OR (k.contype IN ('p', 'u') AND k.conrelid IN (SELECT rel FROM t))
        )
        SELECT coalesce(array_agg(format('ALTER TABLE %s ADD CONSTRAINT %I %s', k.conrelid::regclass, k.conname,
                                         pg_get_constraintdef(k.oid)) ORDER BY k.oid)
                                  FILTER (WHERE k.contype <> 'f'), '{}'),
               coalesce(array_agg(format('ALTER TABLE %s ADD CONSTRAINT %I %s', k.conrelid::regclass, k.conname,
                                         pg_get_constraintdef(k.oid)) ORDER BY k.oid)
                                  FILTER (WHERE k.contype = 'f'), '{}'),
               coalesce(array_agg(format('ALTER TABLE %s DROP CONSTRAINT %I', k.conrelid::regclass, k.conname)
                                  ORDER BY k.contype <> 'f', k.oid), '{}')  -- foreign keys first
        INTO v_key_add, v_fk_add, v_con_drop
        FROM k;
        FOREACH v_def IN ARRAY v_con_drop LOOP
            EXECUTE v_def;
        END LOOP;
        FOREACH v_name IN ARRAY v_idx_names LOOP
            EXECUTE format('DROP INDEX %s', v_name);
        END LOOP;
    END IF;

    -- Talkgroups (groups): per-group attributes, kept in arrays indexed by g + 1.
    SELECT array_agg(x.sid ORDER BY x.g), array_agg(x.tg ORDER BY x.g), array_agg(x.feed ORDER BY x.g),
           array_agg(x.node ORDER BY x.g), array_agg(x.tag ORDER BY x.g), array_agg(x.freq ORDER BY x.g),
           array_agg(x.pl ORDER BY x.g)
    INTO v_g_sid, v_g_tg, v_g_feed, v_g_node, v_g_tag, v_g_freq, v_g_pl
    FROM (
        SELECT g,
               1000 + 37 * y.sys_k AS sid,
               1 + (((g::bigint * 40503 + p_seed) % 65521 + 65521) % 65521)::int AS tg,  -- distinct per g
               10000 + 211 * y.feed_k AS feed,
               200000 + 3 * y.feed_k + g % 3 AS node,
               v_tags[1 + floor(demo.u(g, v_s + 103) * cardinality(v_tags))::int] AS tag,
               round(((ARRAY[151.0, 453.0, 851.0])[1 + y.sys_k % 3] + (g % 640) * 0.0125)::numeric, 4)::float8 AS freq,
               CASE WHEN demo.u(g, v_s + 104) < 0.1 THEN -1 ELSE g % p_playlists END AS pl
        FROM generate_series(0, p_groups - 1) g,
             LATERAL (SELECT floor(40 * power(demo.u(g, v_s + 101), 1.5))::int AS sys_k,
                             floor(80 * power(demo.u(g, v_s + 102), 1.3))::int AS feed_k) y
    ) x;

    SELECT array_agg(md5(p_seed || ':playlist:' || p)::uuid ORDER BY p)
    INTO v_pl_uuid
    FROM generate_series(0, p_playlists - 1) p;

    -- bcfy_playlists
    v_step := clock_timestamp();
    INSERT INTO bcfy_playlists (uuid, name, sync, descr, ts, last_seen, last_pos, listeners, public,
                                max_groups, num_groups, ctids, groups_json, fetched_at, raw_json)
    SELECT v_pl_uuid[p + 1], y.name, y.sync,
           'Broadcastify Calls playlist for ' || y.name,
           v_start_ts - floor(demo.u(p, v_s + 201) * 365 * 86400)::bigint,
           CASE WHEN y.sync THEN v_end_ts - floor(demo.u(p, v_s + 202) * 120)::bigint
                ELSE v_end_ts - floor(demo.u(p, v_s + 202) * 90 * 86400)::bigint END,
           CASE WHEN y.sync THEN v_end_ts - floor(demo.u(p, v_s + 203) * 300)::bigint ELSE 0 END,
           floor(500 * power(demo.u(p, v_s + 204), 3))::int,
           demo.u(p, v_s + 205) < 0.85,
           greatest(coalesce(gr.n, 0), (ARRAY[25, 50, 100, 200])[1 + p % 4])::int,
           coalesce(gr.n, 0)::int,
           jsonb_build_array(100 + (p * 7) % 3100, 100 + (p * 13 + 5) % 3100),
           coalesce(gr.groups, '[]'::jsonb),
           p_anchor - make_interval(secs => floor(demo.u(p, v_s + 206) * 600)),
           jsonb_build_object('uuid', v_pl_uuid[p + 1], 'name', y.name, 'public', 1, 'groups', coalesce(gr.n, 0))
    FROM generate_series(0, p_playlists - 1) p
    CROSS JOIN LATERAL (
        SELECT v_cities[1 + p % cardinality(v_cities)] || ' '
               || v_kinds[1 + (p / cardinality(v_cities)) % cardinality(v_kinds)]
               || CASE WHEN p >= cardinality(v_cities) * cardinality(v_kinds)
                       THEN ' ' || (p / (cardinality(v_cities) * cardinality(v_kinds)) + 1) ELSE '' END AS name,
               demo.u(p, v_s + 200) < 0.7 AS sync) y
    LEFT JOIN (
        SELECT v_g_pl[g + 1] AS pl, count(*) AS n,
               jsonb_agg(jsonb_build_object('groupId', v_g_sid[g + 1] || '-' || v_g_tg[g + 1],
                                            'sid', v_g_sid[g + 1], 'tg', v_g_tg[g + 1],
                                            'feedId', v_g_feed[g + 1], 'tag', v_g_tag[g + 1]) ORDER BY g) AS groups
        FROM generate_series(0, p_groups - 1) g
        WHERE v_g_pl[g + 1] >= 0
        GROUP BY 1
    ) gr ON gr.pl = p
    ORDER BY p;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('bcfy_playlists', v_rows);
    v_steps := v_steps || jsonb_build_object('bcfy_playlists', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    -- bcfy_calls_raw, in ts order (like the ingester wrote it). Per call two hashes: hg picks the
    -- talkgroup (skewed: a few busy dispatch channels), the bit fields of h the rest.
    v_step := clock_timestamp();
    INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, feed_id, tg_id, tag_id, node_id, sid, site_id, freq,
                                src, url, started_at, ended_at, duration_ms, size_bytes, fetched_at, raw_json,
                                processed, last_attempt, error, playlist_uuid, s3_key_v2)
    SELECT c.group_id || '-' || c.ts,
           c.group_id,
           c.ts,
           v_g_feed[c.g + 1],
           c.tg,
           v_g_tag[c.g + 1],
           v_g_node[c.g + 1],
           c.sid,
           c.sid * 10 + ((c.h >> 56) & 3),
           v_g_freq[c.g + 1],
           c.src,
           'https://calls.broadcastify.com/' || c.sid || '/' || c.tg || '/' || c.ts || '-' || c.src || '.m4a',
           CASE WHEN NOT c.legacy THEN to_timestamp(c.ts) END,
           CASE WHEN NOT c.legacy THEN to_timestamp(c.ts + c.dur_ms / 1000.0::float8) END,
           c.dur_ms,
           c.dur_ms * 2 + 600 + ((c.h >> 40) & 1023),
           to_timestamp(c.fetched_ep),
           jsonb_build_object('groupId', c.group_id, 'ts', c.ts, 'src', c.src, 'duration', c.dur_ms / 1000.0::float8),
           NOT c.fresh AND NOT (c.failed AND c.ts >= v_end_ts - 86400),
           CASE WHEN NOT c.fresh THEN to_timestamp(c.fetched_ep + 2 + ((c.h >> 50) & 63)) END,
           CASE WHEN c.failed AND NOT c.fresh
                THEN (ARRAY['download failed: HTTP 404 Not Found', 'download failed: HTTP 403 Forbidden',
                            'download failed: timeout after 30s', 'audio file empty'])[1 + ((c.h >> 58) & 3)] END,
           CASE WHEN v_g_pl[c.g + 1] >= 0 AND c.ts >= v_pl_since THEN v_pl_uuid[v_g_pl[c.g + 1] + 1] END,
           CASE WHEN NOT c.fresh AND NOT c.failed AND c.ts >= v_end_ts - 120 * 86400
                THEN 'calls/' || c.sid || '/' || c.tg || '/' || c.ts || '.m4a' END
    FROM (
        SELECT b.*,
               v_g_sid[b.g + 1] || '-' || v_g_tg[b.g + 1] AS group_id,
               v_g_sid[b.g + 1] AS sid,
               v_g_tg[b.g + 1] AS tg,
               -- bits 0..19: duration, 20..39: misc (legacy / failed), 40..49: size, 50..55: attempt,
               -- 56..57: site, 58..59: error text, 60..63: fetch delay
               CASE WHEN (b.h & 1048575) < 1049 THEN 0     -- ~0.1 % zero-length calls
                    ELSE 600 + floor(40000 * power((b.h & 1048575) / 1048576.0::float8, 3)) END::bigint AS dur_ms,
               (b.i < 3 AND p_calls >= 100) OR ((b.h >> 20) & 1048575) < 105 AS legacy,   -- ~0.01 %
               ((b.h >> 20) & 1048575) >= 1045430 AS failed,                               -- ~0.3 %
               b.ts >= v_end_ts - 1800 OR b.i >= p_calls - 5 AS fresh
        FROM (
            SELECT i,
                   v_start_ts + floor(v_span * power((i + 1)::float8 / p_calls, v_kinv))::bigint AS ts,
                   least(p_groups - 1, floor(p_groups * power(demo.u(i, v_s + 1), 2)))::int AS g,
                   (1000001 + floor(30000 * power(demo.u(i, v_s + 3), 1.5)))::bigint AS src,
                   hashint8extended(i, v_s + 2) AS h
            FROM generate_series(0, p_calls - 1) i
            OFFSET 0
        ) b
        OFFSET 0
    ) c0
    CROSS JOIN LATERAL (
        SELECT c0.*, c0.ts + c0.dur_ms / 1000.0::float8 + 1.5 + ((c0.h >> 60) & 15) / 2.0::float8 AS fetched_ep
    ) c;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('bcfy_calls_raw', v_rows);
    v_steps := v_steps || jsonb_build_object('bcfy_calls_raw', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    -- transcripts: ~p_transcript_ratio of the processed, error-free calls (chosen by a hash of call_uid)
    v_step := clock_timestamp();
    INSERT INTO transcripts (recording_id, text, words, language, model_name, created_at,
                             duration_seconds, confidence, call_uid, s3_bucket, s3_key, s3_key_v2)
    SELECT CASE WHEN x.legacy_model THEN 1 + ((x.h3 >> 1) & 2147483647) END,
           CASE x.h1 & 3
               WHEN 0 THEN x.agency || ' dispatch, ' || x.unit || ' ' || x.num || ', ' || x.phrase || ' '
                           || x.incident || ' at ' || x.addr || ' ' || x.street || ' ' || x.suffix || '.'
               WHEN 1 THEN x.unit || ' ' || x.num || ', ' || x.status || '.'
               WHEN 2 THEN x.unit || ' ' || x.num || ', traffic stop on ' || x.street || ' ' || x.suffix
                           || ' at ' || x.street2 || ', ' || x.color || ' ' || x.vehicle || ', plate '
                           || x.plate || '.'
               ELSE x.unit || ' ' || x.num || ' to ' || x.agency || ' dispatch, ' || x.phrase || ' '
                    || x.incident || ' near ' || x.street || ' and ' || x.street2 || ', ' || x.status || '.'
           END,
           CASE WHEN x.ts >= v_end_ts - 180 * 86400 THEN
               jsonb_build_array(jsonb_build_object('word', x.unit, 'start', 0.0, 'end', 0.38, 'probability', x.conf),
                                 jsonb_build_object('word', x.num::text, 'start', 0.38, 'end', 0.71, 'probability', x.conf))
           END,
           'en',
           CASE WHEN x.legacy_model THEN 'whisper-medium.en'
                WHEN (x.h3 & 7) = 0 THEN 'whisper-large-v2' ELSE 'whisper-large-v3' END,
           to_timestamp(x.ts + x.duration_ms / 1000.0::float8 + 3 + 237 * demo.unit(x.h3)),
           round(x.duration_ms / 1000.0, 2),
           x.conf,
           x.call_uid,
           'scanner-audio',
           'audio/' || x.call_uid || '.m4a',
           x.s3_key_v2
    FROM (
        SELECT t.*,
               t.ts < v_end_ts - 240 * 86400 AS legacy_model,
               v_units[1 + ((t.h1 >> 2) & 255) % cardinality(v_units)] AS unit,
               1 + ((t.h1 >> 10) & 127) % 60 AS num,
               v_incidents[1 + ((t.h1 >> 17) & 255) % cardinality(v_incidents)] AS incident,
               100 + ((t.h1 >> 25) & 8191) % 9800 AS addr,
               v_streets[1 + ((t.h1 >> 38) & 255) % cardinality(v_streets)] AS street,
               v_suffixes[1 + ((t.h1 >> 46) & 255) % cardinality(v_suffixes)] AS suffix,
               -- a cross street different from the street
               v_streets[1 + (((t.h1 >> 38) & 255) % cardinality(v_streets) + 1
                              + (t.h2 & 255) % (cardinality(v_streets) - 1)) % cardinality(v_streets)] AS street2,
               v_phrases[1 + ((t.h2 >> 8) & 255) % cardinality(v_phrases)] AS phrase,
               v_statuses[1 + ((t.h2 >> 16) & 255) % cardinality(v_statuses)] AS status,
               v_agencies[1 + ((t.h2 >> 24) & 255) % cardinality(v_agencies)] AS agency,
               v_colors[1 + ((t.h2 >> 32) & 255) % cardinality(v_colors)] AS color,
               v_vehicles[1 + ((t.h2 >> 40) & 255) % cardinality(v_vehicles)] AS vehicle,
               upper(lpad(to_hex((t.h2 >> 48) & 65535), 4, '0')) || (100 + ((t.h1 >> 54) & 511)) AS plate,
               round((0.55 + 0.449 * demo.unit(t.h4))::numeric, 3) AS conf
        FROM (
            SELECT c.call_uid, c.ts, c.duration_ms, c.s3_key_v2,
                   hashtextextended(c.call_uid, v_s + 31) AS h1,
                   hashtextextended(c.call_uid, v_s + 32) AS h2,
                   hashtextextended(c.call_uid, v_s + 33) AS h3,
                   hashtextextended(c.call_uid, v_s + 34) AS h4
            FROM bcfy_calls_raw c
            WHERE c.processed AND c.error IS NULL
              AND demo.unit(hashtextextended(c.call_uid, v_s + 30)) < p_transcript_ratio
            OFFSET 0
        ) t
        OFFSET 0
    ) x;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('transcripts', v_rows);
    v_steps := v_steps || jsonb_build_object('transcripts', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    -- processing_state: every transcribed, queued, failed or recently downloaded call
    v_step := clock_timestamp();
    INSERT INTO processing_state (call_uid, recording_id, status, last_error, updated_at)
    SELECT c.call_uid, t.recording_id, s.status,
           CASE WHEN s.status = 'error' THEN c.error END,
           CASE s.status
               WHEN 'indexed' THEN t.created_at + make_interval(secs => 2 + (hashtext(c.call_uid) & 63))
               WHEN 'transcribed' THEN t.created_at
               WHEN 'queued' THEN c.fetched_at
               ELSE c.last_attempt END
    FROM bcfy_calls_raw c
    LEFT JOIN transcripts t ON t.call_uid = c.call_uid
    CROSS JOIN LATERAL (
        SELECT CASE WHEN t.id IS NOT NULL THEN
                        CASE WHEN c.ts >= v_end_ts - 7200 OR (hashtext(c.call_uid) & 31) = 0
                             THEN 'transcribed' ELSE 'indexed' END
                    WHEN c.error IS NOT NULL THEN 'error'
                    WHEN NOT c.processed THEN 'queued'
                    ELSE 'downloaded' END AS status) s
    WHERE t.id IS NOT NULL OR c.error IS NOT NULL OR NOT c.processed
       OR (c.ts >= v_end_ts - 6 * 3600 AND c.s3_key_v2 IS NOT NULL);
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('processing_state', v_rows);
    v_steps := v_steps || jsonb_build_object('processing_state', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    -- api_call_metrics: same history and growth curve as the calls, in time order. One hash per row;
    -- bits 0..7: endpoint, 8..21: status, 22..31: duration, 32..43: size, 44..46: cache, 48..63: time.
    v_step := clock_timestamp();
    INSERT INTO api_call_metrics ("timestamp", endpoint, method, status_code, duration_ms, response_size,
                                  cache_hit, error)
    SELECT to_timestamp(v_start_ep + (v_end_ep - v_start_ep)
                        * power((m.j + ((m.h >> 48) & 65535) / 65536.0::float8) / v_metrics, v_growth_inv)),
           m.endpoint,
           CASE WHEN m.endpoint = '/auth/v1/token' THEN 'POST' ELSE 'GET' END,
           m.status,
           CASE WHEN m.status = 504 THEN 30000 + ((m.h >> 32) & 1023)
                ELSE 25 + floor(2500 * power(((m.h >> 22) & 1023) / 1024.0::float8, 3)) END::int,
           CASE WHEN m.status = 200 THEN 300 + ((m.h >> 32) & 4095) * 20
                WHEN m.status = 304 THEN 0
                WHEN m.status = 504 THEN NULL
                ELSE 90 + ((m.h >> 32) & 255) END::int,
           m.status = 304 OR (m.status = 200 AND ((m.h >> 44) & 7) = 0),
           CASE m.status WHEN 404 THEN 'HTTP 404 Not Found' WHEN 429 THEN 'HTTP 429 Too Many Requests'
                         WHEN 500 THEN 'HTTP 500 Internal Server Error' WHEN 502 THEN 'HTTP 502 Bad Gateway'
                         WHEN 503 THEN 'HTTP 503 Service Unavailable' WHEN 504 THEN 'timeout after 30s'
                         WHEN 401 THEN 'HTTP 401 Unauthorized' END
    FROM (
        SELECT a.j, a.h,
               v_endpoints[1 + (a.h & 255) % cardinality(v_endpoints)] AS endpoint,
               CASE WHEN a.sc < 9300 THEN 200 WHEN a.sc < 9550 THEN 304 WHEN a.sc < 9700 THEN 429
                    WHEN a.sc < 9800 THEN 404 WHEN a.sc < 9880 THEN 500 WHEN a.sc < 9930 THEN 502
                    WHEN a.sc < 9970 THEN 503 WHEN a.sc < 9990 THEN 504 ELSE 401 END AS status
        FROM (
            SELECT j, h, (((h >> 8) & 16383) * 10000) >> 14 AS sc      -- 0 .. 9999
            FROM generate_series(0, v_metrics - 1) j,
                 LATERAL (SELECT hashint8extended(j, v_s + 301) AS h) x
            OFFSET 0
        ) a
        OFFSET 0
    ) m;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('api_call_metrics', v_rows);
    v_steps := v_steps || jsonb_build_object('api_call_metrics', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    -- system_logs. One hash per row; bits 0..7: component, 8..17: severity, 18..33: duration,
    -- 34..43: numbers in the message, 44: has metadata, 45..47: NULL duration, 48..63: time.
    v_step := clock_timestamp();
    INSERT INTO system_logs (created_at, component, event_type, message, metadata, duration_ms)
    SELECT to_timestamp(v_start_ep + (v_end_ep - v_start_ep)
                        * power((l.j + ((l.h >> 48) & 65535) / 65536.0::float8) / v_logs, v_growth_inv)),
           l.component,
           CASE WHEN l.sev = 2 THEN 'error' WHEN l.sev = 1 THEN 'warning'
                ELSE CASE l.component
                         WHEN 'ingester' THEN 'calls_ingested' WHEN 'poller' THEN 'playlist_poll'
                         WHEN 'audio-worker' THEN 'audio_downloaded' WHEN 'transcriber' THEN 'transcription_complete'
                         WHEN 'api' THEN 'http_request' WHEN 'indexer' THEN 'index_batch' ELSE 'job_run' END END,
           CASE WHEN l.sev = 2 THEN
                    CASE l.component
                        WHEN 'audio-worker' THEN 'Download failed: HTTP 404 Not Found'
                        WHEN 'transcriber' THEN 'Transcription failed: CUDA out of memory'
                        WHEN 'poller' THEN 'Playlist poll failed: HTTP 429 Too Many Requests'
                        WHEN 'api' THEN 'Unhandled exception in request handler'
                        ELSE 'Database connection lost, retrying' END
                WHEN l.sev = 1 THEN 'Slow operation: ' || l.dur || ' ms'
                ELSE CASE l.component
                         WHEN 'ingester' THEN 'Ingested ' || l.k % 40 || ' new calls'
                         WHEN 'poller' THEN 'Polled ' || 1 + l.k % p_playlists || ' playlists'
                         WHEN 'audio-worker' THEN 'Downloaded audio (' || 2000 + l.k * 97 || ' bytes)'
                         WHEN 'transcriber' THEN 'Transcribed call (' || 1 + l.k % 45 || ' s of audio)'
                         WHEN 'api' THEN 'GET ' || v_api_paths[1 + l.k % cardinality(v_api_paths)] || ' 200'
                         WHEN 'indexer' THEN 'Indexed ' || 1 + l.k % 500 || ' transcripts'
                         ELSE 'Scheduled job finished' END END,
           CASE WHEN ((l.h >> 44) & 1) = 0 THEN
                    jsonb_build_object('host', l.component || '-' || l.k % 3, 'pid', 100 + l.k * 29)
                END,
           CASE WHEN l.sev = 0 AND ((l.h >> 45) & 7) < 2 THEN NULL ELSE l.dur END
    FROM (
        SELECT a.j, a.h,
               v_components[1 + (a.h & 255) % cardinality(v_components)] AS component,
               CASE WHEN ((a.h >> 8) & 1023) < 15 THEN 2 WHEN ((a.h >> 8) & 1023) < 50 THEN 1 ELSE 0 END AS sev,
               (1 + floor(5000 * power(((a.h >> 18) & 65535) / 65536.0::float8, 4)))::int AS dur,
               (a.h >> 34) & 1023 AS k
        FROM (
            SELECT j, hashint8extended(j, v_s + 401) AS h
            FROM generate_series(0, v_logs - 1) j
            OFFSET 0
        ) a
        OFFSET 0
    ) l;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('system_logs', v_rows);
    v_steps := v_steps || jsonb_build_object('system_logs', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    -- bcfy_playlist_poll_log: every playlist polled v_polls_each times over the last 45 days
    v_step := clock_timestamp();
    INSERT INTO bcfy_playlist_poll_log (uuid, poll_started_at, poll_ended_at, success, notes)
    SELECT v_pl_uuid[q.p + 1], q.started,
           q.started + make_interval(secs => 0.15 + 3.5 * power(demo.unit(q.h), 2)),
           q.ok,
           CASE WHEN q.ok THEN CASE WHEN (q.h & 1) = 0 THEN ((q.h >> 8) & 31) || ' new calls' END
                ELSE (ARRAY['HTTP 429 Too Many Requests', 'timeout after 10s', 'HTTP 503 Service Unavailable',
                            'invalid JSON in response'])[1 + ((q.h >> 16) & 3)] END
    FROM (
        SELECT j % p_playlists AS p,
               p_anchor - v_poll_window
                   + make_interval(secs => ((j / p_playlists) + 0.9 * demo.u(j, v_s + 501))
                                           * extract(epoch FROM v_poll_window) / v_polls_each) AS started,
               hashint8extended(j, v_s + 502) AS h,
               demo.u(j, v_s + 503) < 0.97 AS ok
        FROM generate_series(0, v_polls_each * p_playlists - 1) j
        OFFSET 0
    ) q;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    v_counts := v_counts || jsonb_build_object('bcfy_playlist_poll_log', v_rows);
    v_steps := v_steps || jsonb_build_object('bcfy_playlist_poll_log', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    -- Recreate what was dropped, exactly as it was: keys and indexes, statistics, then the
    -- foreign keys (validated by one join each, planned with fresh statistics).
    v_step := clock_timestamp();
    FOREACH v_def IN ARRAY v_key_add || v_idx_defs LOOP
        EXECUTE v_def;
    END LOOP;
    v_steps := v_steps || jsonb_build_object('indexes', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    v_step := clock_timestamp();
    ANALYZE bcfy_playlists, bcfy_playlist_poll_log, bcfy_calls_raw, transcripts, processing_state,
            api_call_metrics, system_logs;
    v_steps := v_steps || jsonb_build_object('analyze', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    v_step := clock_timestamp();
    FOREACH v_def IN ARRAY v_fk_add LOOP
        EXECUTE v_def;
    END LOOP;
    v_steps := v_steps || jsonb_build_object('foreign_keys', round(extract(epoch FROM clock_timestamp() - v_step)::numeric, 2));

    RAISE NOTICE 'demo.seed: % playlists, % calls, % transcripts, % processing_state, % api_call_metrics, '
                 '% system_logs, % poll_log rows in % s (indexes/constraints rebuilt: %)',
        v_counts->>'bcfy_playlists', v_counts->>'bcfy_calls_raw', v_counts->>'transcripts',
        v_counts->>'processing_state', v_counts->>'api_call_metrics', v_counts->>'system_logs',
        v_counts->>'bcfy_playlist_poll_log',
        round(extract(epoch FROM clock_timestamp() - v_t0)::numeric, 1),
        cardinality(v_idx_defs) + cardinality(v_key_add) + cardinality(v_fk_add);

    RETURN jsonb_build_object('rows', v_counts, 'seconds',
                              round(extract(epoch FROM clock_timestamp() - v_t0)::numeric, 2),
                              'steps', v_steps, 'indexes_rebuilt', cardinality(v_idx_defs),
                              'constraints_rebuilt', cardinality(v_key_add) + cardinality(v_fk_add),
                              'seed', p_seed, 'anchor', p_anchor);
END;
$fn$;

COMMENT ON FUNCTION demo.seed(bigint, double precision, double precision, double precision, integer, integer,
                              integer, integer, double precision, double precision, timestamptz, boolean, boolean)
    IS 'Load deterministic, production-shaped demo data into the baseline tables (see 02_demo_data.sql).';
