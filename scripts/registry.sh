#!/usr/bin/env bash
# Installs Debian's OCI registry (package docker-registry, the CNCF "distribution" registry 2.8) into
# .tools/registry without a system-wide install (apt-get download + dpkg -x, no root needed once the
# apt lists exist), and starts it on 127.0.0.1:5001 with filesystem storage, unless a registry
# already answers there. Idempotent: run it as often as you like. Data goes to .tools/registry/data
# (removed by `--clean`), the log to .tools/registry/registry.log.
# Usage: ./scripts/registry.sh [--clean] ; stop it with: kill "$(cat .tools/registry/registry.pid)"
# Tests find it through FHIRHOSE_TEST_REGISTRY=127.0.0.1:5001.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=.tools/registry
HOST=127.0.0.1
PORT=5001
BIN="$DIR/root/usr/bin/docker-registry"

# GET /v2/ must answer 200 (the registry's API version check); plain bash, no curl needed.
answers() {
  local reply
  reply=$( (exec 3<>"/dev/tcp/$HOST/$PORT" &&
    printf 'GET /v2/ HTTP/1.0\r\nHost: %s:%s\r\n\r\n' "$HOST" "$PORT" >&3 &&
    timeout 2 head -n 1 <&3) 2>/dev/null) || return 1
  [[ "$reply" == HTTP/1.?" 200"* ]]
}

port_taken() {
  (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

if [[ "${1:-}" == "--clean" ]]; then
  if answers && [[ -f "$DIR/registry.pid" ]] && kill -0 "$(cat "$DIR/registry.pid")" 2>/dev/null; then
    # Our registry is running on the data we are about to remove: restart it afterwards.
    kill "$(cat "$DIR/registry.pid")"
    for _ in $(seq 1 50); do port_taken || break; sleep 0.1; done
  fi
  rm -rf "$DIR/data"
fi

# Already running (ours or anyone's): nothing to do.
if answers; then
  echo "registry: already answering on http://$HOST:$PORT/v2/"
  exit 0
fi
if port_taken; then
  echo "registry: something that is not an OCI registry listens on $HOST:$PORT; stop it first" >&2
  exit 1
fi

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

nohup "$BIN" serve "$DIR/config.yml" >"$DIR/registry.log" 2>&1 &
echo $! >"$DIR/registry.pid"

for _ in $(seq 1 100); do
  if answers; then
    echo "registry: answering on http://$HOST:$PORT/v2/ (pid $(cat "$DIR/registry.pid"))"
    exit 0
  fi
  if ! kill -0 "$(cat "$DIR/registry.pid")" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
echo "registry: did not start on $HOST:$PORT; see $DIR/registry.log:" >&2
tail -n 20 "$DIR/registry.log" >&2 || true
exit 1
