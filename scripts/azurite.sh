#!/usr/bin/env bash
# Installs Azurite (the Azure Storage emulator, npm azurite@3.37.0) into .tools/azurite and starts
# its blob service on 127.0.0.1:10000, unless something already answers there. Idempotent: run it
# as often as you like. Data and log go to .tools/azurite/data (removed by `--clean`).
# Usage: ./scripts/azurite.sh [--clean] ; stop it with: kill "$(cat .tools/azurite/azurite.pid)"
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.37.0
DIR=.tools/azurite
HOST=127.0.0.1
PORT=10000

if [[ "${1:-}" == "--clean" ]]; then
  rm -rf "$DIR/data"
fi

# Already running (ours or anyone's): nothing to do.
if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
  echo "azurite: already listening on $HOST:$PORT"
  exit 0
fi

if [[ ! -x "$DIR/node_modules/.bin/azurite-blob" ]] || \
   ! grep -q "\"version\": \"$VERSION\"" "$DIR/node_modules/azurite/package.json" 2>/dev/null; then
  mkdir -p "$DIR"
  npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error "azurite@$VERSION"
fi

mkdir -p "$DIR/data"
# --loose and --skipApiVersionCheck: object_store and the Azure SDKs send newer API versions and
# headers than this Azurite knows; both are needed on this Node version (see shared crates notes).
nohup "$DIR/node_modules/.bin/azurite-blob" --blobHost "$HOST" --blobPort "$PORT" \
  --location "$DIR/data" --skipApiVersionCheck --loose >"$DIR/azurite.log" 2>&1 &
echo $! >"$DIR/azurite.pid"

for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
    echo "azurite: listening on $HOST:$PORT (pid $(cat "$DIR/azurite.pid"))"
    exit 0
  fi
  sleep 0.1
done
echo "azurite: did not start; see $DIR/azurite.log" >&2
exit 1
