"""The workload: one thread with its own connection per role (and --threads), paced to the target
rate, stopped by duration / until-file / max-duration / request_stop(), cancelling what still runs
after a grace period; its summary (latency percentiles, max stall, per-role gaps, failures, writes)
and the one-line human form of it."""
from __future__ import annotations

import array
import collections
import datetime as dt
import math
import os
import threading
import time
import uuid

import psycopg2

from .db import APP_NAME, _iso, _utcnow, describe_target
from .journal import KEY_TABLES, KeyLog
from .recorder import Recorder
from .session import _Session, _StmtFailed
from .statements import API_READS, ROLE_WEIGHTS, ROLES, STATEMENTS, UPSERT_TARGETS

DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
DEFAULT_HARD_MAX_S = 3600.0


def _percentile(sorted_vals, q: float) -> float | None:
    n = len(sorted_vals)
    if n == 0:
        return None
    k = max(0, min(n - 1, int(math.ceil(q * n)) - 1))   # nearest-rank
    return sorted_vals[k]


def _r(v: float | None, nd: int = 3):
    return None if v is None else round(v, nd)



class Workload:
    """In-process workload: start() / stop() / summary() (also a context manager)."""

    def __init__(self, conn_kwargs: dict, *, rate: float = 200.0, upsert: str = "call_uid",
                 keys_path: str | None = None, duration: float | None = None,
                 until_file: str | None = None, max_duration: float = DEFAULT_HARD_MAX_S,
                 statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS, threads_per_role: int = 1,
                 roles: list[str] | None = None, dup_ratio: float = 0.05, spread_s: int = 3600,
                 extra_reads: dict[str, str] | None = None, application_name: str = APP_NAME,
                 stop_grace_s: float = 2.0):
        if upsert not in UPSERT_TARGETS:
            raise ValueError(f"upsert must be one of {sorted(UPSERT_TARGETS)}")
        self.conn_kwargs = dict(conn_kwargs)
        self.rate = float(rate)
        self.upsert = upsert
        self.keys_path = keys_path
        self.duration = duration
        self.until_file = until_file
        self.max_duration = float(max_duration)
        self.statement_timeout_ms = statement_timeout_ms
        self.threads_per_role = max(1, int(threads_per_role))
        self.roles = list(roles or ROLES)
        for r in self.roles:
            if r not in ROLES:
                raise ValueError(f"unknown role {r!r} (known: {', '.join(ROLES)})")
        self.dup_ratio = dup_ratio
        self.spread_s = int(spread_s)
        self.application_name = application_name
        self.stop_grace_s = stop_grace_s
        self.run_tag = uuid.uuid4().hex[:8]
        self.sql = {k: st.sql.replace("{conflict}", UPSERT_TARGETS[upsert]) for k, st in STATEMENTS.items()}
        self.api_reads = list(API_READS)
        for name, sql in (extra_reads or {}).items():
            self.sql[name] = sql
            self.api_reads.append((name, 1.0, lambda _k, _r: {}))
        self.transcribe_queue: collections.deque = collections.deque(maxlen=100_000)
        self.rec = Recorder()
        self.keys: KeyLog | None = None
        self._stop_evt = threading.Event()
        self._done_evt = threading.Event()
        self._cancelling = False
        self._threads: list[threading.Thread] = []
        self._sessions: list[_Session] = []
        self._controller: threading.Thread | None = None
        self._lock = threading.Lock()
        self.stop_reason: str | None = None
        self.started_wall: dt.datetime | None = None
        self.ended_wall: dt.datetime | None = None
        self._t_start = None
        self._t_end = None
        self._t_stop_req = None
        self._stopped = False
        self._role_rate: dict[str, float] = {}

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> "Workload":
        if self._t_start is not None:
            raise RuntimeError("workload already started")
        self.keys = KeyLog(self.keys_path, {
            "tool": APP_NAME, "run_tag": self.run_tag, "upsert": self.upsert,
            "target": describe_target(self.conn_kwargs), "started": _iso()})
        self.rec = Recorder()
        self.started_wall = _utcnow()
        self._t_start = time.monotonic()
        total_w = sum(ROLE_WEIGHTS.get(r, 0.1) for r in self.roles)
        for role in self.roles:
            fn, autocommit = ROLES[role]
            per_thread = (self.rate * ROLE_WEIGHTS.get(role, 0.1) / total_w / self.threads_per_role
                          if self.rate > 0 else 0.0)
            self._role_rate[role] = per_thread
            for i in range(self.threads_per_role):
                s = _Session(self, role, i, autocommit)
                self._sessions.append(s)
                t = threading.Thread(target=self._thread_main, args=(s, fn, per_thread),
                                     name=f"wl-{role}-{i}", daemon=True)
                self._threads.append(t)
        for t in self._threads:
            t.start()
        self._controller = threading.Thread(target=self._control, name="wl-control", daemon=True)
        self._controller.start()
        return self

    def _deadline_reason(self) -> str | None:
        el = time.monotonic() - self._t_start
        if el >= self.max_duration:
            return "max-duration"
        if self.duration is not None and el >= self.duration:
            return "duration"
        if self.until_file and os.path.exists(self.until_file):
            return "until-file"
        return None

    def _control(self):
        last_flush = time.monotonic()
        while not self._stop_evt.is_set():
            reason = self._deadline_reason()
            if reason:
                self.request_stop(reason)
                break
            if time.monotonic() - last_flush > 0.5 and self.keys:
                self.keys.flush()
                last_flush = time.monotonic()
            self._stop_evt.wait(0.05)

    def request_stop(self, reason: str = "stop()"):
        """Ask the threads to stop (non-blocking; safe from a signal handler)."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
                self._t_stop_req = time.monotonic()
        self._stop_evt.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop condition (duration, until-file, max-duration, request_stop)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop_evt.is_set():
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                return False
            self._stop_evt.wait(left)
        return True

    def stop(self) -> dict:
        """Stop all threads (cancelling statements still running after the grace period),
        close the keys file and return the summary."""
        if self._t_start is None:
            raise RuntimeError("workload not started")
        if self._stopped:
            return self.summary()
        self.request_stop("stop()")
        grace_end = time.monotonic() + self.stop_grace_s
        for t in self._threads:
            t.join(max(0.0, grace_end - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._cancelling = True
            for s in self._sessions:
                s.cancel()
            for t in self._threads:
                t.join(5.0)
        self._t_end = time.monotonic()
        self.ended_wall = _utcnow()
        if self._controller:
            self._controller.join(1.0)
        if self.keys:
            self.keys.close()
        self._stopped = True
        return self.summary()

    def run(self) -> dict:
        """Blocking: start, wait for a stop condition, stop; returns the summary."""
        self.start()
        try:
            self.wait()
        finally:
            summ = self.stop()
        return summ

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # thread body ---------------------------------------------------------------------------
    def _thread_main(self, s: _Session, fn, rate: float):
        next_t = time.monotonic()
        try:
            while not self._stop_evt.is_set():
                if not s.ensure_connected():
                    break
                n = 0
                try:
                    n = fn(self, s)
                    if n:
                        self.rec.role_ok(s.role, n)
                except _StmtFailed:
                    n = 1
                    s.recover()
                except psycopg2.Error as exc:          # e.g. rollback on a dead connection
                    self.rec.failed(f"{s.role}_other", exc, 0.0)
                    s.recover()
                except Exception as exc:               # a bug in a role: never crash the run
                    with self.rec.lock:
                        if len(self.rec.internal_errors) < 20:
                            self.rec.internal_errors.append(f"{s.role}: {exc!r}")
                    s.recover()
                    self._stop_evt.wait(0.1)
                if n == 0:
                    self._stop_evt.wait(0.02)       # nothing to do (e.g. transcriber queue empty)
                    continue
                if rate > 0:
                    next_t += n / rate
                    now = time.monotonic()
                    if next_t < now - 1.0:           # fell behind (a stall): do not burst to catch up
                        next_t = now
                    if next_t > now:
                        self._stop_evt.wait(next_t - now)
        finally:
            s.close()

    # results -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """The measured window: start() until the stop was requested (or now)."""
        if self._t_start is None:
            return 0.0
        end = self._t_stop_req if self._t_stop_req is not None else time.monotonic()
        return end - self._t_start

    def summary(self) -> dict:
        rec = self.rec
        with rec.lock:
            kinds = {k: (v.ok, v.failed, sorted(v.lat)) for k, v in rec.kinds.items()}
            failures = list(rec.failures)
            failure_counts = dict(rec.failure_counts)
            max_stall = rec.max_stall
            timeline = sorted(rec.timeline.items())
            writes = dict(rec.writes)
            anomalies = dict(rec.anomalies)
            conn = dict(rec.conn)
            connect_lat = sorted(rec.connect_lat)
            cancelled = rec.cancelled_at_stop
            internal = list(rec.internal_errors)
            role_ops = dict(rec.role_ops)
            role_stmts = dict(rec.role_stmts)
            role_gap = dict(rec.role_max_gap)
            role_last = dict(rec.role_last_ok)
        dur = self.elapsed()
        per_kind = {}
        all_lat = array.array("d")
        tot_ok = tot_failed = 0
        for k in sorted(kinds):
            ok, failed, lat = kinds[k]
            tot_ok += ok
            tot_failed += failed
            all_lat.extend(lat)
            per_kind[k] = {"ok": ok, "failed": failed, "p50_ms": _r(_percentile(lat, 0.50)),
                           "p95_ms": _r(_percentile(lat, 0.95)), "p99_ms": _r(_percentile(lat, 0.99)),
                           "max_ms": _r(lat[-1] if lat else None)}
        all_sorted = sorted(all_lat)
        total = tot_ok + tot_failed
        end_mono = self._t_stop_req if self._t_stop_req is not None else time.monotonic()
        roles = {}
        for r in self.roles:
            gap = role_gap.get(r, 0.0)
            last = role_last.get(r, rec.t0)
            gap = max(gap, (end_mono - last) * 1000.0)   # the tail counts too
            roles[r] = {"ops": role_ops.get(r, 0), "max_gap_ms": round(gap, 3),
                        "target_stmts_per_s": round(self._role_rate.get(r, 0.0) * self.threads_per_role, 1),
                        "ok_stmts_per_s": round(role_stmts.get(r, 0) / dur, 1) if dur > 0 else 0.0}
        return {
            "tool": APP_NAME,
            "run_tag": self.run_tag,
            "target": describe_target(self.conn_kwargs),
            "upsert": self.upsert,
            "rate_target": self.rate,
            "started_at": _iso(self.started_wall) if self.started_wall else None,
            "ended_at": _iso(self.ended_wall) if self.ended_wall else None,
            "stop_reason": self.stop_reason,
            "duration_s": round(dur, 3),
            "shutdown_s": (round(self._t_end - self._t_stop_req, 3)
                           if self._t_end is not None and self._t_stop_req is not None else None),
            "statements": total,
            "ok": tot_ok,
            "failed": tot_failed,
            "statements_per_s": round(total / dur, 1) if dur > 0 else 0.0,
            "latency_ms": {"p50": _r(_percentile(all_sorted, 0.50)), "p95": _r(_percentile(all_sorted, 0.95)),
                           "p99": _r(_percentile(all_sorted, 0.99)),
                           "max": _r(all_sorted[-1] if all_sorted else None)},
            "max_stall_ms": round(max_stall[0], 3),
            "max_stall": {"ms": round(max_stall[0], 3), "kind": max_stall[1], "at": max_stall[2]},
            "kinds": per_kind,
            "failures": failures,
            "failure_counts": failure_counts,
            "connections": {"connects": conn.get("connects", 0), "connect_failures": conn.get("connect_failures", 0),
                            "lost": conn.get("lost", 0), "reconnects": conn.get("reconnects", 0),
                            "connect_max_ms": _r(connect_lat[-1] if connect_lat else None)},
            "writes": {t: writes.get(t, 0) for t in KEY_TABLES},
            "anomalies": anomalies,
            "cancelled_at_stop": cancelled,
            "internal_errors": internal,
            "roles": roles,
            "timeline": [{"t": t, "ok": b[0], "failed": b[1], "max_ms": round(b[2], 3)} for t, b in timeline],
            "keys_file": self.keys_path,
        }


def human_line(s: dict) -> str:
    lat = s.get("latency_ms") or {}

    def f(v):
        return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:.0f}")
    line = (f"workload: {s['statements']} statements, {s['failed']} failed, p50 {f(lat.get('p50'))} ms, "
            f"p99 {f(lat.get('p99'))} ms, max {f(lat.get('max'))} ms")
    extra = [f"{s['statements_per_s']}/s over {s['duration_s']:.1f} s",
             f"{s['connections']['reconnects']} reconnects"]
    if s.get("anomalies"):
        extra.append("anomalies " + ", ".join(f"{k}={v}" for k, v in sorted(s["anomalies"].items())))
    if s.get("internal_errors"):
        extra.append(f"{len(s['internal_errors'])} internal errors")
    return line + " (" + "; ".join(extra) + ")"
