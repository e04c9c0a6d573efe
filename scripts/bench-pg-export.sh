#!/usr/bin/env bash
# Benchmark a plain system $export from PostgreSQL (issue 18): synth N patients, load them (plus
# any extra inputs) into a fresh PostgreSQL database, then time a system export from kick-off to
# manifest with `fhirhose serve --database URL`, and report resources/s and the server's peak RSS
# (VmHWM of /proc/PID/status, read before the server is stopped; sampled every second too).
#
# Usage: scripts/bench-pg-export.sh [options]
#   --patients N      synthetic patients (default 100, about 40,000 resources; 10000 is about
#                     3.97 M resources, ~5 GB of NDJSON and ~12 GB in PostgreSQL)
#   --extra PATH      also load PATH (repeatable; e.g. testdata/synthea-r4-100 to pass 4 M)
#   --work DIR        working directory (default /tmp/fhirhose-bench-pg-export): synth output,
#                     the server's data dir (export files), logs, and the private cluster
#   --database URL    a running PostgreSQL server (a URL ending in a database name: that database
#                     is dropped and created); default: a private cluster from
#                     scripts/postgres.sh in WORK/pg, stopped at the end
#   --reuse           export from the database as it is (no synth, no load): re-measure
#   --keep            leave the private cluster running at the end
#   --runs N          exports to time, one after the other (default 1)
#   --port P          HTTP port of the server (default 18481)
# Env: FHIRHOSE_BIN (default: CARGO_TARGET_DIR or target, profile ci, built if missing).
# Prints the load time (no search indexes: export does not read them), then per run: resources,
# MiB of NDJSON, seconds from kick-off to the complete manifest, resources/s, server VmHWM.
set -euo pipefail

PATIENTS=100
WORK=/tmp/fhirhose-bench-pg-export
DATABASE=
REUSE=0
KEEP=0
RUNS=1
PORT=18481
EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --patients) PATIENTS=$2; shift 2 ;;
    --extra) EXTRA+=("$2"); shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --database) DATABASE=$2; shift 2 ;;
    --reuse) REUSE=1; shift ;;
    --keep) KEEP=1; shift ;;
    --runs) RUNS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${FHIRHOSE_BIN:-$TARGET/ci/fhirhose}"
if [[ ! -x "$BIN" ]]; then
  (cd "$ROOT" && cargo build --profile ci -p fhirhose)
fi
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

SERVER=
CLUSTER=
cleanup() {
  [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null || true
  if [[ -n $CLUSTER && $KEEP == 0 ]]; then
    "$ROOT/scripts/postgres.sh" stop "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

if [[ -z $DATABASE ]]; then
  CLUSTER="$WORK/pg"
  DATABASE="$("$ROOT/scripts/postgres.sh" start "$CLUSTER" | tail -1)"
  DATABASE="${DATABASE%/*}/fhbench"
fi
ADMIN="${DATABASE%/*}/postgres"
DBNAME="${DATABASE##*/}"
DBNAME="${DBNAME%%\?*}"
echo "database: ${DATABASE#*@}"

if [[ $REUSE == 0 ]]; then
  SYNTH="$WORK/synth-$PATIENTS"
  if [[ ! -f $SYNTH/done ]]; then
    echo "== synth --patients $PATIENTS"
    rm -rf "$SYNTH"
    "$BIN" synth --patients "$PATIENTS" --out "$SYNTH" | head -1
    touch "$SYNTH/done"
  fi
  PGOPTIONS="-c client_min_messages=warning" psql "$ADMIN" -qc "DROP DATABASE IF EXISTS \"$DBNAME\"" \
    -c "CREATE DATABASE \"$DBNAME\"" >/dev/null
  echo "== load --no-index (export does not read the search indexes)"
  t0=$(date +%s.%N)
  FHIRHOSE_LOG=warn "$BIN" load --no-index --database "$DATABASE" "$SYNTH" "${EXTRA[@]}" | head -1
  t1=$(date +%s.%N)
  echo "load: $(echo "$t1 - $t0" | bc) s"
  psql "$DATABASE" -qc "VACUUM ANALYZE" >/dev/null
fi
echo "stored: $(psql "$DATABASE" -Atc "SELECT count(*) FROM resource_versions
  WHERE superseded_seq IS NULL AND deleted = 0") current resources," \
  "database $(psql "$DATABASE" -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))")"

DATA="$WORK/data"
for run in $(seq 1 "$RUNS"); do
  rm -rf "$DATA"
  mkdir -p "$DATA"
  echo "== run $run: serve --database + system export (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  FHIRHOSE_LOG=warn "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
    --database "$DATABASE" >"$WORK/serve.log" 2>&1 &
  SERVER=$!
  BASE="http://127.0.0.1:$PORT"
  for _ in $(seq 1 600); do
    curl -fsS "$BASE/metadata" >/dev/null 2>&1 && break
    sleep 0.1
  done
  rss_before=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")
  t0=$(date +%s.%N)
  status_url=$(curl -fsS -D - -o /dev/null -H 'Accept: application/fhir+json' \
    -H 'Prefer: respond-async' "$BASE/\$export" |
    awk -F': ' 'tolower($1)=="content-location" {gsub(/\r/,"",$2); print $2}')
  [[ -n "$status_url" ]] || { echo "kick-off failed" >&2; exit 1; }
  rss_max=0
  while :; do
    code=$(curl -sS -o "$WORK/manifest.json" -w '%{http_code}' "$status_url")
    [[ "$code" == 200 ]] && break
    [[ "$code" == 202 || "$code" == 429 ]] ||
      { echo "status $code: $(cat "$WORK/manifest.json")" >&2; exit 1; }
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$SERVER/status")
    ((rss > rss_max)) && rss_max=$rss
    sleep 0.2
  done
  t1=$(date +%s.%N)
  rss_peak=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")
  server_cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$SERVER/stat")
  folder="$DATA/storage/$(jq -r '.extension.storage.container + "/" + .extension.storage.folder' \
    "$WORK/manifest.json")"
  exported=$(jq '[.output[].count] | add' "$WORK/manifest.json")
  lines=$(find "$folder" -type f -name "*.ndjson*" -exec zcat -f {} + | wc -l)
  bytes=$(du -sb "$folder" | cut -f1)
  secs=$(echo "$t1 - $t0" | bc)
  echo "export: $exported resources ($lines NDJSON lines), $((bytes / 1048576)) MiB in $secs s" \
    "= $(echo "$exported / $secs" | bc) resources/s"
  echo "server VmHWM: idle $((rss_before / 1024)) MiB, after the export $((rss_peak / 1024)) MiB" \
    "(largest VmRSS sampled: $((rss_max / 1024)) MiB)"
  echo "server CPU (user+sys, whole process life): $server_cpu s"
  kill "$SERVER"
  wait "$SERVER" 2>/dev/null || true
  SERVER=
done
rm -rf "$DATA"
