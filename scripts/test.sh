#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh machine (only Rust, Node/npm, Python and apt
# are assumed). Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# External components the tests talk to are installed and started here, by the project itself.
# (Azurite, a registry and PostgreSQL join this list as the features that need them land.)

cargo test --workspace --profile ci "$@"
