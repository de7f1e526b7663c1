#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Run one step of an online migration (a function or procedure call) safely on a busy database."""
from __future__ import annotations

DOCUMENTATION = r"""
module: step
short_description: Call one migration step under lock_timeout, with backoff retries, and return its jsonb
description:
  - Runs one statement (typically C(SELECT dbops.p2_swap(%(table)s)) or C(CALL dbops.p2_backfill(...))) in
    autocommit, so a procedure may COMMIT per batch and nothing is held in one long transaction.
  - Sets C(lock_timeout) and C(statement_timeout) first; a lock timeout, deadlock or serialization failure
    is retried with exponential backoff, and after the last retry the step stops cleanly (never waits unbounded).
  - Returns the first column of the first row (decoded when it is json/jsonb) as C(result), and the
    PostgreSQL notices raised by the step.
  - Change is derived from the result, never hard-wired - C(result.changed) when the step returns it,
    otherwise C(changed_if_result_key) / C(unchanged_statuses).
  - In check mode nothing is run unless C(read_only=true).
options:
  sql: {type: str, required: true, description: One statement; psycopg2 named parameters allowed.}
  args: {type: dict, default: {}, description: Named parameters for sql.}
  read_only: {type: bool, default: false, description: The step only reads; run it in check mode too, report unchanged.}
  lock_timeout: {type: str, default: 2s, description: PostgreSQL lock_timeout for the step (C(500ms) for the lock-taking steps).}
  statement_timeout: {type: str, default: "0", description: PostgreSQL statement_timeout for the step (C(0) = none).}
  retries: {type: int, default: 8, description: Retries after a lock timeout / deadlock / serialization failure.}
  retry_delay: {type: float, default: 0.5, description: First backoff in seconds, doubled on each retry (capped at 30 s).}
  reconnect:
    type: bool
    default: false
    description:
      - When the connection is lost during the step (server restart or failover, pg_terminate_backend,
        a network cut), open a new connection and run the step again, within the same C(retries) budget.
      - Only for idempotent steps (every C(dbops.p2_*) step is, since a step whose effect was committed before
        the cut answers "already ..." on the second call). A cut before COMMIT rolled the attempt back.
  run_lock_id:
    type: str
    default: ""
    description:
      - The run id of the run lock this step runs under (a fencing token). When set, the step first renews
        this run's lease in C(ledger_schema).run_lock and refuses to start if another run holds the lock
        now (its lease expired and another run or the maintenance job took it, or an operator forced it);
        while the step runs, a second connection renews the lease every third of its length, and cancels
        the step if the lock was lost.
      - The check is also made inside the step's own transaction, so a takeover between the controller's
        check and the statement changes nothing (C(BEGIN); the lock row read C(FOR SHARE), held until the
        step's C(COMMIT), so a takeover waits for the step; the step; C(COMMIT)). A statement that cannot run
        in a transaction block (C(CALL) of a procedure that commits, C(VACUUM), C(CONCURRENTLY) builds) is
        checked just before it runs, and the session gets the token as C(dbops.run_lock_id), and the engine's
        procedures (C(dbops.p2_backfill), the daily jobs) check it in each batch's transaction.
      - Set by the collection's action plugin from the fact C(run_lock_run_id) while C(run_lock_held) is
        true (roles/run_lock acquire/release); C("") checks nothing. Not checked in check mode (no lock is taken).
  wraparound_wait:
    type: float
    default: 900
    description:
      - Seconds the step waits in all, without using its C(retries), for an anti-wraparound autovacuum that
        holds the lock it needs (never cancelled), polling C(pg_locks) every 2 s (no lock request meanwhile,
        so nobody queues behind the step). Then the step is tried again; used up, it fails naming that autovacuum.
      - A lock held only by ordinary (non-wraparound) autovacuum workers is got past at once instead, by
        making PostgreSQL cancel them (a C(SHARE UPDATE EXCLUSIVE) probe waiting past C(deadlock_timeout);
        the engine's lock-taking steps do it themselves). Every retry notice and the final error name the
        lock's holders (pid, role, application, state, transaction age, query).
  ledger_schema: {type: str, default: dbops, description: Schema of the run_lock table.}
  unchanged_statuses:
    type: list
    elements: str
    default: [noop, already done, already swapped, already prepared, already verified, already finalized, not swapped, nothing to do, done]
    description: Values of result.status meaning the step found nothing to do.
"""

RETURN = r"""
result: {description: the step's return value (decoded json), type: raw}
notices: {description: PostgreSQL notices raised during the step, type: list}
attempts: {description: how many times the step ran on its last connection (1 = no retry), type: int}
reconnects: {description: how many times the connection was reopened (reconnect=true), type: int}
lease_renewals: {description: how many times the run lock's lease was renewed for this step (run_lock_id set), type: int}
autovacuum:
  description: what was done about autovacuum workers holding the lock the step needed ("autovacuum:" lines, also in notices)
  type: list
"""

import json
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.scanner.dbops.plugins.module_utils.pg import (CONNECTION_ARGSPEC, HAS_PSYCOPG2, STEP_RUN_ARGSPEC,
                                                                       LeaseKeeper, LeaseLost,
                                                                       LockAssist, autocommit_only, connect, fence_autocommit,
                                                                       fence_check, fence_lost_text, pg_error_text,
                                                                       set_fence_token, with_retries)

try:
    import psycopg2
except ImportError:  # pragma: no cover
    pass


def connection_lost(conn, exc) -> bool:
    """True when exc means the session is gone (not an SQL error inside a live session)."""
    code = getattr(exc, "pgcode", None) or ""
    return bool(conn.closed) or code.startswith("08") or code in ("57P01", "57P02", "57P03") \
        or isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and not code


def drain(conn) -> list:
    try:
        return conn.notices.drain()
    except Exception:  # pylint: disable=broad-except
        return []


def decide_changed(result, unchanged_statuses):
    if isinstance(result, dict):
        if "changed" in result:
            return bool(result["changed"])
        status = str(result.get("status", "")).lower()
        if status:
            return status not in [s.lower() for s in unchanged_statuses]
    return True


def main():
    spec = dict(CONNECTION_ARGSPEC)
    spec.update(
        sql=dict(type="str", required=True),
        args=dict(type="dict", default={}),
        read_only=dict(type="bool", default=False),
        **STEP_RUN_ARGSPEC,
        unchanged_statuses=dict(type="list", elements="str",
                                default=["noop", "already done", "already swapped", "already prepared",
                                         "already verified", "already finalized", "not swapped", "nothing to do",
                                         "done"]),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    if not HAS_PSYCOPG2:
        module.fail_json(msg="psycopg2 is required on the host that runs this module")
    p = module.params
    if module.check_mode and not p["read_only"]:
        module.exit_json(changed=True, skipped_in_check_mode=True, result=None, notices=[], attempts=0,
                         msg="check mode: would run %s" % p["sql"])
    try:
        conn = connect(p, "scanner-dbops step")
    except RuntimeError as exc:
        module.fail_json(msg=str(exc))
    notices = []
    t0 = time.monotonic()
    state = {"conn": conn, "reconnects": 0}
    keeper = None
    token = p["run_lock_id"] if not module.check_mode else ""
    what = "the step `%s`%s" % (p["sql"].strip(), " with %s" % json.dumps(p["args"], sort_keys=True, default=str)
                                if p["args"] else "")
    if token:
        keeper = LeaseKeeper(p, p["ledger_schema"], token, what, on_lost=lambda: state["conn"].cancel())
        try:
            keeper.start()
        except (LeaseLost, RuntimeError) as exc:
            conn.close()
            module.fail_json(msg=str(exc), lock_lost=isinstance(exc, LeaseLost), notices=[], attempts=0)
        except psycopg2.Error as exc:
            conn.close()
            module.fail_json(msg="cannot check the run lock before the step: %s" % pg_error_text(exc))
    # the fence inside the step's own transaction, when the statement can run in one
    in_tx = bool(token) and not autocommit_only(p["sql"])
    assist = LockAssist(p, wraparound_wait=p["wraparound_wait"])
    assist.attach(conn)

    def finish_fail(msg, lock_lost=False, **kw):
        notices.extend(drain(state["conn"]))
        state["conn"].close()
        if keeper:
            keeper.stop()
        assist.close()
        module.fail_json(msg=msg, notices=notices, autovacuum=autovacuum_notes(), lock_lost=lock_lost, **kw)

    def autovacuum_notes():
        return list(dict.fromkeys(n for n in notices + assist.notes if n.startswith("autovacuum: ")))

    def stop_keeper():
        """Stop renewing; when the lock was lost during the step, fail saying so."""
        lost = keeper.stop() if keeper else None
        if lost:
            if in_tx:
                lost += (" (The step itself had completed: its transaction held the lock row until its COMMIT, "
                         "so it ran while this run still held the lock; nothing after it runs.)")
            finish_fail(lost, lock_lost=True)

    def attempt():
        c = state["conn"]
        assist.mark()
        with c.cursor() as cur:
            cur.execute("SET lock_timeout = %s", (p["lock_timeout"],))
            cur.execute("SET statement_timeout = %s", (p["statement_timeout"],))
            if token:
                set_fence_token(c, p["ledger_schema"], token)
            if not in_tx:
                if token:
                    fence_autocommit(c, p["ledger_schema"], token, "before " + what)
                cur.execute(p["sql"], p["args"] or None)
                row = cur.fetchone() if cur.description else None
                return row[0] if row else None
            cur.execute("BEGIN")
            try:
                fence_check(cur, p["ledger_schema"], token,
                            "inside the transaction of %s, before it ran: nothing of it was changed" % what)
                cur.execute(p["sql"], p["args"] or None)
                row = cur.fetchone() if cur.description else None
                cur.execute("COMMIT")
            except BaseException:
                if not c.closed:
                    try:
                        cur.execute("ROLLBACK")
                    except psycopg2.Error:
                        pass
                raise
        return row[0] if row else None

    def on_retry(n, wait, exc):
        notices.extend(drain(state["conn"]))
        notices.extend(assist.notes)
        del assist.notes[:]
        notices.append("retry %d %s after: %s" % (n, "in %.1fs" % wait if wait else "at once", assist.describe(exc)))

    budget = p["retries"]
    while True:
        try:
            value, attempts = with_retries(attempt, budget, p["retry_delay"], on_retry=on_retry,
                                           free_wait=assist.free_wait)
            break
        except LeaseLost as exc:
            finish_fail(str(exc), lock_lost=True, attempts=0)
        except psycopg2.Error as exc:
            if keeper and keeper.lost:
                stop_keeper()
            if fence_lost_text(exc):
                finish_fail(fence_lost_text(exc), lock_lost=True)
            lost = connection_lost(state["conn"], exc)
            notices.extend(drain(state["conn"]))
            notices.extend(assist.notes)
            del assist.notes[:]
            state["conn"].close()
            if lost and p["reconnect"] and state["reconnects"] < max(1, p["retries"]):
                state["reconnects"] += 1
                wait = min(30.0, p["retry_delay"] * (2 ** (state["reconnects"] - 1)))
                notices.append("reconnect %d in %.1fs after the connection was lost: %s"
                               % (state["reconnects"], wait, pg_error_text(exc)))
                time.sleep(wait)
                try:
                    state["conn"] = connect(p, "scanner-dbops step")
                except RuntimeError as cexc:
                    if keeper:
                        keeper.stop()
                    assist.close()
                    module.fail_json(msg="step interrupted: the connection was lost and could not be reopened: %s"
                                     % cexc, notices=notices)
                assist.attach(state["conn"])
                continue
            if keeper:
                keeper.stop()
            assist.close()
            module.fail_json(msg="step failed after %d attempt(s), nothing of the failed attempt was kept: %s%s"
                             % (len([n for n in notices if n.startswith(("retry ", "reconnect "))]) + 1,
                                assist.describe(exc),
                                " (connection lost; the step is safe to run again)" if lost else ""),
                             notices=notices, autovacuum=autovacuum_notes())
    stop_keeper()
    assist.close()
    conn = state["conn"]
    notices.extend(conn.notices.drain())
    notices.extend(assist.notes)
    conn.close()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    changed = False if p["read_only"] else decide_changed(value, p["unchanged_statuses"])
    module.exit_json(changed=changed, result=value, notices=notices, attempts=attempts, reconnects=state["reconnects"],
                     lease_renewals=keeper.renewals if keeper else 0, autovacuum=autovacuum_notes(),
                     duration_ms=int((time.monotonic() - t0) * 1000))


if __name__ == "__main__":
    main()
