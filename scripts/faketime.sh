#!/usr/bin/env bash
# Installs Debian's libfaketime (package faketime) for the test of nodes whose clocks disagree
# (crates/fhirhose/tests/multinode.rs: one node runs with its clock 20 minutes behind, through
# LD_PRELOAD), unless it is installed already. Idempotent.
# Prints the path of the library on its last line.
# Usage: FHIRHOSE_TEST_FAKETIME=$(./scripts/faketime.sh | tail -n 1)
set -euo pipefail

find_lib() {
  for f in /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1; do
    if [[ -f "$f" ]]; then
      echo "$f"
      return 0
    fi
  done
  return 1
}

if ! find_lib >/dev/null; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "faketime: not installed; run 'sudo apt-get install faketime'" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends faketime >/dev/null; then
    # A fresh machine may have no package lists yet.
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends faketime >/dev/null
  fi
fi
find_lib || { echo "faketime: installed, but libfaketime.so.1 was not found" >&2; exit 1; }
