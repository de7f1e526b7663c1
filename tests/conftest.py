"""Shared fixtures: a real PostgreSQL 15 server (pg_cron + pg_stat_statements preloaded),
started by the test session itself through scripts/pg_embedded.sh, reached over TCP.

Fixtures
  pg_server    session: the running server (host, port, app user/password, superuser password)
  make_db      factory: make_db(baseline=True, seed_calls=0, cron=False) -> DbInfo of a fresh database
  baseline_db  a fresh database with the pre-Phase-1 production schema (no data)

Helpers the test files import (`from conftest import ...`)
  embedded_server       a server of its own, optionally with other settings (a context manager)
  create_db / drop_db   make_db for module-scoped fixtures (the caller drops the database)
  conn_kwargs(db)       psycopg2 / tools/workload connection keywords of a DbInfo
  psql / apply          run SQL files or commands with psql the way the migration runner does
  wait_for              poll a condition until it is true or a timeout
  free_port             a free loopback TCP port
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import psycopg2
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PG_SCRIPT = REPO / "scripts" / "pg_embedded.sh"
OWNER_FILE = "owner.pid"   # in each /tmp/scanner-test-pg-* folder: the pid of the test process that made it
# SCANNER_TEST_PG_MAJOR=13|17|18: every test server is that major, in a container of the matrix image
# (scripts/build_pg_image.sh), host network, data in the same /tmp folder; 15 (default) runs on the host.
PG_MAJOR = os.environ.get("SCANNER_TEST_PG_MAJOR", "15")
CONTAINER_FILE = "container"   # in a server folder: the name of the container it runs in
CONTAINER_SCRIPTS = "/scanner-scripts"


def _podman(*args, check=True, timeout=900):
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / "molecule" / "containers.conf"))}
    return subprocess.run(["podman", *args], env=env, check=check, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pg_script(d: pathlib.Path, action: str, env: dict, check=True, timeout=300):
    """scripts/pg_embedded.sh <action> for the server in folder d: on the host, or inside its container."""
    cfile = d / CONTAINER_FILE
    if not cfile.exists():
        return subprocess.run([str(PG_SCRIPT), action], env=env, check=check, timeout=timeout,
                              stdout=subprocess.DEVNULL, stderr=None if check else subprocess.DEVNULL)
    name, major = cfile.read_text().split()
    pass_env = [f"{k}={env[k]}" for k in ("PG_EMBED_DIR", "PG_EMBED_PORT", "PG_EMBED_FAST") if k in env]
    args = ["exec"] + [x for kv in pass_env for x in ("-e", kv)] + [
        "-e", f"PG_BIN=/usr/lib/postgresql/{major}/bin", name, f"{CONTAINER_SCRIPTS}/pg_embedded.sh", action]
    res = _podman(*args, check=False, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"pg_embedded.sh {action} in container {name} failed: {res.stderr.strip()[-2000:]}")
    return res


def _start_container(d: pathlib.Path, major: str) -> None:
    """The matrix image of that major (built once, cached), idle, host network, d mounted at its own path."""
    if shutil.which("podman") is None:
        pytest.exit(f"SCANNER_TEST_PG_MAJOR={major} needs podman (apt-get install podman runc debootstrap)", returncode=4)
    ref = subprocess.run([str(REPO / "scripts" / "build_pg_image.sh"), "--major", major], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=1800).stdout.strip().splitlines()[-1]
    name = f"scanner-test-pg{major}-{d.name.rsplit('-', 1)[-1]}"
    (d / CONTAINER_FILE).write_text(f"{name} {major}\n")
    _podman("run", "-d", "--name", name, "--network", "host", "--shm-size=256m",
            "-v", f"{d}:{d}", "-v", f"{REPO / 'scripts'}:{CONTAINER_SCRIPTS}:ro", ref, "sleep", "infinity")


def _remove_container(d: pathlib.Path) -> None:
    cfile = d / CONTAINER_FILE
    if cfile.exists():
        _podman("rm", "-f", "-t", "0", cfile.read_text().split()[0], check=False, timeout=120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)   # PermissionError: alive, someone else's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reap_leftover_servers(root: str = "/tmp") -> list:
    """Stop and remove the servers of test processes that are gone (killed before their finalizers
    ran: a SIGKILL, or an xdist worker killed with its controller). Folders without an owner file,
    or whose owner still runs, are left alone. Returns the folders removed."""
    removed = []
    for d in sorted(pathlib.Path(root).glob("scanner-test-pg-*")):
        try:
            pid = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if _alive(pid):
            continue
        env = {**os.environ, "PG_EMBED_DIR": str(d / "pg")}
        if (d / CONTAINER_FILE).exists():
            _remove_container(d)
        else:
            _pg_script(d, "destroy", env, check=False, timeout=120)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed


def pytest_configure(config):
    """A SIGTERM (`timeout`, CI cancelling the job) unwinds the session like Ctrl-C instead of killing it
    on the spot: fixtures' finalizers still stop the PostgreSQL servers and containers they started.
    The servers a killed run left behind anyway are removed when the next session starts."""
    def _unwind(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _unwind)
    if not hasattr(config, "workerinput"):   # the controller (or a run without xdist), once
        reap_leftover_servers()


BASELINE_DIR = REPO / "files" / "sql" / "baseline"
NO_TX_MARKER = "-- dbops:no-transaction"
PSQL = next((p for p in ("/usr/lib/postgresql/15/bin/psql", shutil.which("psql")) if p and os.path.exists(p)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout=120.0, what="condition", interval=0.05):
    """Poll pred() until it returns something true (returned); AssertionError after timeout s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))


@dataclasses.dataclass
class PgServer:
    dir: pathlib.Path
    port: int
    host: str = "127.0.0.1"
    user: str = "scan"
    password: str = ""
    su_password: str = ""
    cron_db: str = "scanner"

    def env(self) -> dict:
        return {"PG_EMBED_DIR": str(self.dir), "PG_EMBED_PORT": str(self.port)}

    def connect(self, dbname: str, superuser: bool = False, **kw):
        return psycopg2.connect(
            host=self.host, port=self.port, dbname=dbname,
            user="postgres" if superuser else self.user,
            password=self.su_password if superuser else self.password, **kw)


@dataclasses.dataclass
class DbInfo:
    server: PgServer
    name: str

    @property
    def host(self):
        return self.server.host

    @property
    def port(self):
        return self.server.port

    @property
    def user(self):
        return self.server.user

    @property
    def password(self):
        return self.server.password

    def connect(self, superuser: bool = False, **kw):
        return self.server.connect(self.name, superuser=superuser, **kw)

    def query(self, sql: str, params=None, superuser: bool = False):
        conn = self.connect(superuser=superuser)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def scalar(self, sql: str, params=None):
        rows = self.query(sql, params)
        return rows[0][0] if rows else None


def conn_kwargs(db) -> dict:
    """psycopg2.connect() keywords of a DbInfo (also what tools/workload's Workload takes)."""
    return {"host": db.host, "port": db.port, "dbname": db.name, "user": db.user, "password": db.password}


def psql(db, target, runner_mode: bool = True, superuser: bool = False,
         tmpdir: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    """Run a file or a command (str) with psql; never raises on SQL errors.

    runner_mode: a file runs in one transaction (-1) unless it starts with the no-transaction
    marker, as the migration runner applies it. The password travels in a 0600 pgpass file (in
    tmpdir, default /tmp; removed afterwards), never on a command line."""
    user = "postgres" if superuser else db.user
    password = db.server.su_password if superuser else db.password
    pgpass = (tmpdir or pathlib.Path("/tmp")) / f"pgpass-{os.getpid()}-{threading.get_ident()}"
    pgpass.write_text(f"{db.host}:{db.port}:{db.name}:{user}:{password}\n")
    pgpass.chmod(0o600)
    cmd = [PSQL, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", db.host, "-p", str(db.port), "-U", user, "-d", db.name]
    if isinstance(target, pathlib.Path):
        if runner_mode and not target.read_text().startswith(NO_TX_MARKER):
            cmd.append("-1")
        cmd += ["-f", str(target)]
    else:
        cmd += ["-c", target]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSFILE=str(pgpass), PGOPTIONS="-c lock_timeout=2s", PGCONNECT_TIMEOUT="10")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    finally:
        pgpass.unlink(missing_ok=True)


SQL_DIR = pathlib.Path(__file__).resolve().parents[1] / "files" / "sql"


def phase_sql(phase: str, sql_dir: pathlib.Path = SQL_DIR) -> list:
    """A phase's files in the order scanner.dbops.migrate applies them: versioned, then repeatable."""
    return sorted(sql_dir.glob(f"{phase}_*.sql")) + sorted((sql_dir / "repeatable" / phase).glob("*.sql"))


def phase_rollback_sql(phase: str, sql_dir: pathlib.Path = SQL_DIR) -> list:
    """A phase's rollback files in the order the module runs them: preconditions, then the
    repeatable files' rollbacks newest first, then the versioned ones' newest first."""
    rb = sql_dir / "rollback"
    return (sorted(rb.glob(f"{phase}_preconditions.sql"))
            + sorted((rb / "repeatable" / phase).glob("*.sql"), reverse=True)
            + sorted((p for p in rb.glob(f"{phase}_*.sql") if not p.name.endswith("_preconditions.sql")),
                     reverse=True))


def apply(db, files, psql=psql) -> str:
    """Run the files in order with psql (runner mode); fail with psql's output on the first error.
    Returns all output."""
    out = []
    for f in files:
        r = psql(db, f)
        out.append(r.stdout + r.stderr)
        assert r.returncode == 0, f"{f.name} failed:\n{r.stdout}\n{r.stderr}"
    return "\n".join(out)


@contextlib.contextmanager
def embedded_server(port: int | None = None, settings: dict | None = None):
    """A PostgreSQL server of its own (scripts/pg_embedded.sh), destroyed on exit.

    settings: server parameters set with ALTER SYSTEM after the first start, then the server is
    restarted (e.g. {"logging_collector": "off"} for a server configured like Debian's default)."""
    # Not pytest's tmp_path: it is 0700 under /tmp/pytest-of-root, unreachable for the postgres user.
    d = pathlib.Path(tempfile.mkdtemp(prefix="scanner-test-pg-", dir="/tmp"))
    d.chmod(0o755)
    (d / OWNER_FILE).write_text(f"{os.getpid()}\n")
    port = port or free_port()
    env = {**os.environ, "PG_EMBED_DIR": str(d / "pg"), "PG_EMBED_PORT": str(port), "PG_EMBED_FAST": "1"}
    try:
        if PG_MAJOR != "15":
            _start_container(d, PG_MAJOR)
        _pg_script(d, "start", env)
        server = PgServer(dir=d / "pg", port=port,
                          password=(d / "pg" / "scan.password").read_text().strip(),
                          su_password=(d / "pg" / "postgres.password").read_text().strip())
        if settings:
            su = server.connect("postgres", superuser=True)
            su.autocommit = True
            with su.cursor() as cur:
                for name, value in settings.items():
                    cur.execute("ALTER SYSTEM SET %s = %%s" % name, (value,))
            su.close()
            for action in ("stop", "start"):
                _pg_script(d, action, env)
        yield server
    finally:
        _pg_script(d, "destroy", env, check=False)
        _remove_container(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    # make test runs the files on 2 pytest-xdist workers (gw0, gw1): one server each; a fixed
    # TEST_PG_PORT becomes TEST_PG_PORT + worker number.
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    port = int(os.environ["TEST_PG_PORT"]) + worker if os.environ.get("TEST_PG_PORT") else free_port()
    with embedded_server(port) as server:
        yield server


def _server_roles(server) -> list:
    """What the application role may do on a shared test server: its attributes and memberships."""
    conn = server.connect("postgres", superuser=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, "
                        "       array(SELECT m.roleid::regrole::text FROM pg_auth_members m "
                        "             WHERE m.member = r.oid ORDER BY 1) "
                        "FROM pg_roles r WHERE r.rolname = %s", (server.user,))
            return list(cur.fetchone())
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def _shared_server_roles_unchanged(request):
    """A test on the worker's shared server must leave the application role as it found it: the
    server outlives the test, and a membership taken away (e.g. pg_monitor) changes what every later
    test of that worker sees (its Phase 2 runs were refused by the upsert gate, far from the cause)."""
    if "pg_server" not in request.fixturenames:
        yield
        return
    server = request.getfixturevalue("pg_server")
    before = _server_roles(server)
    yield
    after = _server_roles(server)
    assert after == before, ("this test changed role %s on the shared test server (superuser, createrole, "
                             "createdb, member of): %s -> %s; restore it in the test's cleanup"
                             % (server.user, before, after))


def _run_sql_file(db: DbInfo, path: pathlib.Path):
    conn = db.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(path.read_text())
    finally:
        conn.close()


def create_db(pg_server, baseline: bool = True, seed_calls: int = 0, cron: bool = False,
              name: str | None = None) -> DbInfo:
    """A fresh database (make_db's, also for module-scoped fixtures: the caller drops it with
    drop_db(pg_server, db.name)). cron=True recreates the server's pg_cron database
    (cron.database_name) instead of a uniquely named one: pg_cron can only live in that database."""
    dbname = pg_server.cron_db if cron else (name or "t_" + uuid.uuid4().hex[:12])
    su = pg_server.connect("postgres", superuser=True)
    su.autocommit = True
    with su.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{dbname}" OWNER {pg_server.user}')
    su.close()
    su = pg_server.connect(dbname, superuser=True)
    su.autocommit = True
    with su.cursor() as cur:
        cur.execute(f"ALTER SCHEMA public OWNER TO {pg_server.user}")
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if cron:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
            cur.execute(f"GRANT USAGE ON SCHEMA cron TO {pg_server.user}")
    su.close()
    db = DbInfo(pg_server, dbname)
    if baseline:
        _run_sql_file(db, BASELINE_DIR / "01_schema.sql")
        if seed_calls:
            _run_sql_file(db, BASELINE_DIR / "02_demo_data.sql")
            db.query("SELECT demo.seed(%s)", (seed_calls,))
    return db


def drop_db(pg_server, name: str):
    su = pg_server.connect("postgres", superuser=True)
    su.autocommit = True
    try:
        with su.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        su.close()


@pytest.fixture
def make_db(pg_server):
    """Factory for fresh databases (create_db), dropped at teardown."""
    created: list[str] = []

    def _make(baseline: bool = True, seed_calls: int = 0, cron: bool = False, name: str | None = None) -> DbInfo:
        dbname = pg_server.cron_db if cron else (name or "t_" + uuid.uuid4().hex[:12])
        created.append(dbname)  # dropped at teardown even when loading the schema fails
        return create_db(pg_server, baseline=baseline, seed_calls=seed_calls, cron=cron, name=dbname)

    yield _make
    su = pg_server.connect("postgres", superuser=True)
    su.autocommit = True
    with su.cursor() as cur:
        for name in created:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    su.close()


@pytest.fixture
def baseline_db(make_db) -> DbInfo:
    return make_db(baseline=True)
