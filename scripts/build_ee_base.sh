#!/usr/bin/env bash
# Build (once) the base image of the AWX execution environment: Debian trixie minbase + Python 3
# with a virtual environment /opt/ee (on PATH; ansible-builder installs every Python package into
# it: Debian disables ensurepip for the system Python, and the venv keeps pip away from dpkg's
# files), the PostgreSQL client, curl and the CA certificates, made with debootstrap and imported
# into podman. No container registry is needed (scripts/build_ee.sh then runs ansible-builder on
# top of it; see docs/AWX.md).
#
#   scripts/build_ee_base.sh            build if missing, tag :current, print the image ref
#   scripts/build_ee_base.sh --ref      print the image ref this script builds, build nothing
#   scripts/build_ee_base.sh --force    rebuild even if the image exists
#
# The tag is a hash of this file: editing it (suite, package list...) builds a new image; an
# unchanged script reuses the cached one (`podman image exists`, well under a second).
#
# Why trixie: its postgresql-client-17 is the newest pg_dump in a Debian release (bookworm has 15;
# 18 is only in sid). pg_dump must be at least the server's major version (ee/bindep.txt).
# The system packages are installed here, not by ansible-builder: its assemble/install-from-bindep
# scripts only know dnf/microdnf. /usr/local/bin/ee-apt (below) gives them a dnf-like
# `install -y PKG...` / `clean all` over apt-get, so bindep still checks ee/bindep.txt (dpkg) and
# installs whatever a new line adds.
#
# Environment (optional):
#   EE_IMAGE_MIRROR   Debian mirror URL (default: the one this machine's apt sources use)
#   EE_IMAGE_WORKDIR  scratch folder for the root filesystem (default: /var/tmp)
#   CONTAINERS_CONF   podman config (default: <repo>/molecule/containers.conf)
#
# Needs root (debootstrap), debootstrap and podman: apt-get install podman runc debootstrap
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
self="$repo/scripts/$(basename "$0")"
name=localhost/scanner-dbops-ee-base
suite=trixie
pg_client=postgresql-client-17
packages=python3,python3-venv,$pg_client,ca-certificates,curl
hash=$(sha256sum "$self" | cut -c1-12)
ref="$name:$hash"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/molecule/containers.conf}

die() { echo "build_ee_base: $*" >&2; exit 1; }

case "${1:-}" in
  --ref) echo "$ref"; exit 0 ;;
  --force) force=1 ;;
  "") force=0 ;;
  *) die "usage: $0 [--ref|--force]" ;;
esac

command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc debootstrap)"

start=$(date +%s)
if [ "$force" = 0 ] && podman image exists "$ref"; then
  podman tag "$ref" "$name:current"
  echo "build_ee_base: $ref already built (cached, $(( $(date +%s) - start ))s)" >&2
  echo "$ref"
  exit 0
fi

command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] \
  || die "debootstrap is not installed (apt-get install podman runc debootstrap)"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap needs it)"
PATH=$PATH:/usr/sbin:/sbin

# The Debian mirror this machine's apt uses (same rules as scripts/build_pg_image.sh): deb822
# stanzas first, then one-line lists; only Debian release suites and http(s) URIs.
detect_mirror() {
  local codenames='^(bookworm|trixie|forky|bullseye|sid|stable|testing|unstable|oldstable)$'
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v re="$codenames" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && enabled != "no") {
          n = split(suites, s, " "); ok = 0
          for (i = 1; i <= n; i++) if (s[i] ~ re) ok = 1
          if (ok) { split(uris, u, " "); if (u[1] ~ /^https?:\/\//) print u[1] }
        }
        types = ""; suites = ""; uris = ""; enabled = ""
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
        if (key == "types") types = $0; else if (key == "suites") suites = $0
        else if (key == "uris") uris = $0; else if (key == "enabled") enabled = tolower($0) }
      END { flush() }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed -E 's/\[[^]]*\]//' "$f" | awk -v re="$codenames" \
      '$1 == "deb" && $2 ~ /^https?:\/\// && $3 ~ re { print $2 }'
  done
}

mirror=${EE_IMAGE_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(detect_mirror | head -n1 || true)
  [ -n "$mirror" ] || { mirror=http://deb.debian.org/debian
    echo "build_ee_base: no Debian mirror found in apt sources, using $mirror" >&2; }
fi

workdir=${EE_IMAGE_WORKDIR:-/var/tmp}
mkdir -p "$workdir"
root=$(mktemp -d "$workdir/scanner-dbops-ee-rootfs.XXXXXX")
log="$root.log"
cleanup() {
  local m
  for m in $(awk -v r="$root" 'index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT

echo "build_ee_base: building $ref (debootstrap $suite from $mirror; log: $log)" >&2
if ! debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  die "debootstrap failed (full log: $log)"
fi
t_boot=$(date +%s)

# The Python of the EE (execution-environment.yml: python_path /opt/ee/bin/python3).
chroot "$root" python3 -m venv /opt/ee || die "cannot create the virtual environment /opt/ee"

# apt inside the image uses the same mirror (for bindep lines not preinstalled here).
echo "deb $mirror $suite main" > "$root/etc/apt/sources.list"
cat > "$root/etc/apt/apt.conf.d/90scanner-dbops-ee" <<'CONF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
CONF
# dnf-like front end for ansible-builder's scripts (options.package_manager_path).
cat > "$root/usr/local/bin/ee-apt" <<'SHIM'
#!/bin/sh
# ansible-builder runs `$PKGMGR install -y PKG...` and `$PKGMGR clean all` (dnf syntax).
set -eu
export DEBIAN_FRONTEND=noninteractive
cmd=${1:-}; [ $# -gt 0 ] && shift
case "$cmd" in
  install)
    pkgs=""
    for a in "$@"; do case "$a" in -*) ;; *) pkgs="$pkgs $a" ;; esac; done
    [ -n "$pkgs" ] || exit 0
    # Already installed (the base image preinstalls the bindep packages): nothing to fetch.
    n=$(dpkg-query -W -f='${Status}\n' $pkgs 2>/dev/null | grep -c 'install ok installed' || true)
    [ "$n" -eq "$(echo $pkgs | wc -w)" ] && exit 0
    apt-get update -q && apt-get install -y -q $pkgs ;;
  clean)
    apt-get clean && rm -rf /var/lib/apt/lists/* ;;
  *)
    exec apt-get "$cmd" "$@" ;;
esac
SHIM
chmod 0755 "$root/usr/local/bin/ee-apt"

# Smaller image: no package cache, no apt lists, no docs, no man pages, no locales but C.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
for f in opt/ee/bin/python3 opt/ee/bin/pip usr/bin/pg_dump usr/bin/pg_restore usr/bin/psql usr/bin/curl usr/local/bin/ee-apt; do
  [ -e "$root/$f" ] || die "image is missing /$f"
done
chroot "$root" python3 -c 'import ensurepip, venv' || die "image is missing python3-venv (ensurepip)"
chroot "$root" pg_dump --version >&2

tar --numeric-owner -C "$root" -c . | podman import --quiet \
  --change 'CMD=["bash"]' \
  --change 'ENV=LANG=C.UTF-8' \
  --change 'ENV=PATH=/opt/ee/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change "LABEL=org.scanner-dbops.build-hash=$hash" \
  - "$ref" >/dev/null
podman tag "$ref" "$name:current"
rm -f "$log"

# Drop images made by older versions of this script (ignore ones still in use).
podman images --format '{{.Repository}}:{{.Tag}}' \
  | awk -v n="$name" -v keep="$ref" -F: '$1 ":" $2 != keep && $1 == n && $2 != "current" { print $1 ":" $2 }' \
  | xargs -r podman rmi >/dev/null 2>&1 || true

end=$(date +%s)
echo "build_ee_base: built $ref in $(( end - start ))s (debootstrap $(( t_boot - start ))s, import $(( end - t_boot ))s)" >&2
echo "$ref"
