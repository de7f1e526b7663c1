# -*- coding: utf-8 -*-
"""Shared helpers for the project's PostgreSQL modules (dbops_migrate, dbops_run_lock).

Connection options use the same names as community.postgresql, so one ``module_defaults``
entry (``scanner_db_login``) serves both. Secrets: ``login_password`` is ``no_log``; errors
never include the DSN.
"""
from __future__ import annotations

import re
import time

try:
    import psycopg2
    import psycopg2.extensions
    HAS_PSYCOPG2 = True
except ImportError:  # pragma: no cover - reported by the module
    HAS_PSYCOPG2 = False

LOCK_NOT_AVAILABLE = "55P03"
DEADLOCK_DETECTED = "40P01"
SERIALIZATION_FAILURE = "40001"
RETRYABLE = {LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED, SERIALIZATION_FAILURE}

CONNECTION_ARGSPEC = dict(
    login_host=dict(type="str", default=""),
    login_port=dict(type="int", default=5432),
    login_user=dict(type="str", default="postgres"),
    login_password=dict(type="str", default="", no_log=True),
    login_db=dict(type="str", default="", aliases=["db"]),
    ssl_mode=dict(type="str", default="prefer",
                  choices=["allow", "disable", "prefer", "require", "verify-ca", "verify-full"]),
    ca_cert=dict(type="str", aliases=["ssl_rootcert"]),
    ssl_cert=dict(type="path"),
    ssl_key=dict(type="path"),
    connect_params=dict(type="dict", default={}),
)

# How a step runs (scanner.dbops.step, and each round of the scanner.dbops.backfill action): documented in step.py.
STEP_RUN_ARGSPEC = dict(
    lock_timeout=dict(type="str", default="2s"),
    statement_timeout=dict(type="str", default="0"),
    retries=dict(type="int", default=8),
    retry_delay=dict(type="float", default=0.5),
    reconnect=dict(type="bool", default=False),
    run_lock_id=dict(type="str", default=""),
    ledger_schema=dict(type="str", default="dbops"),
    wraparound_wait=dict(type="float", default=900.0),
)


def connect(params: dict, application_name: str):
    """Open an autocommit connection; raise a clean RuntimeError without the password."""
    kw = dict(host=params["login_host"] or None, port=params["login_port"],
              user=params["login_user"], dbname=params["login_db"] or None,
              sslmode=params["ssl_mode"], application_name=application_name,
              connect_timeout=10)
    if params.get("login_password"):
        kw["password"] = params["login_password"]
    if params.get("ca_cert"):
        kw["sslrootcert"] = params["ca_cert"]
    if params.get("ssl_cert"):
        kw["sslcert"] = params["ssl_cert"]
    if params.get("ssl_key"):
        kw["sslkey"] = params["ssl_key"]
    kw.update(params.get("connect_params") or {})
    # Our sessions keep their own name (visible in pg_stat_activity), whatever connect_params says.
    kw["application_name"] = application_name
    try:
        conn = psycopg2.connect(**kw)
    except psycopg2.Error as exc:
        msg = str(exc).strip()
        if params.get("login_password"):
            msg = msg.replace(params["login_password"], "********")
        raise RuntimeError(
            "cannot connect to PostgreSQL at %s:%s database %s as %s: %s"
            % (params["login_host"] or "local socket", params["login_port"],
               params["login_db"], params["login_user"], msg)) from None
    conn.autocommit = True
    conn.notices = NoticeSink()
    return conn


class NoticeSink(list):
    """psycopg2 keeps only the last 50 notices by default: keep them all, cleaned."""

    def append(self, item):  # noqa: D401 - psycopg2 calls append()
        text = str(item).strip()
        text = re.sub(r"^(NOTICE|WARNING|INFO):\s+", "", text)
        super().append(text)

    def drain(self) -> list:
        out = list(self)
        del self[:]
        return out


def sqlstate(exc) -> str | None:
    return getattr(exc, "pgcode", None)


def with_retries(fn, retries: int, delay: float, max_delay: float = 30.0, on_retry=None, free_wait=None):
    """Run fn(); on lock_timeout (55P03), deadlock or serialization failure, back off and retry.

    Exponential backoff (delay, 2*delay, ... capped at max_delay). Returns (result, attempts).
    Re-raises the last error when retries are exhausted: never waits unbounded.
    free_wait(exc), when given, is asked first: a number is a retry that does not count against
    retries, after that many seconds (LockAssist: an autovacuum PostgreSQL was made to cancel, or an
    anti-wraparound one waited out, each bounded by its own budget); None is an ordinary retry."""
    attempt = 0
    used = 0
    while True:
        attempt += 1
        try:
            return fn(), attempt
        except psycopg2.Error as exc:
            if sqlstate(exc) not in RETRYABLE:
                raise
            free = free_wait(exc) if free_wait else None
            if free is None:
                used += 1
                if used > retries:
                    raise
                wait = min(max_delay, delay * (2 ** (used - 1)))
            else:
                wait = free
            if on_retry:
                on_retry(attempt, wait, exc)
            if wait:
                time.sleep(wait)


def pg_error_text(exc) -> str:
    """A one-paragraph description of a psycopg2 error: SQLSTATE, message, detail, hint."""
    diag = getattr(exc, "diag", None)
    parts = []
    code = sqlstate(exc)
    primary = getattr(diag, "message_primary", None) or str(exc).strip().splitlines()[0]
    parts.append("%s%s" % ("[%s] " % code if code else "", primary))
    for label, attr in (("detail", "message_detail"), ("hint", "message_hint"), ("context", "context")):
        val = getattr(diag, attr, None) if diag else None
        if val and label in ("detail", "context") and lock_detail(exc) is not None:
            continue  # the engine's holders as jsonb, for machines: its message names them already
        if val:
            parts.append("%s: %s" % (label, val.strip()))
    return "; ".join(parts)


# ---- the run lock's fencing token ----------------------------------------------------------------
# A run holds the migration lock while the row <schema>.run_lock (lock_name 'migration') carries its run
# id. Every write step of a locked run (scanner.dbops.step, scanner.dbops.migrate; the action plugins pass
# run_lock_id from the run's facts) first renews that row for its own run id, and keeps renewing it from a
# second connection while it runs: a step whose run lost the lock (its lease expired and the maintenance
# job or another run took it, or an operator forced it) does not start, and one that is running is
# cancelled within a third of the lease.
LEASE_RENEW_SQL = """
UPDATE {schema}.run_lock
   SET renewed_at = now(), expires_at = now() + (expires_at - renewed_at)
 WHERE lock_name = 'migration' AND run_id = %s
RETURNING GREATEST(extract(epoch FROM expires_at - renewed_at), 1)::float8"""
LEASE_HOLDER_SQL = """
SELECT run_id, holder, acquired_at::text, expires_at::text FROM {schema}.run_lock WHERE lock_name = 'migration'"""


class LeaseLost(Exception):
    """This run no longer holds the migration run lock."""


def _q(schema: str, text: str):
    from psycopg2 import sql as pgsql
    return pgsql.SQL(text).format(schema=pgsql.Identifier(schema))


def renew_lease(conn, schema: str, run_id: str, what: str) -> float:
    """Renew this run's lease (same length as before); return its length in seconds.

    Raises LeaseLost naming the run that holds the lock now when run_id no longer holds it."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", ("%s.run_lock" % _q(schema, "{schema}").as_string(conn),))
        if cur.fetchone()[0]:
            cur.execute(_q(schema, LEASE_RENEW_SQL), (run_id,))
            row = cur.fetchone()
            if row:
                return float(row[0])
            cur.execute(_q(schema, LEASE_HOLDER_SQL))
            holder = cur.fetchone()
        else:
            holder = None
    raise LeaseLost(lease_lost_message(run_id, holder, what))


def lease_lost_message(run_id: str, holder, what: str) -> str:
    """The operator's message when this run lost the lock (holder: run_id, holder, acquired_at or None)."""
    if holder:
        now_held = "it is now held by %s (run %s), who took it at %s" % (holder[1], holder[0], holder[2])
    else:
        now_held = "nobody holds it now (it was released)"
    return ("this run (run %s) no longer holds the migration run lock: %s. Stopped %s; this run changes nothing "
            "more. Wait for that run to finish (or check why the lease of this run was not renewed), then re-run "
            "to continue." % (run_id, now_held, what))


# The fencing token inside the step's own transaction (issue 18 item 12). The controller's lease
# check (LeaseKeeper: before the step, then every third of the lease) cannot stop a statement already
# sent, nor see a takeover between its check and the statement. So the step's transaction itself
# first reads the lock row FOR SHARE: another run holds it -> LeaseLost before anything is changed;
# ours -> held until the step's COMMIT, and a takeover (an UPDATE of that row) waits for it. A lease
# of this run that expired meanwhile (its renewal may have waited for this very row lock; nobody took
# it) is renewed in the same transaction. Procedures that COMMIT per batch (CALL dbops.p2_backfill,
# the daily jobs) cannot run inside a transaction block: they read dbops.run_lock_id /
# dbops.run_lock_schema from their session and call dbops.p2_fence per batch (10_locks.sql).
FENCE_SQL = """
SELECT expires_at > now() FROM {schema}.run_lock WHERE lock_name = 'migration' AND run_id = %s FOR SHARE"""
FENCE_SQLSTATE = "DBF01"   # dbops.p2_fence: this run no longer holds the run lock
_AUTOCOMMIT_ONLY = re.compile(
    r"^\s*(CALL|VACUUM|CHECKPOINT|ALTER\s+SYSTEM|(CREATE|DROP|ALTER)\s+(DATABASE|TABLESPACE)|"
    r"(CREATE|DROP)\s+(UNIQUE\s+)?INDEX\s+CONCURRENTLY|REINDEX\b.*\bCONCURRENTLY|"
    r"ALTER\s+TABLE\b.*\bDETACH\s+PARTITION\b.*\b(CONCURRENTLY|FINALIZE))",
    re.IGNORECASE | re.DOTALL)


def autocommit_only(statement: str) -> bool:
    """A statement that cannot run inside a transaction block (a procedure that COMMITs, VACUUM,
    CONCURRENTLY builds, ...): it is fenced just before it runs, and per batch by the engine."""
    text = re.sub(r"^(\s*(--[^\n]*\n|/\*.*?\*/))*", "", statement, flags=re.DOTALL)
    return bool(_AUTOCOMMIT_ONLY.match(text))


def fence_check(cur, schema: str, run_id: str, what: str):
    """Inside the caller's transaction: this run still holds the run lock (held FOR SHARE until that
    transaction ends). Raises LeaseLost (the caller rolls back) naming the run that holds it now."""
    cur.execute("SELECT to_regclass(%s) IS NOT NULL", ("%s.run_lock" % _q(schema, "{schema}").as_string(cur),))
    holder = None
    if cur.fetchone()[0]:
        cur.execute(_q(schema, FENCE_SQL), (run_id,))
        row = cur.fetchone()
        if row is not None:
            if not row[0]:
                cur.execute(_q(schema, LEASE_RENEW_SQL), (run_id,))
            return
        cur.execute(_q(schema, LEASE_HOLDER_SQL))
        holder = cur.fetchone()
    raise LeaseLost(lease_lost_message(run_id, holder, what))


def fence_autocommit(conn, schema: str, run_id: str, what: str):
    """fence_check in a transaction of its own, right before a statement that cannot run in one."""
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        try:
            fence_check(cur, schema, run_id, what)
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")


def set_fence_token(conn, schema: str, run_id: str):
    """Give the session the token the engine's procedures check per batch (dbops.p2_fence)."""
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('dbops.run_lock_id', %s, false), set_config('dbops.run_lock_schema', %s, false)",
                    (run_id, schema))


def fence_lost_text(exc) -> str | None:
    """The message of dbops.p2_fence's error (this run lost the lock during a procedure), else None."""
    if sqlstate(exc) != FENCE_SQLSTATE:
        return None
    diag = getattr(exc, "diag", None)
    return (getattr(diag, "message_primary", None) or str(exc)).strip()


class LeaseKeeper:
    """Renews this run's lease from its own connection every third of the lease while a step runs.

    start() checks the lease first (raises LeaseLost: the step must not start). When a renewal finds
    the lock lost, on_lost() is called once (the step module cancels its statement) and lost holds
    the message."""

    def __init__(self, params: dict, schema: str, run_id: str, what: str, on_lost=None, during="during "):
        self.params, self.schema, self.run_id, self.what, self.during = params, schema, run_id, what, during
        self.on_lost = on_lost
        self.lost = None
        self.renewals = 0
        self._conn = None
        self._thread = None
        self._stop = None

    def start(self):
        import threading
        self._conn = connect(self.params, "scanner-dbops run-lock lease")
        try:
            lease = renew_lease(self._conn, self.schema, self.run_id, "before " + self.what)
        except Exception:
            self._conn.close()
            raise
        self.renewals = 1
        self.interval = max(0.5, lease / 3.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            try:
                renew_lease(self._conn, self.schema, self.run_id, self.during + self.what
                            + (" (it was cancelled)" if self.on_lost else ""))
                self.renewals += 1
            except LeaseLost as exc:
                self.lost = str(exc)
                if self.on_lost:
                    try:
                        self.on_lost()
                    except Exception:  # pylint: disable=broad-except
                        pass
                return
            except Exception:  # pylint: disable=broad-except
                # A failed renewal (a network blip) is retried at the next beat; the lease is three beats long.
                try:
                    if self._conn.closed:
                        self._conn = connect(self.params, "scanner-dbops run-lock lease")
                except RuntimeError:
                    pass

    def stop(self):
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=30)
        if self._conn is not None:
            self._conn.close()
        return self.lost


# ---- lock waits: who holds the lock, and getting past an autovacuum (issue 18 item 10) ----------
# When psycopg2 gets lock_timeout (55P03) the waiting statement is gone, and with it what
# pg_blocking_pids() would have said. The engine's lock-taking steps name their holders themselves
# (dbops.p2_lock: message, and DETAIL {"holders", "action", "autovacuum"} as jsonb). For any other
# statement a LockWatch looks from a second connection, while the statement runs, whether it waits for
# a lock and who blocks it; the retry notices and the final error name them. When the only blockers are
# autovacuum workers not preventing wraparound, LockAssist makes PostgreSQL cancel them as the engine
# does: a probe, LOCK TABLE ONLY <relation> IN SHARE UPDATE EXCLUSIVE MODE (no application query waits
# behind that mode) with lock_timeout = deadlock_timeout + 500 ms; past deadlock_timeout PostgreSQL's
# deadlock check cancels a (non-wraparound) autovacuum blocking a lock request; then the statement is
# tried again at once. An anti-wraparound autovacuum is never cancelled: the step waits for it to end
# (wraparound_wait), polling pg_locks, never queueing the application behind a lock request meanwhile.
WATCH_SQL = """
SELECT w.relation, w.relation::regclass::text, w.mode, b.pid, b.usename, b.application_name, b.state,
       b.backend_type, round(extract(epoch FROM clock_timestamp() - b.xact_start)::numeric, 1)::float8,
       left(regexp_replace(b.query, '\\s+', ' ', 'g'), CASE WHEN b.backend_type = 'autovacuum worker' THEN 120 ELSE 60 END),
       coalesce(b.query, '') = '<insufficient privilege>',
       EXISTS (SELECT 1 FROM pg_stat_progress_vacuum v WHERE v.pid = b.pid),
       b.usesysid IS NULL AND b.backend_type IS NULL,
       (SELECT string_agg(DISTINCT format('%%s on %%s', l.mode, l.relation::regclass), ', ')
          FROM pg_locks l WHERE l.pid = b.pid AND l.granted AND l.relation = w.relation)
  FROM pg_stat_activity a
  CROSS JOIN LATERAL unnest(pg_blocking_pids(a.pid)) bp (pid)
  LEFT JOIN pg_stat_activity b ON b.pid = bp.pid
  LEFT JOIN LATERAL (SELECT l.relation, l.mode FROM pg_locks l
                      WHERE l.pid = a.pid AND NOT l.granted ORDER BY l.relation NULLS LAST LIMIT 1) w ON true
 WHERE a.pid = %s AND a.wait_event_type = 'Lock'"""
WATCH_KEYS = ("relid", "relation", "mode", "pid", "role", "application_name", "state", "backend_type", "xact_seconds",
              "query", "hidden", "vacuum", "hidden_worker", "locks")


def lock_detail(exc):
    """The engine's lock failure details (dbops.p2_lock's DETAIL jsonb) as a dict, else None."""
    import json
    diag = getattr(exc, "diag", None)
    text = (getattr(diag, "message_detail", None) or "").strip() if diag else ""
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "holders" in value else None


def holder_text(h: dict) -> str:
    """One blocker, as the engine's dbops.p2_lock_text says it."""
    locks = h.get("locks") or (("%s on %s" % (h.get("mode"), h.get("relation"))) if h.get("relation") else "")
    if isinstance(locks, list):   # the engine's holders: one lock per partition, the first three said
        locks = ", ".join(locks[:3]) + (" and %d more" % (len(locks) - 3) if len(locks) > 3 else "")
    if h.get("autovacuum"):
        return "pid %s (%sautovacuum worker%s%s%s)" % (
            h["pid"], "anti-wraparound " if h.get("wraparound") else "",
            ', "%s"' % h["query"] if h.get("query") and not h.get("hidden") else "",
            ", %s" % locks if locks else "",
            ", running %s s" % h["xact_seconds"] if h.get("xact_seconds") is not None else "")
    parts = []
    if h.get("role"):
        parts.append("role %s" % h["role"])
    if h.get("application_name") is not None:
        parts.append('application "%s"' % h["application_name"])
    if h.get("vacuum"):
        parts.append("VACUUM")
    if h.get("state"):
        parts.append(h["state"])
    if h.get("xact_seconds") is not None:
        parts.append("transaction %s s" % h["xact_seconds"])
    if locks:
        parts.append(locks)
    parts.append("query hidden from this role (not a member of pg_read_all_stats)" if h.get("hidden")
                 else 'query "%s"' % (h.get("query") or ""))
    return "pid %s (%s)" % (h["pid"], ", ".join(parts))


class LockWatch:
    """From its own connection, every `every` seconds, whether the session pid waits for a lock, and who
    blocks it (pg_blocking_pids only while it waits). observed() returns the blockers seen since mark()."""

    def __init__(self, params: dict, every: float = 0.1):
        import threading
        self.params, self.every, self.pid = params, every, None
        self._lock = threading.Lock()
        self._seen = {}
        self._stop = threading.Event()
        self._thread = None
        self._conn = None

    def start(self):
        import threading
        try:
            self._conn = connect(self.params, "scanner-dbops lock watch")
        except RuntimeError:
            return self   # nothing to watch with: the step runs anyway, its errors just name no holder
        self._thread = threading.Thread(target=self._loop, name="lock-watch", daemon=True)
        self._thread.start()
        return self

    def mark(self, pid=None):
        with self._lock:
            if pid is not None:
                self.pid = pid
            self._seen = {}

    def observed(self) -> list:
        with self._lock:
            return list(self._seen.values())

    def _loop(self):
        while not self._stop.wait(self.every):
            pid = self.pid
            if pid is None:
                continue
            try:
                with self._conn.cursor() as cur:
                    cur.execute(WATCH_SQL, (pid,))
                    rows = cur.fetchall()
            except Exception:  # pylint: disable=broad-except
                return
            if not rows:
                continue
            with self._lock:
                if pid != self.pid:
                    continue
                for row in rows:
                    h = dict(zip(WATCH_KEYS, row))
                    if h["pid"] is None:
                        continue
                    h["autovacuum"] = h["backend_type"] == "autovacuum worker" or bool(h["vacuum"] and h["hidden_worker"])
                    h["wraparound"] = bool(h["autovacuum"] and "(to prevent wraparound)" in (h["query"] or ""))
                    self._seen[h["pid"]] = h

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._conn is not None:
            self._conn.close()


class LockAssist:
    """Used by scanner.dbops.step and migrate around their retry loops (see above)."""

    def __init__(self, params: dict, wraparound_wait: float = 0.0, max_probes: int = 3, prefix: str = ""):
        self.watch = LockWatch(params).start()
        self.wraparound_wait, self.max_probes, self.prefix = wraparound_wait, max_probes, prefix
        self.conn = None
        self.probes = 0
        self.waited = 0.0
        self.notes = []          # "autovacuum: ..." lines: what was done about an autovacuum

    def attach(self, conn):
        self.conn = conn
        self.watch.mark(conn.get_backend_pid())

    def mark(self):
        """A new attempt starts: forget what the last one waited for."""
        self.watch.mark()

    def close(self):
        self.watch.stop()

    def holders(self, exc) -> list:
        det = lock_detail(exc)
        if det is not None:
            return list(det.get("holders") or [])
        return self.watch.observed() if sqlstate(exc) == LOCK_NOT_AVAILABLE else []

    def describe(self, exc) -> str:
        """pg_error_text, naming the blockers the watch saw when the error does not name them itself."""
        text = pg_error_text(exc)
        if sqlstate(exc) != LOCK_NOT_AVAILABLE or lock_detail(exc) is not None:
            return text
        seen = self.watch.observed()
        if not seen:
            return text + "; the lock's holder(s) could not be seen (the wait was shorter than the watch's interval)"
        return text + "; held by " + "; ".join(holder_text(h) for h in seen)

    def _note(self, text):
        self.notes.append("autovacuum: " + self.prefix + text)

    def free_wait(self, exc):
        """with_retries' free_wait: 0 after PostgreSQL cancelled a blocking autovacuum or an anti-wraparound
        one was waited out; None otherwise (an ordinary retry)."""
        if sqlstate(exc) != LOCK_NOT_AVAILABLE or self.conn is None or self.conn.closed:
            return None
        det = lock_detail(exc)
        if det is not None:
            if det.get("action") in ("wait_wraparound", "not_cancelled"):
                return self._wait_out(det.get("holders") or [])
            return None
        seen = self.watch.observed()
        if not seen or not all(h.get("autovacuum") for h in seen):
            return None
        if any(h.get("wraparound") for h in seen):
            return self._wait_out(seen)
        if self.probes >= self.max_probes:
            return None
        return self._probe(seen)

    def _relids(self, holders):
        out = set()
        for h in holders:
            for r in (h.get("relids") or ([h["relid"]] if h.get("relid") else [])):
                out.add(int(r))
        return sorted(out)

    def _probe(self, seen):
        relids = self._relids(seen)
        if not relids:
            return None
        self.probes += 1
        with self.conn.cursor() as cur:
            cur.execute("SELECT setting::float8 FROM pg_settings WHERE name = 'deadlock_timeout'")
            dt = cur.fetchone()[0]
            if dt > 5000:
                return None
            cur.execute("SELECT c.oid::regclass::text FROM pg_class c WHERE c.oid = ANY(%s::oid[]) "
                        "AND c.relkind IN ('r', 'p', 'm') ORDER BY c.oid", (relids,))
            names = [r[0] for r in cur.fetchall()]
            if not names:
                return None   # a TOAST table's autovacuum: LOCK TABLE cannot wait for it
            results = []
            for name in names:
                t0 = time.monotonic()
                cur.execute("BEGIN")
                try:
                    cur.execute("SET LOCAL lock_timeout = %s", ("%dms" % (dt + 500),))
                    cur.execute("LOCK TABLE ONLY %s IN SHARE UPDATE EXCLUSIVE MODE" % name)
                    granted = True
                except psycopg2.Error as exc:
                    if sqlstate(exc) != LOCK_NOT_AVAILABLE:
                        raise
                    granted = False
                finally:
                    cur.execute("ROLLBACK")
                results.append((name, granted, (time.monotonic() - t0) * 1000))
        who = "; ".join(holder_text(h) for h in seen)
        waited = max(r[2] for r in results)
        if not all(r[1] for r in results):
            self._note("%s was not cancelled by PostgreSQL when a probe waited %.0f ms (deadlock_timeout %.0f ms): "
                       "probably an anti-wraparound one" % (who, waited, dt))
            return None
        if waited >= 0.9 * dt:
            self._note("the only holder was %s: cancelled it (not an anti-wraparound one): a probe waited %.0f ms for "
                       "SHARE UPDATE EXCLUSIVE on %s (no application query waits behind that mode), past deadlock_timeout "
                       "(%.0f ms), so PostgreSQL's deadlock check cancelled the autovacuum; it runs again later"
                       % (who, waited, ", ".join(r[0] for r in results), dt))
        else:
            self._note("the only holder was %s: it finished while a probe waited %.0f ms" % (who, waited))
        return 0.0

    def _wait_out(self, holders):
        """Poll (no lock request: nobody queues behind it) until the holders no longer hold those relations,
        within wraparound_wait seconds in all; 0 then, None when the budget is used up."""
        pids = sorted({int(h["pid"]) for h in holders if h.get("pid") is not None})
        relids = self._relids(holders)
        if not pids or self.waited >= self.wraparound_wait:
            return None
        who = "; ".join(holder_text(h) for h in holders)
        t0 = time.monotonic()
        while True:
            with self.conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_locks WHERE granted AND pid = ANY(%s) AND (relation = ANY(%s::oid[]) "
                            "OR cardinality(%s::oid[]) = 0)", (pids, relids, relids))
                still = cur.fetchone()[0]
            spent = time.monotonic() - t0
            if not still:
                self.waited += spent
                self._note("waited %.0f s for %s to finish: an autovacuum preventing transaction ID wraparound is "
                           "never cancelled" % (spent, who))
                return 0.0
            if self.waited + spent >= self.wraparound_wait:
                self.waited += spent
                self._note("waited %.0f s for %s (an anti-wraparound autovacuum, never cancelled): still running after "
                           "wraparound_wait = %.0f s" % (self.waited, who, self.wraparound_wait))
                return None
            time.sleep(min(2.0, max(0.1, self.wraparound_wait - self.waited - spent)))
