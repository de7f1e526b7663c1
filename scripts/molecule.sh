#!/usr/bin/env bash
# Runs the Molecule scenarios: `default` (Phase 1 in a podman container, with --check), `matrix`
# (every phase, rollback and finalize under the application's workload, production shape) once per
# major of MATRIX_MAJORS (default "15 17"; make test-matrix: "13 15 17 18") and `fleet` (two
# containers, one run) when podman works here, and `embedded` (delegated driver, local server) always.
#   scripts/molecule.sh matrix                        MATRIX_MAJORS="13 15 17 18" scripts/molecule.sh matrix
# All clean up after themselves.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PATH="$repo/.venv/bin:$PATH"
# The postgres OS user must reach the embedded scenario's data folder.
export MOLECULE_PG_EMBED_DIR=${MOLECULE_PG_EMBED_DIR:-/var/tmp/scanner-molecule-pg-$(id -u)}
# Molecule's step lines (dependency, converge, idempotence...) get the time of day, so a log shows
# what each step took (docs/TESTING.md's tables come from these).
stamp() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      *➜*) printf '%(%H:%M:%S)T %s\n' -1 "$line" ;;
      *) printf '%s\n' "$line" ;;
    esac
  done
}
scenarios=("$@")
if [ "${#scenarios[@]}" -eq 0 ]; then
  scenarios=(embedded)
  if [ "$(id -u)" = 0 ] && command -v podman >/dev/null && command -v debootstrap >/dev/null; then
    scenarios=(default matrix fleet embedded)
  else
    echo "molecule: podman/debootstrap unavailable or not root: running only the 'embedded' scenario" >&2
  fi
fi
for s in "${scenarios[@]}"; do
  if [ "$s" = matrix ]; then
    for major in ${MATRIX_MAJORS:-15 17}; do
      echo "=== molecule test -s matrix (PostgreSQL $major)"
      start=$(date +%s)
      # its own scratch folder: two majors may run at once (from two shells) without sharing state
      SCANNER_PG_MAJOR=$major MOLECULE_EPHEMERAL_DIRECTORY=${HOME:-/root}/.ansible/tmp/molecule.scanner-matrix-pg$major \
        molecule test -s matrix 2>&1 | stamp
      echo "=== molecule matrix PostgreSQL $major passed in $(( $(date +%s) - start )) s"
    done
    continue
  fi
  echo "=== molecule test -s $s"
  start=$(date +%s)
  molecule test -s "$s" 2>&1 | stamp
  echo "=== molecule $s passed in $(( $(date +%s) - start )) s"
done
