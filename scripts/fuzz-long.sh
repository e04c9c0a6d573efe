#!/usr/bin/env bash
# The long run of the property tests (fuzzing); CI runs the same tests with their small default
# case counts. Usage: ./scripts/fuzz-long.sh [scale]  (default 20: every property runs 20 times
# its CI case count). Each target prints its cases and time; a failure prints the minimized input.
# Runs niced; set CARGO_TARGET_DIR as usual. PROPTEST_CASES, if set, overrides the scale.
set -uo pipefail
cd "$(dirname "$0")/.."
export FUZZ_SCALE="${1:-${FUZZ_SCALE:-20}}"
targets=(
  "fhir-model fuzz_validate"
  "fhirpath fuzz_props"
  "search fuzz_props"
  "deid fuzz_config"
  "ingest fuzz_loader"
  "export fuzz_request"
)
nice cargo test --profile ci --no-run $(for t in "${targets[@]}"; do set -- $t; echo "-p $1 --test $2"; done) || exit 1
failed=0
for t in "${targets[@]}"; do
  set -- $t
  echo "== $1 $2 (FUZZ_SCALE=$FUZZ_SCALE${PROPTEST_CASES:+, PROPTEST_CASES=$PROPTEST_CASES})"
  start=$(date +%s)
  if ! nice cargo test --profile ci -q -p "$1" --test "$2" -- --test-threads 2; then
    failed=1
  fi
  echo "== $1 $2: $(( $(date +%s) - start )) s"
done
exit $failed
