#!/usr/bin/env bash
# Benchmark SQL on FHIR views (issue 20): the three views of benches/views (patient demographics,
# observations flattened with forEach, conditions) over synthetic data, with `fhirhose view` to
# CSV and to Parquet, and with the reference implementation (sof-js from FHIR/sql-on-fhir-v2, on
# Node.js) to CSV, on the same NDJSON files, interleaved. Reports per view and in total: input
# resources of the view's type, rows, seconds, rows/s, and peak RSS (GNU time's maximum resident
# set size) of each run; then the ratio fhirhose/sof-js.
#
# Usage: scripts/bench-views.sh [options]
#   --patients N   synthetic patients (default 2500: about 1 M resources in all, of which the three
#                  views read Patient, Observation and Condition)
#   --work DIR     working directory (default /tmp/fhirhose-bench-views)
#   --sof-js DIR   a checkout of sof-js (the `sof-js` folder of FHIR/sql-on-fhir-v2); default:
#                  WORK/sql-on-fhir-v2/sof-js, cloned from GitHub when missing (pinned commit)
#   --sof-limit K  resources of each view's type given to sof-js (default 5000: it re-parses every
#                  FHIRPath expression for every resource, ~100 resources/s here, so a full
#                  million would take hours; its cost per resource is flat, so rows/s compare).
#                  fhirhose also runs on the same subset, and the row counts must agree.
#   --runs N       runs of each side (default 1; the median is reported)
#   --threads N    fhirhose view worker threads (default: all cores; sof-js is single-threaded,
#                  so a --threads 1 run is shown too)
# Env: FHIRHOSE_BIN (default: CARGO_TARGET_DIR or target, profile ci; built if missing).
set -euo pipefail
PATIENTS=2500
WORK=/tmp/fhirhose-bench-views
SOF=
RUNS=1
THREADS=
SOF_LIMIT=5000
while [[ $# -gt 0 ]]; do
  case "$1" in
    --patients) PATIENTS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --sof-js) SOF="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --sof-limit) SOF_LIMIT="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${FHIRHOSE_BIN:-$TARGET/ci/fhirhose}"
[[ -x "$BIN" ]] || (cd "$ROOT" && cargo build --profile ci -p fhirhose)
SOF_COMMIT=49fc1adffa8490e7cd5c1e8917d8eb24cbea9dee
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

# The reference implementation and its two dependencies (fhirpath.js pinned as sof-js pins it).
if [[ -z "$SOF" ]]; then
  SOF="$WORK/sql-on-fhir-v2/sof-js"
  if [[ ! -f "$SOF/src/index.js" ]]; then
    git clone -q https://github.com/FHIR/sql-on-fhir-v2 "$WORK/sql-on-fhir-v2"
    git -C "$WORK/sql-on-fhir-v2" checkout -q "$SOF_COMMIT"
  fi
fi
SOF="$(cd "$SOF" && pwd)"
RUNNER="$WORK/sof-runner"
if [[ ! -d "$RUNNER/node_modules/fhirpath" ]]; then
  rm -rf "$RUNNER" && mkdir -p "$RUNNER"
  cp -r "$SOF/src" "$RUNNER/src"
  printf '{"name":"sof-runner","private":true,"type":"module"}\n' > "$RUNNER/package.json"
  (cd "$RUNNER" && npm install --silent --no-audit --no-fund fhirpath@3.9.0 ajv@8 >/dev/null)
fi

# Data: one NDJSON file per type.
if [[ ! -f "$WORK/synth-$PATIENTS/Patient.ndjson" ]]; then
  rm -rf "$WORK/synth-$PATIENTS"
  "$BIN" synth --patients "$PATIENTS" --out "$WORK/synth-$PATIENTS" >/dev/null
fi
DATA="$WORK/synth-$PATIENTS"
total=$(cat "$DATA"/*.ndjson | wc -l)
echo "data: $PATIENTS patients, $total resources in $(ls "$DATA"/*.ndjson | wc -l) files ($DATA)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# measure NAME CMD...: runs CMD under GNU time; prints "seconds maxrss_kb".
measure() {
  local log="$WORK/time.txt"
  /usr/bin/time -f '%e %M' -o "$log" "$@" >/dev/null 2>"$WORK/stderr.txt" || {
    cat "$WORK/stderr.txt" >&2; return 1; }
  cat "$log"
}

views=(patient_demographics observation_flat conditions)
types=(Patient Observation Condition)
declare -A secs rows rss
sides=("fhirhose-csv" "fhirhose-parquet" "fhirhose-csv-1thread" "fhirhose-csv-subset" "sof-js-csv")
mkdir -p "$WORK/subset"
for t in "${types[@]}"; do
  grep -m "$SOF_LIMIT" "\"resourceType\":\"$t\"" "$DATA/$t.ndjson" > "$WORK/subset/$t.ndjson" || true
done
for run in $(seq "$RUNS"); do
  for i in 0 1 2; do
    v=${views[$i]}; t=${types[$i]}
    view="$ROOT/benches/views/$v.json"
    input="$DATA/$t.ndjson"
    subset="$WORK/subset/$t.ndjson"
    for side in "${sides[@]}"; do
      out="$WORK/out/$side"; rm -rf "$out"; mkdir -p "$out"
      case "$side" in
        fhirhose-csv) r=$(measure "$BIN" view "$view" "$input" --format csv --out "$out" --quiet ${THREADS:+--threads $THREADS}) ;;
        fhirhose-parquet) r=$(measure "$BIN" view "$view" "$input" --format parquet --out "$out" --quiet ${THREADS:+--threads $THREADS}) ;;
        fhirhose-csv-1thread) r=$(measure "$BIN" view "$view" "$input" --format csv --out "$out" --quiet --threads 1) ;;
        fhirhose-csv-subset) r=$(measure "$BIN" view "$view" "$subset" --format csv --out "$out" --quiet ${THREADS:+--threads $THREADS}) ;;
        sof-js-csv) r=$(measure node --max-old-space-size=4096 "$ROOT/scripts/bench/sof-js-view.mjs" "$RUNNER" "$view" "$subset" "$out/$v.csv") ;;
      esac
      n=0
      if [[ "$side" == *parquet ]]; then
        # Row count of the Parquet file is checked against the CSV run of the same view.
        n=${rows[$v,fhirhose-csv]:-0}
      else
        n=$(( $(wc -l < "$(ls "$out"/*.csv)") - 1 ))
      fi
      secs[$v,$side,$run]=${r% *}; rss[$v,$side]=${r#* }; rows[$v,$side]=$n
    done
    if [[ "${rows[$v,fhirhose-csv-subset]}" != "${rows[$v,sof-js-csv]}" ]]; then
      echo "WARNING: $v: on the same subset fhirhose wrote ${rows[$v,fhirhose-csv-subset]} rows, sof-js ${rows[$v,sof-js-csv]}" >&2
    fi
  done
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
printf '\n| view | input resources | rows | side | seconds | rows/s | peak RSS MB |\n|---|---:|---:|---|---:|---:|---:|\n'
declare -A tot_s tot_r
for i in 0 1 2; do
  v=${views[$i]}
  for side in "${sides[@]}"; do
    case "$side" in *subset|sof-js*) n_in=$(wc -l < "$WORK/subset/${types[$i]}.ndjson") ;;
      *) n_in=$(wc -l < "$DATA/${types[$i]}.ndjson") ;; esac
    vals=(); for run in $(seq "$RUNS"); do vals+=("${secs[$v,$side,$run]}"); done
    s=$(median "${vals[@]}")
    n=${rows[$v,$side]}
    tot_s[$side]=$(awk -v a="${tot_s[$side]:-0}" -v b="$s" 'BEGIN {print a + b}')
    tot_r[$side]=$(( ${tot_r[$side]:-0} + n ))
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$v" "$n_in" "$n" "$side" "$s" \
      "$(awk -v n="$n" -v s="$s" 'BEGIN {printf "%.0f", (s > 0 ? n / s : 0)}')" "$(( ${rss[$v,$side]} / 1024 ))"
  done
done
echo
for side in "${sides[@]}"; do
  printf 'total %-22s %8s rows in %7.2f s = %9.0f rows/s\n' "$side" "${tot_r[$side]}" "${tot_s[$side]}" \
    "$(awk -v n="${tot_r[$side]}" -v s="${tot_s[$side]}" 'BEGIN {print n / s}')"
done
# Ratios of rows/s (the sides ran on inputs of different sizes).
rate() { awk -v n="${tot_r[$1]}" -v s="${tot_s[$1]}" 'BEGIN {print n / s}'; }
for side in fhirhose-csv fhirhose-parquet fhirhose-csv-1thread fhirhose-csv-subset; do
  printf 'ratio of rows/s, %s / sof-js-csv: %.1fx\n' "$side" \
    "$(awk -v a="$(rate "$side")" -v b="$(rate sof-js-csv)" 'BEGIN {print a / b}')"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
