"""Production shapes: the database and its tables belong to the application role `scan`, and the
migration runs as someone else - the shapes our other tests (migration as `scan`, the owner) do not make.

- member: a non-superuser LOGIN role that is a member of `scan` and of `pg_monitor` (an RDS master
  user granted the application's role: the documented setup);
- superuser: `postgres`.

Each runs the phases, the nightly job and the rollbacks through the real playbooks while the
application workload is connected as `scan` the whole time, and after every stage asserts: the
run succeeded, 0 failed application statements, every committed row present, and owners and
privileges unchanged - every relation of the public schema (new partitions, moved sequences and
the *_nonpartitioned copies included) belongs to `scan` (but the engine's own retention settings), and each table, view and sequence that existed before keeps its grants (a reader role holds
SELECT on the big tables, so a lost grant shows).
"""
from __future__ import annotations

import dataclasses
import sys

import pytest

from conftest import DbInfo, conn_kwargs, create_db, drop_db
from playbook_runner import REPO, ROLLBACK, run_playbook

sys.path.insert(0, str(REPO / "tools"))
import workload  # noqa: E402  (the package tools/workload)

FAST = {"partition_round_seconds": 2, "partition_upsert_probe_seconds": 1}
MEMBER = "dbops_shape_member"
READER = "dbops_shape_reader"
OWNER = "scan"
# New in public and not made from an application table: Phase 2's retention settings (the guide's
# table) belong to the role that ran the migration, like the dbops and monitoring schemas.
ENGINE_OWN = {"app_retention_policies"}
SHAPES = {
    # shape: the playbooks it runs, in order; those after phase2_prepare run under the workload
    "member": ["phase1", "phase2_prepare", "phase2", "phase3", "maintenance",
               "rollback_phase3", "rollback_phase2", "rollback_phase1"],
    "superuser": ["phase1", "phase2_prepare", "phase2", "maintenance", "rollback_phase2"],
}


@dataclasses.dataclass
class Login:
    """A DbInfo seen through another role (what playbook_runner writes into the inventory)."""
    db: DbInfo
    user: str
    password: str

    host = property(lambda self: self.db.host)
    port = property(lambda self: self.db.port)
    name = property(lambda self: self.db.name)


def su(db, sql, params=None):
    return db.query(sql, params, superuser=True)


def relations(db) -> dict:
    """name -> (kind, owner, grants) of every table, partition, sequence and view in public
    (but an extension's)."""
    return {name: (kind, owner, acl) for name, kind, owner, acl in su(db, (
        "SELECT c.relname, c.relkind::text, pg_get_userbyid(c.relowner), "
        "       coalesce((SELECT array_agg(a::text ORDER BY a::text) FROM unnest(c.relacl) a), '{}') "
        "FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'S', 'v', 'm') "
        "  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid "
        "                  AND d.deptype = 'e')"))}   # not an extension's (pg_stat_statements' views)


@pytest.fixture(scope="module")
def member_role(pg_server):
    password = "member-pw-" + pg_server.su_password[:8]
    conn = pg_server.connect("postgres", superuser=True)
    conn.autocommit = True
    with conn.cursor() as cur:
        for role in (MEMBER, READER):
            cur.execute(f"DROP ROLE IF EXISTS {role}")
        cur.execute(f"CREATE ROLE {MEMBER} LOGIN PASSWORD %s", (password,))
        cur.execute(f"GRANT {OWNER}, pg_monitor TO {MEMBER}")
        cur.execute(f"CREATE ROLE {READER} NOLOGIN")
    conn.close()
    yield password
    conn = pg_server.connect("postgres", superuser=True)
    conn.autocommit = True
    with conn.cursor() as cur:
        for role in (MEMBER, READER):
            cur.execute(f"DROP ROLE IF EXISTS {role}")
    conn.close()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_phases_as_another_role_keep_owners_grants_and_data(pg_server, member_role, shape, tmp_path):
    db = create_db(pg_server, baseline=True, seed_calls=3000, cron=True)
    try:
        if shape == "member":
            login = Login(db, MEMBER, member_role)
            su(db, f"GRANT USAGE ON SCHEMA cron TO {MEMBER}")
        else:
            login = Login(db, "postgres", pg_server.su_password)
        for table in ("bcfy_calls_raw", "transcripts", "api_call_metrics", "system_logs", "bcfy_playlists"):
            su(db, f"GRANT SELECT ON public.{table} TO {READER}")
        before = relations(db)
        assert {owner for _, owner, _ in before.values()} == {OWNER}, before
        wl = None
        summaries = []
        try:
            for playbook in SHAPES[shape]:
                if playbook == "phase2":   # the ingester switched to the new upsert (Phase 2 step 0 made its key)
                    wl = workload.Workload(conn_kwargs(db), rate=100, upsert="call_uid_started_at",
                                           keys_path=str(tmp_path / "keys.jsonl"), max_duration=1500)
                    wl.start()
                extra = {**FAST, **(ROLLBACK if playbook.startswith("rollback") else {})}
                res = run_playbook(login, playbook, extra_vars=extra, timeout=900)
                assert res.ok, f"{shape}: {playbook} failed:\n{res.text}"
                now = relations(db)
                wrong_owner = {n: v[1] for n, v in now.items() if v[1] != OWNER and n not in ENGINE_OWN}
                assert not wrong_owner, f"{shape}: after {playbook}, not owned by {OWNER}: {wrong_owner}"
                changed = {n: (before[n], now.get(n)) for n in before
                           if now.get(n) is None or now[n][2] != before[n][2]}
                assert not changed, f"{shape}: after {playbook}, lost or changed grants (before, now): {changed}"
                if wl:
                    s = wl.summary()
                    summaries.append((playbook, s["failed"], s["statements"]))
                    assert s["failed"] == 0, (shape, playbook, s["failures"][:5])
        finally:
            s = wl.stop() if wl else None
        if s:
            print(f"\n{shape}: workload as {OWNER} during {SHAPES[shape][2:]}: {workload.human_line(s)}")
            assert s["failed"] == 0, s["failures"][:5]
            assert s["statements"] > 100, s
            check = workload.check_keys(conn_kwargs(db), str(tmp_path / "keys.jsonl"))
            assert check["ok"], check
        assert su(db, "SELECT count(*) FROM pg_index WHERE NOT indisvalid")[0][0] == 0
    finally:
        drop_db(pg_server, db.name)


def test_engine_of_another_role_is_refused_before_anything(pg_server, member_role):
    """Phase 1 run by one member of `scan`, Phase 2 step 0 then tried by another member of `scan`
    that is not a member of the first: the ledger and the engine's objects belong to the first, so
    the second could neither read the ledger nor replace the engine's code. Preflight says so,
    naming the owner and the GRANT, before the plan, the lock and the backup; after the GRANT the
    same run passes."""
    other, other_pw = "dbops_shape_other", "other-pw-" + pg_server.su_password[:8]
    NO_CRON = {**FAST, "preflight_require_pg_cron": False}   # not this test's subject (a database of its own)
    db = create_db(pg_server, baseline=True, seed_calls=500)
    try:
        su(db, f"DROP ROLE IF EXISTS {other}")
        su(db, f"CREATE ROLE {other} LOGIN PASSWORD %s", (other_pw,))
        su(db, f"GRANT {OWNER}, pg_monitor TO {other}")
        res = run_playbook(Login(db, MEMBER, member_role), "phase1", extra_vars=NO_CRON, timeout=600)
        assert res.ok, res.text
        ledger = su(db, "SELECT version, checksum FROM dbops.schema_migrations ORDER BY version")

        res = run_playbook(Login(db, other, other_pw), "phase2_prepare", extra_vars=NO_CRON, timeout=600)
        assert res.rc != 0, res.text
        msg = res.failure_text
        assert f"Role {other} cannot run this phase" in msg, res.text
        assert f"belong to {MEMBER}" in msg and f"GRANT {MEMBER} TO {other};" in msg, msg
        assert "Traceback" not in msg and "permission denied" not in msg, msg
        assert not list(res.backup_dir.rglob("*.dump")), "a backup was taken"
        assert su(db, "SELECT version, checksum FROM dbops.schema_migrations ORDER BY version") == ledger
        assert su(db, "SELECT count(*) FROM dbops.run_lock")[0][0] == 0
        assert su(db, "SELECT to_regprocedure('dbops.p2_prepare(text)') IS NULL")[0][0], "Phase 2 code was applied"

        su(db, f"GRANT {MEMBER} TO {other}")
        res = run_playbook(Login(db, other, other_pw), "phase2_prepare", extra_vars=NO_CRON, timeout=600)
        assert res.ok, res.text
    finally:
        drop_db(pg_server, db.name)
        su_conn = pg_server.connect("postgres", superuser=True)
        su_conn.autocommit = True
        with su_conn.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {other}")
        su_conn.close()
