#!/usr/bin/env bash
# A private PostgreSQL cluster for tests and benchmarks (issue 18).
#
#   ./scripts/postgres.sh start DIR   create (initdb) and start a cluster in DIR, print its URL
#   ./scripts/postgres.sh stop DIR    stop it (the data stays in DIR; `start` reuses it)
#   ./scripts/postgres.sh url DIR     print the URL of a running cluster
#
# The cluster listens on 127.0.0.1 only, on a free port chosen at the first start (kept in
# DIR/port), with trust authentication (any local user may connect as the superuser `postgres`:
# a test cluster, never a production one) and durability switched off for speed (fsync,
# synchronous_commit and full_page_writes off: a machine crash loses the cluster). `start` is
# idempotent: when the cluster already runs it prints the URL again. The connection URL
# (postgres://postgres@127.0.0.1:PORT/postgres) is always the LAST line of stdout. With openssl
# installed the cluster also speaks TLS, its certificate signed by a private CA in DIR/ca.pem
# (for `?sslmode=require&sslrootcert=DIR/ca.pem`).
#
# PostgreSQL refuses to run as root: when run as root the server runs as the `postgres` system user
# (created if missing) and DIR is owned by it; when DIR's parent directories are not traversable
# by that user (a clone under /root), the cluster lives in /var/tmp/fhirhose-pg-<hash of DIR>
# (named in DIR/cluster) and only the port file stays in DIR.
# POSTGRES_WAL_DIR (read by the first `start` only, when it runs initdb): the write-ahead log in
# that directory (which must not exist yet, inside a directory the cluster's user owns) in 1 MB
# segments, e.g. on a small tmpfs for the `database-wal-full` fault case.
# When the binaries are missing (no /usr/lib/postgresql/*/bin/initdb and no pg_ctl on PATH), the
# Debian/Ubuntu package `postgresql` is installed with apt-get.
set -euo pipefail

usage() {
  echo "usage: $0 start|stop|url DIR" >&2
  exit 2
}
[[ $# -eq 2 ]] || usage
CMD=$1
DIR=$2
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
DATA=$DIR/data
LOG=$DIR/postgres.log
PORT_FILE=$DIR/port
DB_USER=postgres

find_bindir() {
  local d
  # Highest installed major version first.
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
    if [[ -x $d/initdb && -x $d/pg_ctl ]]; then
      echo "$d"
      return 0
    fi
  done
  if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
    dirname "$(command -v pg_ctl)"
    return 0
  fi
  return 1
}

BIN=$(find_bindir || true)
if [[ -z $BIN ]]; then
  if [[ $CMD != start ]]; then
    echo "postgres.sh: PostgreSQL is not installed" >&2
    exit 1
  fi
  echo "postgres.sh: PostgreSQL binaries not found; installing the apt package postgresql" >&2
  SUDO=
  [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  BIN=$(find_bindir) || {
    echo "postgres.sh: installing postgresql did not provide initdb/pg_ctl" >&2
    exit 1
  }
fi

# Run a command as the user that owns the cluster.
if [[ $(id -u) -eq 0 ]]; then
  RUN_USER=postgres
  if ! id "$RUN_USER" >/dev/null 2>&1; then
    useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin "$RUN_USER"
  fi
  as_owner() { runuser -u "$RUN_USER" -- "$@"; }
  # DIR inside a directory the server's user cannot traverse (a clone under /root): the cluster
  # lives under /var/tmp instead, DIR/cluster names it.
  if ! as_owner test -x "$DIR"/.. 2>/dev/null; then
    ALT=/var/tmp/fhirhose-pg-$(printf '%s' "$DIR" | sha1sum | cut -c1-12)
    mkdir -p "$ALT"
    chown "$RUN_USER" "$ALT"
    chmod 700 "$ALT"
    echo "$ALT" >"$DIR/cluster"
    DATA=$ALT/data
    LOG=$ALT/postgres.log
    OWNED=$ALT
  else
    OWNED=$DIR
  fi
else
  RUN_USER=$(id -un)
  as_owner() { "$@"; }
  OWNED=$DIR
fi

running() {
  [[ -f $DATA/postmaster.pid ]] && as_owner "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

url() {
  echo "postgres://$DB_USER@127.0.0.1:$(cat "$PORT_FILE")/postgres"
}

# Whether PostgreSQL could listen on 127.0.0.1:PORT: bound the way it binds (SO_REUSEADDR, so the
# TIME_WAIT connections of a cluster just stopped do not count) and listened on. A connect test
# is not enough: a port held by an outgoing connection's local end answers no connect, yet
# refuses the bind.
port_free() {
  python3 - "$1" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(1)
PY
}

# A free port below the kernel's ephemeral range (ip_local_port_range, 32768 by default): a port
# in that range may become an outgoing connection's local port between the pick and the start,
# or while the cluster is stopped for a restart on the same port ("Address already in use").
pick_port() {
  local p low span
  low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  span=$((low - 20000))
  ((span >= 1000)) || span=10000 # an unusual range: fall back to 20000-29999
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % span))
    if port_free "$p"; then
      echo "$p"
      return 0
    fi
  done
  echo "postgres.sh: no free port found" >&2
  return 1
}

case $CMD in
  start)
    if running; then
      echo "postgres.sh: already running in $DIR" >&2
      url
      exit 0
    fi
    if [[ $(id -u) -eq 0 ]]; then
      chown "$RUN_USER" "$OWNED"
      chmod 700 "$OWNED"
      if ! as_owner test -w "$OWNED"; then
        echo "postgres.sh: user $RUN_USER cannot write $OWNED" >&2
        exit 1
      fi
    fi
    if [[ ! -f $DATA/PG_VERSION ]]; then
      rm -rf "$DATA"
      WAL_ARGS=()
      if [[ -n ${POSTGRES_WAL_DIR:-} ]]; then
        WAL_ARGS=(--waldir="$POSTGRES_WAL_DIR" --wal-segsize=1)
      fi
      as_owner "$BIN/initdb" -D "$DATA" --username="$DB_USER" --auth=trust \
        --encoding=UTF8 --locale=C.UTF-8 "${WAL_ARGS[@]}" >"$OWNED/initdb.log" 2>&1 || {
        # Older initdb versions or images without C.UTF-8.
        rm -rf "$DATA"
        if [[ -n ${POSTGRES_WAL_DIR:-} ]]; then
          rm -rf "$POSTGRES_WAL_DIR"
        fi
        as_owner "$BIN/initdb" -D "$DATA" --username="$DB_USER" --auth=trust \
          --encoding=UTF8 --no-locale "${WAL_ARGS[@]}" >"$OWNED/initdb.log" 2>&1 || {
          echo "postgres.sh: initdb failed; see $OWNED/initdb.log" >&2
          tail -n 20 "$OWNED/initdb.log" >&2
          exit 1
        }
      }
      as_owner tee -a "$DATA/postgresql.conf" >/dev/null <<'EOF'

# scripts/postgres.sh: a private test cluster (no durability, local connections only)
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 300
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
max_wal_size = 4GB
checkpoint_timeout = 30min
autovacuum_naptime = 10s
log_min_messages = warning
log_min_error_statement = panic
EOF
      # TLS with a private CA (when openssl is there): DIR/ca.pem verifies the server's certificate
      # (127.0.0.1 and localhost), e.g. ?sslmode=require&sslrootcert=DIR/ca.pem. Clients without
      # sslmode still connect in plain text.
      if command -v openssl >/dev/null; then
        tls=$(mktemp -d)
        (
          cd "$tls"
          openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=fhirhose test CA" \
            -keyout ca.key -out ca.pem >/dev/null 2>&1
          openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
            -keyout server.key -out server.csr >/dev/null 2>&1
          printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' >ext.cnf
          openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile ext.cnf -out server.crt >/dev/null 2>&1
        ) && {
          cp "$tls/ca.pem" "$DIR/ca.pem"
          chmod 644 "$DIR/ca.pem"
          as_owner tee "$DATA/server.crt" <"$tls/server.crt" >/dev/null
          as_owner tee "$DATA/server.key" <"$tls/server.key" >/dev/null
          as_owner chmod 600 "$DATA/server.key"
          echo "ssl = on" | as_owner tee -a "$DATA/postgresql.conf" >/dev/null
        }
        rm -rf "$tls"
      fi
    fi
    # Reuse the port of an earlier start unless something else took it meanwhile.
    if [[ ! -f $PORT_FILE ]] || ! port_free "$(cat "$PORT_FILE")"; then
      pick_port >"$PORT_FILE"
    fi
    PORT=$(cat "$PORT_FILE")
    # A stale pid file from a killed server: pg_ctl start handles it (it checks the pid).
    if ! as_owner "$BIN/pg_ctl" start -D "$DATA" -l "$LOG" -w -t 60 -o "-p $PORT" >/dev/null; then
      echo "postgres.sh: the server did not start; see $LOG" >&2
      tail -n 20 "$LOG" >&2 || true
      exit 1
    fi
    echo "postgres.sh: PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') running in $DIR on 127.0.0.1:$PORT (as $RUN_USER)" >&2
    url
    ;;
  stop)
    if running; then
      as_owner "$BIN/pg_ctl" stop -D "$DATA" -m fast -w -t 60 >/dev/null
      echo "postgres.sh: stopped the cluster in $DIR" >&2
    else
      echo "postgres.sh: no cluster running in $DIR" >&2
    fi
    ;;
  url)
    if running; then
      url
    else
      echo "postgres.sh: no cluster running in $DIR" >&2
      exit 1
    fi
    ;;
  *)
    usage
    ;;
esac
