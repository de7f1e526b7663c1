"""The demo-data generator files/sql/baseline/02_demo_data.sql (demo.seed).

A small seed (N calls) must already look like production: proportional row counts, 13 months of
history up to now, legacy NULL started_at rows, searchable English transcripts, and every row must
satisfy the CHECK constraints that a later migration adds. The seed must leave the schema exactly
as 01_schema.sql defines it (it drops and rebuilds indexes/constraints around the bulk load) and be
deterministic for a given seed and anchor.
"""
from __future__ import annotations

import datetime as dt
import pathlib

import psycopg2
import pytest

BASELINE_DIR = pathlib.Path(__file__).resolve().parents[1] / "files" / "sql" / "baseline"

N = 5000

# Every predicate a later migration turns into a CHECK constraint, written as "violators".
VIOLATIONS = {
    "calls duration_ms >= 0": "SELECT count(*) FROM bcfy_calls_raw WHERE duration_ms < 0",
    "calls size_bytes >= 0": "SELECT count(*) FROM bcfy_calls_raw WHERE size_bytes < 0",
    "calls ended_at >= started_at": "SELECT count(*) FROM bcfy_calls_raw WHERE ended_at < started_at",
    "transcripts confidence in [0,1]":
        "SELECT count(*) FROM transcripts WHERE confidence < 0 OR confidence > 1",
    "transcripts duration_seconds >= 0": "SELECT count(*) FROM transcripts WHERE duration_seconds < 0",
    "metrics status_code 100..599":
        "SELECT count(*) FROM api_call_metrics WHERE status_code < 100 OR status_code > 599",
    "metrics duration_ms >= 0": "SELECT count(*) FROM api_call_metrics WHERE duration_ms < 0",
    "logs duration_ms >= 0": "SELECT count(*) FROM system_logs WHERE duration_ms < 0",
    "poll_ended_at >= poll_started_at":
        "SELECT count(*) FROM bcfy_playlist_poll_log WHERE poll_ended_at < poll_started_at",
    "playlists last_pos >= 0": "SELECT count(*) FROM bcfy_playlists WHERE last_pos < 0",
}

TABLES_IN_ORDER = {  # table -> ORDER BY giving a total order, for content fingerprints
    "bcfy_playlists": "uuid",
    "bcfy_playlist_poll_log": "uuid, poll_started_at",
    "bcfy_calls_raw": "call_uid",
    "transcripts": "id",
    "processing_state": "id",
    "api_call_metrics": "id",
    "system_logs": "id",
}


def fingerprint(db, table: str) -> str:
    return db.scalar(f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY {TABLES_IN_ORDER[table]}), ''))"
                     f" FROM {table} t")


def schema_objects(db):
    """Index and constraint definitions of the public schema (names included)."""
    idx = db.query("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 2")
    con = db.query("SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) "
                   "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 2")
    return idx, con


@pytest.fixture
def seeded(make_db):
    return make_db(baseline=True, seed_calls=N)


def test_counts_are_proportional(seeded):
    db = seeded
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw") == N
    assert db.scalar("SELECT count(*) FROM api_call_metrics") == 4 * N
    assert db.scalar("SELECT count(*) FROM system_logs") == 2 * N
    assert 200 <= db.scalar("SELECT count(*) FROM bcfy_playlists") <= 500
    transcripts = db.scalar("SELECT count(*) FROM transcripts")
    assert 0.25 * N <= transcripts <= 0.35 * N
    states = db.scalar("SELECT count(*) FROM processing_state")
    assert transcripts <= states <= transcripts + 0.05 * N
    assert db.scalar("SELECT count(*) FROM bcfy_playlist_poll_log") >= db.scalar("SELECT count(*) FROM bcfy_playlists")
    # ANALYZE ran: the planner knows the sizes
    assert db.scalar("SELECT reltuples FROM pg_class WHERE oid = 'bcfy_calls_raw'::regclass") > 0.9 * N


def test_check_predicates_hold(seeded):
    violators = {name: seeded.scalar(sql) for name, sql in VIOLATIONS.items()}
    assert violators == {name: 0 for name in VIOLATIONS}


def test_legacy_null_started_at(seeded):
    db = seeded
    nulls = db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE started_at IS NULL")
    assert 3 <= nulls <= 3 + 0.001 * N
    # ended_at is NULL exactly for those rows; every other row has started_at = to_timestamp(ts)
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE (started_at IS NULL) <> (ended_at IS NULL)") == 0
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw "
                     "WHERE started_at IS NOT NULL AND started_at <> to_timestamp(ts)") == 0
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw "
                     "WHERE ended_at <> started_at + duration_ms * interval '1 millisecond'") == 0


def test_time_spread_and_recent_rows(seeded):
    db = seeded
    for table, col in [("bcfy_calls_raw", "started_at"), ("api_call_metrics", '"timestamp"'),
                       ("system_logs", "created_at")]:
        oldest, newest, last_hour, last_day, last_week, future = db.query(
            f"SELECT min({col}), max({col}), count(*) FILTER (WHERE {col} >= now() - interval '1 hour'),"
            f" count(*) FILTER (WHERE {col} >= now() - interval '24 hours'),"
            f" count(*) FILTER (WHERE {col} >= now() - interval '7 days'),"
            f" count(*) FILTER (WHERE {col} > now()) FROM {table}")[0]
        assert oldest <= db.scalar("SELECT now() - interval '12 months'"), table
        assert oldest >= db.scalar("SELECT now() - interval '13 months 1 day'"), table
        assert last_hour >= 1 and last_day >= last_hour and last_week > last_day, table
        assert future == 0, table
    # denser toward now: the last 3 months hold more calls than the first 3
    first, last = db.query(
        "SELECT count(*) FILTER (WHERE started_at < min_t + interval '3 months'),"
        "       count(*) FILTER (WHERE started_at >= now() - interval '3 months')"
        " FROM bcfy_calls_raw, (SELECT min(started_at) AS min_t FROM bcfy_calls_raw) m")[0]
    assert last > 2 * first
    # every calendar month of the last 13 holds calls (monthly partitions will all get rows)
    assert db.scalar("SELECT count(DISTINCT date_trunc('month', started_at)) FROM bcfy_calls_raw") >= 13
    # poll log: last ~45 days only
    assert db.scalar("SELECT min(poll_started_at) >= now() - interval '46 days' FROM bcfy_playlist_poll_log")


def test_keys_and_references(seeded):
    db = seeded
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE call_uid <> group_id || '-' || ts") == 0
    assert db.scalar("SELECT count(*) FROM (SELECT group_id, ts FROM bcfy_calls_raw"
                     " GROUP BY 1, 2 HAVING count(*) > 1) d") == 0
    assert db.scalar("SELECT count(*) FROM transcripts t"
                     " WHERE NOT EXISTS (SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = t.call_uid)") == 0
    assert db.scalar("SELECT count(*) FROM transcripts WHERE call_uid IS NULL") == 0
    assert db.scalar("SELECT count(*) FROM processing_state p"
                     " WHERE NOT EXISTS (SELECT 1 FROM bcfy_calls_raw c WHERE c.call_uid = p.call_uid)") == 0
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw c WHERE playlist_uuid IS NOT NULL"
                     " AND NOT EXISTS (SELECT 1 FROM bcfy_playlists p WHERE p.uuid = c.playlist_uuid)") == 0
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE playlist_uuid IS NOT NULL") > 0.5 * N
    assert db.scalar("SELECT count(*) FROM bcfy_playlist_poll_log l"
                     " WHERE NOT EXISTS (SELECT 1 FROM bcfy_playlists p WHERE p.uuid = l.uuid)") == 0
    # a transcript is written a few seconds to minutes after its call
    lo, hi = db.query("SELECT min(t.created_at - c.started_at), max(t.created_at - c.started_at)"
                      " FROM transcripts t JOIN bcfy_calls_raw c USING (call_uid)")[0]
    assert dt.timedelta(seconds=1) <= lo and hi <= dt.timedelta(minutes=10)
    # ids came from the sequences
    for table in ("transcripts", "processing_state", "api_call_metrics", "system_logs"):
        max_id, last_value = db.query(
            f"SELECT (SELECT max(id) FROM {table}), last_value FROM {table}_id_seq")[0]
        assert max_id == last_value, table


def test_realistic_shape(seeded):
    db = seeded
    feeds, tgs, sids, sites, nodes, tags, groups = db.query(
        "SELECT count(DISTINCT feed_id), count(DISTINCT tg_id), count(DISTINCT sid), count(DISTINCT site_id),"
        " count(DISTINCT node_id), count(DISTINCT tag_id), count(DISTINCT group_id) FROM bcfy_calls_raw")[0]
    assert 20 <= feeds <= 200 and 10 <= sids <= 60 and sids <= sites and 20 <= nodes <= 400
    assert 5 <= tags <= 40 and tgs == groups and 300 <= groups <= 2000
    # most old calls processed, the newest not yet
    old_processed = db.scalar("SELECT avg(processed::int) FROM bcfy_calls_raw WHERE ts < extract(epoch FROM now()) - 86400")
    assert old_processed > 0.99
    assert db.scalar("SELECT processed FROM bcfy_calls_raw ORDER BY ts DESC LIMIT 1") is False
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE s3_key_v2 IS NOT NULL") > 0
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw WHERE raw_json ? 'groupId'") == N
    statuses = dict(db.query("SELECT status, count(*) FROM processing_state GROUP BY 1"))
    assert {"indexed", "transcribed", "queued"} <= set(statuses)
    assert db.scalar("SELECT count(*) FROM transcripts t JOIN processing_state p USING (call_uid)"
                     " WHERE p.status IN ('transcribed', 'indexed')") == db.scalar("SELECT count(*) FROM transcripts")
    assert db.scalar("SELECT count(DISTINCT language) FROM transcripts") == 1
    assert db.scalar("SELECT min(language) FROM transcripts") == "en"
    assert db.scalar("SELECT count(*) FROM transcripts WHERE model_name IS NULL") == 0
    codes = {r[0] for r in db.query("SELECT DISTINCT status_code FROM api_call_metrics")}
    assert 200 in codes and len(codes) >= 5
    assert db.scalar("SELECT avg((status_code = 200)::int) FROM api_call_metrics") > 0.85
    assert db.scalar("SELECT count(DISTINCT component) FROM system_logs") >= 5
    assert db.scalar("SELECT count(*) FROM system_logs WHERE duration_ms IS NULL") > 0


def test_full_text_search_finds_radio_words(seeded):
    db = seeded
    for word in ("police", "traffic", "fire", "unit"):
        hits = db.scalar("SELECT count(*) FROM transcripts WHERE tsv @@ plainto_tsquery('english', %s)", (word,))
        assert hits > 0, word
    # the dashboard-style join works and recent transcripts exist
    assert db.scalar("SELECT count(*) FROM transcripts t JOIN bcfy_calls_raw c ON t.call_uid = c.call_uid"
                     " WHERE t.tsv @@ plainto_tsquery('english', 'traffic stop')") > 0
    assert db.scalar("SELECT count(*) FROM transcripts WHERE created_at >= now() - interval '7 days'") > 0


def test_schema_left_exactly_as_baseline(make_db, seeded):
    fresh = make_db(baseline=True)
    assert schema_objects(seeded) == schema_objects(fresh)


def test_deterministic_for_seed_and_anchor(seeded):
    db = seeded
    anchor = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
    args = "SELECT demo.seed(3000, p_seed => %s, p_anchor => %s, p_reset => true)"
    db.query(args, (7, anchor))
    first = {t: fingerprint(db, t) for t in TABLES_IN_ORDER}
    db.query(args, (7, anchor))
    assert {t: fingerprint(db, t) for t in TABLES_IN_ORDER} == first
    db.query(args, (8, anchor))
    other = {t: fingerprint(db, t) for t in TABLES_IN_ORDER}
    assert all(other[t] != first[t] for t in TABLES_IN_ORDER)
    # the anchor is "now" for the data set
    assert db.scalar("SELECT max(started_at) FROM bcfy_calls_raw") <= anchor
    assert db.scalar("SELECT max(started_at) FROM bcfy_calls_raw") >= anchor - dt.timedelta(minutes=1)


def test_refuses_to_mix_with_existing_data(seeded):
    db = seeded
    with pytest.raises(psycopg2.errors.RaiseException, match="already hold data"):
        db.query("SELECT demo.seed(100)")
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw") == N
    summary = db.scalar("SELECT demo.seed(1000, p_reset => true)")
    assert summary["rows"]["bcfy_calls_raw"] == 1000
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw") == 1000
    assert db.scalar("SELECT min(id) FROM api_call_metrics") == 1  # RESTART IDENTITY


def test_redefinition_is_idempotent_and_runs_as_owner(seeded):
    db = seeded
    assert db.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
    conn = db.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute((BASELINE_DIR / "02_demo_data.sql").read_text())
            cur.execute((BASELINE_DIR / "02_demo_data.sql").read_text())
            cur.execute("SELECT count(*) FROM pg_proc WHERE proname = 'seed' AND pronamespace = 'demo'::regnamespace")
            assert cur.fetchone()[0] == 1
            cur.execute("SELECT demo.seed(2000, p_reset => true)")
            assert any("demo.seed: 300 playlists, 2000 calls" in n for n in conn.notices)
    finally:
        conn.close()


@pytest.mark.parametrize("n", [0, 1, 7])
def test_tiny_sizes(make_db, n):
    db = make_db(baseline=True)
    conn = db.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute((BASELINE_DIR / "02_demo_data.sql").read_text())
            cur.execute("SELECT demo.seed(%s)", (n,))
            summary = cur.fetchone()[0]
    finally:
        conn.close()
    assert summary["rows"]["bcfy_calls_raw"] == n
    assert db.scalar("SELECT count(*) FROM bcfy_calls_raw") == n
    assert db.scalar("SELECT count(*) FROM api_call_metrics") == 4 * n
    assert {name: db.scalar(sql) for name, sql in VIOLATIONS.items()} == {name: 0 for name in VIOLATIONS}
