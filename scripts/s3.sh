#!/usr/bin/env bash
# Installs moto (an S3-compatible server, PyPI moto[server]==5.2.5) into a virtualenv in .tools/moto
# and starts it on 127.0.0.1:5000, unless something already answers there. Idempotent: run it as
# often as you like. moto keeps its buckets in memory: a restart starts empty.
# Usage: ./scripts/s3.sh ; stop it with: kill "$(cat .tools/moto/moto.pid)"
# Credentials: moto accepts any access key id and secret (tests use test/test); bucket creation
# is a plain `PUT http://127.0.0.1:5000/<bucket>`.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=5.2.5
DIR=.tools/moto
HOST=127.0.0.1
PORT=5000

# Already running (ours or anyone's): nothing to do.
if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
  echo "s3: already listening on $HOST:$PORT"
  exit 0
fi

if [[ ! -x "$DIR/venv/bin/moto_server" ]] || \
   ! "$DIR/venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$VERSION')" 2>/dev/null; then
  mkdir -p "$DIR"
  python3 -m venv "$DIR/venv"
  "$DIR/venv/bin/pip" install --quiet "moto[server]==$VERSION"
fi

nohup "$DIR/venv/bin/moto_server" -H "$HOST" -p "$PORT" >"$DIR/moto.log" 2>&1 &
echo $! >"$DIR/moto.pid"

for _ in $(seq 1 300); do
  if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
    echo "s3: moto listening on $HOST:$PORT (pid $(cat "$DIR/moto.pid"))"
    exit 0
  fi
  sleep 0.1
done
echo "s3: moto did not start; see $DIR/moto.log" >&2
exit 1
