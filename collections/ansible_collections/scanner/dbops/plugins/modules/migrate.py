#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Apply or roll back versioned SQL files through a ledger table, safely on a busy database."""
from __future__ import annotations

DOCUMENTATION = r"""
module: migrate
short_description: Apply versioned SQL migrations through a ledger, with lock_timeout and retries
description:
  - Reads the ledger table C(<ledger_schema>.schema_migrations) and applies, in order, only the
    migrations that are not recorded there; records each one (version, checksum, duration, who,
    when, run id) in the same transaction as the file when the file is transactional.
  - Refuses to continue when an applied migration's checksum differs from the file.
  - A file whose first line is C(-- dbops:no-transaction) runs statement by statement in
    autocommit (for CREATE INDEX CONCURRENTLY); before a
    C(CREATE INDEX CONCURRENTLY IF NOT EXISTS name) the INVALID index a failed build left behind
    is dropped, and every built index is checked to be valid.
  - Every statement runs under a short C(lock_timeout); lock timeouts, deadlocks and
    serialization failures are retried with exponential backoff, never waiting unbounded.
  - PostgreSQL notices (RAISE NOTICE) are returned so the play can show them to the operator.
  - In check mode nothing is written; the pending (or to-be-rolled-back) versions are returned.
options:
  migrations:
    description: Ordered list of migrations (version, name, sql; rollback_sql for state=rolled_back).
    type: list
    elements: dict
    required: true
  state:
    description: C(applied) applies pending migrations; C(rolled_back) runs the rollback SQL of recorded ones, newest first.
    type: str
    choices: [applied, rolled_back]
    default: applied
  ledger_schema:
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
pending: {description: versions pending (or to roll back) before this run, type: list}
applied: {description: per migration run, version/name/duration_ms/statements/retries/execution, type: list}
notices: {description: PostgreSQL notices raised while running, type: list}
ledger: {description: ledger rows after the run, type: list}
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.scanner.dbops.plugins.module_utils.pg import (CONNECTION_ARGSPEC, HAS_PSYCOPG2, connect,
                                           pg_error_text, with_retries)
from ansible_collections.scanner.dbops.plugins.module_utils.sql import (checksum, concurrent_index, is_concurrent,
                                            is_no_transaction, split_statements)

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
"""


class MigrationError(Exception):
    pass


class Runner:
    def __init__(self, module):
        self.m = module
        self.p = module.params
        self.schema = self.p["ledger_schema"]
        self.notices = []
        self.conn = None

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
    def ledger_exists(self):
        return self.fetch("SELECT to_regclass(%s) IS NOT NULL",
                          ("%s.schema_migrations" % pgsql.Identifier(self.schema).as_string(self.conn),))[0][0]

    def ledger_rows(self):
        if not self.ledger_exists():
            return {}
        rows = self.fetch(self.q("SELECT version, name, checksum, applied_at::text, applied_by, duration_ms, "
                                 "execution, run_id FROM {schema}.schema_migrations ORDER BY version"))
        keys = ("version", "name", "checksum", "applied_at", "applied_by", "duration_ms", "execution", "run_id")
        return {r[0]: dict(zip(keys, r)) for r in rows}

    def ensure_ledger(self):
        with self.conn.cursor() as cur:
            cur.execute(self.q(LEDGER_DDL))
        self.conn.notices.drain()  # "schema already exists, skipping" is not news for the operator

    def record_sql(self):
        return self.q("INSERT INTO {schema}.schema_migrations "
                      "(version, name, checksum, execution, applied_by, duration_ms, run_id) "
                      "VALUES (%s, %s, %s, %s, %s, %s, %s)")

    def who(self):
        by = self.p["applied_by"] or "unknown"
        return "%s (db role %s)" % (by, self.p["login_user"])

    # ---- execution -----------------------------------------------------------------------
    def run_statement(self, version, statement, line, retries_box):
        """Autocommit one statement with lock_timeout + retries; rebuild INVALID CIC leftovers."""
        cic = concurrent_index(statement)
        concurrent = is_concurrent(statement)

        def attempt():
            with self.conn.cursor() as cur:
                self.session_settings(cur, concurrent=concurrent)
                if cic:
                    self.drop_invalid_index(cur, version, *cic)
                cur.execute(statement)
                if cic:
                    self.assert_valid_index(cur, *cic)

        def on_retry(n, wait, exc):
            retries_box[0] += 1
            self.notices.append("%s | retry %d in %.1fs after: %s" % (version, n, wait, pg_error_text(exc)))

        try:
            with_retries(attempt, self.p["retries"], self.p["retry_delay"], on_retry=on_retry)
        finally:
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

    def apply_one(self, mig, sql_text, record=True, delete=False):
        """Run one file; record (or delete) its ledger row. Returns a result dict."""
        version = mig["version"]
        retries_box = [0]
        t0 = time.monotonic()
        statements = split_statements(sql_text)
        if is_no_transaction(sql_text):
            execution = "statement-by-statement"
            for idx, (stmt, line) in enumerate(statements, 1):
                try:
                    self.run_statement(version, stmt, line, retries_box)
                except (psycopg2.Error, MigrationError) as exc:
                    raise MigrationError(
                        "%s: statement %d of %d (line %d) failed: %s. The statements before it were applied "
                        "(autocommit file); the file is idempotent: fix the cause and re-run to continue."
                        % (mig.get("path") or version, idx, len(statements), line,
                           pg_error_text(exc) if isinstance(exc, psycopg2.Error) else exc)) from None
            with self.conn.cursor() as cur:
                if record:
                    cur.execute(self.record_sql(), (version, mig["name"], checksum(mig["sql"]), execution,
                                                    self.who(), int((time.monotonic() - t0) * 1000),
                                                    self.p["run_id"]))
                if delete:
                    cur.execute(self.q("DELETE FROM {schema}.schema_migrations WHERE version = %s"), (version,))
        else:
            execution = "transaction"

            def attempt():
                try:
                    with self.conn.cursor() as cur:
                        cur.execute("BEGIN")
                        self.session_settings(cur, local=True)
                        cur.execute(sql_text)
                        if record:
                            cur.execute(self.record_sql(), (version, mig["name"], checksum(mig["sql"]), execution,
                                                            self.who(), int((time.monotonic() - t0) * 1000),
                                                            self.p["run_id"]))
                        if delete:
                            cur.execute(self.q("DELETE FROM {schema}.schema_migrations WHERE version = %s"),
                                        (version,))
                        cur.execute("COMMIT")
                except BaseException:
                    self.conn.rollback() if not self.conn.autocommit else self._abort()
                    raise

            def on_retry(n, wait, exc):
                retries_box[0] += 1
                self.notices.append("%s | retry %d in %.1fs after: %s" % (version, n, wait, pg_error_text(exc)))

            try:
                with_retries(attempt, self.p["retries"], self.p["retry_delay"], on_retry=on_retry)
            except psycopg2.Error as exc:
                raise MigrationError("%s failed and was rolled back (nothing from this file was applied): %s"
                                     % (mig.get("path") or version, pg_error_text(exc))) from None
            finally:
                self.collect_notices(version)
        return dict(version=version, name=mig["name"], execution=execution, statements=len(statements),
                    retries=retries_box[0], duration_ms=int((time.monotonic() - t0) * 1000))

    def _abort(self):
        try:
            with self.conn.cursor() as cur:
                cur.execute("ROLLBACK")
        except psycopg2.Error:
            pass

    # ---- entry points --------------------------------------------------------------------
    def run(self):
        migrations = self.p["migrations"]
        for mig in migrations:
            for key in ("version", "name", "sql"):
                if not mig.get(key):
                    raise MigrationError("every migration needs version, name and sql; got keys %s" % sorted(mig))
        versions = [m["version"] for m in migrations]
        if len(set(versions)) != len(versions):
            raise MigrationError("duplicate migration versions: %s" % versions)
        ledger = self.ledger_rows()
        if self.p["state"] == "applied":
            return self.apply(migrations, ledger)
        return self.rollback(migrations, ledger)

    def apply(self, migrations, ledger):
        drift = []
        for mig in migrations:
            row = ledger.get(mig["version"])
            if row and row["checksum"] != checksum(mig["sql"]):
                drift.append("%s (applied %s by %s, ledger sha256 %s..., file now %s...)"
                             % (mig.get("path") or mig["version"], row["applied_at"], row["applied_by"],
                                row["checksum"][:12], checksum(mig["sql"])[:12]))
        if drift:
            raise MigrationError(
                "refusing to continue: applied migration files were changed after they were applied: %s. "
                "Restore the applied version of the file(s) (git) and put new changes in a new NNN_MM file."
                % "; ".join(drift))
        pending = [m for m in migrations if m["version"] not in ledger]
        result = dict(changed=bool(pending), pending=[m["version"] for m in pending], applied=[])
        if self.m.check_mode or not pending:
            result["ledger"] = list(ledger.values())
            return result
        self.ensure_ledger()
        for mig in pending:
            result["applied"].append(self.apply_one(mig, mig["sql"], record=True))
        result["ledger"] = list(self.ledger_rows().values())
        return result

    def rollback(self, migrations, ledger):
        todo = [m for m in reversed(migrations)
                if m["version"] in ledger or self.p["include_unrecorded"]]
        for mig in todo:
            if not mig.get("rollback_sql"):
                raise MigrationError("no rollback SQL for %s (expected files/sql/rollback/%s)"
                                     % (mig["version"], mig.get("path", mig["version"]).split("/")[-1]))
        result = dict(changed=bool(todo), pending=[m["version"] for m in todo], applied=[])
        if self.m.check_mode or not todo:
            result["ledger"] = list(ledger.values())
            return result
        if ledger:
            pass
        for mig in todo:
            result["applied"].append(self.apply_one(mig, mig["rollback_sql"], record=False,
                                                    delete=mig["version"] in ledger))
        result["ledger"] = list(self.ledger_rows().values())
        return result


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
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    if not HAS_PSYCOPG2:
        module.fail_json(msg="psycopg2 is required on the host that runs this module (pip install psycopg2-binary)")
    runner = Runner(module)
    try:
        runner.conn = connect(module.params, "scanner-dbops migrate")
        result = runner.run()
    except (RuntimeError, MigrationError) as exc:
        module.fail_json(msg=str(exc), notices=runner.notices)
    except psycopg2.Error as exc:
        module.fail_json(msg=pg_error_text(exc), notices=runner.notices)
    finally:
        if runner.conn is not None:
            runner.conn.close()
    result["notices"] = runner.notices
    module.exit_json(**result)


if __name__ == "__main__":
    main()
