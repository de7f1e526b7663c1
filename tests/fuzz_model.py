"""Invariant-checking concurrency test of the Phase 2 engine (issue 18): the generator, the journal,
the model, the invariant checker and the driver that walks the conversion. Used by
tests/test_integrity_fuzz.py (docs/TESTING.md, "Invariant test (issue 18)").

Sessions (threads, one psycopg2 connection each) run random transactions at every isolation level
against bcfy_calls_raw, transcripts and processing_state while the driver walks the conversion of
bcfy_calls_raw and transcripts (prepare, backfill in small batches, verify, swap, rollback, verify and
swap again, finalize, the nightly jobs). Between two steps the driver checks the invariants in one
REPEATABLE READ snapshot; at the end, with the sessions stopped, it also replays every session's
journal of committed transactions into a model and compares it with the tables.

Key spaces: each session writes its own calls (call_uid '<1000..2449>-fz<seed>t<i>-<n>', group_id
'fz<seed>t<i>'), the transcripts / processing_state rows it created and nothing else of that kind, so
the commit order of a key is the session's program order and the model is exact; a small shared
space ('shared-<epoch>-<k>', two fresh keys every 0.4 s, so that every session goes for the same ones
at once) is written by every session for the races (uniqueness, references), checked by the
invariants only; baseline rows (the demo data) get payload updates. A seed gives each session the
same sequence of transaction kinds, targets and values (random.Random(seed * 1000 + session)); the
interleaving, and the shared key a draw lands on, depend on timing.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as dt
import io
import json
import random
import threading
import time
from typing import Any, Callable

import psycopg2
import psycopg2.errors

UTC = dt.timezone.utc
TABLES = ("bcfy_calls_raw", "transcripts")        # the two tables converted
# refusals a native constraint or the engine may give an application transaction
ALLOWED = {"40001": "serialization_failure", "40P01": "deadlock_detected", "23505": "unique_violation",
           "23503": "foreign_key_violation", "23514": "check_violation", "55P03": "lock_not_available"}
TRUNCATE_REFUSED = {"0A000", "P0001"}             # a refused TRUNCATE: native (FK) or the engine's trigger
TRANSIENT = {"40001", "40P01", "55P03"}           # retryable: acceptable for any transaction
ISO = {"RC": "READ COMMITTED", "RR": "REPEATABLE READ", "SER": "SERIALIZABLE"}
NSHARED = 2
SHARED_PERIOD = 0.4
# started_at far ahead (after prepare only): the row lands in DEFAULT; maintain_partitions moves it out
FAR_FUTURE = (dt.datetime(2031, 5, 17, 10, tzinfo=UTC),)


def sqlstate(exc: BaseException) -> str:
    return getattr(exc, "pgcode", None) or type(exc).__name__


def short(msg: Any, n: int = 300) -> str:
    s = " ".join(str(msg).split())
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------
# violations
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Violation:
    invariant: str
    step: str            # the driver step at which it was first seen
    seed: int
    example: str
    count: int = 1       # how many times it was seen (checks or transactions)
    last_step: str = ""


class Violations:
    """Thread-safe; deduplicated by (invariant, key): a divergent row seen at ten checks is one
    violation, seen ten times, first at the step named."""

    def __init__(self, seed: int):
        self.seed = seed
        self.lock = threading.Lock()
        self.items: dict[tuple, Violation] = {}

    def add(self, invariant: str, step: str, key: Any, example: str):
        with self.lock:
            v = self.items.get((invariant, key))
            if v:
                v.count += 1
                v.last_step = step
            else:
                self.items[(invariant, key)] = Violation(invariant, step, self.seed, short(example, 600), 1, step)

    def by_invariant(self) -> dict[str, list[Violation]]:
        out: dict[str, list[Violation]] = collections.defaultdict(list)
        for v in self.items.values():
            out[v.invariant].append(v)
        return dict(out)

    def __len__(self):
        return len(self.items)


# ---------------------------------------------------------------------------------------------
# the model of a session's own key space (replayed from its journal)
# ---------------------------------------------------------------------------------------------
class Model:
    """calls: uid -> {started_at, error, ts}; trs: id -> {call_uid, text}; ps: id -> {call_uid, status}.
    A deleted key is remembered (it must stay absent). Native semantics: deleting a call sets the
    references to it to NULL (ON DELETE SET NULL)."""

    def __init__(self):
        self.calls: dict[str, dict] = {}
        self.gone_calls: set[str] = set()
        self.trs: dict[int, dict] = {}
        self.gone_trs: set[int] = set()
        self.ps: dict[int, dict] = {}
        self.gone_ps: set[int] = set()

    def apply(self, e: tuple):
        op = e[0]
        if op == "call_put":
            _, uid, started, error, ts = e
            self.calls[uid] = {"started_at": started, "error": error, "ts": ts}
            self.gone_calls.discard(uid)
        elif op == "call_set":
            _, uid, field, value = e
            self.calls[uid][field] = value
        elif op == "call_rekey":
            _, old, new, started = e
            c = self.calls.pop(old)
            c["started_at"] = started
            self.calls[new] = c
            self.gone_calls.add(old)
        elif op == "call_del":
            uid = e[1]
            self.calls.pop(uid)
            self.gone_calls.add(uid)
            for rows in (self.trs, self.ps):
                for r in rows.values():
                    if r["call_uid"] == uid:
                        r["call_uid"] = None
        elif op == "tr_put":
            _, tid, uid, text = e
            self.trs[tid] = {"call_uid": uid, "text": text}
        elif op == "tr_set":
            _, tid, field, value = e
            self.trs[tid][field] = value
        elif op == "tr_del":
            self.trs.pop(e[1])
            self.gone_trs.add(e[1])
        elif op == "ps_put":
            _, pid, uid, status = e
            self.ps[pid] = {"call_uid": uid, "status": status}
        elif op == "ps_del":
            self.ps.pop(e[1])
            self.gone_ps.add(e[1])
        elif op == "resync":   # the state read back after a transaction native constraints would refuse
            _, calls, trs, ps = e
            self.gone_calls |= set(self.calls) - set(calls)
            self.gone_trs |= set(self.trs) - set(trs)
            self.gone_ps |= set(self.ps) - set(ps)
            self.calls = {k: dict(v) for k, v in calls.items()}
            self.trs = {k: dict(v) for k, v in trs.items()}
            self.ps = {k: dict(v) for k, v in ps.items()}
            self.gone_calls -= set(calls)
        else:
            raise ValueError(e)

    def referenced(self, uid: str) -> bool:
        return any(r["call_uid"] == uid for r in self.trs.values()) or \
            any(r["call_uid"] == uid for r in self.ps.values())

    def has_transcript(self, uid: str) -> bool:
        return any(r["call_uid"] == uid for r in self.trs.values())


class Mismatch(Exception):
    """A statement's result differs from what the same statement gives with native constraints."""

    def __init__(self, invariant: str, msg: str):
        super().__init__(msg)
        self.invariant = invariant


# ---------------------------------------------------------------------------------------------
# shared context between the driver and the sessions
# ---------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, seed: int, violations: Violations):
        self.seed = seed
        self.violations = violations
        self.step = "before"
        self.stop = threading.Event()
        self.prepared_calls = threading.Event()   # far-future started_at only after prepare (DEFAULT partition)
        self.backfilling = threading.Event()
        self.calls_partitioned = threading.Event()   # set at the first swap of bcfy_calls_raw


# ---------------------------------------------------------------------------------------------
# a session: random transactions
# ---------------------------------------------------------------------------------------------
OWN_KINDS = {"ins", "ins_same", "ins_other", "copy", "bad_check", "upd_payload", "upd_started", "upd_uid", "del",
             "tr_ins", "tr_upd", "tr_reref", "tr_del", "ps_upsert", "ps_del", "read_own", "rr_race"}
WEIGHTS = {
    "ins": 10, "ins_same": 5, "ins_other": 3, "copy": 3, "bad_check": 1,
    "upd_payload": 6, "upd_started": 5, "upd_uid": 4, "del": 5,
    "tr_ins": 7, "tr_upd": 3, "tr_reref": 3, "tr_del": 2, "ps_upsert": 3, "ps_del": 1,
    "read_own": 5, "rr_race": 12,
    "sh_ins": 7, "sh_del": 5, "sh_move": 2, "sh_rekey": 2, "sh_tr": 6,
    "base_upd": 3, "truncate": 1,
}
KINDS, KIND_WEIGHTS = list(WEIGHTS), list(WEIGHTS.values())
# while a backfill runs, the race with its batches is what matters most
KIND_WEIGHTS_BACKFILL = [w * 5 if k == "rr_race" else w for k, w in WEIGHTS.items()]
# before the conversion: mostly inserts, so that the backfill has own rows to copy (and race with)
KIND_WEIGHTS_BEFORE = [w * 4 if k in ("ins", "copy") else w for k, w in WEIGHTS.items()]
# once calls is partitioned, uniqueness and references are enforced by triggers: more races on them
KIND_WEIGHTS_PARTITIONED = [w * 2 if k in ("sh_ins", "sh_del", "sh_tr") else w for k, w in WEIGHTS.items()]
ROLLBACK = object()   # returned by an op whose transaction must be rolled back by the test


class Session(threading.Thread):
    def __init__(self, db, seed: int, idx: int, ctx: Ctx, baseline: list[str], now: dt.datetime):
        super().__init__(daemon=True, name=f"fuzz-session-{idx}")
        self.db = db
        self.seed = seed
        self.idx = idx
        self.ctx = ctx
        self.rnd = random.Random(seed * 1000 + idx)   # a seed replays the same mix (not the interleaving)
        self.tag = f"fz{seed}t{idx}"
        self.baseline = baseline
        self.now = now
        self.model = Model()
        self.journal: list[dict] = []
        self.committed: collections.Counter = collections.Counter()
        self.refused: collections.Counter = collections.Counter()   # (kind, sqlstate)
        self.n = 0
        self.seq = 0
        self.expect: tuple[set, str] | None = None
        self.crash: str | None = None
        self.conn = None

    # ---- values -------------------------------------------------------------------------------
    def new_uid(self) -> tuple[str, int]:
        self.n += 1
        # a numeric prefix in the range of the demo call_uids ('1000-...' to '2449-...'): own rows interleave
        # with the others in primary-key order, so every backfill batch copies some of them
        return f"{self.rnd.randint(1000, 2449)}-{self.tag}-{self.n}", 5_000_000_000 + self.n

    def new_started(self) -> dt.datetime:
        if self.ctx.prepared_calls.is_set() and self.rnd.random() < 0.04:   # lands in DEFAULT: moved by maintain_partitions
            return self.rnd.choice(FAR_FUTURE) + dt.timedelta(seconds=self.rnd.randrange(86400))
        return (self.now - dt.timedelta(seconds=self.rnd.randint(-20 * 86400, 60 * 86400))).replace(microsecond=0)

    def live_calls(self) -> list[str]:
        return list(self.model.calls)

    def pick(self, seq):
        seq = list(seq)
        return self.rnd.choice(seq) if seq else None

    def snap(self, cur, iso: str, sql: str, params=None, p: float = 0.6, longest: float = 0.03):
        """RR / SERIALIZABLE: take the snapshot with a read, then wait a little before writing (what
        makes a snapshot older than the backfill batch or the other session's commit)."""
        cur.execute(sql, params)
        rows = cur.fetchall()
        if iso != "RC" and self.rnd.random() < p:
            time.sleep(self.rnd.uniform(0.002, longest))
        return rows

    def must(self, cur, expected: int, what: str):
        if cur.rowcount != expected:
            raise Mismatch("statement result differs from native", f"{what}: {cur.rowcount} rows, native: {expected}")

    def want(self, codes, why: str):
        self.expect = (set([codes] if isinstance(codes, str) else codes), why)

    # ---- the loop -----------------------------------------------------------------------------
    def run(self):
        try:
            self.conn = self.db.connect()
            self.conn.autocommit = True
            with self.conn.cursor() as cur:
                # an application waits for a lock at most 500 ms (55P03 is an allowed refusal): sessions
                # queued behind an engine step do not hold their own locks for long
                cur.execute("SET lock_timeout = '500ms'")
                cur.execute("SET statement_timeout = '30s'")
                cur.execute("SET application_name = %s", (f"fuzz-{self.tag}",))
            while not self.ctx.stop.is_set():
                self.one()
                time.sleep(self.rnd.uniform(0.001, 0.006))   # think time
        except Exception as e:  # noqa: BLE001 - a crash of the harness is reported, never swallowed
            self.crash = f"{type(e).__name__}: {e}"
            self.ctx.violations.add("harness: session crashed", self.ctx.step, self.idx, self.crash)
        finally:
            if self.conn is not None:
                self.conn.close()

    def choose(self) -> str:
        if self.ctx.backfilling.is_set():
            weights = KIND_WEIGHTS_BACKFILL
        elif not self.ctx.prepared_calls.is_set():
            weights = KIND_WEIGHTS_BEFORE
        elif self.ctx.calls_partitioned.is_set():
            weights = KIND_WEIGHTS_PARTITIONED
        else:
            weights = KIND_WEIGHTS
        return self.rnd.choices(KINDS, weights=weights)[0]

    def iso_for(self, kind: str) -> str:
        r = self.rnd.random()
        if kind == "rr_race":
            return "RR" if r < 0.7 else "SER"
        if kind.startswith("sh_"):
            return "RR" if r < 0.5 else ("SER" if r < 0.7 else "RC")
        if kind == "truncate":   # its checks of the conversion's step must see the latest state
            return "RC"
        return "RC" if r < 0.4 else ("RR" if r < 0.75 else "SER")

    def one(self):
        kind = self.choose()
        iso = self.iso_for(kind)
        self.expect = None
        step = self.ctx.step
        cur = self.conn.cursor()
        try:
            cur.execute(f"BEGIN ISOLATION LEVEL {ISO[iso]}")
            entries = getattr(self, "op_" + kind)(cur, iso)
            if entries is None:          # nothing eligible: an empty transaction, not counted
                cur.execute("ROLLBACK")
                return
            if entries is ROLLBACK:
                cur.execute("ROLLBACK")
                self.refused[(kind, "accepted (rolled back by the test)")] += 1
                return
            cur.execute("COMMIT")
        except Mismatch as m:
            self._rollback(cur)
            self.ctx.violations.add(m.invariant, step, (kind, str(m)[:60]), f"{kind} ({iso}) in session {self.idx}: {m}")
            self.refused[(kind, "result differs")] += 1
            return
        except psycopg2.Error as e:
            code = sqlstate(e)
            self._rollback(cur)
            self.refused[(kind, code)] += 1
            self._classify_refusal(kind, iso, step, code, e)
            return
        finally:
            cur.close()
        # committed
        self.committed[kind] += 1
        if self.expect is not None:
            codes, why = self.expect
            self.ctx.violations.add(
                "accepted what native constraints refuse", step, (kind, tuple(sorted(codes))),
                f"{kind} ({iso}) in session {self.idx} committed; native raises {'/'.join(sorted(codes))}: {why}")
            entries = [self.read_back(entries)]
        self.seq += 1
        for en in entries:
            self.model.apply(en)
        self.journal.append({"session": self.idx, "seq": self.seq, "kind": kind, "iso": iso, "step": self.ctx.step,
                             "writes": entries})

    def _rollback(self, cur):
        try:
            cur.execute("ROLLBACK")
        except psycopg2.Error:
            pass

    def _classify_refusal(self, kind, iso, step, code, e):
        msg = short(getattr(e, "pgerror", None) or e, 240)
        if code in TRANSIENT:
            return
        if self.expect is not None and code in self.expect[0]:
            return
        if kind == "truncate" and code in TRUNCATE_REFUSED:
            return
        if code not in ALLOWED:
            self.ctx.violations.add("refused with an unexpected SQLSTATE", step, (kind, code),
                                    f"{kind} ({iso}) in session {self.idx}: {code}: {msg}")
        elif kind in OWN_KINDS:
            native = "/".join(sorted(self.expect[0])) if self.expect else "success"
            self.ctx.violations.add("refused a write native constraints accept", step, (kind, code),
                                    f"{kind} ({iso}) in session {self.idx}: {code} (native: {native}): {msg}")

    def read_back(self, entries) -> tuple:
        """The own key space as the database has it now (after a transaction that native constraints
        would have refused committed): the model follows it so the violation is reported once."""
        calls, trs, ps = {}, {}, {}
        with self.conn.cursor() as cur:
            cur.execute("SELECT call_uid, started_at, error, ts FROM bcfy_calls_raw WHERE group_id = %s", (self.tag,))
            for uid, started, error, ts in cur.fetchall():
                calls[uid] = {"started_at": started, "error": error, "ts": ts}
            cur.execute("SELECT id, call_uid, text FROM transcripts WHERE id = ANY(%s)",
                        (list(self.model.trs) + list(self.model.gone_trs) + [e[1] for e in entries if e[0] == "tr_put"],))
            for tid, uid, text in cur.fetchall():
                trs[tid] = {"call_uid": uid, "text": text}
            cur.execute("SELECT id, call_uid, status FROM processing_state WHERE id = ANY(%s)",
                        (list(self.model.ps) + list(self.model.gone_ps) + [e[1] for e in entries if e[0] == "ps_put"],))
            for pid, uid, status in cur.fetchall():
                ps[pid] = {"call_uid": uid, "status": status}
        return ("resync", calls, trs, ps)

    # ---- own calls ----------------------------------------------------------------------------
    INS = ("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, feed_id, tg_id, started_at, duration_ms, fetched_at, "
           "raw_json, error) VALUES (%s, %s, %s, 1, 1, %s, %s, now(), '{}', %s)")
    SUFFIX = {"plain": "", "nothing": " ON CONFLICT (call_uid, started_at) DO NOTHING",
              "update": " ON CONFLICT (call_uid, started_at) DO UPDATE SET error = EXCLUDED.error"}

    def op_ins(self, cur, iso):
        uid, ts = self.new_uid()
        started, err = self.new_started(), f"i{self.n}"
        cur.execute(self.INS + self.SUFFIX[self.rnd.choice(list(self.SUFFIX))], (uid, self.tag, ts, started, 1000, err))
        self.must(cur, 1, f"INSERT of new call {uid}")
        return [("call_put", uid, started, err, ts)]

    def op_ins_same(self, cur, iso):
        uid = self.pick(self.model.calls)
        if uid is None:
            return None
        c = self.model.calls[uid]
        self.snap(cur, iso, "SELECT error FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        err = f"u{self.n}-{self.rnd.randrange(10**6)}"
        form = self.rnd.choice(["nothing", "update"])
        cur.execute(self.INS + self.SUFFIX[form], (uid, self.tag, c["ts"], c["started_at"], 1000, err))
        if form == "nothing":
            self.must(cur, 0, f"re-sent call {uid} ON CONFLICT DO NOTHING")
            return []
        self.must(cur, 1, f"re-sent call {uid} ON CONFLICT DO UPDATE")
        return [("call_set", uid, "error", err)]

    def op_ins_other(self, cur, iso):
        """The same call_uid with another started_at: call_uid is unique (native PK, then the guard)."""
        uid = self.pick(self.model.calls)
        if uid is None:
            return None
        c = self.model.calls[uid]
        other = c["started_at"] + dt.timedelta(days=self.rnd.choice([-45, -1, 3, 40]))
        self.snap(cur, iso, "SELECT 1 FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        self.want("23505", f"call_uid {uid} exists (started_at {c['started_at']:%Y-%m-%d}), inserted again with {other:%Y-%m-%d}")
        _, ts = self.new_uid()
        cur.execute(self.INS + self.SUFFIX[self.rnd.choice(list(self.SUFFIX))], (uid, self.tag, ts, other, 1000, "dup"))
        return []

    def op_copy(self, cur, iso):
        rows, entries = [], []
        for _ in range(self.rnd.randint(1, 4)):
            uid, ts = self.new_uid()
            started, err = self.new_started(), f"c{self.n}"
            rows.append([uid, self.tag, ts, 1, started.isoformat(), 500, err, "{}"])
            entries.append(("call_put", uid, started, err, ts))
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        buf.seek(0)
        cur.copy_expert("COPY bcfy_calls_raw (call_uid, group_id, ts, feed_id, started_at, duration_ms, error, raw_json) "
                        "FROM STDIN WITH (FORMAT csv)", buf)
        self.must(cur, len(rows), "COPY of new calls")
        return entries

    def op_bad_check(self, cur, iso):
        uid, ts = self.new_uid()
        self.want("23514", "duration_ms = -5 violates bcfy_calls_raw_duration_ms_check")
        cur.execute(self.INS, (uid, self.tag, ts, self.new_started(), -5, "bad"))
        return []

    def op_upd_payload(self, cur, iso):
        uid = self.pick(self.model.calls)
        if uid is None:
            return None
        self.snap(cur, iso, "SELECT error FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        err = f"p{self.n}-{self.rnd.randrange(10**6)}"
        cur.execute("UPDATE bcfy_calls_raw SET error = %s, processed = true WHERE call_uid = %s", (err, uid))
        self.must(cur, 1, f"UPDATE of the payload of live call {uid}")
        return [("call_set", uid, "error", err)]

    def op_upd_started(self, cur, iso):
        uid = self.pick(self.model.calls)
        if uid is None:
            return None
        self.snap(cur, iso, "SELECT started_at FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        started = self.new_started()
        cur.execute("UPDATE bcfy_calls_raw SET started_at = %s WHERE call_uid = %s", (started, uid))
        self.must(cur, 1, f"UPDATE of the partition key of live call {uid}")
        return [("call_set", uid, "started_at", started)]

    def op_upd_uid(self, cur, iso):
        uid = self.pick(self.model.calls)
        if uid is None:
            return None
        c = self.model.calls[uid]
        new, _ = self.new_uid()
        started = self.new_started() if self.rnd.random() < 0.5 else c["started_at"]
        self.snap(cur, iso, "SELECT 1 FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        if self.model.referenced(uid):
            self.want("23503", f"call {uid} is referenced (transcripts / processing_state, ON UPDATE NO ACTION); "
                               f"re-keyed to {new}{' with a new started_at' if started != c['started_at'] else ''}")
        cur.execute("UPDATE bcfy_calls_raw SET call_uid = %s, started_at = %s WHERE call_uid = %s", (new, started, uid))
        self.must(cur, 1, f"UPDATE of call_uid of live call {uid}")
        return [("call_rekey", uid, new, started)]

    def op_del(self, cur, iso):
        uid = self.pick(self.model.calls)
        if uid is None:
            return None
        self.snap(cur, iso, "SELECT 1 FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        cur.execute("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        self.must(cur, 1, f"DELETE of live call {uid}")
        return [("call_del", uid)]

    # ---- own transcripts / processing_state ---------------------------------------------------
    def _ref_target(self, p_with: float, p_gone: float):
        """(uid, expected sqlstate or None, why): a call without transcript, one with, or a deleted one."""
        r = self.rnd.random()
        free = [u for u in self.model.calls if not self.model.has_transcript(u)]
        taken = [u for u in self.model.calls if self.model.has_transcript(u)]
        if r < p_gone and self.model.gone_calls:
            uid = self.pick(sorted(self.model.gone_calls)[-50:])
            return uid, "23503", f"call {uid} was deleted / re-keyed"
        if r < p_gone + p_with and taken:
            uid = self.pick(taken)
            return uid, "23505", f"call {uid} already has a transcript (transcripts.call_uid is unique)"
        if free:
            return self.pick(free), None, ""
        return None, None, ""

    def op_tr_ins(self, cur, iso):
        uid, code, why = self._ref_target(0.12, 0.12)
        if uid is None:
            return None
        self.snap(cur, iso, "SELECT count(*) FROM transcripts WHERE call_uid = %s", (uid,))
        if code:
            self.want(code, why)
        text = f"unit {self.n} responding {self.tag}"
        cur.execute("INSERT INTO transcripts (call_uid, text, words, language, model_name, duration_seconds, confidence) "
                    "VALUES (%s, %s, '[]', 'en', 'fuzz', 2.5, 0.9) RETURNING id", (uid, text))
        tid = cur.fetchone()[0]
        entries = [("tr_put", tid, uid, text)]
        if self.rnd.random() < 0.6 and not code:
            status = self.rnd.choice(["transcribed", "indexed"])
            cur.execute("INSERT INTO processing_state (call_uid, status) VALUES (%s, %s) "
                        "ON CONFLICT (call_uid) DO UPDATE SET status = EXCLUDED.status RETURNING id", (uid, status))
            entries.append(("ps_put", cur.fetchone()[0], uid, status))
        return entries

    def op_tr_upd(self, cur, iso):
        tid = self.pick(self.model.trs)
        if tid is None:
            return None
        self.snap(cur, iso, "SELECT text FROM transcripts WHERE id = %s", (tid,))
        text = f"edited {self.n} {self.rnd.randrange(10**6)}"
        cur.execute("UPDATE transcripts SET text = %s WHERE id = %s", (text, tid))
        self.must(cur, 1, f"UPDATE of own transcript {tid}")
        return [("tr_set", tid, "text", text)]

    def op_tr_reref(self, cur, iso):
        tid = self.pick(self.model.trs)
        if tid is None:
            return None
        if self.rnd.random() < 0.4:
            uid, code, why = None, None, ""
        else:
            uid, code, why = self._ref_target(0.15, 0.15)
            if uid is None or uid == self.model.trs[tid]["call_uid"]:
                return None
        self.snap(cur, iso, "SELECT call_uid FROM transcripts WHERE id = %s", (tid,))
        if code:
            self.want(code, why)
        cur.execute("UPDATE transcripts SET call_uid = %s WHERE id = %s", (uid, tid))
        self.must(cur, 1, f"UPDATE of call_uid of own transcript {tid}")
        return [("tr_set", tid, "call_uid", uid)]

    def op_tr_del(self, cur, iso):
        tid = self.pick(self.model.trs)
        if tid is None:
            return None
        self.snap(cur, iso, "SELECT 1 FROM transcripts WHERE id = %s", (tid,))
        cur.execute("DELETE FROM transcripts WHERE id = %s", (tid,))
        self.must(cur, 1, f"DELETE of own transcript {tid}")
        return [("tr_del", tid)]

    def op_ps_upsert(self, cur, iso):
        if self.model.gone_calls and self.rnd.random() < 0.15:
            uid = self.pick(sorted(self.model.gone_calls)[-50:])
            self.want("23503", f"call {uid} was deleted / re-keyed")
        else:
            uid = self.pick(self.model.calls)
            if uid is None:
                return None
        status = self.rnd.choice(["queued", "downloaded", "error"])
        self.snap(cur, iso, "SELECT status FROM processing_state WHERE call_uid = %s", (uid,))
        cur.execute("INSERT INTO processing_state (call_uid, status) VALUES (%s, %s) "
                    "ON CONFLICT (call_uid) DO UPDATE SET status = EXCLUDED.status RETURNING id", (uid, status))
        return [("ps_put", cur.fetchone()[0], uid, status)]

    def op_ps_del(self, cur, iso):
        pid = self.pick(self.model.ps)
        if pid is None:
            return None
        cur.execute("DELETE FROM processing_state WHERE id = %s", (pid,))
        self.must(cur, 1, f"DELETE of own processing_state row {pid}")
        return [("ps_del", pid)]

    def op_read_own(self, cur, iso):
        """Read own keys back: every snapshot taken after this session's last commit shows exactly the model."""
        live = self.rnd.sample(list(self.model.calls), min(15, len(self.model.calls)))
        gone = self.rnd.sample(sorted(self.model.gone_calls), min(5, len(self.model.gone_calls)))
        if not live and not gone:
            return None
        cur.execute("SELECT call_uid, started_at, error FROM bcfy_calls_raw WHERE call_uid = ANY(%s)", (live + gone,))
        got = collections.defaultdict(list)
        for uid, started, error in cur.fetchall():
            got[uid].append((started, error))
        bad = []
        for uid in live:
            want = (self.model.calls[uid]["started_at"], self.model.calls[uid]["error"])
            if got.get(uid) != [want]:
                bad.append(f"{uid}: read {got.get(uid, 'nothing')}, committed {want}")
        bad += [f"{uid}: deleted / re-keyed, read {got[uid]}" for uid in gone if uid in got]
        tids = self.rnd.sample(list(self.model.trs), min(8, len(self.model.trs)))
        if tids:
            cur.execute("SELECT id, call_uid, text FROM transcripts WHERE id = ANY(%s)", (tids,))
            rows = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
            for tid in tids:
                want = (self.model.trs[tid]["call_uid"], self.model.trs[tid]["text"])
                if rows.get(tid) != want:
                    bad.append(f"transcript {tid}: read {rows.get(tid, 'nothing')}, committed {want}")
        if bad:
            raise Mismatch("committed writes lost or resurrected (read by the session)", "; ".join(bad[:3]))
        return []

    def op_rr_race(self, cur, iso):
        """The backfill race: the snapshot is taken (reading the backfill's progress), the session
        waits while the driver's next batch may copy the rows just above last_key, then it deletes
        or re-keys one of them."""
        tbl = "bcfy_calls_raw" if self.rnd.random() < 0.7 else "transcripts"
        cur.execute("SELECT step, last_key FROM dbops.p2_state WHERE table_name = %s", (tbl,))
        row = cur.fetchone()
        last = row[1] if row else None
        if tbl == "bcfy_calls_raw":
            if not self.model.calls:
                return None
            cur.execute("SELECT call_uid FROM bcfy_calls_raw WHERE call_uid = ANY(%s) AND (%s::text IS NULL OR call_uid > %s) "
                        "ORDER BY call_uid LIMIT 3", (list(self.model.calls), last, last))
            cands = [r[0] for r in cur.fetchall()] or list(self.model.calls)
            uid = self.pick(cands)
            time.sleep(self.rnd.uniform(0.005, 0.04))
            r = self.rnd.random()
            if r < 0.4:
                cur.execute("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
                self.must(cur, 1, f"DELETE of live call {uid}")
                return [("call_del", uid)]
            if r < 0.65 or self.model.referenced(uid):
                started = self.new_started()
                cur.execute("UPDATE bcfy_calls_raw SET started_at = %s WHERE call_uid = %s", (started, uid))
                self.must(cur, 1, f"UPDATE of the partition key of live call {uid}")
                return [("call_set", uid, "started_at", started)]
            if r < 0.85:
                new, _ = self.new_uid()
                started = self.model.calls[uid]["started_at"]
                cur.execute("UPDATE bcfy_calls_raw SET call_uid = %s WHERE call_uid = %s", (new, uid))
                self.must(cur, 1, f"UPDATE of call_uid of live call {uid}")
                return [("call_rekey", uid, new, started)]
            err = f"r{self.n}-{self.rnd.randrange(10**6)}"
            cur.execute("UPDATE bcfy_calls_raw SET error = %s WHERE call_uid = %s", (err, uid))
            self.must(cur, 1, f"UPDATE of the payload of live call {uid}")
            return [("call_set", uid, "error", err)]
        if not self.model.trs:
            return None
        cur.execute("SELECT id FROM transcripts WHERE id = ANY(%s) AND id > coalesce(%s::bigint, 0) ORDER BY id LIMIT 3",
                    (list(self.model.trs), last))
        cands = [r[0] for r in cur.fetchall()] or list(self.model.trs)
        tid = self.pick(cands)
        time.sleep(self.rnd.uniform(0.005, 0.04))
        r = self.rnd.random()
        if r < 0.5:
            cur.execute("DELETE FROM transcripts WHERE id = %s", (tid,))
            self.must(cur, 1, f"DELETE of own transcript {tid}")
            return [("tr_del", tid)]
        if r < 0.8:
            text = f"race {self.n} {self.rnd.randrange(10**6)}"
            cur.execute("UPDATE transcripts SET text = %s WHERE id = %s", (text, tid))
            self.must(cur, 1, f"UPDATE of own transcript {tid}")
            return [("tr_set", tid, "text", text)]
        cur.execute("UPDATE transcripts SET call_uid = NULL WHERE id = %s", (tid,))
        self.must(cur, 1, f"UPDATE of call_uid of own transcript {tid}")
        return [("tr_set", tid, "call_uid", None)]

    # ---- shared key space: races, checked by the invariants only -------------------------------
    def shared_uid(self) -> str:
        """The contention keys rotate with the clock (a new pair every SHARED_PERIOD s): every session
        goes for the same fresh keys at the same time (insert races), then deletes and references them."""
        epoch = int(time.monotonic() / SHARED_PERIOD) - (self.rnd.random() < 0.2)
        return f"shared-{epoch}-{self.rnd.randrange(NSHARED)}"

    def shared_started(self) -> dt.datetime:
        days = self.rnd.choice([-40, -10, 10])
        return (self.now + dt.timedelta(days=days)).replace(hour=12, minute=0, second=0, microsecond=0)

    def op_sh_ins(self, cur, iso):
        uid = self.shared_uid()
        # a longer window: another session inserts the same call_uid meanwhile (the uniqueness race)
        self.snap(cur, iso, "SELECT count(*) FROM bcfy_calls_raw WHERE call_uid = %s", (uid,), p=0.9, longest=0.06)
        self.n += 1
        suffix = " ON CONFLICT (call_uid, started_at) DO NOTHING" if self.rnd.random() < 0.7 else ""
        cur.execute("INSERT INTO bcfy_calls_raw (call_uid, group_id, ts, started_at, raw_json) "
                    "VALUES (%s, 'fzshared', %s, %s, '{}')" + suffix,
                    (uid, 7_000_000_000 + self.idx * 10_000_000 + self.n, self.shared_started()))
        return []

    def op_sh_del(self, cur, iso):
        uid = self.shared_uid()
        # a longer window: another session references the call meanwhile (the ON DELETE SET NULL race)
        self.snap(cur, iso, "SELECT count(*) FROM bcfy_calls_raw WHERE call_uid = %s", (uid,), p=0.9, longest=0.06)
        cur.execute("DELETE FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        return []

    def op_sh_move(self, cur, iso):
        uid = self.shared_uid()
        self.snap(cur, iso, "SELECT started_at FROM bcfy_calls_raw WHERE call_uid = %s", (uid,))
        cur.execute("UPDATE bcfy_calls_raw SET started_at = %s WHERE call_uid = %s", (self.shared_started(), uid))
        return []

    def op_sh_rekey(self, cur, iso):
        uid, new = self.shared_uid(), self.shared_uid()
        if uid == new:
            return None
        self.snap(cur, iso, "SELECT count(*) FROM bcfy_calls_raw WHERE call_uid IN (%s, %s)", (uid, new))
        cur.execute("UPDATE bcfy_calls_raw SET call_uid = %s WHERE call_uid = %s", (new, uid))
        return []

    def op_sh_tr(self, cur, iso):
        uid = self.shared_uid()
        self.snap(cur, iso, "SELECT count(*) FROM transcripts WHERE call_uid = %s", (uid,), p=0.9)
        if self.rnd.random() < 0.7:
            cur.execute("DELETE FROM transcripts WHERE call_uid = %s", (uid,))
        cur.execute("INSERT INTO transcripts (call_uid, text, duration_seconds, confidence) VALUES (%s, 'shared', 1, 0.5)",
                    (uid,))
        if self.rnd.random() < 0.5:
            cur.execute("INSERT INTO processing_state (call_uid, status) VALUES (%s, 'queued') "
                        "ON CONFLICT (call_uid) DO UPDATE SET status = 'downloaded'", (uid,))
        return []

    # ---- other ---------------------------------------------------------------------------------
    def op_base_upd(self, cur, iso):
        uid = self.pick(self.baseline)
        cur.execute("UPDATE bcfy_calls_raw SET processed = true, last_attempt = now(), error = %s WHERE call_uid = %s",
                    (f"b{self.idx}-{self.n}", uid))
        return []

    def op_truncate(self, cur, iso):
        """TRUNCATE of one partition: refused while the rows must not vanish unseen (swapped: the
        reverse sync; calls: referenced through the trigger pair, as a native FK refuses it)."""
        cur.execute("SELECT table_name, step FROM dbops.p2_state")
        steps = dict(cur.fetchall())
        tbls = [t for t in TABLES if steps.get(t) == "swapped" or (t == "bcfy_calls_raw" and steps.get(t) == "finalized")]
        if not tbls:
            return None
        tbl = self.pick(tbls)
        cur.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = to_regclass(%s) ORDER BY 1", (f"public.{tbl}",))
        parts = [r[0] for r in cur.fetchall()]
        if not parts:
            return None
        part = self.pick(parts)
        # rows from the statistics: reading the partition first would make the TRUNCATE a lock upgrade
        cur.execute("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass(%s)", (f"public.{part}",))
        n = f"~{cur.fetchone()[0]}"
        self.want(TRUNCATE_REFUSED, f"TRUNCATE of partition {part} of {tbl} ({steps[tbl]}, {n} rows)")
        cur.execute("SET LOCAL lock_timeout = '200ms'")   # never queue the others long behind it
        cur.execute(f'TRUNCATE public."{part}"')
        cur.execute("SELECT step FROM dbops.p2_state WHERE table_name = %s", (tbl,))
        if tbl == "transcripts" and cur.fetchone()[0] != "swapped":
            return ROLLBACK   # finalized meanwhile: nothing references transcripts, TRUNCATE is allowed then
        # accepted: recorded as a violation and rolled back (so that the rest of the run stays checkable)
        self.ctx.violations.add("accepted what native constraints refuse", self.ctx.step, ("truncate", tbl),
                                f"truncate ({iso}) in session {self.idx}: TRUNCATE {part} ({tbl} {steps[tbl]}, {n} rows) "
                                f"accepted; native refuses it (0A000: the table is referenced by a foreign key) / the "
                                f"engine's block (P0001); rolled back by the test")
        return ROLLBACK


# ---------------------------------------------------------------------------------------------
# invariants, in one REPEATABLE READ snapshot
# ---------------------------------------------------------------------------------------------
class Checker:
    def __init__(self, db, violations: Violations):
        self.db = db
        self.violations = violations
        self.checks = 0
        self.seconds = 0.0

    def check(self, step: str, sessions: list[Session] | None = None):
        t0 = time.monotonic()
        conn = self.db.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '20s'")
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cur.execute("SELECT 1")
                self._uniqueness(cur, step)
                self._references(cur, step)
                for tbl in TABLES:
                    self._pair(cur, step, tbl)
                if sessions is not None:
                    self._model(cur, step, sessions)
                cur.execute("COMMIT")
        finally:
            conn.close()
        self.checks += 1
        self.seconds += time.monotonic() - t0

    def _uniqueness(self, cur, step):
        for what, sql in (
            ("bcfy_calls_raw.call_uid", "SELECT call_uid::text, count(*), array_agg(started_at ORDER BY started_at)::text "
                                        "FROM bcfy_calls_raw GROUP BY call_uid HAVING count(*) > 1"),
            ("bcfy_calls_raw (group_id, ts)", "SELECT ROW(group_id, ts)::text, count(*), array_agg(call_uid)::text "
                                              "FROM bcfy_calls_raw WHERE group_id IS NOT NULL AND ts IS NOT NULL "
                                              "GROUP BY group_id, ts HAVING count(*) > 1"),
            ("transcripts.call_uid", "SELECT call_uid, count(*), array_agg(id)::text FROM transcripts "
                                     "WHERE call_uid IS NOT NULL GROUP BY call_uid HAVING count(*) > 1"),
            ("processing_state.call_uid", "SELECT call_uid, count(*), array_agg(id)::text FROM processing_state "
                                          "WHERE call_uid IS NOT NULL GROUP BY call_uid HAVING count(*) > 1"),
        ):
            cur.execute(sql)
            for key, n, detail in cur.fetchall():
                self.violations.add(f"unique: {what}", step, key, f"{what} {key} appears {n} times: {detail}")

    def _references(self, cur, step):
        for child in ("transcripts", "processing_state"):
            cur.execute(f"SELECT x.id, x.call_uid FROM {child} x WHERE x.call_uid IS NOT NULL "
                        "AND NOT EXISTS (SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = x.call_uid)")
            for rid, uid in cur.fetchall():
                self.violations.add(f"reference: {child}.call_uid has its call", step, (child, rid),
                                    f"{child} id {rid} references call_uid {uid}, which bcfy_calls_raw does not have")

    def _pair(self, cur, step, tbl):
        """During the conversion the partitioned copy equals the plain one (the derived key on the
        plain side, every shared column, the generated tsv included): while backfilling, every row of
        the shadow is a row of the source and every source row up to last_key is in the shadow; once
        backfilled (and after the swap / a rollback, until finalize) the two are equal."""
        cur.execute("SELECT s.step, s.pk_col, s.pk_type, s.key_col, s.key_expr, s.last_key, "
                    "       (SELECT relname FROM pg_class WHERE oid = pr.plain), (SELECT relname FROM pg_class WHERE oid = pr.part) "
                    "FROM dbops.p2_state s, dbops.p2_pair(s.table_name) pr WHERE s.table_name = %s", (tbl,))
        row = cur.fetchone()
        if not row:
            return
        st, pk, pk_type, key_col, key_expr, last_key, plain, part = row
        if st in ("shadow_created", "finalized") or plain is None or part is None:
            return
        cur.execute("SELECT a.attname FROM pg_attribute a JOIN pg_attribute b ON b.attrelid = %s::regclass "
                    "AND b.attname = a.attname AND b.attnum > 0 AND NOT b.attisdropped "
                    "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    (f"public.{part}", f"public.{plain}"))
        cols = [r[0] for r in cur.fetchall()]
        qi = lambda c: '"' + c.replace('"', '""') + '"'   # noqa: E731
        plain_cols = ", ".join(f"({key_expr})" if c == key_col else qi(c) for c in cols)
        part_cols = ", ".join(qi(c) for c in cols)
        complete = st not in ("prepared", "backfilling")
        if complete:
            done = "true"
        elif last_key is None:
            done = "false"
        else:
            cur.execute("SELECT quote_literal(%s)", (last_key,))
            done = f"{qi(pk)} <= {cur.fetchone()[0]}::{pk_type}"
        cur.execute(f"""
            WITH p AS MATERIALIZED (SELECT {qi(pk)}::text AS k, ROW({plain_cols})::text AS r, {done} AS done
                                    FROM public.{qi(plain)}),
                 q AS MATERIALIZED (SELECT {qi(pk)}::text AS k, ROW({part_cols})::text AS r FROM public.{qi(part)})
            SELECT 'only_part', k, r FROM (SELECT k, r FROM q EXCEPT ALL SELECT k, r FROM p) x
            UNION ALL
            SELECT 'only_plain', k, r FROM (SELECT k, r FROM p WHERE done EXCEPT ALL SELECT k, r FROM q) y
            ORDER BY 2, 1""")
        diff = cur.fetchall()
        if not diff:
            return
        by_key: dict[str, dict] = collections.defaultdict(dict)
        for side, k, r in diff:
            by_key[k][side] = r
        inv = (f"copies equal: {part} (partitioned) vs {plain} (plain)" if complete
               else f"copies equal: shadow {part} is a subset of {plain} (backfilling)")
        for k, sides in by_key.items():
            if "only_part" in sides and "only_plain" in sides:
                what = f"{pk} {k}: values differ: {short(sides['only_part'], 160)} in {part} vs {short(sides['only_plain'], 160)} in {plain}"
            elif "only_part" in sides:
                what = f"{pk} {k}: in {part} but not in {plain} (stale / resurrected): {short(sides['only_part'], 200)}"
            else:
                what = f"{pk} {k}: in {plain} but missing from {part} (lost): {short(sides['only_plain'], 200)}"
            self.violations.add(inv.split(":")[0] + f": {tbl}", step, (tbl, k, tuple(sorted(sides))), f"step {st}: {what}")

    def _model(self, cur, step, sessions):
        """No committed write lost or resurrected: every session's journal replayed into a model
        (in its commit order; its keys are written by no one else) against the tables."""
        for s in sessions:
            m = Model()
            for tx in s.journal:
                for en in tx["writes"]:
                    m.apply(en)
            cur.execute("SELECT call_uid, started_at, error FROM bcfy_calls_raw WHERE group_id = %s", (s.tag,))
            rows = collections.defaultdict(list)
            for uid, started, error in cur.fetchall():
                rows[uid].append((started, error))
            inv = "committed writes lost or resurrected (journal replay)"
            for uid, c in m.calls.items():
                want = [(c["started_at"], c["error"])]
                if rows.get(uid) != want:
                    self.violations.add(inv, step, ("call", uid),
                                        f"call {uid} (session {s.idx}): table has {rows.get(uid, 'nothing')}, "
                                        f"journal: {want[0]}")
            for uid in set(rows) - set(m.calls):
                self.violations.add(inv, step, ("call", uid),
                                    f"call {uid} (session {s.idx}): table has {rows[uid]}, journal: "
                                    f"{'deleted / re-keyed' if uid in m.gone_calls else 'never committed'}")
            for table, mine, gone, col in (("transcripts", m.trs, m.gone_trs, "text"),
                                           ("processing_state", m.ps, m.gone_ps, "status")):
                cur.execute(f"SELECT id, call_uid, {col} FROM {table} WHERE id = ANY(%s)", (list(mine) + list(gone),))
                got = {r[0]: {"call_uid": r[1], col: r[2]} for r in cur.fetchall()}
                for rid, want in mine.items():
                    if got.get(rid) != want:
                        self.violations.add(inv, step, (table, rid),
                                            f"{table} id {rid} (session {s.idx}): table has {got.get(rid, 'nothing')}, "
                                            f"journal: {want}")
                for rid in set(got) & gone:
                    self.violations.add(inv, step, (table, rid),
                                        f"{table} id {rid} (session {s.idx}): deleted in the journal, table has {got[rid]}")


# ---------------------------------------------------------------------------------------------
# the driver: the conversion's steps, as Ansible calls them
# ---------------------------------------------------------------------------------------------
class Refused(Exception):
    def __init__(self, code: str, msg: str):
        super().__init__(f"{code}: {msg}")
        self.code = code


LOCK_RETRIES = threading.local()


def engine(db, sql: str, params=None, lock_timeout: str = "500ms", retries: int = 200):
    """One engine step on a fresh autocommit connection, retried with backoff on lock_not_available
    (the Ansible contract, lock_timeout 500 ms: docs/PHASE2_DESIGN.md). Any other error: Refused.
    LOCK_RETRIES.n counts the retries."""
    for attempt in range(retries):
        LOCK_RETRIES.n = getattr(LOCK_RETRIES, "n", 0) + (attempt > 0)
        conn = db.connect()
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = %s", (lock_timeout,))
                cur.execute("SET statement_timeout = '120s'")
                cur.execute(sql, params)
                row = cur.fetchone() if cur.description else None
                return row[0] if row else None
        except psycopg2.errors.LockNotAvailable:
            time.sleep(0.02 * (1 + attempt % 5))
        except psycopg2.Error as e:
            raise Refused(sqlstate(e), " ".join(str(getattr(e, "pgerror", None) or e).split())) from None
        finally:
            conn.close()
    raise Refused("55P03", f"{sql}: still lock_not_available after {retries} attempts")


MAINTAIN = "CALL maintain_partitions(lock_wait => '400ms', lock_retries => 5)"


class Driver:
    def __init__(self, db, ctx: Ctx, checker: Checker, seconds: float, batches: dict[str, int], log: Callable[[str], None]):
        self.db = db
        self.ctx = ctx
        self.checker = checker
        self.violations = ctx.violations
        self.seconds = seconds
        self.batches = batches
        self.log = log
        self.walk: list[str] = []
        self.state = {t: "plain" for t in TABLES}
        self.repairs = 0
        self.lock_timeouts_only: list[str] = []

    def dwell(self, share: float):
        time.sleep(max(0.05, self.seconds * share))

    def step(self, name: str, fn: Callable[[], Any], check: bool = True):
        self.ctx.step = name
        t0 = time.monotonic()
        LOCK_RETRIES.n = 0
        try:
            res = fn()
            status = res.get("status", "ok") if isinstance(res, dict) else "ok"
        except Refused as e:
            res, status = e, f"REFUSED {e.code}"
            self.violations.add("engine step refused", name, (name, e.code), f"{name}: {e}")
        if isinstance(res, dict) and res.get("errors"):
            status += f", {len(res['errors'])} error(s)"
        if isinstance(res, dict) and res.get("moved_from_default"):
            status += f", moved {res['moved_from_default']}"
        retried = f", {LOCK_RETRIES.n} lock retries" if getattr(LOCK_RETRIES, "n", 0) else ""
        self.walk.append(f"{name}: {status} ({time.monotonic() - t0:.2f}s{retried})")
        if check:
            self.checker.check(name)
        return res

    def ok(self, res) -> bool:
        return not isinstance(res, Refused)

    # ---- steps ------------------------------------------------------------------------------------
    def prepare(self, tbl):
        def fn():
            for _ in range(100):
                res = engine(self.db, "SELECT dbops.p2_prepare(%s)", (tbl,))
                if res["status"] != "retry":
                    return res
                time.sleep(0.05)
            raise Refused("55P03", "prepare: no lock after 100 attempts")
        res = self.step(f"prepare {tbl}", fn)
        if self.ok(res):
            self.state[tbl] = "converting"
            if tbl == "bcfy_calls_raw":
                self.ctx.prepared_calls.set()
        return res

    def backfill_all(self):
        n = {t: 0 for t in TABLES}
        todo = [t for t in TABLES if self.state[t] == "converting"]
        self.ctx.backfilling.set()
        try:
            self._backfill(n, todo)
        finally:
            self.ctx.backfilling.clear()

    def _backfill(self, n, todo):
        # a pause between batches, so that the sessions' snapshots fall between them
        pause = min(0.25, max(0.03, self.seconds * 0.004))
        while todo:
            for tbl in list(todo):
                n[tbl] += 1
                res = self.step(f"backfill {tbl} batch {n[tbl]}",
                                lambda t=tbl: engine(self.db, "CALL dbops.p2_backfill(%s, %s, 0)", (t, self.batches[t])))
                if not self.ok(res):
                    self.state[tbl] = "stuck"
                    todo.remove(tbl)
                elif res["status"] == "done":
                    todo.remove(tbl)
                time.sleep(pause)

    def repair_and_verify(self, tbl) -> dict:
        """After a refused verify / swap (the shadow diverged; the violation is recorded): bring the
        shadow back to the source under a lock that keeps writers out, and verify in the same
        transaction, so that the walk can go on and find what comes after."""
        conn = self.db.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '5s'")
                cur.execute("SELECT shadow_name, key_col, key_expr FROM dbops.p2_state WHERE table_name = %s", (tbl,))
                shadow, key_col, key_expr = cur.fetchone()
                cur.execute(f'LOCK TABLE public."{tbl}", public."{shadow}" IN SHARE ROW EXCLUSIVE MODE')
                cur.execute("SELECT a.attname, a.attgenerated = '' AND b.attgenerated = '' FROM pg_attribute a "
                            "JOIN pg_attribute b ON b.attrelid = %s::regclass AND b.attname = a.attname AND b.attnum > 0 "
                            "AND NOT b.attisdropped WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped "
                            "ORDER BY a.attnum", (f"public.{shadow}", f"public.{tbl}"))
                cols = cur.fetchall()
                qi = lambda c: '"' + c + '"'   # noqa: E731
                src = ", ".join(f"({key_expr})" if c == key_col else qi(c) for c, _ in cols)
                dst = ", ".join(qi(c) for c, _ in cols)
                ins = [c for c, insertable in cols if insertable]
                cur.execute(f'DELETE FROM public."{shadow}" d WHERE ROW({", ".join("d." + qi(c) for c, _ in cols)})::text '
                            f'NOT IN (SELECT ROW({src})::text FROM public."{tbl}")')
                deleted = cur.rowcount
                cur.execute(f'INSERT INTO public."{shadow}" ({", ".join(map(qi, ins))}) '
                            f'SELECT {", ".join(f"({key_expr})" if c == key_col else qi(c) for c in ins)} FROM public."{tbl}" s '
                            f'WHERE ROW({src})::text NOT IN (SELECT ROW({dst})::text FROM public."{shadow}")')
                inserted = cur.rowcount
                cur.execute("SELECT dbops.p2_verify(%s)", (tbl,))
                res = cur.fetchone()[0]
            conn.commit()
            self.repairs += 1
            self.log(f"repaired {shadow}: {deleted} row(s) deleted, {inserted} inserted; verify {res['status']}")
            return res
        except psycopg2.Error as e:
            conn.rollback()
            raise Refused(sqlstate(e), short(getattr(e, "pgerror", None) or e, 400)) from None
        finally:
            conn.close()

    def verify_swap(self, tbl, round_: int):
        if self.state[tbl] != "converting":
            return
        res = self.step(f"verify {tbl} #{round_}", lambda: engine(self.db, "SELECT dbops.p2_verify(%s)", (tbl,)))
        for attempt in range(3):
            if not self.ok(res):
                res = self.step(f"repair shadow + verify {tbl} #{round_}", lambda: self.repair_and_verify(tbl))
                if not self.ok(res):
                    continue
            res = self.step(f"swap {tbl} #{round_}", lambda: engine(self.db, "SELECT dbops.p2_swap(%s)", (tbl,)))
            if self.ok(res):
                self.state[tbl] = "swapped"
                if tbl == "bcfy_calls_raw":
                    self.ctx.calls_partitioned.set()
                return
        self.state[tbl] = "stuck"

    def retried(self, name, sql, tbl, tries=3):
        for attempt in range(tries):
            res = self.step(name + (f" (attempt {attempt + 1})" if attempt else ""),
                            lambda: engine(self.db, sql, (tbl,) if tbl else None))
            if self.ok(res):
                return res
            time.sleep(0.5)
        return res

    def nightly(self, name, sql):
        """A nightly job. One whose failed steps all failed on a lock timeout is noted in the walk,
        not a violation: the job's own contract is "a lock timeout is retried by the next run" (the
        final maintain_partitions is that next run). Any other failure: a refused step."""
        def fn():
            try:
                return engine(self.db, sql)
            except Refused as e:
                if '"error": "55P03' not in str(e) or '"error": "' in str(e).replace('"error": "55P03', ''):
                    raise
                self.log(f"{name}: lock timeouts only: {short(e, 200)}")
                self.lock_timeouts_only.append(name)
                return {"status": "lock timeouts only (retried by the next run)"}
        return self.step(name, fn)

    def run(self):
        T = TABLES
        self.step("before", lambda: self.dwell(0.15))
        for t in T:
            self.prepare(t)
        self.backfill_all()
        for t in T:
            self.verify_swap(t, 1)
            self.dwell(0.06)
        self.nightly("maintain_partitions (swapped)", MAINTAIN)
        self.dwell(0.06)
        for t in reversed(T):   # transcripts first: its old copy references the old calls
            if self.state[t] == "swapped":
                res = self.retried(f"rollback {t}", "SELECT dbops.p2_rollback(%s)", t)
                if self.ok(res):
                    self.state[t] = "converting"
            self.dwell(0.04)
        self.step("validate_refs", lambda: engine(self.db, "SELECT dbops.p2_validate_refs()"))
        self.dwell(0.06)
        for t in T:
            self.verify_swap(t, 2)
            self.dwell(0.06)
        for t in reversed(T):
            if self.state[t] == "swapped":
                res = self.retried(f"finalize {t}", "SELECT dbops.p2_finalize(%s)", t)
                if self.ok(res):
                    self.state[t] = "finalized"
            self.dwell(0.04)
        self.nightly("maintain_partitions", MAINTAIN)
        self.nightly("cleanup_old_data", "CALL cleanup_old_data(lock_wait => '400ms', lock_retries => 5)")
        self.step("after the nightly jobs", lambda: self.dwell(0.4))


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    seed: int
    seconds: float
    committed: collections.Counter
    refused: collections.Counter
    violations: Violations
    walk: list[str]
    checks: int
    check_seconds: float
    states: dict
    repairs: int
    lock_timeouts_only: list
    journal_path: str | None = None

    @property
    def n_committed(self):
        return sum(self.committed.values())

    @property
    def n_refused(self):
        return sum(self.refused.values())

    def summary(self) -> str:
        out = [f"=== integrity fuzz: seed {self.seed}: {self.seconds:.1f} s, {self.checks} invariant checks "
               f"({self.check_seconds:.1f} s), final states {self.states}, shadow repairs {self.repairs} ===",
               f"transactions: {self.n_committed} committed, {self.n_refused} refused"]
        out.append("  committed by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(self.committed.items())))
        by_code = collections.Counter()
        for (kind, code), v in self.refused.items():
            by_code[code] += v
        out.append("  refused by SQLSTATE: " + ", ".join(f"{c} {v}" for c, v in sorted(by_code.items())))
        out.append("  refused by kind/SQLSTATE: " + ", ".join(
            f"{k}/{c} {v}" for (k, c), v in sorted(self.refused.items())))
        out.append("walk: " + " | ".join(self.walk))
        if self.lock_timeouts_only:
            out.append("nightly jobs that only met lock timeouts (not violations; the next run retries): "
                       + ", ".join(self.lock_timeouts_only))
        groups = self.violations.by_invariant()
        out.append(f"violations: {len(self.violations)} distinct, in {len(groups)} invariant(s)")
        for inv, vs in sorted(groups.items()):
            vs = sorted(vs, key=lambda v: self.walk_index(v.step))
            out.append(f"  [{inv}] {len(vs)} distinct, seen {sum(v.count for v in vs)} times; first at step "
                       f"'{vs[0].step}' (seed {self.seed})")
            for v in vs[:6]:
                out.append(f"      - at '{v.step}'" + (f" (seen {v.count}x, last at '{v.last_step}')" if v.count > 1 else "")
                           + f": {v.example}")
            if len(vs) > 6:
                out.append(f"      - ... {len(vs) - 6} more")
        if self.journal_path:
            out.append(f"journal: {self.journal_path}")
        return "\n".join(out)

    def walk_index(self, step: str) -> int:
        for i, w in enumerate(self.walk):
            if w.startswith(step + ":"):
                return i
        return len(self.walk)


def _jsonable(o):
    if isinstance(o, dt.datetime):
        return o.isoformat()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def run_fuzz(db, seed: int, seconds: float, threads: int, calls: int, journal_dir=None, log=print) -> Result:
    violations = Violations(seed)
    ctx = Ctx(seed, violations)
    checker = Checker(db, violations)
    baseline = [r[0] for r in db.query("SELECT call_uid FROM bcfy_calls_raw ORDER BY call_uid")]
    n_tr = db.scalar("SELECT count(*) FROM transcripts")
    now = dt.datetime.now(UTC).replace(microsecond=0)
    sessions = [Session(db, seed, i, ctx, baseline, now) for i in range(threads)]
    # small batches (about 30 per table), so that batches and snapshots interleave
    batches = {"bcfy_calls_raw": max(10, (calls + 400) // 30), "transcripts": max(5, (n_tr + 100) // 20)}
    driver = Driver(db, ctx, checker, seconds, batches, log)
    t0 = time.monotonic()
    for s in sessions:
        s.start()
    try:
        driver.run()
    finally:
        ctx.stop.set()
        for s in sessions:
            s.join(60)
    ctx.step = "after (sessions stopped)"
    checker.check(ctx.step, sessions)
    committed, refused = collections.Counter(), collections.Counter()
    for s in sessions:
        committed.update(s.committed)
        refused.update(s.refused)
        if s.is_alive():
            violations.add("harness: session did not stop", ctx.step, s.idx, f"session {s.idx} still running after 60 s")
    res = Result(seed, time.monotonic() - t0, committed, refused, violations, driver.walk, checker.checks,
                 checker.seconds, dict(driver.state), driver.repairs, driver.lock_timeouts_only)
    if journal_dir is not None:
        path = journal_dir / f"journal-seed{seed}.jsonl"
        with open(path, "w") as f:
            for s in sessions:
                for tx in s.journal:
                    f.write(json.dumps(tx, default=_jsonable) + "\n")
        res.journal_path = str(path)
    return res
