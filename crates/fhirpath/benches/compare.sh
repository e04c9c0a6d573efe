#!/usr/bin/env bash
# Runs the FHIRPath benchmark on Fhirhose and on the HL7 JavaScript engine (fhirpath.js 5.2.0) over
# the same Synthea resources and expressions, and prints one table.
# Usage: crates/fhirpath/benches/compare.sh [BUNDLES] [PASSES] [REPEAT]
# REPEAT > 1 evaluates each resource that many times in a row (hot cache, as a de-identification
# run applying many rules to one resource); 1 streams the whole data set per pass (cold cache).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
bundles="${1:-20}"
passes="${2:-5}"
repeat="${3:-1}"
bash "$here/js/install.sh"
rust_out="$(mktemp)"; js_out="$(mktemp)"
trap 'rm -f "$rust_out" "$js_out"' EXIT
(cd "$root" && FHIRPATH_BENCH_BUNDLES="$bundles" FHIRPATH_BENCH_PASSES="$passes" FHIRPATH_BENCH_REPEAT="$repeat" \
  cargo bench -q -p fhirpath --bench fhirpath 2>/dev/null) > "$rust_out"
NODE_PATH="$root/.tools/fhirpath-js/node_modules" node "$here/js/bench.js" \
  "$here/expressions.txt" "$root/testdata/synthea-r4-100" "$bundles" "$passes" "$repeat" > "$js_out"
echo "bundles=$bundles passes=$passes repeat=$repeat (ms per pass over all resources, best pass)"
printf '%-15s %9s %9s %9s %12s %12s %9s\n' expression resources items js-items fhirhose-ms fhirpathjs-ms speedup
join -t $'\t' <(sort "$rust_out") <(sort "$js_out") | sort -t $'\t' -k1,1 |
  awk -F'\t' '{ printf "%-15s %9d %9d %9d %12.2f %12.2f %8.1fx\n", $1, $2, $3, $6, $4, $7, $7 / ($4 > 0 ? $4 : 0.001) }'
