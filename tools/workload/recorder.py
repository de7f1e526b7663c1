"""Recording what the application experiences: every statement's outcome (ok / SQLSTATE) and
latency, the longest stall, a per-second timeline, each role's longest gap between completed
operations, written rows, anomalies and connection counters."""
from __future__ import annotations

import array
import collections
import threading
import time

from .db import _err_info, _iso

MAX_FAILURE_SAMPLES = 200          # failures kept verbatim in the summary
SAMPLES_PER_KEY = 5                # ... at most this many per (kind, sqlstate)


class _KindStats:
    __slots__ = ("ok", "failed", "lat")

    def __init__(self):
        self.ok = 0
        self.failed = 0
        self.lat = array.array("d")   # ms, every attempt (ok or failed)


class Recorder:
    """Thread-safe statement outcome + latency recorder."""

    def __init__(self):
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.kinds: dict[str, _KindStats] = collections.defaultdict(_KindStats)
        self.failures: list[dict] = []
        self.failure_counts: dict[str, int] = collections.Counter()
        self.max_stall = (0.0, None, None)       # (ms, kind, at)
        self.timeline: dict[int, list] = {}      # second -> [ok, failed, max_ms]
        self.writes: dict[str, int] = collections.Counter()
        self.anomalies: dict[str, int] = collections.Counter()
        self.conn = collections.Counter()        # connects, connect_failures, lost, reconnects
        self.connect_lat = array.array("d")
        self.cancelled_at_stop = 0
        self.internal_errors: list[str] = []
        self.role_ops: dict[str, int] = collections.Counter()
        self.role_stmts: dict[str, int] = collections.Counter()
        self.role_last_ok: dict[str, float] = {}
        self.role_max_gap: dict[str, float] = collections.defaultdict(float)

    def _tl(self, now: float, failed: bool, ms: float):
        sec = int(now - self.t0)
        b = self.timeline.get(sec)
        if b is None:
            b = self.timeline[sec] = [0, 0, 0.0]
        b[1 if failed else 0] += 1
        if ms > b[2]:
            b[2] = ms

    def ok(self, kind: str, ms: float):
        now = time.monotonic()
        with self.lock:
            ks = self.kinds[kind]
            ks.ok += 1
            ks.lat.append(ms)
            if ms > self.max_stall[0]:
                self.max_stall = (ms, kind, _iso())
            self._tl(now, False, ms)

    def failed(self, kind: str, exc: BaseException, ms: float):
        code, msg = _err_info(exc)
        now = time.monotonic()
        with self.lock:
            ks = self.kinds[kind]
            ks.failed += 1
            ks.lat.append(ms)
            if ms > self.max_stall[0]:
                self.max_stall = (ms, kind, _iso())
            self._tl(now, True, ms)
            key = f"{kind}/{code}"
            self.failure_counts[key] += 1
            if len(self.failures) < MAX_FAILURE_SAMPLES and self.failure_counts[key] <= SAMPLES_PER_KEY:
                self.failures.append({"kind": kind, "sqlstate": code, "message": msg, "at": _iso(),
                                      "t_s": round(now - self.t0, 3), "latency_ms": round(ms, 3)})

    def cancelled(self, kind: str, ms: float):
        """A statement cancelled by our own stop(): its wait counts as a stall, not as a failure."""
        with self.lock:
            self.cancelled_at_stop += 1
            self.kinds[kind].lat.append(ms)
            if ms > self.max_stall[0]:
                self.max_stall = (ms, kind, _iso())

    def role_ok(self, role: str, statements: int = 1):
        now = time.monotonic()
        with self.lock:
            self.role_ops[role] += 1
            self.role_stmts[role] += statements
            last = self.role_last_ok.get(role, self.t0)
            gap = (now - last) * 1000.0
            if gap > self.role_max_gap[role]:
                self.role_max_gap[role] = gap
            self.role_last_ok[role] = now

    def bump(self, counter: dict, key: str, n: int = 1):
        with self.lock:
            counter[key] += n
