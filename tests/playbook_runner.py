"""Run a playbook of this repo against a test database, the way an operator would.

    res = run_playbook(db, "phase1", extra_vars={"migrate_retries": 1})
    assert res.ok, res.text
    res.changed, res.stats, res.failures, res.messages, res.task("Apply pending")

A temporary inventory (YAML, 0600, in a private temp dir) describes one host `testdb` of the
group `scanner_db` with `ansible_connection: local`, like inventory/local/hosts.yml, and the
connection inputs (scanner_db_*) as host vars; backup_dir and report_dir are folders in the
same temp dir unless overridden. ansible-playbook runs from the repo with the repo's
ansible.cfg, so stdout is the default callback's output, exactly what an operator sees.

ansible-core 2.19 moved the `json` stdout callback to ansible.posix (not installed here), so the
structure comes from a small notification callback written into the temp dir: it appends one
JSON line per task result and the final stats to events.jsonl, which is parsed into
stats (ok/changed/failed per host), failures (task name + msg), messages and warnings.
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

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
ANSIBLE_PLAYBOOK = VENV_BIN / "ansible-playbook"
PYTHON = VENV_BIN / "python"
HOST = "testdb"

# Value for inventory_vars that removes the variable from the host (to test "undefined").
UNSET = object()

_WORKDIRS: list[str] = []

CALLBACK_NAME = "dbops_test_events"
CALLBACK_SOURCE = '''
from __future__ import annotations
import json, os
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
            with open(self._path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(event, default=str, ensure_ascii=False) + "\\n")

    def _task(self, status, result, **extra):
        task = result.task
        self._write(dict(event="task", status=status, host=result.host.get_name(), task=task.get_name(),
                         action=task.action, ignore_errors=bool(task.ignore_errors),
                         result=dict(result.result), **extra))

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


@atexit.register
def _cleanup():  # pragma: no cover - process exit
    for d in _WORKDIRS:
        shutil.rmtree(d, ignore_errors=True)


@dataclasses.dataclass
class Failure:
    task: str
    msg: str
    rescued: bool = False   # inside a block that had a rescue (the play went on)

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
    data: dict | None = None            # the parsed JSON callback output (None if unparsable)
    stats: dict = dataclasses.field(default_factory=dict)      # host -> {ok, changed, failed, ...}
    failures: list = dataclasses.field(default_factory=list)   # [Failure]
    messages: list = dataclasses.field(default_factory=list)   # every debug msg / module msg, flattened
    warnings: list = dataclasses.field(default_factory=list)
    tasks: list = dataclasses.field(default_factory=list)      # [(task name, result dict of HOST)]

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
    def fatal(self) -> list:
        """Failures that stopped the run (not the ones a rescue handled)."""
        return [f for f in self.failures if not f.rescued]

    @property
    def failure_text(self) -> str:
        return "\n".join(str(f) for f in self.failures)

    @property
    def output(self) -> str:
        """Everything the operator sees (stdout + stderr), plus the parsed messages unescaped."""
        return "\n".join([self.stdout, self.stderr, "\n".join(self.messages), self.failure_text])

    def task(self, name_part: str) -> dict | None:
        """The (last) result of the task whose name contains name_part."""
        found = [r for n, r in self.tasks if name_part in n]
        return found[-1] if found else None

    def task_names(self) -> list:
        return [n for n, _ in self.tasks]

    @property
    def text(self) -> str:
        lines = ["$ %s" % " ".join(self.cmd), "rc=%s in %.1fs; stats=%s" % (self.rc, self.duration, self.stats)]
        if self.failures:
            lines.append("FAILURES:")
            lines += ["  - %s%s" % ("(rescued) " if f.rescued else "", f) for f in self.failures]
        if self.warnings:
            lines.append("WARNINGS:")
            lines += ["  - %s" % w for w in self.warnings]
        if self.messages:
            lines.append("MESSAGES:")
            lines += ["  - %s" % m for m in self.messages]
        if self.data is None:
            lines += ["STDOUT (not JSON):", self.stdout[-20000:]]
        if self.stderr.strip():
            lines += ["STDERR:", self.stderr[-10000:]]
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
    if msg is None:
        return []
    if isinstance(msg, (list, tuple)):
        out = []
        for m in msg:
            out += _flatten(m)
        return out
    if isinstance(msg, dict):
        return [json.dumps(msg, ensure_ascii=False, default=str)]
    return [str(msg)]


def _parse(result: Result):
    try:
        # The JSON callback prints one document; anything before "{" is noise (e.g. warnings).
        start = result.stdout.find("{")
        data = json.loads(result.stdout[start:]) if start >= 0 else None
    except ValueError:
        data = None
    result.data = data
    if not data:
        return
    for host, st in (data.get("stats") or {}).items():
        st = dict(st)
        st["failed"] = st.get("failures", 0)
        result.stats[host] = st
    for play in data.get("plays", []):
        for task in play.get("tasks", []):
            name = task.get("task", {}).get("name", "")
            for host, res in (task.get("hosts") or {}).items():
                if host != HOST:
                    continue
                result.tasks.append((name, res))
                result.warnings += [str(w) for w in res.get("warnings") or []]
                result.messages += _flatten(res.get("msg"))
                if res.get("notices") and name and "Show what PostgreSQL said" not in name:
                    result.messages += _flatten(res.get("notices"))
                items = res.get("results") if isinstance(res.get("results"), list) else []
                for item in items:
                    if isinstance(item, dict):
                        result.warnings += [str(w) for w in item.get("warnings") or []]
                        if item.get("failed") and not item.get("failed_when_result") is False:
                            result.failures.append(Failure(name, _msg_of(item)))
                if res.get("failed") and not (items and any(
                        isinstance(i, dict) and i.get("failed") for i in items)):
                    result.failures.append(Failure(name, _msg_of(res)))
    # A failure followed by a rescue is marked: the last failure of the run is the fatal one.
    rescued_stat = result.stats.get(HOST, {}).get("rescued", 0)
    if rescued_stat and len(result.failures) > 1:
        for f in result.failures[:-1]:
            f.rescued = True


@dataclasses.dataclass
class Prepared:
    cmd: list
    env: dict
    workdir: pathlib.Path
    backup_dir: pathlib.Path
    report_dir: pathlib.Path
    inventory: pathlib.Path


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


def prepare(db, playbook: str, extra_vars=None, check=False, inventory_vars=None, env=None,
            args=None, workdir=None) -> Prepared:
    workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="dbops-pb-"))
    if str(workdir) not in _WORKDIRS:
        _WORKDIRS.append(str(workdir))
    hv = host_vars(db, workdir)
    for key, val in (inventory_vars or {}).items():
        if val is UNSET:
            hv.pop(key, None)
        else:
            hv[key] = val
    inv = workdir / "inventory.yml"
    fd = os.open(inv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump({"scanner_db": {"hosts": {HOST: hv}}}, fh, default_flow_style=False)
    os.chmod(inv, 0o600)
    name = playbook if playbook.endswith((".yml", ".yaml")) else playbook + ".yml"
    path = name if os.path.isabs(name) or "/" in name else "playbooks/" + name
    cmd = [str(ANSIBLE_PLAYBOOK), "-i", str(inv), path]
    if extra_vars:
        ev = workdir / ("extra_vars_%d.json" % time.monotonic_ns())
        fd = os.open(ev, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(extra_vars, fh)
        cmd += ["-e", "@" + str(ev)]
    if check:
        cmd += ["--check"]
    cmd += list(args or [])
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "PG"))}
    full_env.update({
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
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
    return Prepared(cmd, full_env, workdir, backup_dir, report_dir, inv)


def run_playbook(db, playbook: str, extra_vars=None, check=False, inventory_vars=None, env=None,
                 args=None, workdir=None, timeout: float = 300) -> Result:
    """Run playbooks/<playbook>.yml against db (a conftest DbInfo) and parse what it reported."""
    prep = prepare(db, playbook, extra_vars, check, inventory_vars, env, args, workdir)
    t0 = time.monotonic()
    proc = subprocess.Popen(prep.cmd, cwd=REPO, env=prep.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += "\n[playbook_runner] killed after %ss timeout" % timeout
    return finish(prep, proc.returncode, out, err, time.monotonic() - t0)


def finish(prep: Prepared, rc, out, err, duration) -> Result:
    res = Result(rc=rc, stdout=out or "", stderr=err or "", cmd=prep.cmd, duration=duration,
                 workdir=prep.workdir, backup_dir=prep.backup_dir, report_dir=prep.report_dir,
                 inventory=prep.inventory)
    _parse(res)
    return res


def start_playbook(db, playbook: str, **kw):
    """Start a playbook in its own process group; returns (Popen, Prepared). Finish with
    finish(prep, proc.returncode, out, err, duration) or kill with os.killpg(proc.pid, ...)."""
    prep = prepare(db, playbook, **kw)
    proc = subprocess.Popen(prep.cmd, cwd=REPO, env=prep.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    return proc, prep

