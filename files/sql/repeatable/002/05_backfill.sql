-- Phase 2 engine, step 2: the backfill. Each batch first tries a plain INSERT ... SELECT in a
-- subtransaction (ON CONFLICT's speculative insertion cost ~40 % of the copy on narrow tables);
-- a row the capture trigger already wrote (unique_violation) undoes that batch and the rest of
-- the call uses INSERT ... ON CONFLICT DO NOTHING. NULL partition keys are counted once at the
-- end from the source (index on the key column), not per batch.
-- Between batches it reads the database's health (dbops.p2_backfill_health: standbys' replay lag,
-- WAL per second, autovacuum on the table or its shadow, sessions waiting for locks, active
-- sessions) and runs no batch while a signal is over its threshold (issue 11).

-- The health argument (issue 11) changed the signature: the former one goes, or a call with three
-- arguments would be ambiguous.
-- squawk-ignore-file ban-drop-function -- replaces the former signature of the procedure
DROP PROCEDURE IF EXISTS dbops.p2_backfill(text, integer, integer, jsonb);

-- ---------------------------------------------------------------------------------------------
-- Health signals read between two batches (SQL only: works on RDS, for a non-superuser member of
-- pg_monitor). health: thresholds, a missing, null or 0 one turns its signal off:
--   replay_lag_bytes, replay_lag_seconds  each standby of pg_stat_replication (streaming or catchup):
--                                         pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), replay_lag
--   wal_bytes_per_second                  pg_current_wal_lsn() delta since prev_lsn / prev_at (>= 0.1 s)
--   autovacuum                            'wraparound' (an anti-wraparound autovacuum) or 'any': an
--                                         autovacuum worker vacuuming the table, its shadow, a partition
--                                         of the shadow or their TOAST tables
--   lock_waiting_sessions                 sessions of this database waiting for a lock (pg_locks)
--   active_sessions                       active client sessions of this database (pg_stat_activity)
-- Returns {"over": [{"signal", "value", "limit", "reason"}], "unavailable": {signal: why}, "lsn", "at",
-- "wal_bytes_per_second"}. A signal this role cannot read is "unavailable", never an error. Reads only.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dbops.p2_backfill_health(
    tbl text, health jsonb, prev_lsn pg_lsn DEFAULT NULL, prev_at timestamptz DEFAULT NULL
) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    lim_bytes numeric := nullif(health ->> 'replay_lag_bytes', '')::numeric;
    lim_secs numeric := nullif(health ->> 'replay_lag_seconds', '')::numeric;
    lim_wal numeric := nullif(health ->> 'wal_bytes_per_second', '')::numeric;
    av text := lower(coalesce(health ->> 'autovacuum', ''));
    lim_locks numeric := nullif(health ->> 'lock_waiting_sessions', '')::numeric;
    lim_active numeric := nullif(health ->> 'active_sessions', '')::numeric;
    -- pg_stat_replication's positions, pg_stat_progress_vacuum's relid, pg_stat_activity's state and
    -- backend_type of other roles' sessions: superusers and members of pg_read_all_stats only.
    stats boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                     OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE');
    no_stats text := 'this role is neither a superuser nor a member of pg_read_all_stats (pg_monitor): %s';
    mydb oid := (SELECT oid FROM pg_database WHERE datname = current_database());
    lsn pg_lsn := pg_current_wal_lsn();
    at timestamptz := clock_timestamp();
    rate numeric;
    over jsonb := '[]';
    na jsonb := '{}';
    r record;
    n bigint;
    shadow text;
BEGIN
    IF coalesce(lim_bytes, 0) > 0 OR coalesce(lim_secs, 0) > 0 THEN
        IF NOT stats THEN
            na := na || jsonb_build_object('replay_lag', format(no_stats, 'pg_stat_replication hides the standbys'' positions'));
        ELSE
            FOR r IN
                SELECT coalesce(nullif(s.application_name, ''), host(s.client_addr), s.pid::text) AS name,
                       pg_wal_lsn_diff(lsn, s.replay_lsn) AS lag_b, extract(epoch FROM s.replay_lag) AS lag_s
                FROM pg_stat_replication s WHERE s.state IN ('streaming', 'catchup') ORDER BY 1
            LOOP
                IF coalesce(lim_bytes, 0) > 0 AND r.lag_b > lim_bytes THEN
                    over := over || jsonb_build_object(
                        'signal', 'replay_lag_bytes', 'value', r.lag_b, 'limit', lim_bytes,
                        'reason', format('standby %s replay lag %s > %s', r.name, pg_size_pretty(r.lag_b),
                                         pg_size_pretty(lim_bytes)));
                END IF;
                IF coalesce(lim_secs, 0) > 0 AND r.lag_s > lim_secs THEN
                    over := over || jsonb_build_object(
                        'signal', 'replay_lag_seconds', 'value', round(r.lag_s, 1), 'limit', lim_secs,
                        'reason', format('standby %s replay lag %s s > %s s', r.name, round(r.lag_s, 1), lim_secs));
                END IF;
            END LOOP;
        END IF;
    END IF;
    IF prev_lsn IS NOT NULL AND extract(epoch FROM at - prev_at) >= 0.1 THEN
        rate := round(pg_wal_lsn_diff(lsn, prev_lsn) / extract(epoch FROM at - prev_at));
        IF coalesce(lim_wal, 0) > 0 AND rate > lim_wal THEN
            over := over || jsonb_build_object(
                'signal', 'wal_bytes_per_second', 'value', rate, 'limit', lim_wal,
                'reason', format('WAL %s/s > %s/s', pg_size_pretty(rate), pg_size_pretty(lim_wal)));
        END IF;
    END IF;
    IF av IN ('wraparound', 'any') THEN
        IF NOT stats THEN
            na := na || jsonb_build_object('autovacuum', format(no_stats, 'pg_stat_progress_vacuum hides which table is vacuumed'));
        ELSE
            SELECT shadow_name INTO shadow FROM dbops.p2_state WHERE table_name = tbl;
            FOR r IN
                WITH rels AS (
                    SELECT format('public.%I', tbl)::regclass::oid AS relid
                    UNION ALL
                    SELECT t.relid FROM pg_partition_tree(to_regclass(format('public.%I', shadow))) t WHERE shadow IS NOT NULL
                ), alls AS (
                    SELECT relid FROM rels
                    UNION ALL
                    SELECT c.reltoastrelid FROM pg_class c JOIN rels ON rels.relid = c.oid WHERE c.reltoastrelid <> 0
                )
                SELECT c.relname,
                       a.query LIKE '%(to prevent wraparound)%'
                       OR (c.relfrozenxid <> '0'::xid
                           AND age(c.relfrozenxid) > current_setting('autovacuum_freeze_max_age')::bigint) AS wrap
                FROM pg_stat_progress_vacuum v
                JOIN pg_stat_activity a ON a.pid = v.pid AND a.backend_type = 'autovacuum worker'
                JOIN pg_class c ON c.oid = v.relid
                WHERE v.datid = mydb AND v.relid IN (SELECT relid FROM alls)
                ORDER BY 1
            LOOP
                IF av = 'any' OR r.wrap THEN
                    over := over || jsonb_build_object(
                        'signal', 'autovacuum', 'value', r.relname, 'limit', av,
                        'reason', format('%s on %s', CASE WHEN r.wrap THEN 'anti-wraparound autovacuum' ELSE 'autovacuum' END,
                                         r.relname));
                END IF;
            END LOOP;
        END IF;
    END IF;
    IF coalesce(lim_locks, 0) > 0 THEN
        -- pg_locks and pg_stat_activity's pid / datid are readable by every role
        SELECT count(DISTINCT l.pid) INTO n
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE NOT l.granted AND a.datid = mydb AND l.pid <> pg_backend_pid();
        IF n > lim_locks THEN
            over := over || jsonb_build_object(
                'signal', 'lock_waiting_sessions', 'value', n, 'limit', lim_locks,
                'reason', format('%s sessions waiting for a lock > %s', n, lim_locks));
        END IF;
    END IF;
    IF coalesce(lim_active, 0) > 0 THEN
        IF NOT stats THEN
            na := na || jsonb_build_object('active_sessions', format(no_stats, 'pg_stat_activity hides other roles'' sessions'' state'));
        ELSE
            SELECT count(*) INTO n FROM pg_stat_activity
            WHERE datid = mydb AND backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid();
            IF n > lim_active THEN
                over := over || jsonb_build_object(
                    'signal', 'active_sessions', 'value', n, 'limit', lim_active,
                    'reason', format('%s active sessions > %s', n, lim_active));
            END IF;
        END IF;
    END IF;
    RETURN jsonb_build_object('over', over, 'unavailable', na, 'lsn', lsn::text, 'at', at, 'wal_bytes_per_second', rate);
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- Step 2: backfill (procedure: one COMMIT per batch)
-- ---------------------------------------------------------------------------------------------
-- CALL dbops.p2_backfill('bcfy_calls_raw', 5000, 60);   -- from an autocommit session
-- Keyset pagination on the primary key. Each batch: take the table's advisory lock exclusively
-- (try-lock, never queued: writers are not made to wait behind a waiting batch), copy
-- (pk > last AND pk <= next) with the partition key derived as in the sync trigger,
-- ON CONFLICT DO NOTHING (a row the trigger already wrote is newer), record progress, COMMIT.
-- UPDATE / DELETE on the source wait for the running batch (one batch, milliseconds), so a batch
-- can neither resurrect a row deleted meanwhile nor overwrite a newer version.
-- Returns after max_seconds (at least one batch, or one health check that paused it); killed at
-- any point, it resumes from last_key.
-- health (issue 11): the thresholds of dbops.p2_backfill_health, plus check_seconds (default 1):
-- the signals are read before a batch when check_seconds have passed since the last reading. While
-- one is over its threshold no batch runs: the procedure sleeps check_seconds (nothing held, a COMMIT
-- before and after) and reads them again, until they are all back under or max_seconds is used up.
-- The result lists each pause ("pauses": signal, reason, seconds, ongoing = still paused at the
-- return) and the signals this role cannot read ("health_unavailable"). NULL: no health check.
CREATE OR REPLACE PROCEDURE dbops.p2_backfill(
    tbl text, batch_rows integer DEFAULT 5000, max_seconds integer DEFAULT 60, INOUT result jsonb DEFAULT NULL,
    health jsonb DEFAULT NULL
)
LANGUAGE plpgsql
AS $fn$
DECLARE
    st dbops.p2_state;
    t0 timestamptz := clock_timestamp();
    tb timestamptz;
    nxt text;
    n_src bigint;
    n_null bigint := 0;
    n_ins bigint;
    waits integer := 0;
    nb integer := 0;
    rows_now bigint := 0;
    lockkey integer := hashtext(format('public.%I', tbl));
    keyq text;
    sel text;
    rng text;
    n_keys bigint;
    fast boolean := true;
    fallbacks integer := 0;
    finished boolean := false;
    -- health (issue 11)
    use_health boolean := health IS NOT NULL AND EXISTS (
        SELECT 1 FROM jsonb_each_text(health) e
        WHERE e.key <> 'check_seconds' AND coalesce(e.value, '') NOT IN ('', '0', 'off', 'false', 'none'));
    chk_every numeric := coalesce(nullif(nullif(health ->> 'check_seconds', ''), '0')::numeric, 1);
    hc jsonb;
    last_chk timestamptz;
    prev_lsn pg_lsn;
    prev_at timestamptz;
    checks integer := 0;
    unavailable jsonb := '{}';
    pauses jsonb := '[]';
    p_sig text;
    p_reason text;
    p_t0 timestamptz;
    p_worst jsonb;
    wal_over jsonb;
BEGIN
    -- A procedure that COMMITs cannot have a SET clause: turn JIT off for this (the engine's own)
    -- session. Batches read one table and write a partitioned one; compiling them costs more than
    -- it saves.
    PERFORM set_config('jit', 'off', false);
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'p2_backfill: needs READ COMMITTED (each batch takes a fresh snapshot after its lock)';
    END IF;
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF NOT FOUND OR st.step IN ('shadow_created') THEN
        RAISE EXCEPTION 'p2_backfill: % is not prepared (run dbops.p2_prepare first)', tbl;
    END IF;
    IF st.step NOT IN ('prepared', 'backfilling') THEN
        result := jsonb_build_object('status', 'done', 'changed', false, 'table', tbl, 'step', st.step, 'rows_done', st.rows_done,
                                     'null_key_rows', st.null_key_rows);
        RETURN;
    END IF;
    IF st.step = 'prepared' THEN
        PERFORM dbops.p2_fence(format('before the backfill of %s started', tbl));
        UPDATE dbops.p2_state SET step = 'backfilling', backfill_started_at = now(), updated_at = now()
        WHERE table_name = tbl;
        COMMIT;
    END IF;
    LOOP
        EXIT WHEN (nb + waits > 0 OR p_t0 IS NOT NULL OR jsonb_array_length(pauses) > 0)
                  AND clock_timestamp() - t0 >= make_interval(secs => max_seconds);
        IF use_health AND (last_chk IS NULL OR p_t0 IS NOT NULL
                           OR clock_timestamp() - last_chk >= make_interval(secs => chk_every)) THEN
            hc := dbops.p2_backfill_health(tbl, health, prev_lsn, prev_at);
            last_chk := clock_timestamp();
            checks := checks + 1;
            IF prev_lsn IS NULL OR hc ->> 'wal_bytes_per_second' IS NOT NULL THEN
                prev_lsn := (hc ->> 'lsn')::pg_lsn;
                prev_at := (hc ->> 'at')::timestamptz;
            END IF;
            IF hc ->> 'wal_bytes_per_second' IS NOT NULL THEN
                wal_over := (SELECT o FROM jsonb_array_elements(hc -> 'over') o WHERE o ->> 'signal' = 'wal_bytes_per_second');
            ELSIF wal_over IS NOT NULL THEN
                -- too soon for a new WAL rate: the last one stands
                hc := jsonb_set(hc, '{over}', (hc -> 'over') || wal_over);
            END IF;
            unavailable := unavailable || (hc -> 'unavailable');
            IF jsonb_array_length(hc -> 'over') > 0 THEN
                IF p_t0 IS NOT NULL AND p_sig <> hc -> 'over' -> 0 ->> 'signal' THEN
                    -- another signal now: the pause of the former one ends here, a new one begins
                    pauses := pauses || jsonb_build_object('signal', p_sig, 'reason', p_reason, 'worst', p_worst,
                        'seconds', round(extract(epoch FROM clock_timestamp() - p_t0)::numeric, 1), 'ongoing', false,
                        'started_at', p_t0);
                    p_t0 := NULL;
                END IF;
                IF p_t0 IS NULL THEN
                    p_t0 := clock_timestamp();
                    p_sig := hc -> 'over' -> 0 ->> 'signal';
                    p_reason := (SELECT string_agg(o ->> 'reason', '; ') FROM jsonb_array_elements(hc -> 'over') o);
                    p_worst := hc -> 'over' -> 0;
                ELSIF (hc -> 'over' -> 0 -> 'value') > (p_worst -> 'value') THEN
                    p_worst := hc -> 'over' -> 0;
                END IF;
                COMMIT;  -- nothing held while it waits
                PERFORM pg_sleep(least(chk_every, greatest(0, max_seconds - extract(epoch FROM clock_timestamp() - t0))));
                COMMIT;
                CONTINUE;
            ELSIF p_t0 IS NOT NULL THEN
                pauses := pauses || jsonb_build_object('signal', p_sig, 'reason', p_reason, 'worst', p_worst,
                    'seconds', round(extract(epoch FROM clock_timestamp() - p_t0)::numeric, 1), 'ongoing', false,
                    'started_at', p_t0);
                p_t0 := NULL;
            END IF;
        END IF;
        IF NOT pg_try_advisory_xact_lock(80620, lockkey) THEN
            waits := waits + 1;
            PERFORM pg_sleep(0.02);
            CONTINUE;
        END IF;
        tb := clock_timestamp();
        -- under a run lock (scanner.dbops.step sets dbops.run_lock_id): this run still holds it, checked in
        -- this batch's transaction and held FOR SHARE until its COMMIT (issue 18 item 12, 10_locks.sql)
        PERFORM dbops.p2_fence(format('before batch %s of this call of the backfill of %s (the batches before it '
                                      'are committed; the next run resumes after them)', nb + 1, tbl));
        SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
        keyq := format('SELECT max(k)::text, count(*) FROM (SELECT %1$I AS k FROM public.%2$I %3$s ORDER BY %1$I LIMIT %4$s) s',
                       st.pk_col, tbl,
                       CASE WHEN st.last_key IS NULL THEN '' ELSE format('WHERE %I > $1::%s', st.pk_col, st.pk_type) END,
                       batch_rows);
        EXECUTE keyq INTO nxt, n_keys USING st.last_key;
        IF nxt IS NULL THEN
            -- the transactions running now that hold a snapshot may have taken it before the last
            -- batch: the swap waits for them (issue 18; autovacuum and other background workers excepted)
            UPDATE dbops.p2_state SET step = 'backfilled', backfill_done_at = now(), updated_at = now(),
                   lock_waits = lock_waits + waits, rows_total = rows_done,
                   backfill_vxids = ARRAY(SELECT l.virtualxid FROM pg_locks l
                                          LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                                          WHERE l.locktype = 'virtualxid' AND l.granted AND l.pid <> pg_backend_pid()
                                            AND coalesce(a.backend_type, 'client backend') = 'client backend'
                                            -- no snapshot held (READ COMMITTED between statements): it sees every batch
                                            AND (a.pid IS NULL OR a.backend_xmin IS NOT NULL))
            WHERE table_name = tbl;
            finished := true;
            COMMIT;
            EXIT;
        END IF;
        sel := (SELECT string_agg(CASE WHEN c = st.key_col THEN format('(%s) AS %I', st.key_expr, c) ELSE quote_ident(c) END,
                                  ', ' ORDER BY o) FROM unnest(st.ins_cols) WITH ORDINALITY u (c, o));
        rng := format('%s %I <= $2::%s',
                      CASE WHEN st.last_key IS NULL THEN '' ELSE format('%I > $1::%s AND', st.pk_col, st.pk_type) END,
                      st.pk_col, st.pk_type);
        n_ins := NULL;
        IF fast THEN
            -- Fast path: a plain INSERT ... SELECT (no speculative insertion). A row the capture
            -- trigger already wrote makes it fail with unique_violation: the subtransaction is
            -- undone and this call continues on the ON CONFLICT path.
            BEGIN
                EXECUTE format('WITH ins AS (INSERT INTO public.%I (%s) SELECT %s FROM public.%I WHERE %s RETURNING 1) '
                               'SELECT count(*) FROM ins', st.shadow_name, dbops.p2_collist(st.ins_cols), sel, tbl, rng)
                    INTO n_ins USING st.last_key, nxt;
                n_src := n_ins;
            EXCEPTION WHEN unique_violation THEN
                fast := false;
                n_ins := NULL;
                fallbacks := fallbacks + 1;
            END;
        END IF;
        IF n_ins IS NULL THEN
            EXECUTE format('WITH ins AS (INSERT INTO public.%I (%s) SELECT %s FROM public.%I WHERE %s '
                           'ON CONFLICT (%I, %I) DO NOTHING RETURNING 1) SELECT count(*) FROM ins',
                           st.shadow_name, dbops.p2_collist(st.ins_cols), sel, tbl, rng, st.pk_col, st.key_col)
                INTO n_ins USING st.last_key, nxt;
            n_src := greatest(n_keys, n_ins);
        END IF;
        nb := nb + 1;
        rows_now := rows_now + n_src;
        UPDATE dbops.p2_state
        SET last_key = nxt, rows_done = rows_done + n_src, rows_copied = rows_copied + n_ins,
            batches = batches + 1,
            backfill_seconds = backfill_seconds + extract(epoch FROM clock_timestamp() - tb)::numeric,
            rows_total = greatest(rows_total, rows_done + n_src), updated_at = now()
        WHERE table_name = tbl;
        COMMIT;
    END LOOP;
    IF finished THEN
        -- NULL partition keys (derived with key_expr), counted once from the source's key column
        IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = format('public.%I', tbl)::regclass
                     AND attname = st.key_col AND NOT attnotnull) THEN
            EXECUTE format('SELECT count(*) FROM public.%I WHERE %I IS NULL', tbl, st.key_col) INTO n_null;
        END IF;
        PERFORM dbops.p2_fence(format('after the last batch of the backfill of %s', tbl));
        UPDATE dbops.p2_state SET null_key_rows = n_null WHERE table_name = tbl;
        COMMIT;
        -- autovacuum never analyzes a partitioned parent: do it once here (samples, reads only)
        EXECUTE format('ANALYZE public.%I', st.shadow_name);
        COMMIT;
    ELSIF waits > 0 THEN
        UPDATE dbops.p2_state SET lock_waits = lock_waits + waits WHERE table_name = tbl;
        COMMIT;
    END IF;
    IF p_t0 IS NOT NULL THEN
        -- still paused when its time is up: the next round goes on waiting (Ansible merges the two)
        pauses := pauses || jsonb_build_object('signal', p_sig, 'reason', p_reason, 'worst', p_worst,
            'seconds', round(extract(epoch FROM clock_timestamp() - p_t0)::numeric, 1), 'ongoing', true,
            'started_at', p_t0);
    END IF;
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    result := jsonb_build_object(
        'status', CASE WHEN finished THEN 'done' ELSE 'in progress' END, 'changed', rows_now > 0 OR finished,
        'table', tbl, 'step', st.step,
        'rows_done', st.rows_done, 'rows_total', st.rows_total,
        'pct', CASE WHEN coalesce(st.rows_total, 0) > 0
                    THEN round(100.0 * least(st.rows_done, st.rows_total) / st.rows_total, 1) END,
        'rows_this_call', rows_now, 'batches_this_call', nb, 'lock_waits_this_call', waits,
        'fast_path', fast, 'fast_path_fallbacks', fallbacks,
        'rows_per_second', CASE WHEN extract(epoch FROM clock_timestamp() - t0) > 0
                                THEN round(rows_now / extract(epoch FROM clock_timestamp() - t0)::numeric) END,
        'null_key_rows', st.null_key_rows, 'last_key', st.last_key,
        'seconds', round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3))
        || jsonb_build_object(
        'paused', p_t0 IS NOT NULL, 'pauses', pauses,
        'paused_seconds_this_call', (SELECT coalesce(sum((x ->> 'seconds')::numeric), 0) FROM jsonb_array_elements(pauses) x),
        'health_checks', checks, 'health_unavailable', unavailable);
    PERFORM dbops.p2_log(tbl, 'backfill', result);
    COMMIT;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- What to VACUUM before the swap (issue 11): the shadow's partitions that hold pages and were not
-- vacuumed (by hand or by autovacuum) since the backfill finished. A freshly copied table has no
-- visibility map (index-only scans visit the heap), unset hint bits and, for GIN indexes, a pending
-- list: the guide's queries ran 2-3x slower right after the swap. scanner.dbops.vacuum runs each
-- VACUUM (no transaction can), between health checks like the backfill's. The backfill's end already
-- ANALYZEd the partitioned parent (that recurses into every partition). Partitions entirely older
-- than the retention are left out: the first cleanup_old_data() drops them. Reads only.
-- Returns {"status": planned | not backfilled | already swapped | not prepared, "step", "shadow",
--          "partitions": [{"name", "bytes"}] oldest range first, "bytes"}.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION dbops.p2_vacuum_plan(tbl text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    st dbops.p2_state;
    parts jsonb;
BEGIN
    SELECT * INTO st FROM dbops.p2_state WHERE table_name = tbl;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('status', 'not prepared', 'table', tbl, 'partitions', '[]'::jsonb, 'bytes', 0);
    ELSIF st.step NOT IN ('backfilled', 'verified') OR st.backfill_done_at IS NULL THEN
        RETURN jsonb_build_object('status', CASE WHEN st.step IN ('swapped', 'finalized') THEN 'already swapped'
                                                 ELSE 'not backfilled' END,
                                  'table', tbl, 'step', st.step, 'partitions', '[]'::jsonb, 'bytes', 0);
    END IF;
    -- The shadow's partitions first, behind a MATERIALIZED fence: pg_relation_size() takes a lock, and
    -- evaluated on every pg_class row it would wait behind any session's ACCESS EXCLUSIVE lock.
    WITH mine AS MATERIALIZED (
        SELECT ih.inhrelid AS oid FROM pg_inherits ih
        WHERE ih.inhparent = to_regclass(format('public.%I', st.shadow_name))
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('name', x.relname, 'bytes', x.bytes)
                              ORDER BY x.is_default, x.range_start), '[]')
    INTO parts
    FROM (SELECT c.relname::text AS relname, pg_relation_size(c.oid) AS bytes, pb.range_start, pb.range_end,
                 pb.is_default, greatest(s.last_vacuum, s.last_autovacuum) AS vacuumed_at
          FROM mine
          JOIN pg_class c ON c.oid = mine.oid AND c.relkind = 'r'
          CROSS JOIN LATERAL dbops.p2_part_bounds(c.oid) pb
          LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
          OFFSET 0) x  -- computed once per partition: never pushed below the join
    LEFT JOIN public.app_retention_policies rp ON rp.table_name = tbl
    WHERE x.bytes > 0
      AND (rp.retention IS NULL OR x.range_end IS NULL OR x.range_end > now() - rp.retention)
      AND coalesce(x.vacuumed_at, '-infinity') < st.backfill_done_at;
    RETURN jsonb_build_object('status', 'planned', 'table', tbl, 'step', st.step, 'shadow', st.shadow_name,
                              'partitions', parts,
                              'bytes', (SELECT coalesce(sum((p ->> 'bytes')::bigint), 0) FROM jsonb_array_elements(parts) p));
END
$fn$;
