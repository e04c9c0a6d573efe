#!/usr/bin/env bash
# Installs Debian's OCI registry (package docker-registry, the CNCF "distribution" registry 2.8) into
# .tools/registry without a system-wide install (apt-get download + dpkg -x, no root needed once the
# apt lists exist), and starts it on 127.0.0.1:5001 with filesystem storage. Idempotent: run it as
# often as you like. Data goes to .tools/registry/data (removed by `--clean`, which also restarts
# an instance using it), the log to .tools/registry/registry.log.
# An instance already listening is reused only when it works for us: scripts/service-check.py
# checks `GET /v2/` (200, a registry/2.0 API) and uploads, reads and deletes a small blob and, when
# one of this project's scripts started it (from any checkout's .tools/registry), that its
# checkout, program, configuration and storage folder still exist (this registry recreates a
# deleted storage folder on the next write, so the round trip alone would not notice). A stale
# instance of ours is stopped and replaced; anything else on the port is named and left alone,
# and this script fails. scripts/tests/stale-services.sh checks that repair; see
# docs/reliability.md.
# Usage: ./scripts/registry.sh [--clean] ; stop it with: kill "$(cat .tools/registry/registry.pid)"
# Tests find it through FHIRHOSE_TEST_REGISTRY=127.0.0.1:5001.
# FHIRHOSE_REGISTRY_PORT overrides the port (the suite's tests expect 5001).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=.tools/registry
HOST=127.0.0.1
PORT=${FHIRHOSE_REGISTRY_PORT:-5001}
BIN="$DIR/root/usr/bin/docker-registry"

CHECK=(python3 scripts/service-check.py registry "$PORT")
# One start at a time per port, from any checkout: two runs at the same moment would both find
# the port free and both start an instance (the loser then fails to bind, or worse, the pidfile
# names the wrong one). The lock is held until this script exits; the service does not inherit it.
exec 9>"${TMPDIR:-/tmp}/fhirhose-registry-$PORT.lock"
flock -w 600 9 || { echo "$0: another start of this service on port $PORT held its lock for 10 minutes" >&2; exit 1; }

if [[ "${1:-}" == "--clean" ]]; then
  rm -rf "$DIR/data"
fi

# A working instance answers: nothing to do. A stale one of ours is stopped (exit 3).
rc=0
"${CHECK[@]}" reuse --pidfile "$DIR/registry.pid" || rc=$?
case $rc in 0) exit 0 ;; 3) ;; *) exit 1 ;; esac

if [[ ! -x "$BIN" ]]; then
  mkdir -p "$DIR/deb"
  rm -f "$DIR"/deb/docker-registry_*.deb
  # As root, apt would hand the download to its sandbox user, who cannot write here.
  APT_OPTS=()
  if [[ "$(id -u)" == 0 ]]; then APT_OPTS=(-o APT::Sandbox::User=root); fi
  if ! (cd "$DIR/deb" && apt-get download "${APT_OPTS[@]}" docker-registry); then
    # A fresh machine may have no package lists yet; refreshing them needs root.
    if [[ "$(id -u)" == 0 ]]; then
      apt-get update -qq
      (cd "$DIR/deb" && apt-get download "${APT_OPTS[@]}" docker-registry)
    else
      echo "registry: 'apt-get download docker-registry' failed; run 'sudo apt-get update' first" >&2
      exit 1
    fi
  fi
  rm -rf "$DIR/root"
  dpkg -x "$DIR"/deb/docker-registry_*.deb "$DIR/root"
  if [[ ! -x "$BIN" ]]; then
    echo "registry: the docker-registry package has no usr/bin/docker-registry" >&2
    exit 1
  fi
fi

mkdir -p "$DIR/data"
DATA=$(cd "$DIR/data" && pwd)
cat >"$DIR/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $DATA
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $HOST:$PORT
  headers:
    X-Content-Type-Options: [nosniff]
EOF

# Absolute paths, so that the command line names the checkout (service-check.py reads it).
nohup "$PWD/$BIN" serve "$PWD/$DIR/config.yml" >"$DIR/registry.log" 2>&1 9>&- &
echo $! >"$DIR/registry.pid"

for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null && "${CHECK[@]}" probe 2>/dev/null; then
    echo "registry: answering on http://$HOST:$PORT/v2/ (pid $(cat "$DIR/registry.pid"))"
    exit 0
  fi
  if ! kill -0 "$(cat "$DIR/registry.pid")" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
"${CHECK[@]}" probe || true
echo "registry: did not start on $HOST:$PORT; see $DIR/registry.log:" >&2
tail -n 20 "$DIR/registry.log" >&2 || true
exit 1
