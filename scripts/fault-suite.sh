#!/usr/bin/env bash
# The fault suite (crates/fhirhose/tests/faults.rs) in a longer series than CI runs: the real
# `fhirhose` binary killed (-9) at random points of exports, cancels, loads and transactions,
# SIGTERM during exports, Azurite and the S3 servers (moto frozen, s3s-fs stopped and restarted)
# down for a while or for good, a full disk (an 8 MB tmpfs: needs root). See docs/reliability.md
# for the invariants and results.
#
# Usage: ./scripts/fault-suite.sh [ROUNDS] [CASES]
#   ROUNDS  rounds of every case (default 20; CI runs 1-3 per case)
#   CASES   comma-separated case names (default: all), e.g. kill9-export,kill9-cancel
# Environment: FHIRHOSE_FAULT_SEED=<n> repeats a run (the seed is printed);
#   FHIRHOSE_FAULTS_PENDING=1 also runs cases marked pending; FHIRHOSE_FAULT_LOG=info for
#   server logs (kept only while a round runs).
set -euo pipefail
cd "$(dirname "$0")/.."

export FHIRHOSE_REQUIRE_EXTERNAL=1
export FHIRHOSE_FAULT_ROUNDS="${1:-20}"
if [[ -n "${2:-}" ]]; then
  export FHIRHOSE_FAULT_CASES="$2"
fi
# The suite starts its own Azurite and moto on free ports from these installations.
./scripts/azurite.sh >/dev/null
./scripts/s3.sh >/dev/null
./scripts/s3fs.sh >/dev/null

cargo test --profile ci -p fhirhose --test faults -- --nocapture 2>&1 | grep -E '^(faults|  (ok|FAIL|skip))|test result'
