#!/usr/bin/env bash
# Benchmark the `fhirhose export` client against the server it downloads from: synth N patients,
# load them, serve (--auth none), then run the client (kick-off, poll, parallel downloads) and,
# on the same manifest, `curl` downloading the same files one after another. Reports the server's
# export rate (kick-off to manifest), the client's download rate and curl's, in MB/s, and the peak
# RSS of the server (VmHWM) and of the client.
#
# Usage: scripts/bench-export-client.sh [PATIENTS] [WORK_DIR]  (defaults: 300, /tmp/fhirhose-bench-client)
# Env: FHIRHOSE_BIN (default: $CARGO_TARGET_DIR/ci/fhirhose or target/ci/fhirhose), PORT (18490),
#      BENCH_DATA=DIR (a loaded data directory: no synth, no load), PARALLEL (client, default 4).
set -euo pipefail
PATIENTS="${1:-300}"
WORK="${2:-/tmp/fhirhose-bench-client}"
PORT="${PORT:-18490}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${FHIRHOSE_BIN:-$TARGET/ci/fhirhose}"
[[ -x "$BIN" ]] || (cd "$ROOT" && cargo build --profile ci -p fhirhose)
mkdir -p "$WORK"
if [[ -n "${BENCH_DATA:-}" ]]; then
  DATA="$BENCH_DATA"
else
  DATA="$WORK/data"
  rm -rf "$WORK/synth" "$DATA"
  "$BIN" synth --patients "$PATIENTS" --out "$WORK/synth" >/dev/null
  FHIRHOSE_LOG=warn "$BIN" load --no-index --data-dir "$DATA" "$WORK/synth" >/dev/null
fi
FHIRHOSE_LOG=warn "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/metadata" >/dev/null && break; sleep 0.2; done

rm -rf "$WORK/out" "$WORK/curl"
echo "== fhirhose export (parallel ${PARALLEL:-4})"
/usr/bin/time -o "$WORK/client-time" -f '%M' "$BIN" export "http://127.0.0.1:$PORT" --out "$WORK/out" \
  --quiet --parallel "${PARALLEL:-4}" --poll-interval 1 --verify 2>&1 | tee "$WORK/client.txt"

echo "== curl, the same files one after another"
mkdir -p "$WORK/curl"
python3 -c 'import json,sys; [print(e["url"]) for e in json.load(open(sys.argv[1]))["output"]]' \
  "$WORK/out/manifest.json" > "$WORK/urls.txt"
t0=$(date +%s.%N)
n=0
while read -r url; do n=$((n+1)); curl -sf -o "$WORK/curl/$n.ndjson" "$url"; done < "$WORK/urls.txt"
t1=$(date +%s.%N)
bytes=$(du -sb "$WORK/curl" | cut -f1)
echo "curl: $n files, $bytes bytes in $(echo "$t1 - $t0" | bc) s = $(echo "scale=1; $bytes / ($t1 - $t0) / 1000000" | bc) MB/s"
echo "resources: $(cat "$WORK"/out/*.ndjson | wc -l)"
echo "peak RSS: server $(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$SERVER/status") MiB (VmHWM of the serve process)," \
  "client $(($(tail -n 1 "$WORK/client-time") / 1024)) MiB"
