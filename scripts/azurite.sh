#!/usr/bin/env bash
# Installs Azurite (the Azure Storage emulator, npm azurite@3.37.0) into .tools/azurite and starts
# its blob service on 127.0.0.1:10000. Idempotent: run it as often as you like. Data and log go to
# .tools/azurite/data (removed by `--clean`, which also restarts an instance using it).
# An instance already listening is reused only when it works for us: scripts/service-check.py
# creates a container, puts, gets and deletes a blob (SharedKey, devstoreaccount1), checks that it
# is Azurite 3.37.0 and, when one of this project's scripts started it (from any checkout's
# .tools/azurite), that its checkout and data folder still exist. A stale instance of ours (say,
# left by a CI run whose clone was deleted: every blob PUT answers 500) is stopped and replaced;
# anything else on the port is named and left alone, and this script fails.
# scripts/tests/stale-services.sh checks that repair; see docs/reliability.md.
# Usage: ./scripts/azurite.sh [--clean] ; stop it with: kill "$(cat .tools/azurite/azurite.pid)"
# FHIRHOSE_AZURITE_PORT overrides the port (the suite's tests expect 10000).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.37.0
DIR=.tools/azurite
HOST=127.0.0.1
PORT=${FHIRHOSE_AZURITE_PORT:-10000}
CHECK=(python3 scripts/service-check.py azurite "$PORT")
# One start at a time per port, from any checkout: two runs at the same moment would both find
# the port free and both start an instance (the loser then fails to bind, or worse, the pidfile
# names the wrong one). The lock is held until this script exits; the service does not inherit it.
exec 9>"${TMPDIR:-/tmp}/fhirhose-azurite-$PORT.lock"
flock -w 600 9 || { echo "$0: another start of this service on port $PORT held its lock for 10 minutes" >&2; exit 1; }

if [[ "${1:-}" == "--clean" ]]; then
  rm -rf "$DIR/data"
fi

# A working instance answers: nothing to do. A stale one of ours is stopped (exit 3).
rc=0
"${CHECK[@]}" reuse --version "$VERSION" --pidfile "$DIR/azurite.pid" || rc=$?
case $rc in 0) exit 0 ;; 3) ;; *) exit 1 ;; esac

if [[ ! -x "$DIR/node_modules/.bin/azurite-blob" ]] || \
   ! grep -q "\"version\": \"$VERSION\"" "$DIR/node_modules/azurite/package.json" 2>/dev/null; then
  mkdir -p "$DIR"
  npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error "azurite@$VERSION"
fi

mkdir -p "$DIR/data"
# --loose and --skipApiVersionCheck: object_store and the Azure SDKs send newer API versions and
# headers than this Azurite knows; both are needed on this Node version (see shared crates notes).
# Absolute paths, so that the command line names the checkout (service-check.py reads it).
nohup "$PWD/$DIR/node_modules/.bin/azurite-blob" --blobHost "$HOST" --blobPort "$PORT" \
  --location "$PWD/$DIR/data" --skipApiVersionCheck --loose >"$DIR/azurite.log" 2>&1 9>&- &
echo $! >"$DIR/azurite.pid"

for _ in $(seq 1 150); do
  if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null && "${CHECK[@]}" probe 2>/dev/null; then
    echo "azurite: listening on $HOST:$PORT (pid $(cat "$DIR/azurite.pid"))"
    exit 0
  fi
  kill -0 "$(cat "$DIR/azurite.pid")" 2>/dev/null || break
  sleep 0.1
done
"${CHECK[@]}" probe || true
echo "azurite: did not start; see $DIR/azurite.log" >&2
exit 1
