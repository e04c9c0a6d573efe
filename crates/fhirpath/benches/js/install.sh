#!/usr/bin/env bash
# Installs the HL7 JavaScript FHIRPath engine used as the comparison baseline into .tools/ (gitignored).
# fhirpath@5.2.2 does not install from the registry (a dependency version is missing); 5.2.0 does.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../../.." && pwd)"
dest="$root/.tools/fhirpath-js"
if [ -f "$dest/node_modules/fhirpath/package.json" ]; then
  exit 0
fi
mkdir -p "$dest"
npm install --silent --no-audit --no-fund --prefix "$dest" fhirpath@5.2.0 >&2
