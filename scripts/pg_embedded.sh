#!/usr/bin/env bash
# Embedded local PostgreSQL 15 for the demo and the tests: pg_cron + pg_stat_statements
# preloaded, loopback TCP only, scram passwords, data under an ignored folder of the repo.
# The server runs as the `postgres` OS user when invoked as root (PostgreSQL refuses root).
#
#   scripts/pg_embedded.sh start|stop|status|env
#
# Environment (all optional):
#   PG_EMBED_DIR   data + sockets + password file   (default: <repo>/.local/pg)
#   PG_EMBED_PORT  TCP port on 127.0.0.1             (default: 55432)
#   PG_EMBED_DB    application database              (default: scanner)
#   PG_EMBED_USER  application/migration role        (default: scan; not a superuser, like RDS)
#   PG_EMBED_FAST  1 = fsync/synchronous_commit off  (tests only)
#   PG_BIN         server binaries                   (default: /usr/lib/postgresql/15/bin)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${PG_EMBED_DIR:-$repo/.local/pg}
port=${PG_EMBED_PORT:-55432}
db=${PG_EMBED_DB:-scanner}
user=${PG_EMBED_USER:-scan}
bin=${PG_BIN:-/usr/lib/postgresql/15/bin}
data=$dir/data
run=$dir/run
pwfile=$dir/$user.password

as_pg() {
  # PostgreSQL refuses to run as root: drop to the postgres OS user when we are root.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

psql_bin() { command -v psql || echo /usr/bin/psql; }

init() {
  [ -x "$bin/initdb" ] || { echo "PostgreSQL 15 server not found at $bin (run scripts/install.sh)" >&2; exit 1; }
  [ -f "$bin/../lib/pg_cron.so" ] || [ -f "/usr/lib/postgresql/15/lib/pg_cron.so" ] || {
    echo "pg_cron is not installed (apt-get install postgresql-15-cron, or run scripts/install.sh)" >&2; exit 1; }
  mkdir -p "$dir" "$run"
  if [ "$(id -u)" = 0 ]; then chown -R postgres: "$dir"; fi
  if ! as_pg test -w "$dir"; then
    echo "The postgres OS user cannot write $dir (a parent folder is not traversable?)." >&2
    echo "Set PG_EMBED_DIR to a folder it can reach, e.g. PG_EMBED_DIR=/var/tmp/scanner-pg" >&2
    exit 1
  fi
  umask 077
  local supw; supw=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)
  local apppw; apppw=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)
  printf '%s\n' "$supw" > "$dir/postgres.password"
  printf '%s\n' "$apppw" > "$pwfile"
  chmod 600 "$dir/postgres.password" "$pwfile"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/postgres.password"; fi
  as_pg "$bin/initdb" -D "$data" -U postgres --pwfile="$dir/postgres.password" \
    --auth-local=peer --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log"
  cat >>"$data/postgresql.conf" <<CONF
# --- scanner-dbops embedded server ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$run'
shared_preload_libraries = 'pg_cron,pg_stat_statements'
cron.database_name = '$db'
cron.use_background_workers = on
max_worker_processes = 16
max_connections = 100
shared_buffers = 256MB
maintenance_work_mem = 256MB
max_wal_size = 4GB
logging_collector = on
log_directory = '$dir/log'
log_filename = 'postgresql.log'
log_min_duration_statement = 5000
log_lock_waits = on
CONF
  if [ "${PG_EMBED_FAST:-0}" = 1 ]; then
    printf 'fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n' >>"$data/postgresql.conf"
  fi
  # loopback TCP only, passwords (scram); the local socket is for the postgres superuser (peer).
  cat >"$data/pg_hba.conf" <<HBA
local all postgres peer
host  all all 127.0.0.1/32 scram-sha-256
HBA
}

bootstrap() {
  # Runs once after the first start, as the superuser over the local socket: the application
  # role is NOT a superuser (like RDS, where the migration role is a member of rds_superuser).
  local apppw; apppw=$(cat "$pwfile")
  as_pg "$(psql_bin)" -X -q -v ON_ERROR_STOP=1 -h "$run" -p "$port" -U postgres -d postgres \
    -v user="$user" -v db="$db" -v pw="$apppw" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'user', :'pw') \gexec
SELECT format('GRANT pg_monitor, pg_signal_backend TO %I', :'user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user') \gexec
SQL
  as_pg "$(psql_bin)" -X -q -v ON_ERROR_STOP=1 -h "$run" -p "$port" -U postgres -d "$db" \
    -v user="$user" <<'SQL'
CREATE EXTENSION IF NOT EXISTS pg_cron;
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
SELECT format('GRANT USAGE ON SCHEMA cron TO %I', :'user') \gexec
SELECT format('ALTER SCHEMA public OWNER TO %I', :'user') \gexec
SQL
  touch "$dir/.bootstrapped"
}

running() { [ -f "$data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; }

case "${1:-}" in
  start)
    [ -f "$data/PG_VERSION" ] || init
    if running; then echo "embedded PostgreSQL already running on 127.0.0.1:$port"; else
      mkdir -p "$dir/log"; if [ "$(id -u)" = 0 ]; then chown postgres: "$dir/log"; fi
      as_pg "$bin/pg_ctl" -D "$data" -w -t 60 -l "$dir/log/startup.log" start >/dev/null
      echo "embedded PostgreSQL started on 127.0.0.1:$port (data: $data)"
    fi
    [ -f "$dir/.bootstrapped" ] || bootstrap
    ;;
  stop)
    if running; then as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null; echo "embedded PostgreSQL stopped"; \
    else echo "embedded PostgreSQL not running"; fi
    ;;
  status)
    if running; then echo "running on 127.0.0.1:$port"; else echo "stopped"; exit 3; fi
    ;;
  env)
    # For humans and scripts: how to reach the application database.
    echo "PGHOST=127.0.0.1 PGPORT=$port PGDATABASE=$db PGUSER=$user PASSWORD_FILE=$pwfile"
    ;;
  destroy)
    if running; then as_pg "$bin/pg_ctl" -D "$data" -m immediate -w stop >/dev/null || true; fi
    rm -rf "$dir"; echo "embedded PostgreSQL removed ($dir)"
    ;;
  *) echo "usage: $0 start|stop|status|env|destroy" >&2; exit 2 ;;
esac
