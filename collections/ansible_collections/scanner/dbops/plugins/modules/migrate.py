#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Apply or roll back versioned SQL files through a ledger table, safely on a busy database."""
from __future__ import annotations

DOCUMENTATION = r"""
module: migrate
short_description: Apply versioned and repeatable SQL through a ledger, with lock_timeout and retries
description:
  - Versioned migrations (C(kind=versioned), state such as tables and indexes) are applied once, in
    order, and recorded in C(<ledger_schema>.schema_migrations) (version, checksum, duration, who,
    when, run id) in the same transaction as the file when the file is transactional.
  - Refuses to continue when an applied migration's checksum differs from the file, unless the file
    declares that checksum on a line C(-- dbops:supersedes sha256:<hex>). Such a row is re-stamped
    (new checksum, the old one kept in C(superseded_checksums)) and nothing is re-run.
  - Repeatable files (C(kind=repeatable), code such as functions and views) run after the versioned
    ones, each in one transaction, whenever their checksum differs from their last row in
    C(<ledger_schema>.schema_repeatables) (an append-only history), and are recorded there.
  - Rolling back runs the C(kind=precondition) SQL first (it refuses by raising), then the
    repeatable files' rollbacks (newest first), then the versioned ones'; ledger rows of the
    phase whose file no longer exists (retired) are removed with it.
  - A file whose first line is C(-- dbops:no-transaction) runs statement by statement in
    autocommit (for CREATE INDEX CONCURRENTLY); before a
    C(CREATE INDEX CONCURRENTLY IF NOT EXISTS name) the INVALID index a failed build left behind
    is dropped, and every built index is checked to be valid.
  - Every statement runs under a short C(lock_timeout); lock timeouts, deadlocks and
    serialization failures are retried with exponential backoff, never waiting unbounded. Each retry
    notice and the final error name the sessions that held the lock (pid, role, application, state,
    transaction age, query); a lock held only by non-wraparound autovacuum workers is got past by making
    PostgreSQL cancel them (see scanner.dbops.step's C(wraparound_wait)).
  - PostgreSQL notices (RAISE NOTICE) are returned so the play can show them to the operator.
  - In check mode nothing is written; the pending (or to-be-rolled-back) versions are returned.
options:
  migrations:
    description:
      - Ordered list of migrations (kind, version, name, sql; rollback_sql for state=rolled_back), as the
        scanner.dbops.migrations lookup returns them. kind defaults to C(versioned).
    type: list
    elements: dict
    required: true
  state:
    description: C(applied) applies pending migrations; C(rolled_back) runs the rollback SQL of recorded ones, newest first.
    type: str
    choices: [applied, rolled_back]
    default: applied
  ledger_schema:
    description: Schema of the ledger tables.
    type: str
    default: dbops
  lock_timeout:
    description: PostgreSQL lock_timeout for every statement (e.g. C(2s)).
    type: str
    default: 2s
  concurrent_lock_timeout:
    description:
      - lock_timeout for C(CREATE/DROP INDEX CONCURRENTLY) and C(REINDEX CONCURRENTLY). Their waits
        (for older transactions to end) hold only a SHARE UPDATE EXCLUSIVE lock, which does not block
        the application's reads and writes, so they may wait longer than DDL that would queue traffic.
    type: str
    default: 5min
  statement_timeout:
    description: PostgreSQL statement_timeout for every statement (C(0) = none).
    type: str
    default: "0"
  retries:
    description: Retries after a lock timeout / deadlock / serialization failure.
    type: int
    default: 8
  retry_delay:
    description: First backoff in seconds, doubled on each retry (capped at 30 s).
    type: float
    default: 0.5
  include_unrecorded:
    description: With state=rolled_back, also run the (idempotent) rollback of migrations missing from the ledger, e.g. after a partial failure.
    type: bool
    default: false
  run_id:
    description: The run's id, recorded in the ledger.
    type: str
    default: ""
  run_lock_id:
    description:
      - The run id of the run lock this run holds (a fencing token). When set (and not in check mode), the
        module first renews this run's lease in C(ledger_schema).run_lock and refuses to apply anything if
        another run holds the lock now; while it applies files, a second connection renews the lease every
        third of its length and cancels the statement running when the lock was lost.
      - The lock is also checked inside each file's transaction (the lock row read C(FOR SHARE) right after
        C(BEGIN), held until the file's C(COMMIT), so a takeover waits for the file), and right before each
        statement of a C(-- dbops:no-transaction) file and before the ledger is written; once another run holds
        the lock the module stops before the next file, having applied nothing of it.
      - Set by the collection's action plugin from the fact C(run_lock_run_id) while C(run_lock_held) is true.
    type: str
    default: ""
  applied_by:
    description: Who runs it (operator@controller); recorded in the ledger with current_user.
    type: str
    default: ""
extends_documentation_fragment: []
notes:
  - Connection options are those of community.postgresql (login_host, login_port, login_user,
    login_password, login_db, ssl_mode, ca_cert).
"""

RETURN = r"""
pending: {description: versions and repeatable files pending (or to roll back) before this run, type: list}
repeatable_pending: {description: the repeatable files among them, type: list}
restamped: {description: versioned rows re-stamped (a superseded checksum), type: list}
retired: {description: ledger rows of the phase whose file no longer exists, type: list}
applied: {description: per migration run, version/name/duration_ms/statements/retries/execution, type: list}
notices: {description: PostgreSQL notices raised while running, type: list}
ledger: {description: ledger rows after the run, type: list}
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.scanner.dbops.plugins.module_utils.pg import (CONNECTION_ARGSPEC, HAS_PSYCOPG2, LeaseKeeper, LeaseLost,
                                                                       LockAssist, connect, fence_autocommit, fence_check,
                                                                       pg_error_text, with_retries)
from ansible_collections.scanner.dbops.plugins.module_utils.sql import (checksum, concurrent_index, is_concurrent,
                                                                         is_no_transaction, split_statements,
                                                                         supersedes)

try:
    import psycopg2
    from psycopg2 import sql as pgsql
except ImportError:  # pragma: no cover
    pass

LEDGER_DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    execution   text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  text NOT NULL,
    duration_ms bigint NOT NULL,
    run_id      text
);
COMMENT ON TABLE {schema}.schema_migrations IS
    'scanner-dbops migration ledger: one row per applied files/sql/NNN_MM_*.sql (checksum = sha256 of the file)';
ALTER TABLE {schema}.schema_migrations ADD COLUMN IF NOT EXISTS superseded_checksums text [] NOT NULL DEFAULT '{{}}';
CREATE TABLE IF NOT EXISTS {schema}.schema_repeatables (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    action      text NOT NULL CHECK (action IN ('applied', 'rolled_back')),
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  text NOT NULL,
    duration_ms bigint NOT NULL,
    run_id      text
);
CREATE INDEX IF NOT EXISTS schema_repeatables_name_id_idx ON {schema}.schema_repeatables (name, id);
COMMENT ON TABLE {schema}.schema_repeatables IS
    'scanner-dbops ledger of repeatable files (files/sql/repeatable/NNN/*.sql): one row each time one is applied or rolled back; the last row per name is its state';
"""


KINDS = ("versioned", "precondition", "repeatable")


class MigrationError(Exception):
    pass


class Runner:
    def __init__(self, module):
        self.m = module
        self.p = module.params
        self.schema = self.p["ledger_schema"]
        self.notices = []
        self.conn = None
        self.assist = None   # LockAssist, once connected
        # the run lock's fencing token, checked inside each file's transaction (not in check mode)
        self.token = "" if module.check_mode else self.p.get("run_lock_id") or ""

    def fence(self, cur, what):
        if self.token:
            fence_check(cur, self.schema, self.token, what)

    def fence_now(self, what):
        if self.token:
            fence_autocommit(self.conn, self.schema, self.token, what)

    def describe(self, exc):
        return self.assist.describe(exc) if self.assist else pg_error_text(exc)

    def retry_kw(self):
        return dict(free_wait=self.assist.free_wait) if self.assist else {}

    def mark(self):
        """A new attempt: forget the lock waits the last one saw."""
        if self.assist:
            self.assist.mark()

    def flush_notes(self, version):
        """What was done about an autovacuum (LockAssist), into the notices."""
        if self.assist:
            for note in self.assist.notes:
                self.notices.append("%s | %s" % (version, note))
            del self.assist.notes[:]

    # ---- plumbing ------------------------------------------------------------------------
    def q(self, text):
        return pgsql.SQL(text).format(schema=pgsql.Identifier(self.schema))

    def fetch(self, query, args=None):
        with self.conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else []

    def collect_notices(self, version):
        for text in self.conn.notices.drain():
            self.notices.append("%s | %s" % (version, text))

    def session_settings(self, cur, local=False, concurrent=False):
        scope = "LOCAL " if local else ""
        timeout = self.p["concurrent_lock_timeout"] if concurrent else self.p["lock_timeout"]
        cur.execute("SET %slock_timeout = %%s" % scope, (timeout,))
        cur.execute("SET %sstatement_timeout = %%s" % scope, (self.p["statement_timeout"],))

    # ---- ledger --------------------------------------------------------------------------
    def relation_exists(self, name):
        return self.fetch("SELECT to_regclass(%s) IS NOT NULL",
                          ("%s.%s" % (pgsql.Identifier(self.schema).as_string(self.conn), name),))[0][0]

    def ledger_rows(self):
        if not self.relation_exists("schema_migrations"):
            return {}
        rows = self.fetch(self.q("SELECT version, name, checksum, applied_at::text, applied_by, duration_ms, "
                                 "execution, run_id FROM {schema}.schema_migrations ORDER BY version"))
        keys = ("version", "name", "checksum", "applied_at", "applied_by", "duration_ms", "execution", "run_id")
        return {r[0]: dict(zip(keys, r)) for r in rows}

    def repeatable_rows(self):
        """The last row of each repeatable file: its state."""
        if not self.relation_exists("schema_repeatables"):
            return {}
        rows = self.fetch(self.q("SELECT DISTINCT ON (name) name, checksum, action, applied_at::text, applied_by "
                                 "FROM {schema}.schema_repeatables ORDER BY name, id DESC"))
        keys = ("name", "checksum", "action", "applied_at", "applied_by")
        return {r[0]: dict(zip(keys, r)) for r in rows}

    def ensure_ledger(self):
        with self.conn.cursor() as cur:
            cur.execute(self.q(LEDGER_DDL))
        self.conn.notices.drain()  # "schema already exists, skipping" is not news for the operator

    def who(self):
        by = self.p["applied_by"] or "unknown"
        return "%s (db role %s)" % (by, self.p["login_user"])

    # ---- what each run writes into the ledger, in the same transaction as the file ----------
    def record_versioned(self, mig, execution):
        def op(cur, duration_ms):
            cur.execute(self.q("INSERT INTO {schema}.schema_migrations "
                               "(version, name, checksum, execution, applied_by, duration_ms, run_id) "
                               "VALUES (%s, %s, %s, %s, %s, %s, %s)"),
                        (mig["version"], mig["name"], checksum(mig["sql"]), execution, self.who(), duration_ms,
                         self.p["run_id"]))
        return op

    def delete_versioned(self, mig):
        def op(cur, duration_ms):
            cur.execute(self.q("DELETE FROM {schema}.schema_migrations WHERE version = %s"), (mig["version"],))
        return op

    def record_repeatable(self, mig, action):
        def op(cur, duration_ms):
            cur.execute(self.q("INSERT INTO {schema}.schema_repeatables "
                               "(name, checksum, action, applied_by, duration_ms, run_id) "
                               "VALUES (%s, %s, %s, %s, %s, %s)"),
                        (mig["version"], checksum(mig["sql"]), action, self.who(), duration_ms, self.p["run_id"]))
        return op

    # ---- execution -----------------------------------------------------------------------
    def run_statement(self, version, statement, retries_box):
        """Autocommit one statement with lock_timeout + retries; rebuild INVALID CIC leftovers."""
        cic = concurrent_index(statement)
        concurrent = is_concurrent(statement)

        def attempt():
            self.mark()
            self.fence_now("before statement `%s` of %s: it was not run" % (statement[:60], version))
            with self.conn.cursor() as cur:
                self.session_settings(cur, concurrent=concurrent)
                if cic:
                    self.drop_invalid_index(cur, version, *cic)
                cur.execute(statement)
                if cic:
                    self.assert_valid_index(cur, *cic)

        def on_retry(n, wait, exc):
            retries_box[0] += 1
            self.flush_notes(version)
            self.notices.append("%s | retry %d in %.1fs after: %s" % (version, n, wait, self.describe(exc)))

        try:
            with_retries(attempt, self.p["retries"], self.p["retry_delay"], on_retry=on_retry, **self.retry_kw())
        finally:
            self.flush_notes(version)
            self.collect_notices(version)

    def drop_invalid_index(self, cur, version, schema, name):
        cur.execute("""SELECT n.nspname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE c.relname = %s AND n.nspname = coalesce(%s, current_schema())
                         AND NOT i.indisvalid""", (name, schema))
        row = cur.fetchone()
        if row:
            self.notices.append("%s | index %s.%s is INVALID (left by an interrupted build): dropping and rebuilding"
                                % (version, row[0], name))
            cur.execute(pgsql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}.{}").format(
                pgsql.Identifier(row[0]), pgsql.Identifier(name)))

    @staticmethod
    def assert_valid_index(cur, schema, name):
        cur.execute("""SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE c.relname = %s AND n.nspname = coalesce(%s, current_schema())""", (name, schema))
        row = cur.fetchone()
        if not row or not row[0]:
            raise MigrationError("index %s exists but is not valid after CREATE INDEX CONCURRENTLY" % name)

    def apply_one(self, mig, sql_text, ledger_op=None):
        """Run one file and, in the same transaction when it has one, its ledger write."""
        version = mig["version"]
        retries_box = [0]
        t0 = time.monotonic()
        statements = split_statements(sql_text)

        def elapsed_ms():
            return int((time.monotonic() - t0) * 1000)

        def on_retry(n, wait, exc):
            retries_box[0] += 1
            self.flush_notes(version)
            self.notices.append("%s | retry %d in %.1fs after: %s" % (version, n, wait, self.describe(exc)))

        if is_no_transaction(sql_text):
            execution = "statement-by-statement"
            for idx, (stmt, line) in enumerate(statements, 1):
                try:
                    self.run_statement(version, stmt, retries_box)
                except (psycopg2.Error, MigrationError) as exc:
                    raise MigrationError(
                        "%s: statement %d of %d (line %d) failed: %s. The statements before it were applied "
                        "(autocommit file); the file is idempotent: fix the cause and re-run to continue."
                        % (mig.get("path") or version, idx, len(statements), line,
                           self.describe(exc) if isinstance(exc, psycopg2.Error) else exc)) from None
            if ledger_op:
                with self.conn.cursor() as cur:
                    ledger_op(cur, elapsed_ms())
        else:
            execution = "transaction"

            def attempt():
                self.mark()
                try:
                    with self.conn.cursor() as cur:
                        cur.execute("BEGIN")
                        self.fence(cur, "inside the transaction of %s, before it ran: nothing of it was applied (the "
                                        "files before it are applied and recorded)" % (mig.get("path") or version))
                        self.session_settings(cur, local=True)
                        cur.execute(sql_text)
                        if ledger_op:
                            ledger_op(cur, elapsed_ms())
                        cur.execute("COMMIT")
                except BaseException:
                    self.conn.rollback() if not self.conn.autocommit else self._abort()
                    raise

            try:
                with_retries(attempt, self.p["retries"], self.p["retry_delay"], on_retry=on_retry, **self.retry_kw())
            except psycopg2.Error as exc:
                raise MigrationError("%s failed and was rolled back (nothing from this file was applied): %s"
                                     % (mig.get("path") or version, self.describe(exc))) from None
            finally:
                self.flush_notes(version)
                self.collect_notices(version)
        return dict(version=version, name=mig["name"], kind=mig.get("kind", "versioned"), execution=execution,
                    statements=len(statements), retries=retries_box[0], duration_ms=elapsed_ms())

    def _abort(self):
        try:
            with self.conn.cursor() as cur:
                cur.execute("ROLLBACK")
        except psycopg2.Error:
            pass

    # ---- entry points --------------------------------------------------------------------
    def run(self):
        migrations = [dict(m, kind=m.get("kind") or "versioned") for m in self.p["migrations"]]
        for mig in migrations:
            if mig["kind"] not in KINDS:
                raise MigrationError("unknown migration kind %r for %s (expected one of %s)"
                                     % (mig["kind"], mig.get("version"), ", ".join(KINDS)))
            needed = ("version", "name") + (("sql",) if mig["kind"] != "precondition" else ("rollback_sql",))
            for key in needed:
                if not mig.get(key):
                    raise MigrationError("every migration needs version, name and sql; got keys %s" % sorted(mig))
        versions = [m["version"] for m in migrations]
        if len(set(versions)) != len(versions):
            raise MigrationError("duplicate migration versions: %s" % versions)
        plan = Plan(migrations, self.ledger_rows(), self.repeatable_rows())
        if self.p["state"] == "applied":
            return self.apply(plan)
        return self.rollback(plan)

    def apply(self, plan):
        drift, restamp = [], []
        for mig in plan.versioned:
            row = plan.ledger.get(mig["version"])
            if not row or row["checksum"] == checksum(mig["sql"]):
                continue
            if row["checksum"] in supersedes(mig["sql"]):
                restamp.append((mig, row))
                continue
            drift.append("%s (applied %s by %s, ledger sha256 %s..., file now %s...)"
                         % (mig.get("path") or mig["version"], row["applied_at"], row["applied_by"],
                            row["checksum"][:12], checksum(mig["sql"])[:12]))
        if drift:
            raise MigrationError(
                "refusing to continue: applied migration files were changed after they were applied: %s. "
                "Restore the applied version of the file(s) (git) and put new changes in a new NNN_MM file "
                "(code belongs in files/sql/repeatable/, which may change)." % "; ".join(drift))
        pending = [m for m in plan.versioned if m["version"] not in plan.ledger]
        repeatable = [m for m in plan.repeatable if plan.repeatable_changed(m)]
        result = dict(changed=bool(pending or repeatable or restamp),
                      pending=[m["version"] for m in pending + repeatable],
                      repeatable_pending=[m["version"] for m in repeatable],
                      restamped=[m["version"] for m, _ in restamp], retired=plan.retired(), applied=[])
        if self.m.check_mode or not result["changed"]:
            result["ledger"] = list(plan.ledger.values())
            return result
        self.fence_now("before applying anything of this run's migrations")
        self.ensure_ledger()
        with self.conn.cursor() as cur:
            for mig, row in restamp:
                cur.execute(self.q("UPDATE {schema}.schema_migrations SET checksum = %s, "
                                   "superseded_checksums = superseded_checksums || %s::text "
                                   "WHERE version = %s AND checksum = %s"),
                            (checksum(mig["sql"]), row["checksum"], mig["version"], row["checksum"]))
                self.notices.append("%s | ledger row re-stamped: the file supersedes the applied text "
                                    "(sha256 %s... -> %s...); nothing re-run"
                                    % (mig["version"], row["checksum"][:12], checksum(mig["sql"])[:12]))
        for mig in pending:
            result["applied"].append(self.apply_one(mig, mig["sql"], self.record_versioned(mig, self.execution(mig))))
        for mig in repeatable:
            result["applied"].append(self.apply_one(mig, mig["sql"], self.record_repeatable(mig, "applied")))
        result["ledger"] = list(self.ledger_rows().values())
        return result

    @staticmethod
    def execution(mig):
        return "statement-by-statement" if is_no_transaction(mig["sql"]) else "transaction"

    def rollback(self, plan):
        unrecorded = self.p["include_unrecorded"]
        versioned = [m for m in reversed(plan.versioned) if m["version"] in plan.ledger or unrecorded]
        # A phase applied before its code moved to repeatable files has versioned rows only: its code
        # is rolled back with it (the rollback files drop IF EXISTS).
        repeatable = [m for m in reversed(plan.repeatable)
                      if plan.repeatable_applied(m) or unrecorded or versioned]
        for mig in repeatable + versioned:
            if not mig.get("rollback_sql"):
                where = ("rollback/repeatable/" if mig["kind"] == "repeatable" else "rollback/")
                raise MigrationError("no rollback SQL for %s (expected files/sql/%s%s)"
                                     % (mig["version"], where, mig.get("path", mig["version"]).split("/")[-1]))
        retired = plan.retired()
        result = dict(changed=bool(repeatable or versioned or retired),
                      pending=[m["version"] for m in repeatable + versioned],
                      repeatable_pending=[m["version"] for m in repeatable], restamped=[], retired=retired,
                      applied=[])
        if self.m.check_mode or not result["changed"]:
            result["ledger"] = list(plan.ledger.values())
            return result
        self.fence_now("before rolling back anything")
        for guard in plan.preconditions:
            self.apply_one(guard, guard["rollback_sql"])
        for mig in repeatable:
            op = self.record_repeatable(mig, "rolled_back") if mig["version"] in plan.repeatables else None
            result["applied"].append(self.apply_one(mig, mig["rollback_sql"], op))
        for mig in versioned:
            op = self.delete_versioned(mig) if mig["version"] in plan.ledger else None
            result["applied"].append(self.apply_one(mig, mig["rollback_sql"], op))
        if retired:
            with self.conn.cursor() as cur:
                cur.execute(self.q("DELETE FROM {schema}.schema_migrations WHERE version = ANY(%s)"), (retired,))
            self.notices.append("ledger rows removed with the phase (their files were retired): %s"
                                % ", ".join(retired))
        result["ledger"] = list(self.ledger_rows().values())
        return result


class Plan:
    """The phase's files split by kind, next to what the ledger says of them."""

    def __init__(self, migrations, ledger, repeatables):
        self.ledger = ledger
        self.repeatables = repeatables
        self.versioned = [m for m in migrations if m["kind"] == "versioned"]
        self.preconditions = [m for m in migrations if m["kind"] == "precondition"]
        self.repeatable = [m for m in migrations if m["kind"] == "repeatable"]

    def repeatable_applied(self, mig):
        row = self.repeatables.get(mig["version"])
        return bool(row) and row["action"] == "applied"

    def repeatable_changed(self, mig):
        row = self.repeatables.get(mig["version"])
        return not self.repeatable_applied(mig) or row["checksum"] != checksum(mig["sql"])

    def retired(self):
        """Ledger rows of these phases whose versioned file is gone (its content moved elsewhere)."""
        phases = {m["version"][:3] for m in self.versioned}
        files = {m["version"] for m in self.versioned}
        return sorted(v for v in self.ledger if v[:3] in phases and v not in files)


def main():
    spec = dict(CONNECTION_ARGSPEC)
    spec.update(
        migrations=dict(type="list", elements="dict", required=True),
        state=dict(type="str", default="applied", choices=["applied", "rolled_back"]),
        ledger_schema=dict(type="str", default="dbops"),
        lock_timeout=dict(type="str", default="2s"),
        concurrent_lock_timeout=dict(type="str", default="5min"),
        statement_timeout=dict(type="str", default="0"),
        retries=dict(type="int", default=8),
        retry_delay=dict(type="float", default=0.5),
        include_unrecorded=dict(type="bool", default=False),
        run_id=dict(type="str", default=""),
        applied_by=dict(type="str", default=""),
        run_lock_id=dict(type="str", default=""),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    if not HAS_PSYCOPG2:
        module.fail_json(msg="psycopg2 is required on the host that runs this module (pip install psycopg2-binary)")
    runner = Runner(module)
    p = module.params
    keeper = None
    if p["run_lock_id"] and not module.check_mode:
        keeper = LeaseKeeper(p, p["ledger_schema"], p["run_lock_id"],
                             "applying phase %s" % ", ".join(sorted({m.get("version", "?")[:3] for m in p["migrations"]})),
                             on_lost=lambda: runner.conn is not None and runner.conn.cancel())
    try:
        if keeper:
            keeper.start()
        runner.conn = connect(module.params, "scanner-dbops migrate")
        if not module.check_mode:
            runner.assist = LockAssist(p, wraparound_wait=0.0, prefix="")
            runner.assist.attach(runner.conn)
        result = runner.run()
    except (RuntimeError, MigrationError, LeaseLost) as exc:
        module.fail_json(msg=(keeper.stop() if keeper else None) or str(exc), notices=runner.notices,
                         lock_lost=isinstance(exc, LeaseLost) or bool(keeper and keeper.lost))
    except psycopg2.Error as exc:
        lost = keeper.stop() if keeper else None
        module.fail_json(msg=lost or pg_error_text(exc), notices=runner.notices, lock_lost=bool(lost))
    finally:
        if runner.assist is not None:
            runner.assist.close()
        if runner.conn is not None:
            runner.conn.close()
    lost = keeper.stop() if keeper else None
    if lost:
        module.fail_json(msg=lost, notices=runner.notices, lock_lost=True)
    if keeper:
        result["lease_renewals"] = keeper.renewals
    result["notices"] = runner.notices
    module.exit_json(**result)


if __name__ == "__main__":
    main()
