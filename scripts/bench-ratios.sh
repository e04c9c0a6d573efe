#!/usr/bin/env bash
# The ratios of issue 24, each path run interleaved with its reference in one invocation so that
# both see the same machine load; median over ROUNDS runs of each, peak RSS, load average.
#
#   scripts/bench-ratios.sh anonymize [WORK]   `anonymize --threads 2` against `--threads 1`
#   scripts/bench-ratios.sh export [WORK]      de-identified system export (Microsoft sample
#                                              configuration) against the plain system export
#   scripts/bench-ratios.sh load [WORK]        `load` with search indexes against `load --no-index`
#
# WORK (default /tmp/fhirhose-bench-ratios) keeps the synthesized data (`fhirhose synth --patients
# $PATIENTS`, default 1000 = 397,807 resources) and, for `export`, a data directory loaded once
# with `--no-index`; both are reused when present.
# Env: FHIRHOSE_BIN (default $CARGO_TARGET_DIR/release/fhirhose, built if missing), BINS
#      (anonymize: several binaries, space-separated, interleaved in each round), ROUNDS
#      (default 5), PATIENTS (default 1000), PORT (default 18490), NICE (niceness of the runs,
#      default 0; -15 as root gives the runs the cores ahead of niced builds).
# Each figure is wall time of the whole command (anonymize, load: process start to exit, including
# reading, parsing, writing and, for load, the index build and fsyncs) or kick-off to complete
# manifest (export: the server's own work, files written and fsynced; downloads not included;
# the status long-polled, so the figure ends when the export does).
# Export rows also give the server's CPU seconds (user + system) during the export: steadier than
# wall time when other processes share the cores.
set -euo pipefail

MODE="${1:?usage: $0 anonymize|export|load [WORK]}"
WORK="${2:-/tmp/fhirhose-bench-ratios}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${FHIRHOSE_BIN:-$TARGET/release/fhirhose}"
ROUNDS="${ROUNDS:-5}"
PATIENTS="${PATIENTS:-1000}"
PORT="${PORT:-18490}"
NICE="${NICE:-0}"
CONFIG_SRC="$ROOT/crates/deid/tests/corpus/shipped-configs/r4-configuration-sample.json"
if [[ ! -x "$BIN" ]]; then
  (cd "$ROOT" && cargo build --release -p fhirhose)
fi
# Linux schedules autogroups (sessions) fairly against each other, so a process's own niceness
# only ranks it within its session: a negative NICE is also given to this script's autogroup.
if [[ "$NICE" -lt 0 && -w /proc/self/autogroup ]]; then
  echo "$NICE" >/proc/self/autogroup 2>/dev/null || true
fi
mkdir -p "$WORK"
SYNTH="$WORK/synth-$PATIENTS"
if [[ ! -d "$SYNTH" ]]; then
  echo "== synth --patients $PATIENTS"
  "$BIN" synth --patients "$PATIENTS" --out "$SYNTH.tmp" >/dev/null
  mv "$SYNTH.tmp" "$SYNTH"
fi
RESOURCES=$(cat "$SYNTH"/*.ndjson | wc -l)
# The sample configuration with fixed keys (its empty keys would draw random ones per process).
CONFIG="$WORK/sample.json"
jq '.parameters.cryptoHashKey = "bench-hash-key" | .parameters.encryptKey = "0123456789abcdef0123456789abcdef"
    | .parameters.dateShiftKey = "bench-shift-key"' "$CONFIG_SRC" >"$CONFIG"

RUNS="$WORK/runs-$MODE"
: >"$RUNS"
# run LABEL COMMAND...: wall seconds and peak RSS of one command, appended to $RUNS.
run() {
  local label=$1
  shift
  local load t0 t1
  load=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  /usr/bin/time -f '%M %U %S' -o "$WORK/time" nice -n "$NICE" "$@" >/dev/null 2>"$WORK/last.err" ||
    { cat "$WORK/last.err" >&2; exit 1; }
  t1=$(date +%s.%N)
  read -r rss user sys <"$WORK/time"
  record "$label" "$(echo "$t1 - $t0" | bc)" "$rss" "$load" ", CPU $(echo "$user + $sys" | bc) s"
}
record() {
  echo "$1 $2 s, peak RSS $(($3 / 1024)) MiB, load $4${5:-}" | tee -a "$RUNS"
}
# median LABEL: median seconds of LABEL's runs.
median() {
  grep "^$1 " "$RUNS" | awk '{print $2}' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'
}
summary() {
  local ref=$1 path=$2 mr mp
  mr=$(median "$ref")
  mp=$(median "$path")
  echo "--- $ROUNDS rounds, $RESOURCES resources, medians:"
  echo "$ref: $mr s = $(echo "$RESOURCES / $mr" | bc) resources/s"
  echo "$path: $mp s = $(echo "$RESOURCES / $mp" | bc) resources/s"
  echo "ratio $path / $ref (throughput): $(echo "scale=3; $mr / $mp" | bc)"
}

case "$MODE" in
anonymize)
  # BINS="A B ...": several binaries, interleaved in each round (default: $BIN alone).
  read -r -a bins <<<"${BINS:-$BIN}"
  for ((r = 1; r <= ROUNDS; r++)); do
    for b in "${!bins[@]}"; do
      for t in 1 2; do
        rm -rf "$WORK/anon-out"
        run "threads-$t#$b" "${bins[$b]}" anonymize -i "$SYNTH" -o "$WORK/anon-out" -c "$CONFIG" -b --threads "$t" --quiet
      done
    done
  done
  rm -rf "$WORK/anon-out"
  for b in "${!bins[@]}"; do
    echo "=== #$b ${bins[$b]}"
    summary "threads-1#$b" "threads-2#$b"
  done
  ;;
load)
  for ((r = 1; r <= ROUNDS; r++)); do
    for mode in no-index indexed; do
      rm -rf "$WORK/load-data"
      args=()
      [[ $mode == no-index ]] && args=(--no-index)
      FHIRHOSE_LOG=warn run "$mode" "$BIN" load "${args[@]}" --data-dir "$WORK/load-data" "$SYNTH"
    done
  done
  rm -rf "$WORK/load-data"
  summary no-index indexed
  ;;
export)
  DATA="$WORK/export-data-$PATIENTS"
  if [[ ! -d "$DATA" ]]; then
    echo "== load --no-index (export needs no search index)"
    FHIRHOSE_LOG=warn "$BIN" load --no-index --data-dir "$DATA.tmp" "$SYNTH" >/dev/null
    mv "$DATA.tmp" "$DATA"
  fi
  mkdir -p "$DATA/storage/anonymization"
  cp "$CONFIG" "$DATA/storage/anonymization/sample.json"
  FHIRHOSE_LOG=warn nice -n "$NICE" "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" >"$WORK/serve.log" 2>&1 &
  SERVER=$!
  trap 'kill "$SERVER" 2>/dev/null || true' EXIT
  BASE="http://127.0.0.1:$PORT"
  for _ in $(seq 1 600); do
    curl -fsS "$BASE/metadata" >/dev/null 2>&1 && break
    sleep 0.1
  done
  # export LABEL QUERY: kick-off to complete manifest, then the files are deleted.
  # The server's CPU seconds so far (user + system), from /proc/PID/stat (clock ticks).
  server_cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$SERVER/stat"
  }
  export_once() {
    local load t0 t1 status_url code folder count c0 c1
    load=$(cut -d' ' -f1 /proc/loadavg)
    c0=$(server_cpu)
    t0=$(date +%s.%N)
    status_url=$(curl -fsS -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \
      "$BASE/\$export?$2" | awk -F': ' 'tolower($1)=="content-location" {gsub(/\r/,"",$2); print $2}')
    [[ -n "$status_url" ]] || { echo "kick-off failed" >&2; exit 1; }
    # Long-polled (`Prefer: wait=20`): the answer comes as the export ends, not up to a polling
    # interval later (a server that does not hold it is polled every 0.1 s).
    while :; do
      code=$(curl -sS -o "$WORK/manifest.json" -D "$WORK/status-headers" -w '%{http_code}' \
        -H 'Prefer: wait=20' "$status_url")
      [[ "$code" == 200 ]] && break
      [[ "$code" == 202 || "$code" == 429 ]] || { echo "status $code: $(cat "$WORK/manifest.json")" >&2; exit 1; }
      grep -qi '^preference-applied: *wait' "$WORK/status-headers" || sleep 0.1
    done
    t1=$(date +%s.%N)
    c1=$(server_cpu)
    count=$(jq '[.output[].count] | add' "$WORK/manifest.json")
    [[ "$count" == "$RESOURCES" ]] || { echo "exported $count of $RESOURCES" >&2; exit 1; }
    folder="$DATA/storage/$(jq -r '.extension.storage.container + "/" + .extension.storage.folder' "$WORK/manifest.json")"
    record "$1" "$(echo "$t1 - $t0" | bc)" "$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")" "$load" \
      ", server CPU $(echo "$c1 - $c0" | bc) s"
    curl -fsS -X DELETE "$status_url" >/dev/null || true
    rm -rf "$folder"
  }
  for ((r = 1; r <= ROUNDS; r++)); do
    export_once plain ""
    export_once deid "_container=deid&_anonymizationConfig=sample.json"
  done
  echo "(peak RSS is the server's VmHWM so far: it only grows)"
  summary plain deid
  ;;
*)
  echo "unknown mode $MODE" >&2
  exit 2
  ;;
esac
