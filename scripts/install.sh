#!/usr/bin/env bash
# Installs everything the project needs, idempotently:
#   scripts/install.sh          OS packages for the demo, .venv, collections
#   scripts/install.sh --test   also what the test suite needs (podman, runc, debootstrap, chromium)
# OS packages are installed only when running as root with apt-get available; otherwise the
# script says what is missing. Galaxy is tried first for collections; when it does not answer,
# the same pinned versions are taken from the `ansible` wheel on PyPI (it bundles them).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

log() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

# ---- 1. OS packages ------------------------------------------------------------------------
pkgs=(postgresql-15 postgresql-client-15 postgresql-15-cron)
[ "$want_test" = 1 ] && pkgs+=(podman runc netavark iptables debootstrap chromium fonts-dejavu-core)  # iptables: podman networks (tests/test_awx_ee_run.py); chromium + a font: tests/test_report_html.py
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The Debian package creates and starts a default cluster on 5432; we never use it.
  else
    echo "Missing OS packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# ---- 2. Python virtualenv ------------------------------------------------------------------
py=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
sum=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
  log "creating .venv (requirements.txt)"
  "$py" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import ansible, psycopg2" || { echo "pip install failed" >&2; exit 1; }
  echo "$sum" > "$stamp"
fi

# ---- 3. Collections (pinned in requirements.yml) into ./collections -----------------------
coll_dir=collections/ansible_collections
have_version() { # namespace name version
  python3 - "$coll_dir/$1/$2/MANIFEST.json" "$3" <<'PY'
import json, sys
try:
    v = json.load(open(sys.argv[1]))["collection_info"]["version"]
except Exception:
    sys.exit(1)
sys.exit(0 if v == sys.argv[2] else 1)
PY
}
need_collections() {
  have_version community postgresql 4.2.0 && have_version containers podman 1.18.0 \
    && have_version awx awx 24.6.1 && return 1
  return 0
}
if need_collections; then
  mkdir -p collections
  log "collections: trying Ansible Galaxy"
  if ! timeout 90 .venv/bin/ansible-galaxy collection install -r requirements.yml -p ./collections --force >/dev/null 2>&1 \
       || need_collections; then
    log "collections: Galaxy unreachable, extracting the pinned versions from the ansible==12.3.0 wheel (PyPI)"
    mkdir -p .cache/wheel
    [ -f .cache/wheel/ansible-12.3.0-py3-none-any.whl ] || \
      .venv/bin/pip download -q --no-deps ansible==12.3.0 -d .cache/wheel 2>&1 | grep -v "^WARNING: Location" || true
    rm -rf .cache/wheel/x
    .venv/bin/python - <<'PY'
import zipfile
with zipfile.ZipFile(".cache/wheel/ansible-12.3.0-py3-none-any.whl") as z:
    names = [n for n in z.namelist()
             if n.startswith(("ansible_collections/community/postgresql/", "ansible_collections/containers/podman/",
                              "ansible_collections/awx/awx/"))]
    z.extractall(".cache/wheel/x", names)
PY
    for c in community/postgresql containers/podman awx/awx; do
      rm -rf "$coll_dir/$c"; mkdir -p "$coll_dir/$(dirname "$c")"
      cp -a ".cache/wheel/x/ansible_collections/$c" "$coll_dir/$c"
    done
    rm -rf .cache/wheel/x
    need_collections && { echo "collections: pinned versions not installed" >&2; exit 1; }
  fi
fi
log "ready: $(.venv/bin/ansible --version | head -1), community.postgresql 4.2.0, containers.podman 1.18.0, awx.awx 24.6.1"
