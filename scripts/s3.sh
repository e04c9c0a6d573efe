#!/usr/bin/env bash
# Installs moto (an S3-compatible server, PyPI moto[server]==5.2.5) into a virtualenv in .tools/moto
# and starts it on 127.0.0.1:5000. Idempotent: run it as often as you like. moto keeps its buckets
# in memory: a restart starts empty.
# An instance already listening is reused only when it works for us: scripts/service-check.py
# creates a bucket, puts, gets and deletes an object (SigV4, test/test) and, when one of this
# project's scripts started it (from any checkout's .tools/moto), checks that its checkout and
# virtualenv still exist and hold moto 5.2.5. A stale instance of ours is stopped and replaced;
# anything else on the port is named and left alone, and this script fails.
# scripts/tests/stale-services.sh checks that repair; see docs/reliability.md.
# Usage: ./scripts/s3.sh ; stop it with: kill "$(cat .tools/moto/moto.pid)"
# Credentials: moto accepts any access key id and secret (tests use test/test); bucket creation
# is a plain `PUT http://127.0.0.1:5000/<bucket>`.
# FHIRHOSE_S3_PORT overrides the port (the suite's tests expect 5000).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=5.2.5
DIR=.tools/moto
HOST=127.0.0.1
PORT=${FHIRHOSE_S3_PORT:-5000}
CHECK=(python3 scripts/service-check.py s3 "$PORT")
# One start at a time per port, from any checkout: two runs at the same moment would both find
# the port free and both start an instance (the loser then fails to bind, or worse, the pidfile
# names the wrong one). The lock is held until this script exits; the service does not inherit it.
exec 9>"${TMPDIR:-/tmp}/fhirhose-s3-$PORT.lock"
flock -w 600 9 || { echo "$0: another start of this service on port $PORT held its lock for 10 minutes" >&2; exit 1; }

# A working instance answers: nothing to do. A stale one of ours is stopped (exit 3).
rc=0
"${CHECK[@]}" reuse --version "$VERSION" --pidfile "$DIR/moto.pid" || rc=$?
case $rc in 0) exit 0 ;; 3) ;; *) exit 1 ;; esac

if [[ ! -x "$DIR/venv/bin/moto_server" ]] || \
   ! "$DIR/venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$VERSION')" 2>/dev/null; then
  mkdir -p "$DIR"
  python3 -m venv "$DIR/venv"
  "$DIR/venv/bin/pip" install --quiet "moto[server]==$VERSION"
fi

# The venv's python named explicitly (not through moto_server's #! line) and absolute paths: the
# command line names the checkout and the process uses only that checkout's virtualenv.
nohup "$PWD/$DIR/venv/bin/python" "$PWD/$DIR/venv/bin/moto_server" -H "$HOST" -p "$PORT" \
  >"$DIR/moto.log" 2>&1 9>&- &
echo $! >"$DIR/moto.pid"

for _ in $(seq 1 300); do
  if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null && "${CHECK[@]}" probe 2>/dev/null; then
    echo "s3: moto listening on $HOST:$PORT (pid $(cat "$DIR/moto.pid"))"
    exit 0
  fi
  kill -0 "$(cat "$DIR/moto.pid")" 2>/dev/null || break
  sleep 0.1
done
"${CHECK[@]}" probe || true
echo "s3: moto did not start; see $DIR/moto.log" >&2
exit 1
