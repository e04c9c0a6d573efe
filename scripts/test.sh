#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh machine (only Rust, Node/npm, Python and apt
# are assumed). Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# The lint gate first (issue 23): formatting, clippy with warnings denied on every target, the
# API docs with warnings denied (broken intra-doc links) and no module cycles inside a crate.
# Fails fast, before any service starts.
# FHIRHOSE_SKIP_LINT=1 skips it (a developer's quick rerun; CI never sets it).
if [[ "${FHIRHOSE_SKIP_LINT:-0}" != 1 ]]; then
  cargo fmt --all --check
  cargo clippy --workspace --all-targets --profile ci -- -D warnings
  RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --profile ci
  python3 scripts/check-module-cycles.py
fi

# External components the tests talk to are installed and started here, by the project itself;
# tests that need them fail (rather than skip) when FHIRHOSE_REQUIRE_EXTERNAL=1.
export FHIRHOSE_REQUIRE_EXTERNAL=1
# One round of every randomised fault case here (the CI budget); scripts/fault-suite.sh runs the
# long series (20 rounds by default) and docs/reliability.md records its results.
export FHIRHOSE_FAULT_ROUNDS="${FHIRHOSE_FAULT_ROUNDS:-1}"
# Azure Blob destination: Azurite (npm) on 127.0.0.1:10000.
./scripts/azurite.sh
export FHIRHOSE_TEST_AZURITE=http://127.0.0.1:10000/devstoreaccount1
# S3 destination: moto (PyPI moto[server]) on 127.0.0.1:5000.
./scripts/s3.sh
export FHIRHOSE_TEST_S3=http://127.0.0.1:5000
# A second S3 server that keeps its objects on disk, stopped and restarted by the fault suite:
# s3s-fs (crates.io), built into .tools/s3s-fs (a few minutes, once).
FHIRHOSE_TEST_S3S_FS=$(./scripts/s3fs.sh | tail -n 1)
export FHIRHOSE_TEST_S3S_FS
# Headless browser for the status-page test: Debian's chromium + chromium-driver (apt, when missing);
# the test starts chromedriver itself on a free port.
FHIRHOSE_TEST_CHROMEDRIVER=$(./scripts/chromium.sh | tail -n 1)
export FHIRHOSE_TEST_CHROMEDRIVER
# Parquet reader for the `fhirhose view --format parquet` test: pyarrow (PyPI) in .tools/pyarrow.
FHIRHOSE_TEST_PYARROW=$(./scripts/pyarrow.sh | tail -n 1)
export FHIRHOSE_TEST_PYARROW
# A node whose clock is 20 minutes behind the others, for the multinode test: Debian's libfaketime
# (apt, when missing), preloaded into that node only.
FHIRHOSE_TEST_FAKETIME=$(./scripts/faketime.sh | tail -n 1)
export FHIRHOSE_TEST_FAKETIME
# OCI registry for de-identification configs in images: Debian's docker-registry on 127.0.0.1:5001.
./scripts/registry.sh
export FHIRHOSE_TEST_REGISTRY=127.0.0.1:5001
# PostgreSQL: a private cluster in .pg (scripts/postgres.sh; apt-installs PostgreSQL if missing).
# FHIRHOSE_TEST_POSTGRES serves the PostgreSQL-only tests in the first run.
FHIRHOSE_TEST_POSTGRES=$(./scripts/postgres.sh start .pg | tail -n 1)
export FHIRHOSE_TEST_POSTGRES
# The cluster's private CA (written when openssl is installed), for the TLS test.
[[ -f .pg/ca.pem ]] && export FHIRHOSE_TEST_POSTGRES_CA=$PWD/.pg/ca.pem

cargo test --workspace --profile ci "$@"

# The suites parameterised by backend, a second time against PostgreSQL (a fresh database per
# test, see store::testing): every unit test, and the store, search, ingest and export suites and
# the server's storage suites by name. (search's backends_agree compares both backends already in
# the first run, through FHIRHOSE_TEST_POSTGRES: not repeated here.) `--workspace` again, so that features resolve as in the
# first run and nothing is rebuilt (`-p` selections rebuilt for minutes).
pg_suites=(
  job_queue postgres_store sqlite_store
  bad_input evaluator_agrees_with_fhirpath fuzz_props indexer_entries reindex
  search_features synthea_queries
  bundles fuzz_loader load_synthea pipeline synth
  azure fuzz_request run_levels service wal
  export export_lifecycle deid_export export_group_limits azure_export s3_export views
  download_ranges status_page import http hardening smart_auth smart_export smart_security smart_search_scopes smart_scope_gaps search_limits conditional_race condition_locks
  cli database faults export_restart
)
FHIRHOSE_TEST_DATABASE=$FHIRHOSE_TEST_POSTGRES cargo test --workspace --profile ci --lib \
  "${pg_suites[@]/#/--test=}" "$@"
