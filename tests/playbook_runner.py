"""Run a playbook of this repo against a test database, the way an operator would.

    res = run_playbook(db, "phase1", extra_vars={"migrate_retries": 1})
    assert res.ok, res.text
    res.changed, res.stats, res.failures, res.messages, res.task("Apply pending")

A temporary inventory (YAML, 0600, in a private temp dir) describes one host `testdb` of the
group `scanner_db` with `ansible_connection: local`, like inventory/local/hosts.yml, and the
connection inputs (scanner_db_*) as host vars; backup_dir and report_dir are folders in the
same temp dir unless overridden. ansible-playbook runs from the repo with the repo's
ansible.cfg, so stdout is the default callback's output: exactly what an operator sees.

ansible-core 2.19 moved the `json` stdout callback to ansible.posix (not installed here), so the
structure comes from a small notification callback written into the temp dir: it appends one
JSON line per task result, and the final stats, to events.jsonl, parsed into stats
(ok/changed/failed per host), failures (task name + msg), messages and warnings.
Temp dirs are removed at interpreter exit.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
ANSIBLE_PLAYBOOK = VENV_BIN / "ansible-playbook"
PYTHON = VENV_BIN / "python"
COLLECTIONS = REPO / "collections"
COLLECTION = COLLECTIONS / "ansible_collections" / "scanner" / "dbops"
HOST = "testdb"

# Value for inventory_vars that removes the variable from the host (to test "undefined").
UNSET = object()

_WORKDIRS: list = []

CALLBACK_NAME = "dbops_test_events"
CALLBACK_SOURCE = r'''
from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: dbops_test_events
type: notification
short_description: test helper, task results as JSON lines
description: [Appends one JSON line per task result to $DBOPS_TEST_EVENTS.]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "dbops_test_events"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._path = os.environ.get("DBOPS_TEST_EVENTS")

    def _write(self, event):
        if self._path:
            event["t"] = time.time()
            with open(self._path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event, default=str, ensure_ascii=False) + "\n")

    def _task(self, status, result, **extra):
        task = result.task
        self._write(dict(event="task", status=status, host=result.host.get_name(), task=task.get_name(),
                         action=task.action, result=dict(result.result), **extra))

    def v2_playbook_on_play_start(self, play):
        self._write(dict(event="play", name=play.get_name()))

    def v2_runner_on_ok(self, result):
        self._task("ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._task("failed", result, ignored=bool(ignore_errors))

    def v2_runner_on_unreachable(self, result):
        self._task("unreachable", result)

    def v2_runner_on_skipped(self, result):
        self._task("skipped", result)

    def v2_playbook_on_stats(self, stats):
        hosts = sorted(stats.processed.keys())
        self._write(dict(event="stats", stats={h: stats.summarize(h) for h in hosts}))
'''


def _descendants(pid: int) -> list:
    """All descendants of pid, from /proc (Ansible's forked workers call setsid(), so killing the
    playbook's process group misses them and they would outlive a killed run)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int):
    """SIGKILL a started playbook, its process group and every descendant (workers included)."""
    victims = _descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


_STARTED: list = []


@atexit.register
def _cleanup():  # pragma: no cover - process exit
    for proc in _STARTED:
        if proc.poll() is None:
            kill_tree(proc.pid)
    for d in _WORKDIRS:
        shutil.rmtree(d, ignore_errors=True)


@dataclasses.dataclass
class Failure:
    task: str
    msg: str
    ignored: bool = False   # ignore_errors: the play went on

    def __str__(self):
        return "%s: %s" % (self.task, self.msg)


@dataclasses.dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    cmd: list
    duration: float
    workdir: pathlib.Path
    backup_dir: pathlib.Path
    report_dir: pathlib.Path
    inventory: pathlib.Path
    events: list = dataclasses.field(default_factory=list)     # raw events of the callback
    stats: dict = dataclasses.field(default_factory=dict)      # host -> {ok, changed, failed, ...}
    failures: list = dataclasses.field(default_factory=list)   # [Failure] in order
    messages: list = dataclasses.field(default_factory=list)   # every msg a task returned, flattened
    warnings: list = dataclasses.field(default_factory=list)
    tasks: list = dataclasses.field(default_factory=list)      # [(task name, status, result dict)]

    # ---- convenience ---------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def host_stats(self) -> dict:
        return self.stats.get(HOST, {})

    @property
    def changed(self) -> int:
        return self.host_stats.get("changed", 0)

    @property
    def failed(self) -> int:
        return self.host_stats.get("failed", 0)

    @property
    def failure_text(self) -> str:
        return "\n".join(str(f) for f in self.failures)

    @property
    def output(self) -> str:
        """Everything the operator sees (stdout + stderr)."""
        return self.stdout + "\n" + self.stderr

    @property
    def all_text(self) -> str:
        """stdout + stderr + the parsed messages and failures (for searching)."""
        return "\n".join([self.stdout, self.stderr, "\n".join(self.messages), self.failure_text,
                          "\n".join(self.warnings)])

    @property
    def screen(self) -> str:
        """stdout + stderr with every whitespace run as one space: the default callback prints
        results as YAML and folds long strings over several lines."""
        return " ".join((self.stdout + "\n" + self.stderr).split())

    def shows(self, needle: str) -> bool:
        """Did the operator's screen (stdout/stderr) show needle (whitespace-insensitive, and
        YAML's '' for a quote inside '...' read as ')?"""
        norm = " ".join(needle.split())
        return norm in self.screen or norm in self.screen.replace("''", "'")

    def task(self, name_part: str, status: str | None = None) -> dict | None:
        """The (last) result of the task whose name contains name_part."""
        found = [r for n, s, r in self.tasks if name_part in n and (status is None or s == status)]
        return found[-1] if found else None

    def task_names(self, status: str | None = None) -> list:
        return [n for n, s, _ in self.tasks if status is None or s == status]

    @property
    def text(self) -> str:
        lines = ["$ %s" % " ".join(self.cmd), "rc=%s in %.1fs; stats=%s" % (self.rc, self.duration, self.stats)]
        if self.failures:
            lines.append("FAILURES:")
            lines += ["  - %s%s" % ("(ignored) " if f.ignored else "", f) for f in self.failures]
        if self.warnings:
            lines.append("WARNINGS:")
            lines += ["  - %s" % w for w in self.warnings]
        lines += ["STDOUT (tail):", self.stdout[-12000:]]
        if self.stderr.strip():
            lines += ["STDERR (tail):", self.stderr[-6000:]]
        return "\n".join(lines)

    def __str__(self):
        return self.text


def _msg_of(res: dict) -> str:
    for key in ("msg", "stderr", "module_stderr", "exception"):
        val = res.get(key)
        if val:
            return val if isinstance(val, str) else json.dumps(val, ensure_ascii=False)
    return json.dumps(res, ensure_ascii=False, default=str)[:2000]


def _flatten(msg) -> list:
    if msg is None or msg == "":
        return []
    if isinstance(msg, (list, tuple)):
        out = []
        for m in msg:
            out += _flatten(m)
        return out
    if isinstance(msg, dict):
        return [json.dumps(msg, ensure_ascii=False, default=str)]
    return [str(msg)]


def _parse(result: Result, events_path: pathlib.Path):
    if not events_path.exists():
        return
    for line in events_path.read_text(encoding="utf-8").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        result.events.append(ev)
        if ev["event"] == "stats":
            for host, st in ev["stats"].items():
                st = dict(st)
                st["failed"] = st.get("failures", 0)
                result.stats[host] = st
            continue
        if ev["event"] != "task" or ev["host"] != HOST:
            continue
        name, res, status = ev["task"], ev["result"], ev["status"]
        result.tasks.append((name, status, res))
        result.warnings += [str(w) for w in res.get("warnings") or []]
        if status != "skipped":
            result.messages += _flatten(res.get("msg"))
        items = res.get("results") if isinstance(res.get("results"), list) else []
        failed_items = [i for i in items if isinstance(i, dict) and i.get("failed")]
        for item in items:
            if isinstance(item, dict):
                result.warnings += [str(w) for w in item.get("warnings") or []]
                if item.get("msg") and not item.get("failed") and item.get("msg") != "All assertions passed":
                    result.messages += _flatten(item.get("msg"))
        if status in ("failed", "unreachable"):
            ignored = bool(ev.get("ignored"))
            if failed_items:
                result.failures += [Failure(name, _msg_of(i), ignored) for i in failed_items]
            else:
                result.failures.append(Failure(name, _msg_of(res), ignored))


@dataclasses.dataclass
class Prepared:
    cmd: list
    env: dict
    workdir: pathlib.Path
    backup_dir: pathlib.Path
    report_dir: pathlib.Path
    inventory: pathlib.Path
    events: pathlib.Path


def host_vars(db, workdir: pathlib.Path) -> dict:
    return {
        "ansible_connection": "local",
        "ansible_python_interpreter": str(PYTHON),
        "scanner_db_host": db.host,
        "scanner_db_port": db.port,
        "scanner_db_name": db.name,
        "scanner_db_user": db.user,
        "scanner_db_password": db.password,
        "scanner_db_sslmode": "disable",
        "backup_dir": str(workdir / "backups"),
        "report_dir": str(workdir / "reports"),
    }


def _write_private(path: pathlib.Path, text: str):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def new_workdir() -> pathlib.Path:
    d = pathlib.Path(tempfile.mkdtemp(prefix="dbops-pb-"))   # 0700
    _WORKDIRS.append(str(d))
    return d


def prepare(db, playbook: str, extra_vars=None, check=False, inventory_vars=None, env=None,
            args=None, workdir=None) -> Prepared:
    """Write the inventory, extra vars and callback; return the command and its environment.

    workdir: reuse a folder (e.g. of a previous run) so backups/reports accumulate there."""
    workdir = pathlib.Path(workdir) if workdir else new_workdir()
    stamp = time.monotonic_ns()
    hv = host_vars(db, workdir)
    for key, val in (inventory_vars or {}).items():
        if val is UNSET:
            hv.pop(key, None)
        else:
            hv[key] = val
    inv = workdir / "inventory.yml"
    _write_private(inv, yaml.safe_dump({"scanner_db": {"hosts": {HOST: hv}}}, default_flow_style=False))
    cb_dir = workdir / "callback_plugins"
    cb_dir.mkdir(exist_ok=True)
    (cb_dir / (CALLBACK_NAME + ".py")).write_text(CALLBACK_SOURCE)
    events = workdir / ("events_%d.jsonl" % stamp)
    name = playbook if playbook.endswith((".yml", ".yaml")) else playbook + ".yml"
    path = name if os.path.isabs(name) or "/" in name else "playbooks/" + name
    cmd = [str(ANSIBLE_PLAYBOOK), "-i", str(inv), path]
    if extra_vars:
        ev = workdir / ("extra_vars_%d.json" % stamp)
        _write_private(ev, json.dumps(extra_vars))
        cmd += ["-e", "@" + str(ev)]
    if check:
        cmd += ["--check"]
    cmd += list(args or [])
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "PG"))}
    full_env.update({
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_CALLBACK_PLUGINS": str(cb_dir),
        "ANSIBLE_CALLBACKS_ENABLED": CALLBACK_NAME,
        "DBOPS_TEST_EVENTS": str(events),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(workdir / "ansible-tmp"),
        "ANSIBLE_ASYNC_DIR": str(workdir / "ansible-async"),
        "PATH": "%s:%s" % (VENV_BIN, os.environ.get("PATH", "/usr/bin:/bin")),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    full_env.update(env or {})
    backup_dir = pathlib.Path(hv.get("backup_dir", workdir / "backups"))
    report_dir = pathlib.Path(hv.get("report_dir", workdir / "reports"))
    return Prepared(cmd, full_env, workdir, backup_dir, report_dir, inv, events)


def _output(prep: Prepared, stream: str) -> pathlib.Path:
    """The file a run's stdout or stderr goes to (named after its events file: a reused workdir keeps each run's)."""
    return prep.events.with_name(prep.events.stem.replace("events", stream) + ".txt")


def start_playbook(db, playbook: str, **kw):
    """Start a playbook in its own process group; returns (Popen, Prepared).

    Kill it with kill_tree(proc.pid) (workers included); or wait and call finish()."""
    prep = prepare(db, playbook, **kw)
    return launch(prep), prep


def launch(prep: Prepared):
    """Start prep.cmd (as prepare() wrote it, or changed by the caller); returns the Popen."""
    # Output goes to files, not pipes: nobody reads a pipe while the test waits for the run to reach
    # a step, and a run that writes more than the pipe buffer (64 KiB: more backfill rounds on a
    # loaded machine) would block on its next write and never get there.
    with open(_output(prep, "stdout"), "w") as out, open(_output(prep, "stderr"), "w") as err:
        proc = subprocess.Popen(prep.cmd, cwd=REPO, env=prep.env, stdout=out, stderr=err,
                                text=True, start_new_session=True)
    proc.started_at = time.monotonic()
    _STARTED.append(proc)
    return proc


def finish(proc, prep: Prepared, timeout: float = 300) -> Result:
    """Wait for a started playbook (killing its process group after timeout) and parse it."""
    killed = ""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        killed = "\n[playbook_runner] killed after %ss timeout" % timeout
    out = _output(prep, "stdout").read_text(errors="replace")
    err = _output(prep, "stderr").read_text(errors="replace") + killed
    res = Result(rc=proc.returncode, stdout=out or "", stderr=err or "", cmd=prep.cmd,
                 duration=time.monotonic() - getattr(proc, "started_at", time.monotonic()),
                 workdir=prep.workdir, backup_dir=prep.backup_dir, report_dir=prep.report_dir,
                 inventory=prep.inventory)
    _parse(res, prep.events)
    return res


# The word every rollback playbook needs (-e rollback_confirm=ROLLBACK, roles/preflight/tasks/confirm.yml).
ROLLBACK = {"rollback_confirm": "ROLLBACK"}


def run_playbook(db, playbook: str, extra_vars=None, check=False, inventory_vars=None, env=None,
                 args=None, workdir=None, timeout: float = 300) -> Result:
    """Run playbooks/<playbook>.yml against db (a conftest DbInfo) and parse what it reported."""
    proc, prep = start_playbook(db, playbook, extra_vars=extra_vars, check=check, inventory_vars=inventory_vars,
                                env=env, args=args, workdir=workdir)
    return finish(proc, prep, timeout=timeout)


class Stages(dict):
    """A test module's playbook runs ("stages", in file order), kept by name so that a later test
    can use an earlier stage's result:

        STAGES = Stages(); run_stage = STAGES.run; stage = STAGES.ok
        run_stage(env, "phase1", "phase1")    # env: {"db": DbInfo, "workdir": a shared folder}
        stage("phase1")   # its Result; the test fails saying so if it did not run or failed
    """

    def run(self, env, name, playbook, **kw) -> Result:
        res = run_playbook(env["db"], playbook, workdir=env["workdir"], **kw)
        self[name] = res
        return res

    def ok(self, name) -> Result:
        res = self.get(name)
        if res is None:
            pytest.fail("stage %r did not run (an earlier test failed before it)" % name)
        assert res.ok, "stage %r failed:\n%s" % (name, res.text)
        return res


# ---- the project's Python code, in process ---------------------------------------------------
def _load(mod_name: str, path: pathlib.Path):
    import importlib.util
    import sys
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def project_code():
    """The collection's module_utils and modules (scanner.dbops), imported by their real paths.

    Returns a namespace with dbops_sql, dbops_pg (module_utils), dbops_migrate, dbops_run_lock and
    dbops_step (the modules)."""
    import importlib
    import sys
    import types
    if str(COLLECTIONS) not in sys.path:
        sys.path.insert(0, str(COLLECTIONS))
    base = "ansible_collections.scanner.dbops.plugins."
    mod = lambda name: importlib.import_module(base + name)  # noqa: E731
    return types.SimpleNamespace(dbops_sql=mod("module_utils.sql"), dbops_pg=mod("module_utils.pg"),
                                 dbops_migrate=mod("modules.migrate"), dbops_run_lock=mod("modules.run_lock"),
                                 dbops_step=mod("modules.step"))


def lookup_migrations(phase: str = "001", sql_dir=None):
    """The scanner.dbops.migrations lookup, loaded through Ansible's plugin loader (it needs its docs)."""
    from ansible.plugins.loader import lookup_loader
    lookup_loader.add_directory(str(COLLECTION / "plugins" / "lookup"))
    lk = lookup_loader.get("migrations")
    return lk.run([phase], variables={}, sql_dir=str(sql_dir or REPO / "files" / "sql"))[0]


class _FakeModule:
    def __init__(self, params, check_mode=False):
        self.params = params
        self.check_mode = check_mode


def migrate_direct(db, phase: str = "001", state: str = "applied", sql_dir=None, check_mode=False,
                   user=None, password=None, **overrides) -> dict:
    """Run dbops_migrate's Runner in this process (fast setup for a test: same code, same ledger).

    Connects as db.user (or user/password). Returns the module's result dict."""
    code = project_code()
    params = dict(login_host=db.host, login_port=db.port, login_user=user or db.user,
                  login_password=password if password is not None else db.password, login_db=db.name,
                  ssl_mode="disable", ca_cert=None, ssl_cert=None, ssl_key=None, connect_params={},
                  migrations=lookup_migrations(phase, sql_dir), state=state, ledger_schema="dbops",
                  lock_timeout="2s", concurrent_lock_timeout="5min", statement_timeout="0", retries=8,
                  retry_delay=0.5, include_unrecorded=False, run_id="test-direct", applied_by="pytest")
    params.update(overrides)
    runner = code.dbops_migrate.Runner(_FakeModule(params, check_mode))
    runner.conn = code.dbops_pg.connect(params, "scanner-dbops test")
    try:
        result = runner.run()
    finally:
        runner.conn.close()
    result["notices"] = runner.notices
    return result


# ---- what a run leaves in the database -------------------------------------------------------
def db_state(db) -> dict:
    """Everything a phase could change (schemas, indexes, constraints, views, ledger, run lock),
    read as superuser; compare two snapshots to prove a run changed nothing."""
    def q(text):
        return db.query(text, superuser=True)
    state = {
        "schemas": q("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' ORDER BY 1"),
        "indexes": q("SELECT schemaname, indexname, indexdef FROM pg_indexes "
                     "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"),
        "invalid": q("SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid ORDER BY 1"),
        "constraints": q("SELECT conrelid::regclass::text, conname, convalidated FROM pg_constraint "
                         "WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"),
        "views": q("SELECT schemaname, viewname FROM pg_views WHERE schemaname NOT IN "
                   "('pg_catalog', 'information_schema') ORDER BY 1, 2"),
    }
    if q("SELECT to_regclass('dbops.schema_migrations') IS NOT NULL")[0][0]:
        state["ledger"] = q("SELECT version, checksum, applied_at::text FROM dbops.schema_migrations ORDER BY 1")
    if q("SELECT to_regclass('dbops.run_lock') IS NOT NULL")[0][0]:
        state["run_lock"] = q("SELECT run_id, holder, expires_at::text FROM dbops.run_lock ORDER BY 1")
    return state


def ledger(db, prefix: str = "") -> list:
    """Versions recorded in the migration ledger (dbops.schema_migrations), of one phase with prefix."""
    return [v for (v,) in db.query("SELECT version FROM dbops.schema_migrations WHERE version LIKE %s ORDER BY 1",
                                   (prefix + "%",))]
