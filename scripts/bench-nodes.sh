#!/usr/bin/env bash
# Export throughput with 1, 2 and 3 `fhirhose serve` nodes on one PostgreSQL database and one
# shared local folder (issue 19; results in docs/scale.md). Synthesizes PATIENTS patients, loads
# them once into a fresh database, then for N in 1 2 3 starts N nodes (their `<data-dir>/storage`
# linked to one folder, one base URL as behind a load balancer), times one system export from
# kick-off at node 1 to the manifest, and stops the nodes.
#
# Usage: scripts/bench-nodes.sh [PATIENTS] [WORK_DIR]   (defaults: 500, /tmp/fhirhose-bench-nodes)
# Env: FHIRHOSE_BIN (default: target/release/fhirhose, built if missing),
#      PG_URL (a cluster's URL; default: a private cluster started in WORK_DIR/pg by
#      scripts/postgres.sh and stopped at the end), WORKERS (export workers per node, default 2),
#      ITEM_RESOURCES (default 5000), NODES (default "1 2 3"), RUNS (exports per node count,
#      default 1), NICE (niceness of the nodes and of the private cluster's server processes,
#      default 0; -15 as root on a machine shared with builds).
# Each line printed also gives the load average before and after the run (other processes on
# the machine compete for the same cores), and each node's peak RSS (VmHWM) after the export.
set -euo pipefail

PATIENTS="${1:-500}"
WORK="${2:-/tmp/fhirhose-bench-nodes}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${FHIRHOSE_BIN:-$TARGET/release/fhirhose}"
WORKERS="${WORKERS:-2}"
ITEM_RESOURCES="${ITEM_RESOURCES:-5000}"
RUNS="${RUNS:-1}"
NICE="${NICE:-0}"
if [[ ! -x "$BIN" ]]; then
  (cd "$ROOT" && cargo build --release -p fhirhose)
fi
rm -rf "$WORK/synth" "$WORK/shared" "$WORK"/n[0-9]* "$WORK/load"
mkdir -p "$WORK/shared"

PIDS=()
STARTED_PG=""
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
  [[ -n "$STARTED_PG" ]] && "$ROOT/scripts/postgres.sh" stop "$WORK/pg" >/dev/null 2>&1 || true
}
trap cleanup EXIT

if [[ -z "${PG_URL:-}" ]]; then
  PG_URL=$("$ROOT/scripts/postgres.sh" start "$WORK/pg" | tail -n 1)
  STARTED_PG=1
  # The postmaster's niceness is inherited by the backends it forks for the nodes.
  pg_data="$WORK/pg/data"
  [[ -f "$WORK/pg/cluster" ]] && pg_data="$(cat "$WORK/pg/cluster")/data"
  if [[ "$NICE" != 0 && -f "$pg_data/postmaster.pid" ]]; then
    renice -n "$NICE" -p "$(head -n 1 "$pg_data/postmaster.pid")" >/dev/null
  fi
fi
DB="fh_bench_nodes_$$"
psql_url="$PG_URL"
if command -v psql >/dev/null; then
  psql "$psql_url" -qc "CREATE DATABASE $DB" >/dev/null
else
  echo "psql is needed to create the benchmark database" >&2; exit 1
fi
URL="${PG_URL%/*}/$DB"

echo "== synth --patients $PATIENTS"
"$BIN" synth --patients "$PATIENTS" --out "$WORK/synth" >/dev/null 2>&1
echo "== load into PostgreSQL"
t0=$(date +%s.%N)
FHIRHOSE_LOG=warn "$BIN" load --no-index --database "$URL" --data-dir "$WORK/load" "$WORK/synth" >/dev/null 2>&1
t1=$(date +%s.%N)
echo "load: $(echo "$t1 - $t0" | bc) s"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PORT0=$(free_port)
while :; do
  ok=1
  for i in 1 2; do (exec 3<>"/dev/tcp/127.0.0.1/$((PORT0 + i))") 2>/dev/null && ok=0; done
  [[ $ok == 1 ]] && break
  PORT0=$(free_port)
done
BASE="http://127.0.0.1:$PORT0"
for n in ${NODES:-1 2 3}; do
for run in $(seq 1 "$RUNS"); do
  PIDS=()
  for i in $(seq 1 "$n"); do
    d="$WORK/n$n-$i"
    mkdir -p "$d"
    ln -sfn "$WORK/shared" "$d/storage"
    FHIRHOSE_LOG=warn nice -n "$NICE" "$BIN" serve --listen "127.0.0.1:$((PORT0 + i - 1))" --data-dir "$d" \
      --database "$URL" --base-url "$BASE" --node-id "n$i" --export-workers "$WORKERS" \
      --export-item-resources "$ITEM_RESOURCES" >"$d/serve.log" 2>&1 &
    PIDS+=($!)
  done
  for i in $(seq 1 "$n"); do
    for _ in $(seq 1 600); do
      curl -fsS "http://127.0.0.1:$((PORT0 + i - 1))/metadata" >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  load_before=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  status_url=$(curl -fsS -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \
    "$BASE/\$export" | awk -F': ' 'tolower($1)=="content-location" {gsub(/\r/,"",$2); print $2}')
  [[ -n "$status_url" ]] || { echo "kick-off failed" >&2; exit 1; }
  while :; do
    code=$(curl -s -o "$WORK/manifest.json" -w '%{http_code}' "$status_url")
    [[ "$code" == 200 ]] && break
    [[ "$code" == 202 ]] || { echo "status $code" >&2; cat "$WORK/manifest.json" >&2; exit 1; }
    sleep 0.2
  done
  t1=$(date +%s.%N)
  load_after=$(cut -d' ' -f1 /proc/loadavg)
  secs=$(echo "$t1 - $t0" | bc)
  total=$(python3 -c "import json,sys; print(sum(f['count'] for f in json.load(open(sys.argv[1]))['output']))" "$WORK/manifest.json")
  by_node=$(psql "$URL" -AtF: -c "SELECT split_part(owner, '/', 1), count(*) FROM export_item WHERE job_id = '${status_url##*/}' AND kind = 'scan' GROUP BY 1 ORDER BY 1" | tr '\n' ' ')
  printf 'nodes=%d workers/node=%s resources=%s seconds=%.2f resources/s=%.0f load=%s..%s items by node: %s\n' \
    "$n" "$WORKERS" "$total" "$secs" "$(echo "$total / $secs" | bc -l)" "$load_before" "$load_after" "$by_node"
  rss=""
  for p in "${PIDS[@]}"; do rss+="$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$p/status")MiB "; done
  echo "peak RSS by node: $rss"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
  rm -rf "$WORK/shared/exports"
done
done
psql "$psql_url" -qc "DROP DATABASE $DB WITH (FORCE)" >/dev/null || true
