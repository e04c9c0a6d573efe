#!/usr/bin/env bash
# An export end to end (issue 24): kick-off to the last byte of every file on the client's disk,
# PARALLEL downloads at a time, against kick-off to the complete manifest alone; then the SMART
# reference server (scripts/bench-smart-reference.sh) on the same NDJSON, end to end the same way.
#
# Usage: scripts/bench-export-e2e.sh [WORK_DIR]        (default /tmp/fhirhose-bench-e2e)
# Env: FHIRHOSE_BIN (default $CARGO_TARGET_DIR/ci/fhirhose, built if missing), PATIENTS (1000:
#      `fhirhose synth --patients 1000` = 397,807 resources), SYNTH (an existing synth folder to
#      use instead), ROUNDS (5), PARALLEL (2), PORT (18490), SKIP_SMART=1 (Fhirhose only),
#      NICE (as in scripts/bench-ratios.sh: a negative value also raises this script's autogroup),
#      STREAMED=1 (also, in each round, `fhirhose export --partial-manifests`: the product's
#      client downloading each file while the export runs, timed from kick-off to its exit),
#      DOWNLOAD_MODE (processes | one-process | fhirhose, see scripts/bench/download.sh; both
#      servers; fhirhose = this binary's `fhirhose export` client).
#
# Each round runs one system export twice: once timed to the complete manifest (the files are
# written and fsynced by the server; the status is long-polled with `Prefer: wait=20`, so the
# answer comes as the export ends; a server that does not hold it is polled every 0.1 s), once timed to the last byte of the last
# download (scripts/bench/download.sh: PARALLEL curl processes with keep-alive connections, or
# one `curl --parallel` process with DOWNLOAD_MODE=one-process; each file written to WORK_DIR/out
# and counted), the two interleaved. Both figures include the kick-off and the polling. Files of each export are deleted
# (DELETE on the status URL) after it. After each manifest-only export its files are also copied
# with `cp` (PARALLEL at a time) from the server's folder to WORK_DIR/out: the time to put those
# bytes on this disk with no HTTP at all (cp copies in the kernel, copy_file_range, one copy per
# byte; a client copies each byte out of its socket and into its file).
# In the end-to-end runs the download phase is also timed alone, with the client's CPU time
# (curl is single-threaded: its CPU time is the floor of that phase whatever the server). The reference
# server writes no files (it generates each file's NDJSON when it is downloaded), so its only
# fair figure is end to end.
set -euo pipefail
WORK="${1:-/tmp/fhirhose-bench-e2e}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${FHIRHOSE_BIN:-$TARGET/ci/fhirhose}"
PATIENTS="${PATIENTS:-1000}"
ROUNDS="${ROUNDS:-5}"
PARALLEL="${PARALLEL:-2}"
PORT="${PORT:-18490}"
NICE="${NICE:-0}"
[[ -x "$BIN" ]] || (cd "$ROOT" && cargo build --profile ci -p fhirhose)
if [[ "$NICE" -lt 0 && -w /proc/self/autogroup ]]; then
  echo "$NICE" >/proc/self/autogroup 2>/dev/null || true
fi
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
SYNTH="${SYNTH:-$WORK/synth-$PATIENTS}"
if [[ ! -d "$SYNTH" ]]; then
  echo "== synth --patients $PATIENTS"
  "$BIN" synth --patients "$PATIENTS" --out "$SYNTH.tmp" >/dev/null
  mv "$SYNTH.tmp" "$SYNTH"
fi
RESOURCES=$(cat "$SYNTH"/*.ndjson | wc -l)
DATA="$WORK/data"
if [[ ! -f "$DATA/fhirhose.db" ]]; then
  echo "== load --no-index"
  rm -rf "$DATA"
  FHIRHOSE_LOG=warn "$BIN" load --no-index --data-dir "$DATA" "$SYNTH" >/dev/null
fi
FHIRHOSE_LOG=warn nice -n "$NICE" "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" >"$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 1 600); do
  curl -fsS "$BASE/metadata" >/dev/null 2>&1 && break
  sleep 0.1
done

RUNS="$WORK/runs"
: >"$RUNS"
# export_once LABEL DOWNLOAD(0|1)
export_once() {
  local load t0 t1 status_url code count got bytes
  load=$(cut -d' ' -f1 /proc/loadavg)
  rm -rf "$WORK/out"
  mkdir -p "$WORK/out"
  sync
  t0=$(date +%s.%N)
  status_url=$(curl -fsS -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \
    "$BASE/\$export" | awk -F': ' 'tolower($1)=="content-location" {gsub(/\r/,"",$2); print $2}')
  [[ -n "$status_url" ]] || { echo "kick-off failed" >&2; exit 1; }
  while :; do
    code=$(curl -sS -o "$WORK/manifest.json" -D "$WORK/status-headers" -w '%{http_code}' \
      -H 'Prefer: wait=20' "$status_url")
    [[ "$code" == 200 ]] && break
    [[ "$code" == 202 || "$code" == 429 ]] || { echo "status $code: $(cat "$WORK/manifest.json")" >&2; exit 1; }
    # A server that held the answer until something changed is asked again at once.
    grep -qi '^preference-applied: *wait' "$WORK/status-headers" || sleep 0.1
  done
  if [[ "$2" == 1 ]]; then
    # The downloads alone, and the CPU time of the client (curl and jq, user + system): on a
    # 2-core machine the client's CPU time is the floor of this phase (docs/performance.md).
    local tm cpu
    tm=$(date +%s.%N)
    STATUS_URL="$status_url" BASE_URL="$BASE" FHIRHOSE_BIN="$BIN" \
      /usr/bin/time -o "$WORK/client-time" -f '%U %S' nice -n "$NICE" \
      "$ROOT/scripts/bench/download.sh" "$WORK/manifest.json" "$WORK/out" "$PARALLEL"
    cpu=$(tail -n 1 "$WORK/client-time")
  fi
  t1=$(date +%s.%N)
  if [[ "$2" == 1 ]]; then
    echo "downloads $(echo "$t1 - $tm" | bc) s after the manifest at $(echo "$tm - $t0" | bc) s, client CPU" \
      "$(echo "$cpu" | awk '{print $1 + $2}') s" | tee -a "$RUNS"
  fi
  count=$(jq '[.output[].count] | add' "$WORK/manifest.json")
  [[ "$count" == "$RESOURCES" ]] || { echo "exported $count of $RESOURCES" >&2; exit 1; }
  if [[ "$2" == 1 ]]; then
    got=$(find "$WORK/out" -name '*.ndjson' -exec cat {} + | wc -l)
    [[ "$got" == "$RESOURCES" ]] || { echo "downloaded $got of $RESOURCES lines" >&2; exit 1; }
    bytes=$(du -sb "$WORK/out" | cut -f1)
  fi
  if [[ "$2" == 0 ]]; then
    # The same files copied by `cp`, PARALLEL at a time, from the server's folder (in the page
    # cache, just written) to WORK_DIR/out: these bytes on this disk without HTTP.
    local c0 c1
    sync
    c0=$(date +%s.%N)
    find "$DATA/storage" -type f -name '*.ndjson' -print0 |
      nice -n "$NICE" xargs -0 -n 1 -P "$PARALLEL" cp -t "$WORK/out"
    c1=$(date +%s.%N)
    got=$(find "$WORK/out" -name '*.ndjson' -exec cat {} + | wc -l)
    [[ "$got" == "$RESOURCES" ]] || { echo "copied $got of $RESOURCES lines" >&2; exit 1; }
    echo "copy $(echo "$c1 - $c0" | bc) s, $(( $(du -sb "$WORK/out" | cut -f1) / 1048576 )) MiB copied by cp" | tee -a "$RUNS"
  fi
  echo "$1 $(echo "$t1 - $t0" | bc) s, server VmHWM $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$SERVER/status") MiB, load $load${bytes:+, $((bytes / 1048576)) MiB downloaded}" |
    tee -a "$RUNS"
  curl -fsS -X DELETE "$status_url" >/dev/null || true
}
# export_streamed (STREAMED=1): the product's client from kick-off to its exit with
# --partial-manifests: it long-polls the running export's manifest pages and downloads each file
# as soon as a page lists it, PARALLEL at a time, into WORK_DIR/out; every line counted.
export_streamed() {
  local load t0 t1 got job
  load=$(cut -d' ' -f1 /proc/loadavg)
  rm -rf "$WORK/out"
  mkdir -p "$WORK/out"
  sync
  t0=$(date +%s.%N)
  /usr/bin/time -o "$WORK/client-time" -f '%U %S %M' nice -n "$NICE" "$BIN" export "$BASE" \
    --out "$WORK/out" --parallel "$PARALLEL" --partial-manifests --quiet >/dev/null 2>"$WORK/streamed.err" ||
    { cat "$WORK/streamed.err" >&2; exit 1; }
  t1=$(date +%s.%N)
  got=$(find "$WORK/out" -name '*.ndjson' -exec cat {} + | wc -l)
  [[ "$got" == "$RESOURCES" ]] || { echo "streamed: downloaded $got of $RESOURCES lines" >&2; exit 1; }
  echo "streamed $(echo "$t1 - $t0" | bc) s, client CPU $(tail -n 1 "$WORK/client-time" | awk '{print $1 + $2 " s, client peak RSS " int($3 / 1024)}') MiB," \
    "server VmHWM $(awk '/VmHWM/ {print int($2/1024)}' "/proc/$SERVER/status") MiB, load $load ($(tail -n 1 "$WORK/streamed.err"))" |
    tee -a "$RUNS"
  job=$(jq -r '.output[0].url' "$WORK/out/manifest.json" | sed 's#.*/export-files/\([^/]*\)/.*#\1#')
  curl -fsS -X DELETE "$BASE/export-status/$job" >/dev/null || true
}
median() {
  grep "^$1 " "$RUNS" | awk '{print $2}' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'
}
echo "== $ROUNDS rounds, $RESOURCES resources, $PARALLEL parallel downloads (${DOWNLOAD_MODE:-processes})"
for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2)); then export_once manifest 0; export_once end-to-end 1; else export_once end-to-end 1; export_once manifest 0; fi
  if [[ -n "${STREAMED:-}" ]]; then export_streamed; fi
done
rm -rf "$WORK/out"
mm=$(median manifest)
me=$(median end-to-end)
echo "--- Fhirhose, medians of $ROUNDS:"
echo "kick-off -> manifest:  $mm s = $(echo "$RESOURCES / $mm" | bc) resources/s"
echo "kick-off -> last byte: $me s = $(echo "$RESOURCES / $me" | bc) resources/s"
mc=$(median copy)
md=$(median downloads)
echo "downloads alone (manifest to last byte, in the end-to-end runs): $md s, client CPU $(grep '^downloads ' "$RUNS" | awk '{print $(NF-1)}' | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}') s (median)"
echo "downloads add $(echo "scale=1; 100 * ($me - $mm) / $mm" | bc) % to kick-off -> manifest (target <= 25 %)"
if [[ -n "${STREAMED:-}" ]]; then
  ms=$(median streamed)
  echo "fhirhose export --partial-manifests (downloads while the export runs): kick-off -> last byte $ms s = $(echo "$RESOURCES / $ms" | bc) resources/s;" \
    "downloads add $(echo "scale=1; 100 * ($ms - $mm) / $mm" | bc) % to kick-off -> manifest"
fi
echo "cp of the same files to the same disk: $mc s = $(echo "scale=1; 100 * $mc / $mm" | bc) % of kick-off -> manifest (2 processes copying in the kernel: below any one-process HTTP client)"
kill "$SERVER" 2>/dev/null || true
wait "$SERVER" 2>/dev/null || true

if [[ -z "${SKIP_SMART:-}" ]]; then
  echo "== SMART reference server, same data"
  FHIRHOSE_BIN="$BIN" PARALLEL="$PARALLEL" PORT="$PORT" "$ROOT/scripts/bench-smart-reference.sh" "$SYNTH" "$WORK/smart" | tee "$WORK/smart.txt"
  ref=$(awk '/^export:/ {for (i = 1; i <= NF; i++) if ($i == "resources/s") print $(i-1)}' "$WORK/smart.txt")
  if [[ -n "$ref" ]]; then
    echo "--- end to end: Fhirhose $(echo "$RESOURCES / $me" | bc) resources/s, reference $ref resources/s =" \
      "$(echo "scale=1; $RESOURCES / $me / $ref" | bc)x (target >= 20x)"
  fi
fi
