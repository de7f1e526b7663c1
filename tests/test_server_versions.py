"""The supported PostgreSQL range and the capability map (roles/preflight/files/capabilities.sql).

The map is computed once per run from server_version_num by preflight (fact preflight_capabilities);
it is pure arithmetic on the number, so it is fed version numbers of servers we do not have here
(12, 19) on the embedded PostgreSQL 15, with the role's defaults as the range. The playbook-level
refusal (a real server outside the configured range, nothing touched) is in test_bad_input.py.
"""
from __future__ import annotations

import pathlib

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
CAPS_SQL = (REPO / "roles" / "preflight" / "files" / "capabilities.sql").read_text()
DEFAULTS = yaml.safe_load((REPO / "roles" / "preflight" / "defaults" / "main.yml").read_text())


@pytest.fixture(scope="module")
def caps(pg_server):
    conn = pg_server.connect("postgres", superuser=True)
    conn.autocommit = True

    def _caps(version_num: int) -> dict:
        with conn.cursor() as cur:
            cur.execute(CAPS_SQL, {"version_num": version_num,
                                   "min_version_num": DEFAULTS["preflight_min_server_version_num"],
                                   "max_major": DEFAULTS["preflight_max_server_major"]})
            return dict(zip([d.name for d in cur.description], cur.fetchone()))
    yield _caps
    conn.close()


def test_supported_range_is_13_to_18():
    assert DEFAULTS["preflight_min_server_version_num"] == 130000
    assert DEFAULTS["preflight_max_server_major"] == 18


@pytest.mark.parametrize("num", [130000, 130022, 140000, 150010, 160004, 170006, 180001])
def test_supported_majors_are_accepted(caps, num):
    c = caps(num)
    assert c["refusal"] is None, c
    assert c["major"] == num // 10000 and c["supported_range"] == "PostgreSQL 13 to 18"


@pytest.mark.parametrize("num, major", [(120022, 12), (110000, 11), (90624, 9)])
def test_older_servers_are_refused_with_what_to_do(caps, num, major):
    msg = caps(num)["refusal"]
    assert msg.startswith("PostgreSQL %d (server_version_num %d) is older than this project supports "
                          "(PostgreSQL 13 to 18, tested on 13, 15, 17 and 18)" % (major, num)), msg
    assert "Upgrade the server first" in msg and "nothing was changed" in msg


@pytest.mark.parametrize("num", [190000, 200001])
def test_newer_servers_are_refused(caps, num):
    msg = caps(num)["refusal"]
    assert msg.startswith("PostgreSQL %d (server_version_num %d) is newer than this project supports "
                          "(PostgreSQL 13 to 18" % (num // 10000, num)), msg
    assert "nothing was changed" in msg


def test_capabilities_follow_the_major(caps):
    c13, c15, c17, c18 = caps(130010), caps(150010), caps(170002), caps(180001)
    assert not c13["detach_concurrently"] and c15["detach_concurrently"]
    assert not c15["stat_checkpointer"] and c17["stat_checkpointer"]
    assert not c17["not_null_constraints"] and c18["not_null_constraints"]
    assert all(c["pgss_exec_time"] and c["trusted_extensions"] for c in (c13, c15, c17, c18))


def test_the_running_server_is_in_range(pg_server, caps):
    conn = pg_server.connect("postgres", superuser=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('server_version_num')::int")
            num = cur.fetchone()[0]
    finally:
        conn.close()
    assert caps(num)["refusal"] is None


def test_the_engine_reads_the_same_map(pg_server, caps):
    """dbops.p2_capabilities() (the map inside the database, files/sql/repeatable/002/01_helpers.sql)
    agrees with preflight's map on every capability it has, for every major from 13 to 18, and without
    an argument reads the running server's version."""
    src = (REPO / "files" / "sql" / "repeatable" / "002" / "01_helpers.sql").read_text()
    start = src.index("CREATE OR REPLACE FUNCTION dbops.p2_capabilities(")
    body = src[start:src.index("$$;", src.index("AS $$", start)) + 3].replace("dbops.p2_capabilities", "pg_temp.p2_capabilities")
    conn = pg_server.connect("postgres", superuser=True)
    try:
        with conn.cursor() as cur:
            cur.execute(body)
            for num in (130000, 140005, 150010, 160000, 170002, 180001):
                cur.execute("SELECT pg_temp.p2_capabilities(%s)", (num,))
                engine = cur.fetchone()[0]
                pre = caps(num)
                assert engine.keys() - {"major"} <= pre.keys(), engine
                assert {k: pre[k] for k in engine} == engine, (num, engine)
            cur.execute("SELECT pg_temp.p2_capabilities(), current_setting('server_version_num')::int / 10000")
            here, major = cur.fetchone()
            assert here["major"] == major
    finally:
        conn.close()
