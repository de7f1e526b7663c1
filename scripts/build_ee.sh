#!/usr/bin/env bash
# Build the AWX execution environment (`make ee`): localhost/scanner-dbops-ee:<tag>, the tag being
# options.tags of execution-environment.yml. ansible-builder (.venv) + podman, on the Debian base
# image of scripts/build_ee_base.sh (debootstrap; no container registry needed). Python packages come
# from PyPI, the pinned collections from the repository's collections/ (scripts/install.sh).
#
#   scripts/build_ee.sh            build unless the image of these inputs exists; print the image ref
#   scripts/build_ee.sh --ref      print the image ref, build nothing
#   scripts/build_ee.sh --check    exit 0 when the image exists and is up to date, 3 otherwise; build nothing
#   scripts/build_ee.sh --force    rebuild (podman's layer cache still applies)
#
# Cache: the image carries a label with a hash of its inputs (base image, execution-environment.yml,
# ee/*.txt, requirements.yml, the copied collections, this script, RDS_CA_BUNDLE_URL); when the image
# exists with that label nothing is built (well under a second).
#
# Environment (optional):
#   RDS_CA_BUNDLE_URL  AWS RDS CA bundle baked into the image (default: AWS's global bundle URL;
#                      empty: none; unreachable: the build goes on without it and says so)
#   EE_BUILD_CA_BUNDLE CA bundle the build's RUN steps trust for PyPI and the Debian mirror (default:
#                      this machine's /etc/ssl/certs/ca-certificates.crt, so a TLS-intercepting proxy
#                      the host trusts works; empty: the image's own). Mounted read-only over the
#                      image's bundle during the build only: the final image keeps Debian's bundle.
#   CONTAINERS_CONF    podman config (default: <repo>/molecule/containers.conf)
# Needs root (the base image's debootstrap), debootstrap and podman: apt-get install podman runc debootstrap
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/molecule/containers.conf}
ee_file=execution-environment.yml
py=$repo/.venv/bin/python
RDS_CA_BUNDLE_URL=${RDS_CA_BUNDLE_URL-https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem}
EE_BUILD_CA_BUNDLE=${EE_BUILD_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}

die() { echo "build_ee: $*" >&2; exit 1; }
[ -x "$py" ] && [ -x "$repo/.venv/bin/ansible-builder" ] || die "no .venv with ansible-builder: run scripts/install.sh --test"

# The image ref (options.tags[0], unqualified names are localhost/), the collections to copy.
ref=$("$py" - "$ee_file" <<'PY'
import sys, yaml
ee = yaml.safe_load(open(sys.argv[1]))
tag = ee["options"]["tags"][0]
print(tag if "/" in tag.split(":")[0] else "localhost/" + tag)
PY
)
case "${1:-}" in
  --ref) echo "$ref"; exit 0 ;;
  --force) force=1 ;;
  --check) force=check ;;
  "") force=0 ;;
  *) die "usage: $0 [--ref|--check|--force]" ;;
esac
command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc debootstrap)"

start=$(date +%s)
if [ "$force" = check ]; then
  base=$(scripts/build_ee_base.sh --ref)
  podman image exists "$base" || { echo "build_ee: base image $base is not built: run make ee" >&2; exit 3; }
else
  base=$(scripts/build_ee_base.sh)
fi
t_base=$(date +%s)

# The collections copied into the image must be the versions requirements.yml pins (otherwise
# ansible-galaxy would try Galaxy during the build).
"$py" - "$ee_file" <<'PY' || die "install the pinned collections first: scripts/install.sh"
import json, pathlib, sys, yaml
ee = yaml.safe_load(open(sys.argv[1]))
pins = {c["name"]: str(c["version"]) for c in yaml.safe_load(open(ee["dependencies"]["galaxy"]))["collections"]}
copied = {}
for entry in ee.get("additional_build_files", []):
    src = pathlib.Path(entry["src"])
    if src.parts[:1] == ("collections",):
        info = json.loads((src / "MANIFEST.json").read_text())["collection_info"] if (src / "MANIFEST.json").is_file() \
            else yaml.safe_load((src / "galaxy.yml").read_text())
        copied[f"{info['namespace']}.{info['name']}"] = str(info["version"])
bad = [f"{n} {v}: {copied.get(n, 'not in collections/')}" for n, v in pins.items() if copied.get(n) != v]
for line in bad:
    print(f"build_ee: pinned collection {line}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY

inputs=$( {
  podman image inspect --format '{{.Id}}' "$base"
  sha256sum "$ee_file" ee/*.txt requirements.yml scripts/build_ee.sh
  find -L collections/ansible_collections/community/postgresql collections/ansible_collections/containers/podman \
       collections/ansible_collections/awx/awx collections/ansible_collections/scanner/dbops \
       -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
  echo "RDS_CA_BUNDLE_URL=$RDS_CA_BUNDLE_URL"
} | sha256sum | cut -c1-12)

size() { podman image inspect --format '{{.Size}}' "$ref" | awk '{ printf "%d MB", $1 / 1000000 }'; }
if [ "$force" != 1 ] && [ "$(podman image inspect --format '{{index .Labels "org.scanner-dbops.ee-inputs"}}' "$ref" 2>/dev/null)" = "$inputs" ]; then
  echo "build_ee: $ref is up to date (inputs $inputs; cached, $(( $(date +%s) - start ))s; $(size))" >&2
  echo "$ref"
  exit 0
fi

if [ "$force" = check ]; then
  echo "build_ee: $ref is missing or older than its inputs ($inputs): run make ee" >&2
  exit 3
fi
old=$(podman image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true)
ctx=$(mktemp -d /var/tmp/scanner-dbops-ee-context.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
extra="--label org.scanner-dbops.ee-inputs=$inputs"
if [ -n "$EE_BUILD_CA_BUNDLE" ]; then
  [ -f "$EE_BUILD_CA_BUNDLE" ] || die "EE_BUILD_CA_BUNDLE=$EE_BUILD_CA_BUNDLE is not a file"
  extra="$extra --volume $EE_BUILD_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro"
fi
echo "build_ee: building $ref on $base (inputs $inputs)" >&2
"$repo/.venv/bin/ansible-builder" build --file "$ee_file" --context "$ctx" --tag "$ref" \
  --container-runtime podman --build-arg "EE_BASE_IMAGE=$base" --build-arg "RDS_CA_BUNDLE_URL=$RDS_CA_BUNDLE_URL" \
  --extra-build-cli-args "$extra" -v 2 >&2 \
  || die "ansible-builder build failed (output above)"
end=$(date +%s)

# Drop the image this one replaces (kept when still in use).
new=$(podman image inspect --format '{{.Id}}' "$ref")
if [ -n "$old" ] && [ "$old" != "$new" ]; then podman rmi "$old" >/dev/null 2>&1 || true; fi

echo "build_ee: built $ref in $(( end - start ))s (base image $(( t_base - start ))s, ansible-builder $(( end - t_base ))s); size $(size)" >&2
echo "build_ee: largest parts (MB):" >&2
podman run --rm --entrypoint du "$ref" -xsm /opt/ee /usr/lib/x86_64-linux-gnu /usr/lib/python3.13 /usr/share/perl \
  /usr/lib/postgresql /usr/share/ansible 2>/dev/null | sort -rn | sed 's/^/  /' >&2 || true
podman run --rm --entrypoint ls "$ref" /etc/pki/rds/global-bundle.pem >/dev/null 2>&1 \
  && echo "build_ee: RDS CA bundle included (/etc/pki/rds/global-bundle.pem)" >&2 \
  || echo "build_ee: no RDS CA bundle in the image (RDS_CA_BUNDLE_URL empty or unreachable): mount one at /etc/pki/rds/global-bundle.pem for sslmode=verify-full" >&2
echo "$ref"
