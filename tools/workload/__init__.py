"""scanner-workload: simulate the police-scanner application against PostgreSQL while a
migration runs, and measure what the application experiences.

"Zero downtime is measured, not claimed": every statement the simulated application sends is
timed and its outcome (ok / SQLSTATE) recorded; every write that COMMITTED is journaled to a
JSON-lines keys file so that `check` can prove afterwards that nothing was lost.

Roles (one thread each, own connection, autocommit or short transactions like the real app):
  ingest       INSERT INTO bcfy_calls_raw ... ON CONFLICT <target> DO NOTHING RETURNING ...
               (+ occasional duplicates of already committed calls: exercises the conflict path)
  worker       audio worker: SELECT ... FOR UPDATE SKIP LOCKED, UPDATE ... SET processed = true
  transcriber  INSERT INTO transcripts ... RETURNING id; upsert processing_state by call_uid
  api          reads: list by feed_id / tg_id, transcripts JOIN calls, FTS, dashboard counts
  metrics      INSERT INTO api_call_metrics ... RETURNING id
  logs         INSERT INTO system_logs ... RETURNING id

Modules
  statements.py  the SQL (STATEMENTS, API_READS) and each role's operation (ROLES)
  db.py          connecting, the target without its password, SQLSTATEs, UTC timestamps
  recorder.py    every statement's outcome and latency, stalls, per-role gaps, connection counters
  session.py     one application connection (one thread): reconnects, timed statements
  runner.py      Workload: the threads, their pace, stop conditions, the summary; human_line()
  journal.py     KeyLog (the journal of committed writes) and check_keys() (nothing lost)
  cli.py         `run` and `check` on the command line: python tools/workload --help
  __main__.py    makes the folder runnable: python tools/workload ... (or python -m tools.workload)

Library (import the folder tools/ puts on sys.path as `workload`)
  wl = Workload(conn_kwargs={"host": ..., "port": ..., "dbname": ..., "user": ..., "password": ...},
                rate=200, upsert="call_uid", keys_path="keys.jsonl", duration=None)
  wl.start(); ...migration...; wl.stop(); s = wl.summary()       # or: with Workload(...) as wl:
  report = check_keys(conn_kwargs, "keys.jsonl")                   # report["missing_total"] == 0

Only the standard library and psycopg2 are used.
"""
from __future__ import annotations

from .cli import main
from .db import APP_NAME, connect, describe_target, read_password_file
from .journal import KEY_TABLES, KeyLog, check_keys, load_keys
from .recorder import Recorder
from .runner import DEFAULT_HARD_MAX_S, DEFAULT_STATEMENT_TIMEOUT_MS, Workload, human_line
from .statements import API_READS, CALL_COLUMNS, ROLE_WEIGHTS, ROLES, STATEMENTS, UPSERT_TARGETS, Statement

__all__ = [
    "API_READS", "APP_NAME", "CALL_COLUMNS", "DEFAULT_HARD_MAX_S", "DEFAULT_STATEMENT_TIMEOUT_MS", "KEY_TABLES",
    "KeyLog", "ROLES", "ROLE_WEIGHTS", "Recorder", "STATEMENTS", "Statement", "UPSERT_TARGETS", "Workload",
    "check_keys", "connect", "describe_target", "human_line", "load_keys", "main", "read_password_file",
]
