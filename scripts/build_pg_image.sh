#!/usr/bin/env bash
# Build (once) the local PostgreSQL 15 test image for the Molecule `default` scenario:
# Debian bookworm minbase + postgresql-15, postgresql-15-cron, python3, python3-psycopg2,
# made with debootstrap and imported into podman. No container registry is needed.
#
#   scripts/build_pg_image.sh            build if missing, tag :current, print the image ref
#   scripts/build_pg_image.sh --ref      print the image ref this script builds, build nothing
#   scripts/build_pg_image.sh --force    rebuild even if the image exists
#
# The tag is a hash of this file: editing the script (package list, mirror logic...)
# produces a new tag and so a rebuild; an unchanged script reuses the cached image
# (`podman image exists`), which takes well under a second.
# The image is also tagged localhost/scanner-pg15:current (what molecule/default uses).
#
# Environment (optional):
#   PG_IMAGE_MIRROR   Debian mirror URL (default: the one this machine's apt sources use)
#   PG_IMAGE_WORKDIR  scratch folder for the root filesystem (default: /var/tmp)
#   CONTAINERS_CONF   podman config (default: <repo>/molecule/containers.conf)
#
# Needs root (debootstrap), debootstrap and podman: apt-get install podman runc debootstrap
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
self="$repo/scripts/$(basename "$0")"
name=localhost/scanner-pg15
suite=bookworm   # PostgreSQL 15 is bookworm's version: do not follow the host's release
packages=postgresql-15,postgresql-15-cron,python3,python3-psycopg2,ca-certificates
hash=$(sha256sum "$self" | cut -c1-12)
ref="$name:$hash"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/molecule/containers.conf}

die() { echo "build_pg_image: $*" >&2; exit 1; }

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
  echo "build_pg_image: $ref already built (cached, $(( $(date +%s) - start ))s)" >&2
  echo "$ref"
  exit 0
fi

command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] \
  || die "debootstrap is not installed (apt-get install podman runc debootstrap)"
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap needs it)"
PATH=$PATH:/usr/sbin:/sbin

# The Debian mirror this machine's apt uses: deb822 (*.sources) first, then one-line lists.
# Only stanzas/lines for a Debian release suite count (not -security/-updates, not
# third-party repositories such as nodesource), and only http(s) URIs.
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
    # deb [options] uri suite components...
    sed -E 's/\[[^]]*\]//' "$f" | awk -v re="$codenames" \
      '$1 == "deb" && $2 ~ /^https?:\/\// && $3 ~ re { print $2 }'
  done
}

mirror=${PG_IMAGE_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(detect_mirror | head -n1 || true)
  [ -n "$mirror" ] || { mirror=http://deb.debian.org/debian
    echo "build_pg_image: no Debian mirror found in apt sources, using $mirror" >&2; }
fi

workdir=${PG_IMAGE_WORKDIR:-/var/tmp}
mkdir -p "$workdir"
root=$(mktemp -d "$workdir/scanner-pg15-rootfs.XXXXXX")
log="$root.log"
cleanup() {
  # debootstrap mounts proc/sys inside the target and may leave them on failure:
  # unmount everything below the root before deleting it, and never cross a mount.
  local m
  for m in $(awk -v r="$root" 'index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT

echo "build_pg_image: building $ref (debootstrap $suite from $mirror; log: $log)" >&2
if ! debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  die "debootstrap failed (full log: $log)"
fi
t_boot=$(date +%s)

# The package created a default cluster (15/main); the tests make their own.
if [ -d "$root/etc/postgresql/15/main" ]; then
  chroot "$root" pg_dropcluster 15 main >/dev/null 2>&1 \
    || rm -rf "$root/etc/postgresql/15/main" "$root/var/lib/postgresql/15/main"
fi
# Smaller image: no package cache, no apt lists, no docs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/log/*.log
# Check the image has what the tests rely on before importing it.
for f in usr/lib/postgresql/15/bin/initdb usr/lib/postgresql/15/lib/pg_cron.so \
         usr/lib/postgresql/15/lib/pg_stat_statements.so usr/bin/python3 usr/bin/psql; do
  [ -e "$root/$f" ] || die "image is missing /$f"
done
chroot "$root" python3 -c 'import psycopg2' || die "image is missing python3-psycopg2"

tar --numeric-owner -C "$root" -c . | podman import --quiet \
  --change 'CMD=["sleep","infinity"]' \
  --change 'ENV=LANG=C.UTF-8' \
  --change "LABEL=org.scanner-dbops.build-hash=$hash" \
  - "$ref" >/dev/null
podman tag "$ref" "$name:current"
rm -f "$log"

# Drop images made by older versions of this script (ignore ones still in use).
podman images --format '{{.Repository}}:{{.Tag}}' \
  | awk -v n="$name" -v keep="$ref" -F: '$1 ":" $2 != keep && $1 == n && $2 != "current" { print $1 ":" $2 }' \
  | xargs -r podman rmi >/dev/null 2>&1 || true

end=$(date +%s)
echo "build_pg_image: built $ref in $(( end - start ))s (debootstrap $(( t_boot - start ))s, import $(( end - t_boot ))s)" >&2
echo "$ref"
