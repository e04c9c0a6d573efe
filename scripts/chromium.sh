#!/usr/bin/env bash
# Installs Debian's headless browser for the status-page test (packages chromium and
# chromium-driver, system-wide with apt: chromium needs its shared libraries, so the dpkg -x trick of
# registry.sh does not work for it), unless both are installed already. Idempotent.
# Prints the path of chromedriver on its last line; the test (crates/server/tests/status_page.rs)
# starts chromedriver itself on a free port and stops it at the end, so nothing is left running.
# Usage: FHIRHOSE_TEST_CHROMEDRIVER=$(./scripts/chromium.sh | tail -n 1)
set -euo pipefail

found() {
  command -v chromedriver >/dev/null 2>&1 &&
    { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
}

if ! found; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "chromium: not installed; run 'sudo apt-get install chromium chromium-driver'" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; then
    # A fresh machine may have no package lists yet.
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  fi
  if ! found; then
    echo "chromium: installed, but chromium or chromedriver is not on PATH" >&2
    exit 1
  fi
fi
echo "chromium: $(chromium --version 2>/dev/null || chromium-browser --version 2>/dev/null)" >&2
command -v chromedriver
