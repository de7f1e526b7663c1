#!/usr/bin/env bash
# The README's demo: embedded PostgreSQL 15 + demo data, then the whole guide: Phase 1, Phase 2
# step 0, Phase 2 and Phase 3 while the application's workload runs (tools/workload), the
# guide's performance validation and the nightly maintenance job; it ends with the zero-downtime
# figures and the report paths. Running it again changes nothing (each playbook reports changed=0).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export ANSIBLE_CONFIG="$repo/ansible.cfg"
export PG_EMBED_PORT=${PG_EMBED_PORT:-55432}
pg_dir=${PG_EMBED_DIR:-$repo/.local/pg}
calls=${DEMO_CALLS:-200000}
rate=${DEMO_RATE:-150}
py=.venv/bin/python
play() { .venv/bin/ansible-playbook -i inventory/local "$@"; }

scripts/pg_embedded.sh start
play playbooks/demo_seed.yml -e demo_seed_calls="$calls"
play playbooks/phase1.yml

# The application, running throughout Phase 2: ingest (already on the new upsert, which
# Phase 2's first migration makes available: see README "The ingester's upsert"), worker,
# transcriber, API reads, metrics, logs. Every statement and committed key is recorded.
run=.local/demo-workload; mkdir -p "$run"; rm -f "$run/stop"
# Operator workflow: step 0 installs the engine and the new unique key, the application switches
# its upsert to ON CONFLICT (call_uid, started_at), then Phase 2 converts while it runs.
play playbooks/phase2_prepare.yml
upsert=call_uid_started_at
"$py" tools/workload run --host 127.0.0.1 --port "$PG_EMBED_PORT" --dbname scanner --user scan \
  --password-file "$pg_dir/scan.password" --rate "$rate" --upsert "$upsert" --until-file "$run/stop" \
  --max-duration 3600 --keys "$run/keys.jsonl" --summary "$run/summary.json" --quiet &
wl=$!
trap 'touch "$run/stop"; wait $wl 2>/dev/null || true' EXIT
sleep 3
set +e
play playbooks/phase2.yml && play playbooks/phase3.yml
rc=$?
set -e
touch "$run/stop"; wait $wl || true; trap - EXIT
if [ "$rc" -eq 0 ]; then
  # the guide's "Performance Validation" against the baseline Phase 1 saved, then the nightly job
  set +e
  play playbooks/validate.yml && play playbooks/maintenance.yml
  rc=$?
  set -e
fi
echo
echo "=== Zero downtime, measured while Phases 2 and 3 ran ==="
"$py" - "$run/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
lat = s.get("latency_ms", {})
print(f"application statements: {s['statements']}, failed: {s['failed']}, "
      f"p50 {lat.get('p50', 0):.1f} ms, p99 {lat.get('p99', 0):.1f} ms, max stall {s['max_stall_ms']:.0f} ms "
      f"over {s['duration_s']:.0f} s")
PY
"$py" tools/workload check --host 127.0.0.1 --port "$PG_EMBED_PORT" --dbname scanner --user scan \
  --password-file "$pg_dir/scan.password" --keys "$run/keys.jsonl" | tail -1
echo "reports (open the .html in a browser): $(ls -t reports/*.html 2>/dev/null | head -6 | tr '\n' ' ')"
echo "The embedded PostgreSQL keeps running on 127.0.0.1:$PG_EMBED_PORT: 'make demo-stop' stops it."
exit $rc
