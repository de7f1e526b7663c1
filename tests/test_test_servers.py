"""The test session cleans up after itself even when a run was killed.

A SIGTERM unwinds the session (conftest.pytest_configure), but an xdist worker killed with its controller,
or a SIGKILL, runs no finalizer: its PostgreSQL server stayed in /tmp with its port taken. Each test server's
folder names its owner process (owner.pid); the next session removes the servers whose owner is gone, and
leaves those of live processes alone.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import tempfile

import psycopg2

from conftest import OWNER_FILE, PG_SCRIPT, PSQL, free_port, reap_leftover_servers

import pytest

pytestmark = pytest.mark.skipif(PSQL is None, reason="PostgreSQL binaries not installed")


def start_server(folder: pathlib.Path, owner: int) -> int:
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    (folder / OWNER_FILE).write_text(f"{owner}\n")
    port = free_port()
    env = {**os.environ, "PG_EMBED_DIR": str(folder / "pg"), "PG_EMBED_PORT": str(port), "PG_EMBED_FAST": "1"}
    subprocess.run([str(PG_SCRIPT), "start"], check=True, env=env, stdout=subprocess.DEVNULL)
    return port


def answers(folder: pathlib.Path, port: int) -> bool:
    try:
        psycopg2.connect(host="127.0.0.1", port=port, dbname="postgres", user="postgres", connect_timeout=3,
                         password=(folder / "pg" / "postgres.password").read_text().strip()).close()
        return True
    except (psycopg2.Error, OSError):
        return False


def test_servers_of_dead_test_processes_are_removed_live_ones_kept():
    root = pathlib.Path(tempfile.mkdtemp(prefix="scanner-reap-", dir="/tmp"))
    root.chmod(0o755)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan, mine = root / "scanner-test-pg-orphan", root / "scanner-test-pg-mine"
    try:
        p_orphan = start_server(orphan, dead.pid)
        p_mine = start_server(mine, os.getpid())
        assert answers(orphan, p_orphan) and answers(mine, p_mine)
        assert reap_leftover_servers(str(root)) == [str(orphan)]
        assert not orphan.exists() and not answers(orphan, p_orphan)
        assert mine.exists() and answers(mine, p_mine)
        assert reap_leftover_servers(str(root)) == []
    finally:
        env = {**os.environ, "PG_EMBED_DIR": str(mine / "pg")}
        subprocess.run([str(PG_SCRIPT), "destroy"], env=env, stdout=subprocess.DEVNULL, check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)
