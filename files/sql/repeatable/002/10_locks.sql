-- Phase 2 engine: lock waits that name their holders and get past autovacuum (issue 18 item 10),
-- and the run lock's fencing token checked inside a step's own transaction (issue 18 item 12).
--
-- Every lock-taking step waits at most lock_timeout (500 ms, below deadlock_timeout = 1 s: the
-- step, never the application, is the side that gives up). PostgreSQL cancels a (non-wraparound)
-- autovacuum that blocks a lock request only once that request has waited deadlock_timeout, so on a
-- busy table, whose autovacuum runs for minutes, every attempt gave up before that and the swap,
-- finalize, DETACH or DEFAULT move never got through. Here, when a lock attempt fails:
--  * its holders are read (pg_locks on the relations, their partitions and, for a DROP, their TOAST
--    tables; pg_stat_activity, pg_stat_progress_vacuum) and named in the error: pid, role,
--    application, state, transaction age, the first 60 characters of the query;
--  * when the only holders are autovacuum workers not preventing wraparound, a probe asks for
--    SHARE UPDATE EXCLUSIVE on the vacuumed relation (the weakest mode that conflicts with a vacuum,
--    and one no application query conflicts with, so nobody queues behind it) with lock_timeout =
--    deadlock_timeout + 500 ms. PostgreSQL's own deadlock check then cancels the autovacuum (the
--    native mechanism: no privilege needed, unlike pg_cancel_backend of an autovacuum worker before
--    PG 18; and it can never hit a worker that has moved on to another table). The probe's lock is
--    released at once and the real lock is tried again with the short lock_timeout. The
--    application waits behind the step only during the real attempts, as before;
--  * an anti-wraparound autovacuum is never cancelled (PostgreSQL does not either): the error says
--    so and the caller waits it out (scanner.dbops.step polls until it is gone).
-- A TOAST table cannot be locked by LOCK TABLE: for an autovacuum of one (it blocks a DROP TABLE)
-- the statement itself is retried with lock_timeout = deadlock_timeout + 300 ms.

-- Lock mode names: 'ACCESS EXCLUSIVE' (LOCK TABLE's spelling) or 'AccessExclusiveLock' (pg_locks').
CREATE OR REPLACE FUNCTION dbops.p2_lock_mode(mode text) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN mode ~ 'Lock$' THEN mode
                ELSE replace(initcap(lower(btrim(mode))), ' ', '') || 'Lock' END
$$;

-- true when a lock held in mode held conflicts with a request for mode wanted (PostgreSQL's table).
CREATE OR REPLACE FUNCTION dbops.p2_lock_conflicts(held text, wanted text) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT dbops.p2_lock_mode(held) = ANY (CASE dbops.p2_lock_mode(wanted)
        WHEN 'AccessShareLock' THEN ARRAY['AccessExclusiveLock']
        WHEN 'RowShareLock' THEN ARRAY['ExclusiveLock', 'AccessExclusiveLock']
        WHEN 'RowExclusiveLock' THEN ARRAY['ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
        WHEN 'ShareUpdateExclusiveLock' THEN ARRAY['ShareUpdateExclusiveLock', 'ShareLock', 'ShareRowExclusiveLock',
                                                    'ExclusiveLock', 'AccessExclusiveLock']
        WHEN 'ShareLock' THEN ARRAY['RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareRowExclusiveLock',
                                     'ExclusiveLock', 'AccessExclusiveLock']
        WHEN 'ShareRowExclusiveLock' THEN ARRAY['RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareLock',
                                                 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
        WHEN 'ExclusiveLock' THEN ARRAY['RowShareLock', 'RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareLock',
                                         'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
        ELSE ARRAY['AccessShareLock', 'RowShareLock', 'RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareLock',
                   'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
    END)
$$;

-- What a statement of the daily jobs locks, read from its text (the engine generates them):
-- [{"rel": oid, "mode": ..., "only": no partitions, "toast": its TOAST table too}]; [] when unknown.
CREATE OR REPLACE FUNCTION dbops.p2_stmt_targets(stmt text) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    id text := '((?:"(?:[^"]|"")+"|[^\s.,"()]+)(?:\.(?:"(?:[^"]|"")+"|[^\s.,"()]+))?)';
    m text [];
    out jsonb := '[]';
    r text;
BEGIN
    IF stmt ~* '^\s*LOCK\s+TABLE\s' THEN
        m := regexp_match(stmt, '^\s*LOCK\s+TABLE\s+(ONLY\s+)?(.+?)\s+IN\s+(.+?)\s+MODE', 'i');
        FOREACH r IN ARRAY regexp_split_to_array(m[2], '\s*,\s*') LOOP
            out := out || jsonb_build_object('rel', to_regclass(r)::oid, 'mode', m[3], 'only', m[1] IS NOT NULL);
        END LOOP;
    ELSIF stmt ~* '^\s*ALTER\s+TABLE\s+\S.*\s(ATTACH|DETACH)\s+PARTITION\s' THEN
        m := regexp_match(stmt, '^\s*ALTER\s+TABLE\s+(?:ONLY\s+)?' || id || '\s+(ATTACH|DETACH)\s+PARTITION\s+' || id, 'i');
        out := jsonb_build_array(
            jsonb_build_object('rel', to_regclass(m[1])::oid, 'only', true,
                               'mode', CASE upper(m[2]) WHEN 'ATTACH' THEN 'ShareUpdateExclusiveLock' ELSE 'AccessExclusiveLock' END),
            jsonb_build_object('rel', to_regclass(m[3])::oid, 'mode', 'AccessExclusiveLock', 'only', true));
    ELSIF stmt ~* '^\s*ALTER\s+TABLE\s' THEN
        m := regexp_match(stmt, '^\s*ALTER\s+TABLE\s+(?:ONLY\s+)?' || id || '\s+(\w+)', 'i');
        out := jsonb_build_array(jsonb_build_object('rel', to_regclass(m[1])::oid,
            'mode', CASE WHEN upper(m[2]) IN ('DISABLE', 'ENABLE') THEN 'ShareRowExclusiveLock' ELSE 'AccessExclusiveLock' END));
    ELSIF stmt ~* '^\s*DROP\s+TABLE\s' THEN
        m := regexp_match(stmt, '^\s*DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?' || id, 'i');
        out := jsonb_build_array(jsonb_build_object('rel', to_regclass(m[1])::oid, 'mode', 'AccessExclusiveLock',
                                                    'toast', true));
    ELSIF stmt ~* '^\s*(DELETE\s+FROM|UPDATE|INSERT\s+INTO)\s' THEN
        m := regexp_match(stmt, '^\s*(?:DELETE\s+FROM|UPDATE|INSERT\s+INTO)\s+(?:ONLY\s+)?' || id, 'i');
        out := jsonb_build_array(jsonb_build_object('rel', to_regclass(m[1])::oid, 'mode', 'RowExclusiveLock'));
    END IF;
    RETURN (SELECT coalesce(jsonb_agg(e), '[]') FROM jsonb_array_elements(out) e WHERE e ->> 'rel' IS NOT NULL);
END
$$;

-- The sessions holding a lock that conflicts with targets (as p2_stmt_targets returns them; each
-- relation with its partitions unless "only", and its TOAST tables when "toast"), granted, this
-- database, other sessions. One element per session:
-- {pid, role, application_name, state, backend_type, xact_seconds, query (60 characters), locks,
--  relids, autovacuum, vacuum, wraparound, hidden (pg_stat_activity hides its details from this role)};
-- an autovacuum's query is kept to 120 characters (its "(to prevent wraparound)" ends it).
-- autovacuum: backend_type 'autovacuum worker'; when hidden (not a member of pg_read_all_stats), a
-- session in pg_stat_progress_vacuum without a user. wraparound: its query says "(to prevent
-- wraparound)", or (hidden) the relation it vacuums is older than its autovacuum_freeze_max_age.
CREATE OR REPLACE FUNCTION dbops.p2_lock_holders(targets jsonb) RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH t AS (
        SELECT (e ->> 'rel')::oid AS top, dbops.p2_lock_mode(coalesce(e ->> 'mode', 'AccessExclusiveLock')) AS mode,
               coalesce((e ->> 'only')::boolean, false) AS only_top, coalesce((e ->> 'toast')::boolean, false) AS toast
        FROM jsonb_array_elements(coalesce(targets, '[]')) e
        WHERE (e ->> 'rel') IS NOT NULL
    ), tree AS (
        SELECT t.mode, t.toast, t.top AS relid FROM t
        UNION
        SELECT t.mode, t.toast, pt.relid::oid FROM t, pg_partition_tree(t.top::regclass) pt WHERE NOT t.only_top
    ), rels AS (
        SELECT tree.mode, tree.relid FROM tree
        UNION
        SELECT tree.mode, c.reltoastrelid FROM tree JOIN pg_class c ON c.oid = tree.relid
        WHERE tree.toast AND c.reltoastrelid <> 0
    ), held AS (
        SELECT l.pid, l.relation, l.mode
        FROM pg_locks l JOIN rels r ON r.relid = l.relation
        WHERE l.locktype = 'relation' AND l.granted AND l.pid IS DISTINCT FROM pg_backend_pid()
          AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
          AND dbops.p2_lock_conflicts(l.mode, r.mode)
    ), s AS (
        SELECT h.pid,
               array_agg(DISTINCT h.relation) AS relids,
               array_agg(DISTINCT format('%s on %s', h.mode, h.relation::regclass)) AS locks,
               a.usename, a.application_name, a.state, a.backend_type, a.xact_start, a.query,
               a.usesysid IS NULL AND a.backend_type IS NULL AS hidden_worker,
               a.query IS NULL OR a.query = '<insufficient privilege>' AS hidden,
               EXISTS (SELECT 1 FROM pg_stat_progress_vacuum v WHERE v.pid = h.pid) AS vacuum
        FROM held h LEFT JOIN pg_stat_activity a ON a.pid = h.pid
        GROUP BY h.pid, a.usename, a.application_name, a.state, a.backend_type, a.xact_start, a.query, a.usesysid
    ), k AS (
        SELECT s.*,
               s.backend_type = 'autovacuum worker' OR (s.vacuum AND s.hidden_worker) AS autovacuum,
               CASE WHEN s.query LIKE 'autovacuum:%' THEN s.query LIKE '%(to prevent wraparound)%'
                    ELSE EXISTS (
                        SELECT 1 FROM pg_class c
                        WHERE c.oid = ANY (s.relids) AND c.relkind IN ('r', 'm', 't')
                          AND (age(c.relfrozenxid) > least(current_setting('autovacuum_freeze_max_age')::bigint,
                                   coalesce((SELECT o.option_value::bigint FROM pg_options_to_table(c.reloptions) o
                                             WHERE o.option_name = 'autovacuum_freeze_max_age'), 2000000000))
                               OR mxid_age(c.relminmxid) > least(current_setting('autovacuum_multixact_freeze_max_age')::bigint,
                                   coalesce((SELECT o.option_value::bigint FROM pg_options_to_table(c.reloptions) o
                                             WHERE o.option_name = 'autovacuum_multixact_freeze_max_age'), 2000000000))))
               END AS wraparound
        FROM s
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'pid', k.pid, 'role', k.usename, 'application_name', k.application_name, 'state', k.state,
               'backend_type', k.backend_type,
               'xact_seconds', round(extract(epoch FROM clock_timestamp() - k.xact_start)::numeric, 1),
               'query', CASE WHEN NOT k.hidden THEN left(regexp_replace(k.query, '\s+', ' ', 'g'),
                                                         CASE WHEN k.autovacuum THEN 120 ELSE 60 END) END,
               'locks', to_jsonb(k.locks), 'relids', to_jsonb(k.relids),
               'autovacuum', coalesce(k.autovacuum, false), 'vacuum', k.vacuum,
               'wraparound', coalesce(k.autovacuum AND k.wraparound, false), 'hidden', k.hidden)
           ORDER BY k.pid), '[]')
    FROM k
$$;

-- The locks of a holder, for messages: the first three (a lock on a partitioned table is one per partition).
CREATE OR REPLACE FUNCTION dbops.p2_lock_list(locks jsonb) RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(x, ', ' ORDER BY o) FILTER (WHERE o <= 3)
           || CASE WHEN count(*) > 3 THEN format(' and %s more', count(*) - 3) ELSE '' END
    FROM jsonb_array_elements_text(locks) WITH ORDINALITY e (x, o)
$$;

-- One line per holder, for messages.
CREATE OR REPLACE FUNCTION dbops.p2_lock_text(holders jsonb) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(string_agg(CASE
        WHEN (h ->> 'autovacuum')::boolean THEN format('pid %s (%sautovacuum worker%s, %s%s)', h ->> 'pid',
            CASE WHEN (h ->> 'wraparound')::boolean THEN 'anti-wraparound ' ELSE '' END,
            CASE WHEN h ->> 'query' IS NOT NULL THEN format(', "%s"', h ->> 'query') ELSE '' END,
            dbops.p2_lock_list(h -> 'locks'),
            CASE WHEN h ->> 'xact_seconds' IS NOT NULL THEN format(', running %s s', h ->> 'xact_seconds') ELSE '' END)
        ELSE format('pid %s (%s)', h ->> 'pid', concat_ws(', ',
            'role ' || (h ->> 'role'),
            'application "' || (h ->> 'application_name') || '"',
            CASE WHEN (h ->> 'vacuum')::boolean THEN 'VACUUM' END,
            h ->> 'state',
            'transaction ' || (h ->> 'xact_seconds') || ' s',
            dbops.p2_lock_list(h -> 'locks'),
            CASE WHEN (h ->> 'hidden')::boolean
                 THEN 'query hidden from this role (not a member of pg_read_all_stats)'
                 ELSE 'query "' || (h ->> 'query') || '"' END))
        END, '; ' ORDER BY (h ->> 'pid')::int), '')
    FROM jsonb_array_elements(holders) h
$$;

-- After a failed lock attempt (the caller's transaction holds nothing of it any more): who held it,
-- and when the only holders are non-wraparound autovacuum workers and probe is true, let PostgreSQL
-- cancel them (the probe described at the top). Returns {"action", "text", "holders", "autovacuum",
-- "lock_timeout"}; action: released (nobody holds it now), held (other sessions hold it),
-- wait_wraparound, cancelled (retry now), finished (the autovacuum ended during the probe: retry
-- now), not_cancelled (the probe gave up: retry later), extend (a TOAST table's autovacuum: retry
-- the statement itself with lock_timeout = the returned "lock_timeout").
CREATE OR REPLACE FUNCTION dbops.p2_lock_unblock(targets jsonb, probe boolean DEFAULT true) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    h jsonb := dbops.p2_lock_holders(targets);
    held text := dbops.p2_lock_text(h);
    dt numeric := (SELECT s.setting::numeric FROM pg_settings s WHERE s.name = 'deadlock_timeout');   -- ms
    av jsonb := '[]';
    rel oid;
    t timestamptz;
    granted boolean;
    waited numeric;
    what text;
    toast boolean := false;
BEGIN
    IF jsonb_array_length(h) = 0 THEN
        RETURN jsonb_build_object('action', 'released', 'holders', h, 'autovacuum', av,
            'text', 'no session holds a conflicting lock any more (it was released right after the attempt)');
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(h) x WHERE NOT (x ->> 'autovacuum')::boolean) THEN
        RETURN jsonb_build_object('action', 'held', 'holders', h, 'autovacuum', av, 'text', 'held by ' || held);
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(h) x WHERE (x ->> 'wraparound')::boolean) THEN
        RETURN jsonb_build_object('action', 'wait_wraparound', 'holders', h, 'autovacuum', av,
            'text', 'held by ' || held || ': an autovacuum preventing transaction ID wraparound is never cancelled '
                    '(neither by PostgreSQL nor by this engine); waiting for it to finish');
    END IF;
    IF NOT probe THEN
        RETURN jsonb_build_object('action', 'held', 'holders', h, 'autovacuum', av, 'text', 'held by ' || held);
    END IF;
    IF dt > 5000 THEN
        RETURN jsonb_build_object('action', 'held', 'holders', h, 'autovacuum', av,
            'text', format('held by %s (an autovacuum: deadlock_timeout = %s ms is too long to let PostgreSQL cancel '
                           'it within a step; waiting for it to finish)', held, dt));
    END IF;
    FOR rel IN SELECT DISTINCT r::oid FROM jsonb_array_elements(h) x, jsonb_array_elements_text(x -> 'relids') r LOOP
        IF (SELECT c.relkind FROM pg_class c WHERE c.oid = rel) NOT IN ('r', 'p', 'm') THEN
            toast := true;   -- LOCK TABLE cannot lock a TOAST table: the statement itself waits longer
            CONTINUE;
        END IF;
        t := clock_timestamp();
        BEGIN
            PERFORM set_config('lock_timeout', round(dt + 500) || 'ms', true);
            EXECUTE format('LOCK TABLE ONLY %s IN SHARE UPDATE EXCLUSIVE MODE', rel::regclass);
            RAISE EXCEPTION USING ERRCODE = 'P2L00';   -- undo the sub-transaction: the probe's lock goes at once
        EXCEPTION
            WHEN SQLSTATE 'P2L00' THEN granted := true;
            WHEN lock_not_available THEN granted := false;
        END;
        waited := round(extract(epoch FROM clock_timestamp() - t)::numeric * 1000);
        what := CASE WHEN NOT granted THEN 'not cancelled' WHEN waited >= 0.9 * dt THEN 'cancelled' ELSE 'finished' END;
        av := av || (SELECT jsonb_agg(jsonb_build_object('pid', x -> 'pid', 'relation', rel::regclass::text,
                                                         'query', x -> 'query', 'action', what, 'waited_ms', waited))
                     FROM jsonb_array_elements(h) x WHERE x -> 'relids' @> to_jsonb(rel));
    END LOOP;
    IF jsonb_array_length(av) = 0 AND toast THEN
        RETURN jsonb_build_object('action', 'extend', 'holders', h, 'autovacuum', av,
            'lock_timeout', round(dt + 300) || 'ms',
            'text', format('held by %s (an autovacuum of a TOAST table: the statement waits deadlock_timeout + 300 ms '
                           'so that PostgreSQL cancels it)', held));
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(av) x WHERE x ->> 'action' = 'not cancelled') THEN
        RETURN jsonb_build_object('action', 'not_cancelled', 'holders', h, 'autovacuum', av,
            'text', format('held by %s: an autovacuum that PostgreSQL did not cancel when a probe waited %s ms '
                           '(deadlock_timeout %s ms): it is probably preventing wraparound; waiting for it to finish',
                           held, (SELECT max((x ->> 'waited_ms')::numeric) FROM jsonb_array_elements(av) x), dt));
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(av) x WHERE x ->> 'action' = 'cancelled') THEN
        RETURN jsonb_build_object('action', 'cancelled', 'holders', h, 'autovacuum', av,
            'text', format('the only holder was %s: cancelled it (not an anti-wraparound one): a probe waited %s ms '
                           'for SHARE UPDATE EXCLUSIVE (no application query waits behind that mode), past '
                           'deadlock_timeout (%s ms), so PostgreSQL''s deadlock check cancelled the autovacuum; '
                           'it runs again later', held,
                           (SELECT max((x ->> 'waited_ms')::numeric) FROM jsonb_array_elements(av) x), dt));
    END IF;
    RETURN jsonb_build_object('action', 'finished', 'holders', h, 'autovacuum', av,
        'text', format('the only holder was %s: it finished while a probe waited %s ms', held,
                       (SELECT max((x ->> 'waited_ms')::numeric) FROM jsonb_array_elements(av) x)));
END
$$;

-- Lock rels in mode (LOCK TABLE's spelling; or run stmt, e.g. a DROP TABLE, which takes that lock)
-- with the caller's lock_timeout; on lock_not_available, name the holders and get past a
-- non-wraparound autovacuum (dbops.p2_lock_unblock), then try once more. Raises lock_not_available
-- (nothing kept: the failed attempts are rolled back), MESSAGE naming the holders, DETAIL the
-- jsonb {"holders", "action", "autovacuum"} (scanner.dbops.step reads "action": wait_wraparound is
-- waited out). Returns {"attempts", "lock_wait_ms", "autovacuum"}; a cancelled autovacuum is also
-- told as a NOTICE 'autovacuum: <what>: ...'.
CREATE OR REPLACE FUNCTION dbops.p2_lock(what text, rels regclass [], mode text DEFAULT 'ACCESS EXCLUSIVE',
                                         stmt text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lt text := current_setting('lock_timeout');
    names text := (SELECT string_agg(r::text, ', ' ORDER BY o) FROM unnest(rels) WITH ORDINALITY u (r, o));
    cmd text := coalesce(stmt, format('LOCK TABLE %s IN %s MODE', names, mode));
    tg jsonb := (SELECT coalesce(jsonb_agg(jsonb_build_object('rel', r::oid, 'mode', mode,
                                                              'toast', coalesce(stmt ~* '^\s*DROP\s+TABLE\s', false))), '[]')
                 FROM unnest(rels) r);
    t0 timestamptz := clock_timestamp();
    u jsonb;
BEGIN
    BEGIN
        EXECUTE cmd;
        RETURN jsonb_build_object('attempts', 1, 'autovacuum', '[]'::jsonb,
                                  'lock_wait_ms', round(extract(epoch FROM clock_timestamp() - t0)::numeric * 1000, 1));
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
    u := dbops.p2_lock_unblock(tg);
    IF u ->> 'action' IN ('cancelled', 'finished', 'extend') THEN
        BEGIN
            IF u ->> 'action' = 'extend' THEN
                PERFORM set_config('lock_timeout', u ->> 'lock_timeout', true);
            END IF;
            EXECUTE cmd;
            PERFORM set_config('lock_timeout', lt, true);
            RAISE NOTICE 'autovacuum: %: %', what, u ->> 'text';
            RETURN jsonb_build_object('attempts', 2, 'autovacuum', u -> 'autovacuum', 'text', u ->> 'text',
                                      'lock_wait_ms', round(extract(epoch FROM clock_timestamp() - t0)::numeric * 1000, 1));
        EXCEPTION WHEN lock_not_available THEN
            u := dbops.p2_lock_unblock(tg, false)
                 || jsonb_build_object('autovacuum', u -> 'autovacuum', 'before', u ->> 'text');
            u := u || jsonb_build_object('text', format('%s; then %s', u ->> 'before', u ->> 'text'));
        END;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'lock_not_available',
        MESSAGE = format('%s: %s within lock_timeout %s: %s', what,
                         CASE WHEN stmt IS NULL THEN format('could not lock %s (%s)', names, mode)
                              ELSE format('could not run "%s" (%s on %s)', left(stmt, 60), mode, names) END,
                         lt, u ->> 'text'),
        DETAIL = jsonb_build_object('holders', u -> 'holders', 'action', u ->> 'action',
                                    'autovacuum', u -> 'autovacuum')::text,
        HINT = CASE WHEN u ->> 'action' IN ('wait_wraparound', 'not_cancelled')
                    THEN 'Nothing was changed. Wait for that autovacuum to finish (pg_stat_progress_vacuum shows how far '
                         'it is; never cancel an anti-wraparound one), then run the step again.'
                    ELSE 'Nothing was changed; the step can be run again (Ansible retries it with backoff).' END;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The run lock's fencing token, inside the step's own transaction (issue 18 item 12)
-- ---------------------------------------------------------------------------------------------
-- scanner.dbops.step and scanner.dbops.migrate set dbops.run_lock_id (and dbops.run_lock_schema)
-- on their session when the run holds the migration run lock. A procedure that COMMITs per batch
-- (p2_backfill, the daily jobs) calls this at the start of each batch's transaction: it holds the
-- lock row FOR SHARE until that transaction ends (a takeover waits for it), renews a lease of this
-- run that expired meanwhile (nobody took it; its renewals may have waited for this very row lock),
-- and raises (SQLSTATE DBF01, the controller's LeaseLost wording) when another run holds the lock
-- now or it was released. No token set (pg_cron, psql): nothing checked.
CREATE OR REPLACE FUNCTION dbops.p2_fence(what text DEFAULT 'this step') RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    token text := nullif(current_setting('dbops.run_lock_id', true), '');
    sch text := coalesce(nullif(current_setting('dbops.run_lock_schema', true), ''), 'dbops');
    live boolean;
    h_run text;
    h_holder text;
    h_at text;
BEGIN
    IF token IS NULL THEN
        RETURN;
    END IF;
    IF to_regclass(format('%I.run_lock', sch)) IS NOT NULL THEN
        EXECUTE format('SELECT expires_at > now() FROM %I.run_lock WHERE lock_name = ''migration'' AND run_id = $1 '
                       'FOR SHARE', sch) INTO live USING token;
        IF live THEN
            RETURN;
        ELSIF NOT live THEN
            EXECUTE format('UPDATE %I.run_lock SET renewed_at = now(), expires_at = now() + (expires_at - renewed_at) '
                           'WHERE lock_name = ''migration'' AND run_id = $1', sch) USING token;
            RETURN;
        END IF;
        EXECUTE format('SELECT run_id, holder, acquired_at::text FROM %I.run_lock WHERE lock_name = ''migration''', sch)
            INTO h_run, h_holder, h_at;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'DBF01',
        MESSAGE = format('this run (run %s) no longer holds the migration run lock: %s. Stopped %s; this run changes '
                         'nothing more. Wait for that run to finish (or check why the lease of this run was not renewed), '
                         'then re-run to continue.', token,
                         CASE WHEN h_run IS NULL THEN 'nobody holds it now (it was released)'
                              ELSE format('it is now held by %s (run %s), who took it at %s', h_holder, h_run, h_at) END,
                         what);
END
$$;
