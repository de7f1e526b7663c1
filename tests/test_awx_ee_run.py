"""The AWX execution environment at work: a job run the way AWX runs it.

`make ee` (scripts/build_ee.sh) builds localhost/scanner-dbops-ee:<tag>; here ansible-runner inside
that image runs playbooks/phase1.yml and playbooks/maintenance.yml against a PostgreSQL server in
another container (localhost/scanner-pg15, scripts/build_pg_image.sh) on a podman network
of its own, as an AWX job pod does:

- the private data dir is mounted at /runner: project/ (a clean copy of the repository, like AWX's
  checkout: no installed third-party collections, those come from the image), inventory/ (the
  variables of the AWX inventory in awx/objects.yml: backup_dir and report_dir under /backups),
  env/extravars (what the "Scanner PostgreSQL" credential type injects: the extra var
  scanner_db_password; never a command-line argument), artifacts/ (written by ansible-runner);
- /backups is a host folder (the container group's PVC in AWX).

Asserts: both playbooks succeed; Phase 1's report is in the mounted folder; a second run of each
changes nothing; the password is nowhere in the runner's artifacts, the job output or the reports.

The image is built when missing or when its inputs changed (scripts/build_ee.sh caches by a hash
of its inputs; cached: under a second). SCANNER_EE_BUILD=0 (what `make test` sets) builds nothing:
the test skips when the image is missing or older than its inputs (`make ee`). Skips with the reason when not root or podman, debootstrap or iptables (podman
networks) are missing. Containers and the network are removed afterwards.
"""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import subprocess
import time
import uuid

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, CONTAINERS_CONF=str(REPO / "molecule" / "containers.conf"))
HOST = "scanner-ee-db"
RUNNER_UID = 1000  # the EE image's user (ansible-builder's final `USER 1000`)
RUN_TIMEOUT = 600


def _have(cmd):
    return shutil.which(cmd) or os.path.exists(f"/usr/sbin/{cmd}") or os.path.exists(f"/sbin/{cmd}")


def _requirements():
    if os.geteuid() != 0:
        pytest.skip("needs root: rootful podman and debootstrap (scripts/build_ee_base.sh)")
    for cmd in ("podman", "debootstrap", "iptables"):
        if not _have(cmd):
            pytest.skip(f"{cmd} is not installed (apt-get install podman runc debootstrap iptables; "
                        "iptables: netavark sets up podman networks with it)")


def _podman(*args, timeout=120, check=True, **kw):
    res = subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout,
                         check=False, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} failed: {res.stdout}{res.stderr}")
    return res


def _script(name, timeout):
    t0 = time.monotonic()
    res = subprocess.run([str(REPO / "scripts" / name)], env=ENV, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert res.returncode == 0, f"{name} failed:\n{res.stderr[-4000:]}"
    print(f"{name}: {time.monotonic() - t0:.0f}s: {res.stderr.strip().splitlines()[-1:]}")
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def images():
    _requirements()
    if os.environ.get("SCANNER_EE_BUILD", "1") == "0":
        check = subprocess.run([str(REPO / "scripts" / "build_ee.sh"), "--check"], env=ENV, capture_output=True,
                               text=True, timeout=120, check=False)
        if check.returncode == 3:
            pytest.skip(f"SCANNER_EE_BUILD=0: {check.stderr.strip().splitlines()[-1]}")
        assert check.returncode == 0, check.stderr
        ref = check.stdout.strip()
    else:
        ref = _script("build_ee.sh", timeout=3600)
    # The PostgreSQL image by its own tag: when it exists, the build script is not run (it would
    # re-tag :current, which other podman users of this machine may be using).
    pg = subprocess.run([str(REPO / "scripts" / "build_pg_image.sh"), "--ref"], capture_output=True, text=True,
                        check=True).stdout.strip()
    if _podman("image", "exists", pg, check=False).returncode != 0:
        pg = _script("build_pg_image.sh", timeout=1800)
    return ref, pg


INIT = r"""
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
data=/var/lib/postgresql/ee-test
install -d -o postgres -g postgres -m 0700 "$data"
install -d -o postgres -g postgres /var/run/postgresql
runuser -u postgres -- "$bin/initdb" -D "$data" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
  -E UTF8 --locale=C.UTF-8 >/dev/null
cat >> "$data/postgresql.conf" <<'CONF'
listen_addresses = '*'
port = 5432
unix_socket_directories = '/var/run/postgresql'
shared_preload_libraries = 'pg_cron,pg_stat_statements'
cron.database_name = 'scanner'
max_worker_processes = 16
password_encryption = scram-sha-256
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
printf 'local all postgres peer\nhost all all 0.0.0.0/0 scram-sha-256\n' > "$data/pg_hba.conf"
runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start >/dev/null
"""


def _psql(container, db, sql):
    """SQL on stdin (never on a command line), as the postgres superuser over the socket."""
    res = _podman("exec", "-i", container, "runuser", "-u", "postgres", "--", "psql", "-X", "-q",
                  "-v", "ON_ERROR_STOP=1", "-d", db, input=sql, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def env(images, tmp_path_factory):
    ee_ref, pg_ref = images
    uid = uuid.uuid4().hex[:8]
    net, pg = f"scanner-ee-net-{uid}", f"scanner-ee-pg-{uid}"
    password = "ee-" + secrets.token_hex(16)
    started = []
    try:
        _podman("network", "create", net)
        started.append(("network", net))
        _podman("run", "-d", "--name", pg, "--network", net, "--shm-size=256m", pg_ref, "sleep", "infinity")
        started.append(("container", pg))
        _podman("exec", "-i", pg, "bash", "-s", input=INIT, timeout=180)
        _psql(pg, "postgres", f"""
            CREATE ROLE scan LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}';
            GRANT pg_monitor, pg_signal_backend TO scan;
            CREATE DATABASE scanner OWNER scan ENCODING 'UTF8';""")
        _psql(pg, "scanner", """
            CREATE EXTENSION pg_cron; CREATE EXTENSION pg_stat_statements;
            GRANT USAGE ON SCHEMA cron TO scan; ALTER SCHEMA public OWNER TO scan;""")
        baseline = REPO / "files" / "sql" / "baseline"
        _psql(pg, "scanner", "SET ROLE scan;\n" + (baseline / "01_schema.sql").read_text()
              + "\n" + (baseline / "02_demo_data.sql").read_text() + "\nSELECT demo.seed(2000);\n")
        ip = _podman("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{net}").IPAddress}}}}',
                     pg).stdout.strip()
        assert ip, "the PostgreSQL container has no address on the test network"

        pdd = tmp_path_factory.mktemp("runner")
        _private_data_dir(pdd, ip, password)
        backups = tmp_path_factory.mktemp("backups")
        subprocess.run(["chown", "-R", f"{RUNNER_UID}:0", str(pdd), str(backups)], check=True)
        yield dict(ee=ee_ref, net=net, uid=uid, pdd=pdd, backups=backups, password=password, outputs=[])
    finally:
        for kind, name in reversed(started):
            if kind == "container":
                _podman("rm", "-f", "-t", "0", name, check=False)
            else:
                _podman("network", "rm", "-f", name, check=False)


def _private_data_dir(pdd, db_ip, password):
    """ansible-runner's input layout, as AWX writes it for a job."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not src.is_symlink():
            dst = pdd / "project" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (pdd / "inventory").mkdir()
    # The variables of the AWX inventory (awx/objects.yml), the test server as its host.
    inventory = {"scanner_db": {"hosts": {HOST: {
        "scanner_db_host": db_ip, "scanner_db_port": 5432, "scanner_db_name": "scanner",
        "scanner_db_user": "scan", "scanner_db_sslmode": "disable",
        "backup_dir": "/backups/scanner-dbops",
        "report_dir": "/backups/scanner-dbops/reports/{{ inventory_hostname }}",
        "ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}"}}}}
    (pdd / "inventory" / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (pdd / "env").mkdir()


def _write_extravars(env, job_vars):
    """What AWX writes for a job: the job template's variables plus the credential type's injector,
    extra_vars {scanner_db_password: "{{ password }}"} (a file, never the command line)."""
    extravars = env["pdd"] / "env" / "extravars"
    extravars.write_text(yaml.safe_dump({**job_vars, "scanner_db_password": env["password"]}))
    os.chown(extravars, RUNNER_UID, 0)
    extravars.chmod(0o600)


def _run(env, playbook, ident, job_vars=None):
    """ansible-runner in the EE, as a job pod runs it; returns the play's stats."""
    _write_extravars(env, job_vars or {})
    name = f"scanner-ee-job-{env['uid']}-{ident}"
    cmd = ["run", "--rm", "--name", name, "--network", env["net"],
           "-v", f"{env['pdd']}:/runner", "-v", f"{env['backups']}:/backups",
           env["ee"], "ansible-runner", "run", "/runner", "-p", playbook, "--ident", ident]
    t0 = time.monotonic()
    try:
        res = _podman(*cmd, timeout=RUN_TIMEOUT, check=False)
    finally:
        _podman("rm", "-f", "-t", "0", name, check=False)
    elapsed = time.monotonic() - t0
    env["outputs"].append(res.stdout + res.stderr)
    art = env["pdd"] / "artifacts" / ident
    status = (art / "status").read_text().strip() if (art / "status").is_file() else None
    rc = (art / "rc").read_text().strip() if (art / "rc").is_file() else None
    stats = {}
    for f in sorted((art / "job_events").glob("*.json")):
        event = json.loads(f.read_text())
        if event.get("event") == "playbook_on_stats":
            stats = event["event_data"]
    print(f"{playbook} ({ident}) in the EE: {status}, {elapsed:.0f}s, changed={stats.get('changed')}")
    assert status == "successful" and rc == "0", \
        f"{playbook} in the EE: status {status}, rc {rc}\n{res.stdout[-6000:]}{res.stderr[-2000:]}"
    return stats


def test_phase1_runs_in_the_ee_and_writes_its_report(env):
    stats = _run(env, "playbooks/phase1.yml", "phase1-1")
    assert stats["changed"].get(HOST, 0) > 0, stats  # Phase 1 applied its migrations
    assert not stats.get("failures") and not stats.get("dark"), stats
    reports = sorted((env["backups"] / "scanner-dbops" / "reports" / HOST).glob("*.json"))
    assert reports, "no report in the mounted /backups folder"
    assert any(json.loads(r.read_text()) for r in reports)


# Before Phase 2 the partition and retention procedures do not exist yet: the maintenance job
# template of such a database carries these variables (the playbook refuses otherwise).
MAINTENANCE_VARS = {"maintenance_partitions": False, "maintenance_retention": False}


def test_maintenance_runs_in_the_ee(env):
    stats = _run(env, "playbooks/maintenance.yml", "maintenance-1", MAINTENANCE_VARS)
    assert not stats.get("failures") and not stats.get("dark"), stats


def test_second_runs_change_nothing(env):
    for playbook, ident, job_vars in (("playbooks/phase1.yml", "phase1-2", {}),
                                      ("playbooks/maintenance.yml", "maintenance-2", MAINTENANCE_VARS)):
        stats = _run(env, playbook, ident, job_vars)
        assert stats["changed"].get(HOST, 0) == 0, (playbook, stats)


def test_no_secret_in_artifacts_output_or_reports(env):
    secret = env["password"].encode()
    leaks = []
    for folder in (env["pdd"] / "artifacts", env["backups"]):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files or folder == env["backups"], f"nothing in {folder}"
        leaks += [str(p) for p in files if secret in p.read_bytes()]
    leaks += [f"output of run {i}" for i, out in enumerate(env["outputs"]) if env["password"] in out]
    assert len(env["outputs"]) == 4, "the runs above did not all happen"
    assert not leaks, f"the database password appears in: {leaks}"
