#!/usr/bin/env bash
# Build (once) a local PostgreSQL test image for the Molecule scenarios: a Debian minbase root with
# postgresql-<major>, postgresql-<major>-cron (where the suite ships it), python3, python3-psycopg2,
# made with debootstrap and imported into podman. No container registry is needed.
#
#   scripts/build_pg_image.sh [--major N]            build if missing, tag :current, print the image ref
#   scripts/build_pg_image.sh [--major N] --ref      print the image ref this script builds, build nothing
#   scripts/build_pg_image.sh [--major N] --force    rebuild even if the image exists
#
# Majors (each from the Debian suite that ships it; never the host's release):
#   13 -> bullseye, 15 -> bookworm (default), 17 -> trixie, 18 -> sid (checked 2026-11: trixie and trixie-backports
#   ship no postgresql-18; sid has postgresql-18 18.6 and postgresql-18-cron 1.6.8).
# The image is localhost/scanner-pg<major>:<hash>, also tagged localhost/scanner-pg<major>:current
# (molecule/default, phase2 and fleet use localhost/scanner-pg15:current; molecule/matrix the others).
# When the suite has no pg_cron package for the major, the image has none and the label
# org.scanner-dbops.pg-cron=false says so (the matrix scenario then runs without pg_cron).
#
# The tag is a hash of this file: editing the script (package list, mirror logic...)
# produces a new tag and so a rebuild; an unchanged script reuses the cached image
# (`podman image exists`), which takes well under a second.
#
# Environment (optional):
#   PG_IMAGE_MIRROR   Debian mirror URL (default: the one this machine's apt sources use)
#   PG_IMAGE_WORKDIR  scratch folder for the root filesystem (default: /var/tmp)
#   CONTAINERS_CONF   podman config (default: <repo>/molecule/containers.conf)
#   PG_IMAGE_PRUNE    0 keeps the older tags of the image (default 1: removed after a build); podman's
#                     image store is machine-wide, so a branch with another version of this script
#                     building beside a checkout still using the old tag should set 0
#
# Needs root (debootstrap), debootstrap and podman: apt-get install podman runc debootstrap
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
self="$repo/scripts/$(basename "$0")"
die() { echo "build_pg_image: $*" >&2; exit 1; }
usage="usage: $0 [--major 13|15|17|18] [--ref|--force]"

major=15
action=build
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --major) [ $# -ge 2 ] || die "$usage"; major=$2; shift 2 ;;
    --major=*) major=${1#--major=}; shift ;;
    --ref) action=ref; shift ;;
    --force) force=1; shift ;;
    *) die "$usage" ;;
  esac
done

# The Debian suite that ships each major (its own PostgreSQL, so the distro's pg_cron build matches).
# cron=1: the suite has postgresql-<major>-cron.
case "$major" in
  13) suite=bullseye; cron=1 ;;
  15) suite=bookworm; cron=1 ;;
  17) suite=trixie; cron=1 ;;
  18) suite=sid; cron=1 ;;
  *) die "no image recipe for PostgreSQL $major (known: 13 15 17 18)" ;;
esac
name=localhost/scanner-pg$major
packages=postgresql-$major,python3,python3-psycopg2,ca-certificates
[ "$cron" = 1 ] && packages="$packages,postgresql-$major-cron"
hash=$(sha256sum "$self" | cut -c1-12)
ref="$name:$hash"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/molecule/containers.conf}

[ "$action" = ref ] && { echo "$ref"; exit 0; }

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
root=$(mktemp -d "$workdir/scanner-pg$major-rootfs.XXXXXX")
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

echo "build_pg_image: building $ref (PostgreSQL $major: debootstrap $suite from $mirror; log: $log)" >&2
if ! debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  die "debootstrap failed (full log: $log)"
fi
t_boot=$(date +%s)

# The package created a default cluster (<major>/main); the tests make their own.
if [ -d "$root/etc/postgresql/$major/main" ]; then
  chroot "$root" pg_dropcluster "$major" main >/dev/null 2>&1 \
    || rm -rf "$root/etc/postgresql/$major/main" "$root/var/lib/postgresql/$major/main"
fi
# Smaller image: no package cache, no apt lists, no docs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/var/log/*.log
# Check the image has what the tests rely on before importing it.
need="usr/lib/postgresql/$major/bin/initdb usr/lib/postgresql/$major/lib/pg_stat_statements.so usr/bin/python3 usr/bin/psql"
[ "$cron" = 1 ] && need="$need usr/lib/postgresql/$major/lib/pg_cron.so"
for f in $need; do
  [ -e "$root/$f" ] || die "image is missing /$f"
done
chroot "$root" python3 -c 'import psycopg2' || die "image is missing python3-psycopg2"

tar --numeric-owner -C "$root" -c . | podman import --quiet \
  --change 'CMD=["sleep","infinity"]' \
  --change 'ENV=LANG=C.UTF-8' \
  --change "LABEL=org.scanner-dbops.build-hash=$hash" \
  --change "LABEL=org.scanner-dbops.pg-major=$major" \
  --change "LABEL=org.scanner-dbops.pg-cron=$([ "$cron" = 1 ] && echo true || echo false)" \
  - "$ref" >/dev/null
podman tag "$ref" "$name:current"
rm -f "$log"

# Drop images made by older versions of this script (ignore ones still in use).
[ "${PG_IMAGE_PRUNE:-1}" = 0 ] || podman images --format '{{.Repository}}:{{.Tag}}' \
  | awk -v n="$name" -v keep="$ref" -F: '$1 ":" $2 != keep && $1 == n && $2 != "current" { print $1 ":" $2 }' \
  | xargs -r podman rmi >/dev/null 2>&1 || true

end=$(date +%s)
echo "build_pg_image: built $ref (PostgreSQL $major, Debian $suite, pg_cron $([ "$cron" = 1 ] && echo yes || echo no)) in $(( end - start ))s (debootstrap $(( t_boot - start ))s, import $(( end - t_boot ))s)" >&2
echo "$ref"
