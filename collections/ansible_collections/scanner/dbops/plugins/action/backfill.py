# -*- coding: utf-8 -*-
"""scanner.dbops.backfill: the paced backfill of one table, round after round, until it is done.

One round is one call of the engine's procedure, CALL dbops.p2_backfill(table, batch_rows, seconds, NULL,
health), which copies committed batches for up to `round_seconds` and pauses itself while the database is
under strain. The round runs as the scanner.dbops.step module on the managed host (its connection,
lock_timeout, retries, reconnect and run-lock fencing, like every other step). Between rounds this action,
on the controller, prints the round's progress with an ETA (a Display line sent from the task's worker
process: shown at once, in the terminal and in AWX's job output), keeps the pauses (a pause still going on
at the end of a round and in the next is one pause), and stops at the time budget (`max_seconds`).

Why a loop here: the former task file included itself once per round, and ansible-core died with
RecursionError between 200 and 250 levels (~50 minutes of 15 s rounds), each level slower than the last.
This loop holds a constant amount of state whatever the number of rounds (the last result, the merged
pauses, counters, and samples of the round time and memory at rounds 1, 10, 100, 1 000, ...).
"""
from __future__ import annotations

import collections
import json
import math
import os
import time

from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()

OWN_ARGS = ("table", "batch_rows", "round_seconds", "max_seconds", "health", "max_rounds")
SQL = "CALL dbops.p2_backfill(%(t)s, %(rows)s, %(secs)s, NULL, %(health)s::jsonb)"


def rss_kb(pid) -> int:
    """Resident memory of a process, from /proc (0 where there is no /proc)."""
    try:
        with open("/proc/%s/statm" % pid) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return 0


def merge_pauses(kept: list, new: list, table: str) -> list:
    """kept + new (each tagged with the table); a pause still going on at the end of the last round that
    goes on in this one (same signal) is one pause."""
    new = [dict(p, table=table) for p in new or []]
    if kept and new and kept[-1].get("table") == table and kept[-1].get("ongoing") \
            and kept[-1].get("signal") == new[0].get("signal"):
        last = dict(kept[-1], seconds=round(float(kept[-1].get("seconds") or 0) + float(new[0].get("seconds") or 0), 1),
                    ongoing=new[0].get("ongoing"))
        return kept[:-1] + [last] + new[1:]
    return kept + new


def progress_line(table: str, rnd: int, r: dict, round_s: float, task_rate: float) -> str:
    """One round: rows done/total, the round's rate (its rows over its wall time, the module call included)
    and the ETA at the rate of the whole task so far, then the round's pauses."""
    done = int(r.get("rows_done") or 0)
    total = r.get("rows_total")
    left = max(int(total or 0) - done, 0)
    if r.get("status") != "done" and task_rate > 0:
        tail = "ETA %d s" % round(left / task_rate)
    else:
        tail = str(r.get("status"))
    line = "%s: round %d: %s/%s rows (%s %%), %d rows/s this round, %s" % (
        table, rnd, done, total if total is not None else "?", r.get("pct", 100),
        int(int(r.get("rows_this_call") or 0) / round_s) if round_s > 0 else 0, tail)
    for p in r.get("pauses") or []:
        line += "; paused: %s (%s s%s)" % (p.get("reason"), p.get("seconds"), ", still waiting" if p.get("ongoing") else "")
    return line


class ActionModule(ActionBase):
    _VALID_ARGS = None   # the step module's options pass through (connection, lock_timeout, retries, ...)

    def run(self, tmp=None, task_vars=None):
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        table = args.get("table")
        if not table:
            return dict(result, failed=True, msg="scanner.dbops.backfill: table is required")
        try:
            batch_rows = int(args.get("batch_rows", 5000))
            round_seconds = int(args.get("round_seconds", 15))
            max_seconds = float(args.get("max_seconds", 0) or 0)
            max_rounds = int(args.get("max_rounds", 0) or 0)
        except (TypeError, ValueError) as exc:
            return dict(result, failed=True, msg="scanner.dbops.backfill: batch_rows, round_seconds, max_seconds and "
                                                 "max_rounds must be numbers: %s" % exc)
        if batch_rows < 1 or round_seconds < 0 or max_seconds < 0 or max_rounds < 0:
            return dict(result, failed=True, msg="scanner.dbops.backfill: batch_rows must be >= 1, round_seconds, "
                                                 "max_seconds and max_rounds >= 0")
        health = args.get("health") or {}
        step_args = {k: v for k, v in args.items() if k not in OWN_ARGS}
        if "run_lock_id" not in step_args:   # the run lock's fencing token, as for scanner.dbops.step (fenced.py)
            held = self._templar.template(task_vars.get("run_lock_held", False))
            run_id = self._templar.template(task_vars.get("run_lock_run_id", ""))
            if boolean(held, strict=False) and run_id:
                step_args["run_lock_id"] = str(run_id)
        step_args.setdefault("reconnect", True)   # every round is idempotent: resumes from the last committed batch

        if self._task.check_mode:
            return dict(result, changed=True, skipped_in_check_mode=True, rounds=0,
                        msg="check mode: would copy %s in rounds of %s s" % (table, round_seconds))

        pauses: list = []
        told: dict = {}
        notes: list = []
        spent = 0.0
        copied = 0
        rnd = 0
        last = {}
        samples = {}
        recent = collections.deque(maxlen=10)   # the last ten rounds' durations (s)
        controller = os.getppid()
        started = time.monotonic()
        while True:
            rnd += 1
            secs = round_seconds if max_seconds <= 0 else max(min(round_seconds, math.ceil(max_seconds - spent)), 1)
            t0 = time.monotonic()
            res = self._execute_module(
                module_name="scanner.dbops.step",
                module_args=dict(step_args, sql=SQL, args={"t": table, "rows": batch_rows, "secs": secs,
                                                            "health": self._json(health)}),
                task_vars=task_vars)
            notes = (notes + [n for n in res.get("notices") or [] if n.startswith(("retry ", "reconnect ", "autovacuum: "))])[-50:]
            if res.get("failed"):
                res.update(stopped=True, rounds=rnd, rows_copied=copied, seconds=round(spent, 1), pauses=pauses, notices=notes,
                           msg="%s: round %d of the backfill failed (%d rows copied by this run before it; the committed "
                               "batches are kept, a new run resumes after them): %s"
                               % (table, rnd, copied, res.get("msg")))
                return dict(result, **res)
            last = res.get("result") or {}
            copied += int(last.get("rows_this_call") or 0)
            spent += float(last.get("seconds") or 0)
            pauses = merge_pauses(pauses, last.get("pauses"), table)
            took = time.monotonic() - t0
            display.display(progress_line(table, rnd, last, took, copied / max(time.monotonic() - started, 1e-6)))
            for sig, why in (last.get("health_unavailable") or {}).items():
                if sig not in told:
                    told[sig] = why
                    display.display("%s: health signal %s not available: %s; ignored" % (table, sig, why))
            recent.append(took)
            if math.log10(rnd).is_integer():   # rounds 1, 10, 100, 1 000, ...: the mean of the last ten rounds
                samples[str(rnd)] = {"round_ms": round(1000 * sum(recent) / len(recent), 1),
                                     "worker_rss_kb": rss_kb("self"), "controller_rss_kb": rss_kb(controller)}
            if last.get("status", "done") == "done":
                break
            if max_seconds > 0 and spent >= max_seconds:
                mine = [p for p in pauses if p.get("table") == table]
                why = sorted({str(p.get("reason")) for p in mine})
                return dict(result, failed=True, stopped=True, budget_used=True, seconds=round(spent, 1), rounds=rnd, rows_copied=copied, pauses=pauses,
                            health_unavailable=told, notices=notes, samples=samples, result=last, changed=copied > 0,
                            msg="%s: the backfill used its time budget, partition_backfill_max_seconds = %s (%.1f s): "
                                "%s/%s rows copied, paused %.1f s in this run%s. Nothing is lost: run the playbook again "
                                "to continue from there, or raise partition_backfill_max_seconds."
                                % (table, args.get("max_seconds"), spent, last.get("rows_done"), last.get("rows_total"),
                                   sum(float(p.get("seconds") or 0) for p in mine),
                                   " (%s)" % "; ".join(why) if why else ""))
            if max_rounds and rnd >= max_rounds:
                return dict(result, failed=True, stopped=True, seconds=round(spent, 1), rounds=rnd, rows_copied=copied,
                            pauses=pauses, notices=notes,
                            samples=samples, result=last, changed=copied > 0,
                            msg="%s: stopped after max_rounds = %d rounds, %s/%s rows copied; run again to continue"
                                % (table, max_rounds, last.get("rows_done"), last.get("rows_total")))
        samples["last"] = {"round": rnd, "round_ms": round(1000 * sum(recent) / len(recent), 1),
                           "worker_rss_kb": rss_kb("self"), "controller_rss_kb": rss_kb(controller)}
        return dict(result, changed=copied > 0, result=last, rounds=rnd, rows_copied=copied, seconds=round(spent, 1),
                    pauses=pauses, health_unavailable=told, notices=notes, samples=samples)

    @staticmethod
    def _json(value) -> str:
        return value if isinstance(value, str) else json.dumps(value, default=str)
