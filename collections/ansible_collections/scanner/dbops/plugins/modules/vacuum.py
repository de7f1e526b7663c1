#!/usr/bin/python
# -*- coding: utf-8 -*-
"""VACUUM a Phase 2 shadow table's partitions before the swap, paced by the database's health."""
from __future__ import annotations

DOCUMENTATION = r"""
module: vacuum
short_description: VACUUM each backfilled partition of a Phase 2 shadow table, pausing while the database is under strain
description:
  - Asks C(dbops.p2_vacuum_plan(table)) which partitions of the shadow table hold pages and were not vacuumed
    since the backfill finished, and runs C(VACUUM (SKIP_LOCKED)) on each, one at a time, in autocommit
    (VACUUM cannot run in a transaction, so not in the backfill procedure).
  - Before each VACUUM it reads C(dbops.p2_backfill_health(table, health)), the backfill's signals (standby
    replay lag, WAL per second, autovacuum, waiting locks, active sessions); while one is over its threshold
    it runs nothing and waits, and reports each pause with its reason and length.
  - A partition VACUUM skips (another session holds a conflicting lock, e.g. autovacuum; or this role may
    not vacuum it) is reported with the server's reason, never counted as vacuumed. Idempotent, a second call finds nothing to do.
  - In check mode it reports what it would vacuum and runs nothing.
options:
  table: {type: str, required: true, description: The table being converted (its dbops.p2_state row).}
  health:
    type: dict
    default: {}
    description: Thresholds of dbops.p2_backfill_health plus check_seconds; empty or all 0 turns the checks off.
  max_seconds: {type: float, default: 0, description: "Stop (fail, saying so) when paused past this many seconds from the start; 0 = no limit."}
  lock_timeout: {type: str, default: 2s, description: PostgreSQL lock_timeout for each VACUUM.}
  run_lock_id: {type: str, default: "", description: "The run lock's fencing token (see scanner.dbops.step), also checked by the database right before each VACUUM."}
  ledger_schema: {type: str, default: dbops, description: Schema of the run_lock table.}
"""

RETURN = r"""
result:
  description: status (vacuumed | nothing to do | the plan's status), vacuumed (names), skipped (names, locked),
    bytes, seconds, pauses ([{signal, reason, worst, seconds}]), health_unavailable ({signal -> why}).
  type: dict
"""

import datetime
import json
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.scanner.dbops.plugins.module_utils.pg import (CONNECTION_ARGSPEC, HAS_PSYCOPG2, LeaseKeeper, LeaseLost, connect,
                                                                       fence_autocommit, pg_error_text)

try:
    import psycopg2
    from psycopg2 import sql as pgsql
except ImportError:  # pragma: no cover
    pass

OFF = ("", "0", "off", "false", "none")


class Budget(Exception):
    """Paused past max_seconds."""


class Health:
    """The backfill's health signals, read before each VACUUM; waits while one is over its threshold."""

    def __init__(self, cur, table, health, clock=time.monotonic, sleep=time.sleep):
        self.cur, self.table, self.health = cur, table, dict(health or {})
        self.on = any(k != "check_seconds" and str(v if v is not None else "").lower() not in OFF
                      for k, v in self.health.items())
        self.every = float(self.health.get("check_seconds") or 1)
        self.clock, self.sleep = clock, sleep
        self.lsn = self.at = None
        self.wal_over = None
        self.pauses = []
        self.unavailable = {}

    def read(self):
        self.cur.execute("SELECT dbops.p2_backfill_health(%s, %s::jsonb, %s::pg_lsn, %s::timestamptz)",
                         (self.table, json.dumps(self.health), self.lsn, self.at))
        hc = self.cur.fetchone()[0]
        if isinstance(hc, str):
            hc = json.loads(hc)
        over = list(hc.get("over") or [])
        if self.lsn is None or hc.get("wal_bytes_per_second") is not None:
            self.lsn, self.at = hc.get("lsn"), hc.get("at")
        if hc.get("wal_bytes_per_second") is not None:
            self.wal_over = next((o for o in over if o.get("signal") == "wal_bytes_per_second"), None)
        elif self.wal_over is not None:
            over.append(self.wal_over)  # too soon for a new WAL rate: the last one stands
        self.unavailable.update(hc.get("unavailable") or {})
        return over

    def wait(self, deadline):
        """Return when every signal is under its threshold; raise Budget past deadline (monotonic, or None)."""
        if not self.on:
            return
        start = sig = reason = worst = started_at = None
        while True:
            over = self.read()
            now = self.clock()
            if start is not None and (not over or over[0].get("signal") != sig):
                self.pauses.append({"signal": sig, "reason": reason, "worst": worst,
                                    "seconds": round(now - start, 1), "ongoing": False, "started_at": started_at})
                start = None
            if not over:
                return
            if start is None:
                start, sig, worst = now, over[0].get("signal"), over[0]
                started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                reason = "; ".join(o.get("reason", "") for o in over)
            elif (over[0].get("value") or 0) > (worst.get("value") or 0):
                worst = over[0]
            if deadline is not None and now >= deadline:
                self.pauses.append({"signal": sig, "reason": reason, "worst": worst,
                                    "seconds": round(now - start, 1), "ongoing": True, "started_at": started_at})
                raise Budget()
            self.sleep(self.every)


def main():
    spec = dict(CONNECTION_ARGSPEC)
    spec.update(
        table=dict(type="str", required=True),
        health=dict(type="dict", default={}),
        max_seconds=dict(type="float", default=0),
        lock_timeout=dict(type="str", default="2s"),
        run_lock_id=dict(type="str", default=""),
        ledger_schema=dict(type="str", default="dbops"),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    if not HAS_PSYCOPG2:
        module.fail_json(msg="psycopg2 is required on the host that runs this module")
    p = module.params
    t0 = time.monotonic()
    try:
        conn = connect(p, "scanner-dbops vacuum")
    except RuntimeError as exc:
        module.fail_json(msg=str(exc))
    with conn.cursor() as cur:
        try:
            cur.execute("SET lock_timeout = %s", (p["lock_timeout"],))
            cur.execute("SELECT dbops.p2_vacuum_plan(%s)", (p["table"],))
            plan = cur.fetchone()[0]
        except psycopg2.Error as exc:
            conn.close()
            module.fail_json(msg="%s: cannot read what to vacuum: %s" % (p["table"], pg_error_text(exc)))
    parts = plan.get("partitions") or []
    if plan.get("status") != "planned" or not parts:
        conn.close()
        module.exit_json(changed=False, result=dict(plan, status="nothing to do" if plan.get("status") == "planned"
                                                    else plan.get("status"), vacuumed=[], skipped=[], pauses=[]))
    if module.check_mode:
        conn.close()
        module.exit_json(changed=True, result=dict(plan, status="would vacuum", vacuumed=[], skipped=[], pauses=[]),
                         msg="check mode: would vacuum %d partition(s) of %s" % (len(parts), plan.get("shadow")))

    keeper = None
    if p["run_lock_id"]:
        keeper = LeaseKeeper(p, p["ledger_schema"], p["run_lock_id"], "the vacuum of %s" % plan.get("shadow"),
                             on_lost=conn.cancel)
        try:
            keeper.start()
        except (LeaseLost, RuntimeError) as exc:
            conn.close()
            module.fail_json(msg=str(exc), lock_lost=isinstance(exc, LeaseLost))
    deadline = t0 + p["max_seconds"] if p["max_seconds"] > 0 else None
    vacuumed, skipped, reasons = [], [], []
    with conn.cursor() as cur:
        health = Health(cur, p["table"], p["health"])
        try:
            cur.execute("SET lock_timeout = %s", (p["lock_timeout"],))
            for part in parts:
                health.wait(deadline)
                if keeper and keeper.lost:
                    break
                if keeper:   # the token, checked by the database right before each VACUUM (which no transaction may wrap)
                    fence_autocommit(conn, p["ledger_schema"], p["run_lock_id"],
                                     "before the VACUUM of %s (%d of %d partitions done)" % (part["name"], len(vacuumed),
                                                                                             len(parts)))
                conn.notices.drain()
                cur.execute(pgsql.SQL("VACUUM (SKIP_LOCKED) {}.{}").format(pgsql.Identifier("public"),
                                                                          pgsql.Identifier(part["name"])))
                # VACUUM skips with a WARNING, not an error: a lock held by another session (SKIP_LOCKED,
                # "skipping vacuum of ... lock not available") or a role that may not vacuum it ("skipping
                # ... only table or database owner can vacuum it"; 16+: "permission denied to vacuum ...,
                # skipping it"). Reported with the server's words, never counted as vacuumed.
                said = [n for n in conn.notices.drain() if "skipping" in n]
                if said:
                    skipped.append(part["name"])
                    reasons.extend(said)
                else:
                    vacuumed.append(part["name"])
        except Budget:
            pass
        except LeaseLost as exc:
            keeper.stop()
            conn.close()
            module.fail_json(msg=str(exc), lock_lost=True)
        except psycopg2.Error as exc:
            lost = keeper.stop() if keeper else None
            conn.close()
            module.fail_json(msg=lost or "%s: VACUUM failed after %d of %d partitions (the next run vacuums the rest): %s"
                             % (p["table"], len(vacuumed), len(parts), pg_error_text(exc)), lock_lost=bool(lost))
    lost = keeper.stop() if keeper else None
    conn.close()
    if lost:
        module.fail_json(msg=lost, lock_lost=True)
    result = dict(status="vacuumed" if len(vacuumed) + len(skipped) == len(parts) else "stopped: time budget",
                  table=p["table"], shadow=plan.get("shadow"), vacuumed=vacuumed, skipped=skipped,
                  left=len(parts) - len(vacuumed) - len(skipped), skipped_reasons=reasons,
                  bytes=sum(x["bytes"] for x in parts if x["name"] in vacuumed),
                  seconds=round(time.monotonic() - t0, 1), pauses=health.pauses,
                  health_unavailable=health.unavailable)
    module.exit_json(changed=bool(vacuumed), result=result)


if __name__ == "__main__":
    main()
