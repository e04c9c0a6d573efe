#!/usr/bin/env bash
# Peak memory against data size (issue 24: "every benchmark reports peak RSS; none grows with the
# data size except bounded batches"). For each patient count, synthesizes the data and measures
# the peak RSS of every bulk path on it:
#
#   load --no-index, load (with search indexes), reindex       the process (GNU time %M)
#   anonymize --threads 2 (the NDJSON folder)                   the process
#   serve: after start, after a plain system export, after a    the server's VmHWM, read from
#     de-identified one (Microsoft sample configuration), after /proc after each step (it only
#     downloading every file of the plain export (curl), after   grows: each figure is the peak
#     a Patient-level export with _typeFilter                    of everything up to that step)
#   the `fhirhose export` client (kick-off, poll, 2 parallel     the process
#     downloads, --verify) against that server
#
# Usage: scripts/bench-rss.sh [WORK_DIR]        (default /tmp/fhirhose-bench-rss)
# Env: FHIRHOSE_BIN (default $CARGO_TARGET_DIR/ci/fhirhose, built if missing), SIZES (patient
#      counts, default "250 1000 2000": 99 k, 398 k and 795 k resources), PORT (18495).
# Prints one table, MiB per path and size. Times are not the point here (see bench-ratios.sh).
set -euo pipefail
WORK="${1:-/tmp/fhirhose-bench-rss}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${FHIRHOSE_BIN:-$TARGET/ci/fhirhose}"
SIZES="${SIZES:-250 1000 2000}"
PORT="${PORT:-18495}"
[[ -x "$BIN" ]] || (cd "$ROOT" && cargo build --profile ci -p fhirhose)
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
CONFIG="$WORK/sample.json"
jq '.parameters.cryptoHashKey = "bench-hash-key" | .parameters.encryptKey = "0123456789abcdef0123456789abcdef"
    | .parameters.dateShiftKey = "bench-shift-key"' \
  "$ROOT/crates/deid/tests/corpus/shipped-configs/r4-configuration-sample.json" >"$CONFIG"
RESULTS="$WORK/results"
: >"$RESULTS"
SERVER=
trap '[[ -n "$SERVER" ]] && kill "$SERVER" 2>/dev/null || true' EXIT

# peak LABEL SIZE COMMAND...: the command's peak RSS in MiB, recorded.
peak() {
  local label=$1 size=$2
  shift 2
  /usr/bin/time -o "$WORK/time" -f '%M' "$@" >/dev/null 2>"$WORK/last.err" ||
    { cat "$WORK/last.err" >&2; exit 1; }
  echo "$label $size $(($(tail -n 1 "$WORK/time") / 1024))" >>"$RESULTS"
}
hwm() { echo "$1 $2 $(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$SERVER/status")" >>"$RESULTS"; }
# export_wait QUERY [PATH]: kick-off, poll to the manifest ($WORK/manifest.json); prints the status URL.
export_wait() {
  local url code
  url=$(curl -fsS -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \
    "http://127.0.0.1:$PORT/${2:-}\$export?$1" | awk -F': ' 'tolower($1)=="content-location" {gsub(/\r/,"",$2); print $2}')
  [[ -n "$url" ]] || { echo "kick-off failed: $1" >&2; exit 1; }
  while :; do
    code=$(curl -sS -o "$WORK/manifest.json" -w '%{http_code}' "$url")
    [[ "$code" == 200 ]] && break
    [[ "$code" == 202 || "$code" == 429 ]] || { echo "status $code: $(cat "$WORK/manifest.json")" >&2; exit 1; }
    sleep 0.1
  done
  echo "$url"
}

for size in $SIZES; do
  synth="$WORK/synth-$size"
  if [[ ! -d "$synth" ]]; then
    "$BIN" synth --patients "$size" --out "$synth.tmp" >/dev/null
    mv "$synth.tmp" "$synth"
  fi
  echo "== $size patients: $(cat "$synth"/*.ndjson | wc -l) resources, $(du -sm "$synth" | cut -f1) MiB of NDJSON"
  data="$WORK/data"
  rm -rf "$data" "$WORK/anon"
  FHIRHOSE_LOG=warn peak "load --no-index" "$size" "$BIN" load --no-index --data-dir "$data" "$synth"
  rm -rf "$data"
  FHIRHOSE_LOG=warn peak "load (indexed)" "$size" "$BIN" load --data-dir "$data" "$synth"
  FHIRHOSE_LOG=warn peak "reindex" "$size" "$BIN" reindex --data-dir "$data"
  peak "anonymize --threads 2" "$size" "$BIN" anonymize -i "$synth" -o "$WORK/anon" -c "$CONFIG" -b --threads 2 --quiet
  rm -rf "$WORK/anon"

  mkdir -p "$data/storage/anonymization"
  cp "$CONFIG" "$data/storage/anonymization/sample.json"
  FHIRHOSE_LOG=warn "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$data" >"$WORK/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 600); do curl -fsS "http://127.0.0.1:$PORT/metadata" >/dev/null 2>&1 && break; sleep 0.1; done
  hwm "serve: started" "$size"
  url=$(export_wait "")
  hwm "serve: + plain system export" "$size"
  rm -rf "$WORK/dl"
  mkdir -p "$WORK/dl"
  "$ROOT/scripts/bench/download.sh" "$WORK/manifest.json" "$WORK/dl" 2
  hwm "serve: + its downloads (2 curl)" "$size"
  curl -fsS -X DELETE "$url" >/dev/null
  url=$(export_wait "_container=deid&_anonymizationConfig=sample.json")
  hwm "serve: + de-identified export" "$size"
  curl -fsS -X DELETE "$url" >/dev/null
  url=$(export_wait "_type=Observation,Condition&_typeFilter=Observation%3Fstatus%3Dfinal" "Patient/")
  hwm "serve: + Patient export, _typeFilter" "$size"
  curl -fsS -X DELETE "$url" >/dev/null
  rm -rf "$WORK/dl"
  peak "export client (2 parallel, --verify)" "$size" "$BIN" export "http://127.0.0.1:$PORT" --out "$WORK/dl" \
    --quiet --parallel 2 --poll-interval 1 --verify
  rm -rf "$WORK/dl"
  kill "$SERVER"
  wait "$SERVER" 2>/dev/null || true
  SERVER=
  rm -rf "$data"
done

echo "--- peak RSS, MiB (patients: $SIZES)"
awk -v sizes="$SIZES" '
  { key = $0; sub(/ [0-9]+ [0-9]+$/, "", key); n = split($0, f, " "); v[key, f[n - 1]] = f[n]
    if (!(key in seen)) { seen[key] = 1; order[++k] = key } }
  END {
    m = split(sizes, s, " ")
    printf "%-40s", "path"; for (j = 1; j <= m; j++) printf "%10s", s[j]; printf "\n"
    for (i = 1; i <= k; i++) { printf "%-40s", order[i]; for (j = 1; j <= m; j++) printf "%10s", v[order[i], s[j]]; printf "\n" }
  }' "$RESULTS"
