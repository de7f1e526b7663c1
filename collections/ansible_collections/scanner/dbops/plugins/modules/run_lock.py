#!/usr/bin/python
# -*- coding: utf-8 -*-
"""A run lock (lease) for migrations that survives Ansible's one-connection-per-task model."""
from __future__ import annotations

DOCUMENTATION = r"""
module: run_lock
short_description: Take, renew, check or release the database-wide migration run lock
description:
  - Ansible opens a new database connection for every task, so a session advisory lock cannot
    span a run. This module keeps a lease row in C(<ledger_schema>.run_lock) instead, taken
    atomically with C(INSERT ... ON CONFLICT ... WHERE) so two runs can never both hold it.
  - A second run (a laptop while AWX runs) stops at once with the holder's name, run id, start
    time and when the lease expires. A crashed run's lease expires after C(ttl_seconds) without a
    renewal and is then taken over (reported), so it never blocks forever.
  - The lock row is transient bookkeeping of the current run and is removed at its end, so the
    module reports C(changed=false); a run that changes nothing in the database says so.
options:
  state:
    description:
      - C(present) takes or renews the lease, C(absent) releases it (only if this run holds it), C(check) only reports.
      - C(hold) keeps the lease of this run while an Ansible async job runs (pg_dump); it renews the lease every third
        of its length until C(async_results_file) shows the job finished, and fails at once (without taking the lock)
        if another run holds it.
    type: str
    choices: [present, absent, check, hold]
    default: present
  async_results_file: {type: path, description: "state=hold: the results_file of the async job to wait for."}
  timeout_seconds: {type: int, default: 86400, description: "state=hold: stop waiting (and fail) after this long."}
  run_id: {type: str, required: true, description: Unique id of this run.}
  holder: {type: str, default: "", description: Human-readable holder (operator@controller, playbook).}
  ttl_seconds: {type: int, default: 1800, description: Lease length; renewed by every call with state=present.}
  force: {type: bool, default: false, description: Take the lock even if another live run holds it (operator override).}
  ledger_schema: {type: str, default: dbops, description: Schema of the run_lock table.}
"""

RETURN = r"""
held_by: {description: holder of the lock after the call (or the current holder when refused), type: dict}
took_over: {description: details of a stale (expired) lease that was taken over, type: dict}
renewals: {description: "state=hold: how many times the lease was renewed", type: int}
"""

import json
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.scanner.dbops.plugins.module_utils.pg import (CONNECTION_ARGSPEC, HAS_PSYCOPG2, LeaseKeeper, LeaseLost, connect,
                                                                       pg_error_text)

try:
    import psycopg2
    from psycopg2 import sql as pgsql
except ImportError:  # pragma: no cover
    pass

DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.run_lock (
    lock_name   text PRIMARY KEY DEFAULT 'migration',
    run_id      text NOT NULL,
    holder      text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
"""

COLS = ("run_id", "holder", "acquired_at", "renewed_at", "expires_at", "expired")


def main():
    spec = dict(CONNECTION_ARGSPEC)
    spec.update(
        state=dict(type="str", default="present", choices=["present", "absent", "check", "hold"]),
        run_id=dict(type="str", required=True),
        holder=dict(type="str", default=""),
        ttl_seconds=dict(type="int", default=1800),
        force=dict(type="bool", default=False),
        ledger_schema=dict(type="str", default="dbops"),
        async_results_file=dict(type="path"),
        timeout_seconds=dict(type="int", default=86400),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           required_if=[("state", "hold", ["async_results_file"])])
    if not HAS_PSYCOPG2:
        module.fail_json(msg="psycopg2 is required on the host that runs this module")
    p = module.params
    if p["state"] == "hold":
        hold(module)
    schema = pgsql.Identifier(p["ledger_schema"])

    def q(text):
        return pgsql.SQL(text).format(schema=schema)

    try:
        conn = connect(p, "scanner-dbops run-lock")
    except RuntimeError as exc:
        module.fail_json(msg=str(exc))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                        ("%s.run_lock" % schema.as_string(conn),))
            exists = cur.fetchone()[0]
            current = None
            if exists:
                cur.execute(q("SELECT run_id, holder, acquired_at::text, renewed_at::text, expires_at::text, "
                              "expires_at < now() FROM {schema}.run_lock WHERE lock_name = 'migration'"))
                row = cur.fetchone()
                current = dict(zip(COLS, row)) if row else None
            mine = current is not None and current["run_id"] == p["run_id"]
            other_live = current is not None and not mine and not current["expired"]

            if p["state"] == "check" or module.check_mode:
                if other_live and p["state"] != "absent" and not p["force"]:
                    module.fail_json(msg=refusal(current), held_by=current)
                module.exit_json(changed=False, held_by=current)

            if p["state"] == "absent":
                if exists:
                    cur.execute(q("DELETE FROM {schema}.run_lock WHERE lock_name = 'migration' AND run_id = %s"),
                                (p["run_id"],))
                module.exit_json(changed=False, held_by=None if mine else current, released=mine)

            # state == present
            cur.execute(q(DDL))
            cur.execute(q("""
                INSERT INTO {schema}.run_lock AS l (lock_name, run_id, holder, expires_at)
                VALUES ('migration', %(run)s, %(holder)s, now() + make_interval(secs => %(ttl)s))
                ON CONFLICT (lock_name) DO UPDATE
                   SET run_id = EXCLUDED.run_id, holder = EXCLUDED.holder,
                       acquired_at = CASE WHEN l.run_id = EXCLUDED.run_id THEN l.acquired_at ELSE now() END,
                       renewed_at = now(), expires_at = EXCLUDED.expires_at
                 WHERE l.run_id = EXCLUDED.run_id OR l.expires_at < now() OR %(force)s
                RETURNING run_id, holder, acquired_at::text, renewed_at::text, expires_at::text, false"""),
                dict(run=p["run_id"], holder=p["holder"] or p["run_id"], ttl=p["ttl_seconds"], force=p["force"]))
            row = cur.fetchone()
            if row is None:
                cur.execute(q("SELECT run_id, holder, acquired_at::text, renewed_at::text, expires_at::text, "
                              "expires_at < now() FROM {schema}.run_lock WHERE lock_name = 'migration'"))
                holder = dict(zip(COLS, cur.fetchone()))
                module.fail_json(msg=refusal(holder), held_by=holder)
            result = dict(changed=False, held_by=dict(zip(COLS, row)))
            if current and not mine:
                result["took_over"] = current
                module.warn("took over the migration lock from %s (run %s): %s"
                            % (current["holder"], current["run_id"],
                               "its lease had expired at %s" % current["expires_at"] if current["expired"]
                               else "forced by the operator"))
            module.exit_json(**result)
    except psycopg2.Error as exc:
        module.fail_json(msg=pg_error_text(exc))
    finally:
        conn.close()


def async_finished(path: str) -> bool:
    """True when the async job's results file holds its final result (as async_status reads it)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False   # not written yet, or being written
    return bool(data.get("finished")) or "started" not in data


def hold(module):
    """Renew this run's lease until the async job is done; fail when the lock was lost."""
    p = module.params
    if module.check_mode:
        module.exit_json(changed=False, renewals=0)
    what = "waiting for the async job %s (it may still be running)" % p["async_results_file"]
    keeper = LeaseKeeper(p, p["ledger_schema"], p["run_id"], what, during="while ")
    try:
        keeper.start()
    except (LeaseLost, RuntimeError) as exc:
        module.fail_json(msg=str(exc), lock_lost=isinstance(exc, LeaseLost))
    except psycopg2.Error as exc:
        module.fail_json(msg="cannot renew the run lock: %s" % pg_error_text(exc))
    deadline = time.monotonic() + p["timeout_seconds"]
    while not async_finished(p["async_results_file"]) and keeper.lost is None:
        if time.monotonic() > deadline:
            keeper.stop()
            module.fail_json(msg="the async job %s did not finish within %d s"
                             % (p["async_results_file"], p["timeout_seconds"]))
        time.sleep(min(1.0, keeper.interval))
    lost = keeper.stop()
    if lost:
        module.fail_json(msg=lost, lock_lost=True)
    module.exit_json(changed=False, renewals=keeper.renewals)


def refusal(cur):
    return ("another migration run holds the lock on this database: %s (run %s), started %s, last renewed %s. "
            "Wait for it to finish. If that run crashed, its lease expires at %s and the next run takes over; "
            "to override now (only if you are sure it is dead) re-run with -e run_lock_force=true."
            % (cur["holder"], cur["run_id"], cur["acquired_at"], cur["renewed_at"], cur["expires_at"]))


if __name__ == "__main__":
    main()
