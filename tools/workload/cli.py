"""scanner-workload: simulate the police-scanner application against PostgreSQL while a
migration runs, and measure what the application experiences.

CLI (from the repository root; from elsewhere give the folder's path: python /path/to/tools/workload)
  python tools/workload run   [conn] [--duration S | --until-file PATH] [--rate N]
                              [--upsert call_uid|call_uid_started_at]
                              [--keys out.jsonl] [--summary out.json] [--max-duration 3600] ...
  python tools/workload check [conn] --keys out.jsonl [--json out.json]
  conn: --dsn 'host=... dbname=...'  and/or  --host --port --dbname --user;
        password from --password-file FILE, PGPASSFILE / ~/.pgpass or PGPASSWORD (never printed)
  exit codes: run 0 = no failed statement, 1 = some statements failed, 2 = usage/setup error;
              check 0 = nothing lost, 1 = committed rows/updates missing, 2 = error.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import psycopg2

from .db import _err_info, describe_target, read_password_file
from .journal import check_keys
from .runner import DEFAULT_HARD_MAX_S, DEFAULT_STATEMENT_TIMEOUT_MS, Workload, human_line
from .statements import ROLES, UPSERT_TARGETS


def _add_conn_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("connection (password: --password-file, PGPASSFILE/~/.pgpass or PGPASSWORD)")
    g.add_argument("--dsn", help="libpq conninfo or URI (a password inside it is never printed)")
    g.add_argument("--host")
    g.add_argument("--port", type=int)
    g.add_argument("--dbname")
    g.add_argument("--user")
    g.add_argument("--password-file", help="file whose first line is the password")


def _conn_kwargs(args) -> dict:
    kw = {"dsn": args.dsn, "host": args.host, "port": args.port, "dbname": args.dbname, "user": args.user}
    if args.password_file:
        kw["password"] = read_password_file(args.password_file)
    return {k: v for k, v in kw.items() if v is not None}


def _write_json(path: str, data: dict):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def _cmd_run(args) -> int:
    extra = {}
    for item in args.extra_read or []:
        name, sep, sql = item.partition("=")
        if not sep or not name.strip() or not sql.strip():
            print(f"workload: --extra-read expects NAME=SQL, got {item!r}", file=sys.stderr)
            return 2
        extra[name.strip()] = sql.strip()
    try:
        conn_kwargs = _conn_kwargs(args)
    except OSError as exc:
        print(f"workload: cannot read password file: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        wl = Workload(conn_kwargs, rate=args.rate, upsert=args.upsert, keys_path=args.keys,
                      duration=args.duration, until_file=args.until_file, max_duration=args.max_duration,
                      statement_timeout_ms=int(args.statement_timeout * 1000),
                      threads_per_role=args.threads, roles=args.roles.split(",") if args.roles else None,
                      dup_ratio=args.dup_ratio, spread_s=args.spread, extra_reads=extra)
    except ValueError as exc:
        print(f"workload: {exc}", file=sys.stderr)
        return 2

    def _on_signal(signum, _frame):
        wl.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if not args.quiet:
        print(f"workload: target {describe_target(conn_kwargs)}, rate {args.rate:g}/s, "
              f"upsert ON CONFLICT {UPSERT_TARGETS[args.upsert]}, run {wl.run_tag}", file=sys.stderr, flush=True)
    summ = wl.run()
    if args.summary:
        _write_json(args.summary, summ)
    print(human_line(summ), flush=True)
    if summ["failed"] and not args.quiet:
        for key, n in sorted(summ["failure_counts"].items()):
            print(f"workload:   failed {key}: {n}", file=sys.stderr)
    return 1 if summ["failed"] else 0


def _cmd_check(args) -> int:
    try:
        conn_kwargs = _conn_kwargs(args)
        report = check_keys(conn_kwargs, args.keys)
    except OSError as exc:
        print(f"check: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except psycopg2.Error as exc:
        code, msg = _err_info(exc)
        print(f"check: database error {code}: {msg}", file=sys.stderr)
        return 2
    for t, r in report["tables"].items():
        line = f"check: {t}: {r['expected']} committed, {r['missing']} missing"
        if r["missing"]:
            line += f" e.g. {r['missing_sample']}"
        print(line)
    if report["unreadable_lines"]:
        print(f"check: {report['unreadable_lines']} unreadable key lines ignored", file=sys.stderr)
    if args.json:
        _write_json(args.json, report)
    if report["ok"]:
        print("check: OK: every committed write is present")
        return 0
    print(f"check: FAILED: {report['missing_total']} committed writes missing")
    return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="workload.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the simulated application")
    _add_conn_args(r)
    r.add_argument("--duration", type=float, help="seconds to run")
    r.add_argument("--until-file", help="stop when this file exists")
    r.add_argument("--max-duration", type=float, default=DEFAULT_HARD_MAX_S,
                   help="hard stop after this many seconds whatever happens (default 3600)")
    r.add_argument("--rate", type=float, default=200.0, help="target statements/s overall (0 = as fast as possible)")
    r.add_argument("--upsert", choices=sorted(UPSERT_TARGETS), default="call_uid",
                   help="ingest conflict target: (call_uid) today, (call_uid, started_at) once partitioned")
    r.add_argument("--keys", help="JSON-lines journal of committed writes (for `check`)")
    r.add_argument("--summary", help="write the JSON summary here")
    r.add_argument("--statement-timeout", type=float, default=DEFAULT_STATEMENT_TIMEOUT_MS / 1000,
                   help="per-session statement_timeout in seconds (default 30)")
    r.add_argument("--threads", type=int, default=1, help="threads (connections) per role")
    r.add_argument("--roles", help=f"comma list of roles (default all: {','.join(ROLES)})")
    r.add_argument("--dup-ratio", type=float, default=0.05, help="share of ingests that re-send a committed call")
    r.add_argument("--spread", type=int, default=3600, help="new calls start up to this many seconds in the past")
    r.add_argument("--extra-read", action="append", metavar="NAME=SQL", help="extra read statement for the api role")
    r.add_argument("--quiet", action="store_true")
    c = sub.add_parser("check", help="verify every committed write is still present")
    _add_conn_args(c)
    c.add_argument("--keys", required=True, action="append", help="keys file (repeatable)")
    c.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        if args.duration is None and not args.until_file:
            print(f"workload: no --duration/--until-file: stops after --max-duration {args.max_duration:g} s "
                  "or on SIGTERM/SIGINT", file=sys.stderr)
        return _cmd_run(args)
    return _cmd_check(args)

