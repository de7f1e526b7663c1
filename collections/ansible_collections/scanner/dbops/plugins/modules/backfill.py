#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Documentation and argument spec of the scanner.dbops.backfill action (plugins/action/backfill.py)."""
from __future__ import annotations

DOCUMENTATION = r"""
module: backfill
short_description: Copy a Phase 2 table into its shadow round after round, printing progress, until done or out of budget
description:
  - An action plugin (it runs on the controller): each round runs C(CALL dbops.p2_backfill(table, batch_rows, seconds,
    NULL, health)) through M(scanner.dbops.step) on the managed host, so every round has the step's lock_timeout,
    retries, reconnect and run-lock fencing. The procedure copies committed batches for up to C(round_seconds) and
    pauses itself while a health signal is over its threshold.
  - After each round a progress line is printed at once (rows done/total, percent, rows per second, ETA, the
    round's pauses); a health signal this role cannot read is said once.
  - Any number of rounds in constant memory and constant time per round (a Python loop; the task file that
    included itself once per round died with RecursionError after ~200 rounds).
  - Stops (fails, saying how far it got; nothing is lost, the next run resumes) when the rounds' time reaches
    C(max_seconds), or after C(max_rounds) rounds.
  - In check mode nothing is run.
options:
  table: {type: str, required: true, description: The table being converted (its dbops.p2_state row).}
  batch_rows: {type: int, default: 5000, description: Rows per batch (one transaction each).}
  round_seconds: {type: int, default: 15, description: "Seconds per round, i.e. between two progress lines (0: one batch per round)."}
  max_seconds: {type: float, default: 0, description: "The table's time budget over all rounds, pauses included; 0 = none."}
  max_rounds: {type: int, default: 0, description: "Stop after this many rounds; 0 = no limit."}
  health:
    type: raw
    default: {}
    description: Thresholds of dbops.p2_backfill_health plus check_seconds (a dict or its JSON); empty turns the checks off.
  lock_timeout: {type: str, default: 2s, description: "As for scanner.dbops.step, for each round."}
  statement_timeout: {type: str, default: "0", description: "As for scanner.dbops.step."}
  retries: {type: int, default: 8, description: "As for scanner.dbops.step, per round."}
  retry_delay: {type: float, default: 0.5, description: "As for scanner.dbops.step."}
  reconnect: {type: bool, default: true, description: "As for scanner.dbops.step (every round is idempotent)."}
  run_lock_id: {type: str, default: "", description: "As for scanner.dbops.step; taken from the fact run_lock_run_id while the run lock is held."}
  ledger_schema: {type: str, default: dbops, description: Schema of the run_lock table.}
  wraparound_wait: {type: float, default: 900, description: "As for scanner.dbops.step."}
"""

RETURN = r"""
result: {description: the last round's result (dbops.p2_backfill's jsonb), type: dict}
rounds: {description: rounds run, type: int}
rows_copied: {description: rows copied by this task, type: int}
seconds: {description: the rounds' time (s), pauses included, type: float}
pauses: {description: "every pause: table, signal, reason, worst, seconds, ongoing (one across rounds when it went on)", type: list}
health_unavailable: {description: "signal -> why this role cannot read it (ignored)", type: dict}
notices: {description: "the last 50 retry / reconnect / autovacuum notices of the rounds", type: list}
samples: {description: "at rounds 1, 10, 100, 1 000, ... and the last: mean time of the last ten rounds (ms), the worker's and the controller's resident memory (kB)", type: dict}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.scanner.dbops.plugins.module_utils.pg import CONNECTION_ARGSPEC, STEP_RUN_ARGSPEC


def main():
    spec = dict(CONNECTION_ARGSPEC)
    spec.update(
        table=dict(type="str", required=True),
        batch_rows=dict(type="int", default=5000),
        round_seconds=dict(type="int", default=15),
        max_seconds=dict(type="float", default=0),
        max_rounds=dict(type="int", default=0),
        health=dict(type="raw", default={}),
    )
    spec.update(STEP_RUN_ARGSPEC, reconnect=dict(type="bool", default=True))
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    module.fail_json(msg="scanner.dbops.backfill runs as an action plugin on the controller (plugins/action/backfill.py); "
                         "this file only documents it")


if __name__ == "__main__":
    main()
