#!/usr/bin/env bash
# Benchmark bulk $export: synth N patients, load them into a fresh data directory with the release
# binary, then time a system export from kick-off to manifest and report resources/s, the
# server's peak RSS (VmHWM, read from /proc before the server is stopped) and its CPU seconds
# (user + system) from kick-off to manifest.
#
# Usage: scripts/bench-export.sh [PATIENTS] [WORK_DIR]   (defaults: 10000, /tmp/fhirhose-bench-export)
# Env: FHIRHOSE_BIN (default: target/release/fhirhose, built if missing), PORT (default 18480),
#      BENCH_DATA=DIR (export from this loaded data directory; no synth, no load),
#      QUERY='...' (kick-off query string, e.g. '_container=deid&_anonymizationConfig=sample.json'
#      with the configuration in DIR/storage/anonymization/), SERVE_ARGS (extra `serve` flags),
#      KICKOFF (the kick-off path, default '$export'; e.g. 'Patient/$export' with
#      QUERY='organizeOutputBy=Patient'), BODY=FILE (a Parameters resource POSTed to KICKOFF,
#      e.g. KICKOFF='$viewdefinition-export' with the views as `view` parameters).
set -euo pipefail

PATIENTS="${1:-10000}"
WORK="${2:-/tmp/fhirhose-bench-export}"
PORT="${PORT:-18480}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${FHIRHOSE_BIN:-$TARGET/release/fhirhose}"
if [[ ! -x "$BIN" ]]; then
  (cd "$ROOT" && cargo build --release -p fhirhose)
fi

if [[ -n "${BENCH_DATA:-}" ]]; then
  DATA="$BENCH_DATA"
  mkdir -p "$WORK"
else
rm -rf "$WORK"
mkdir -p "$WORK"
SYNTH="$WORK/synth" DATA="$WORK/data"

echo "== synth --patients $PATIENTS"
t0=$(date +%s.%N)
"$BIN" synth --patients "$PATIENTS" --out "$SYNTH"
t1=$(date +%s.%N)
echo "synth: $(echo "$t1 - $t0" | bc) s"

echo "== load (no search indexes: export does not use them)"
t0=$(date +%s.%N)
FHIRHOSE_LOG=warn "$BIN" load --no-index --data-dir "$DATA" "$SYNTH"
t1=$(date +%s.%N)
echo "load: $(echo "$t1 - $t0" | bc) s"
fi

echo "== serve + system export"
# shellcheck disable=SC2086
FHIRHOSE_LOG=warn "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" ${SERVE_ARGS:-} >"$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 1 600); do
  curl -fsS "$BASE/metadata" >/dev/null 2>&1 && break
  sleep 0.1
done
rss_before=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")
# The server's CPU ticks (user + system, all its threads) before and after the export.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER/stat"; }
cpu_before=$(cpu_ticks)

t0=$(date +%s.%N)
post=()
[[ -n "${BODY:-}" ]] && post=(-H 'Content-Type: application/fhir+json' --data-binary "@$BODY")
status_url=$(curl -fsS -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \
  "${post[@]}" "$BASE/${KICKOFF:-\$export}?${QUERY:-}" | awk -F': ' 'tolower($1)=="content-location" {gsub(/\r/,"",$2); print $2}')
[[ -n "$status_url" ]] || { echo "kick-off failed" >&2; exit 1; }
while :; do
  code=$(curl -sS -o "$WORK/manifest.json" -w '%{http_code}' "$status_url")
  [[ "$code" == 200 ]] && break
  [[ "$code" == 202 || "$code" == 429 ]] || { echo "status $code: $(cat "$WORK/manifest.json")" >&2; exit 1; }
  sleep 0.2
done
t1=$(date +%s.%N)
rss_peak=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")
cpu_after=$(cpu_ticks)

folder="$DATA/storage/$(jq -r '.extension.storage.container + "/" + .extension.storage.folder' "$WORK/manifest.json")"
exported=$(jq '[.output[].count] | add' "$WORK/manifest.json")
bytes=$(du -sb "$folder" | cut -f1)
secs=$(echo "$t1 - $t0" | bc)
echo "export: $exported resources, $((bytes / 1048576)) MiB NDJSON in $secs s" \
  "= $(echo "$exported / $secs" | bc) resources/s"
echo "server VmHWM: before export $((rss_before / 1024)) MiB, after export $((rss_peak / 1024)) MiB"
echo "server CPU during the export (user + system): $(echo "scale=2; ($cpu_after - $cpu_before) / $(getconf CLK_TCK)" | bc) s"
