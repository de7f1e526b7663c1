"""Testinfra checks of the Molecule database host, run by verify.yml (not by `pytest tests/`:
the file name does not match test_*.py on purpose).

Looks at the server as an operator would: psql as the `postgres` superuser over the local
socket, on the container (podman://) or on this machine (local://, the embedded server).
Environment (set by verify.yml): SCANNER_PG_SOCKET_DIR, SCANNER_PG_PORT, SCANNER_DB_NAME,
SCANNER_DB_USER, SCANNER_LEDGER_TABLE (optional), SCANNER_SEEDED (1 when demo data was loaded).
"""
from __future__ import annotations

import os
import shlex

import pytest

SOCKET_DIR = os.environ.get("SCANNER_PG_SOCKET_DIR", "/var/run/postgresql")
PORT = os.environ.get("SCANNER_PG_PORT", "5432")
DB = os.environ.get("SCANNER_DB_NAME", "scanner")
APP_USER = os.environ.get("SCANNER_DB_USER", "scan")
LEDGER = os.environ.get("SCANNER_LEDGER_TABLE", "")
SEEDED = os.environ.get("SCANNER_SEEDED", "0") == "1"


def psql(host, sql: str, db: str = DB) -> str:
    """Run one query as the postgres superuser over the socket; return the unaligned output."""
    cmd = (f"psql -X -q -A -t -v ON_ERROR_STOP=1 -h {shlex.quote(SOCKET_DIR)} -p {shlex.quote(PORT)} "
           f"-U postgres -d {shlex.quote(db)} -c {shlex.quote(sql)}")
    if host.check_output("id -u") == "0":  # PostgreSQL's peer auth wants the postgres OS user
        cmd = "runuser -u postgres -- " + cmd
    return host.check_output(cmd)


def test_server_accepts_connections(host):
    cmd = host.run(f"pg_isready -h {shlex.quote(SOCKET_DIR)} -p {shlex.quote(PORT)}")
    assert cmd.rc == 0, cmd.stdout + cmd.stderr


def test_server_is_postgresql_15(host):
    assert psql(host, "SHOW server_version_num").startswith("15")


def test_listens_on_loopback_only(host):
    assert psql(host, "SHOW listen_addresses") == "127.0.0.1"


def test_pg_cron_and_pg_stat_statements_preloaded(host):
    libs = {x.strip() for x in psql(host, "SHOW shared_preload_libraries").split(",")}
    assert {"pg_cron", "pg_stat_statements"} <= libs
    assert psql(host, "SHOW cron.database_name") == DB


def test_extensions_installed(host):
    exts = set(psql(host, "SELECT extname FROM pg_extension").split())
    assert {"pg_cron", "pg_stat_statements"} <= exts


def test_application_role_is_not_superuser(host):
    row = psql(host, f"SELECT rolsuper, rolcanlogin FROM pg_roles WHERE rolname = '{APP_USER}'")
    assert row == "f|t", f"role {APP_USER}: (rolsuper|rolcanlogin) expected f|t, found {row!r}"
    groups = set(psql(host, f"SELECT b.rolname FROM pg_auth_members m JOIN pg_roles a ON a.oid = m.member "
                            f"JOIN pg_roles b ON b.oid = m.roleid WHERE a.rolname = '{APP_USER}'").split())
    assert {"pg_monitor", "pg_signal_backend"} <= groups


def test_database_owned_by_application_role(host):
    owner = psql(host, f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{DB}'")
    assert owner == APP_USER


@pytest.mark.parametrize("table", ["bcfy_calls_raw", "transcripts", "processing_state"])
def test_baseline_table_exists(host, table):
    assert psql(host, f"SELECT to_regclass('public.{table}') IS NOT NULL") == "t"


def test_demo_data_seeded(host):
    if not SEEDED:
        pytest.skip("files/sql/baseline/02_demo_data.sql not present: no demo data")
    assert int(psql(host, "SELECT count(*) FROM bcfy_calls_raw")) > 0


def test_ledger_table_exists(host):
    if not LEDGER:
        pytest.skip("ledger table name not configured (molecule_ledger_table)")
    assert psql(host, f"SELECT to_regclass('{LEDGER}') IS NOT NULL") == "t", f"{LEDGER} missing"
