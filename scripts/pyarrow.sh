#!/usr/bin/env bash
# Installs pyarrow (PyPI pyarrow==$VERSION), the independent Parquet reader the `fhirhose view
# --format parquet` test reads files back with, into a virtualenv in .tools/pyarrow. Idempotent.
# Prints the venv's python as its last line (scripts/test.sh exports it as FHIRHOSE_TEST_PYARROW).
# Usage: ./scripts/pyarrow.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=22.0.0
DIR=.tools/pyarrow

if ! "$DIR/venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pyarrow') != '$VERSION')" 2>/dev/null; then
  mkdir -p "$DIR"
  python3 -m venv "$DIR/venv"
  "$DIR/venv/bin/pip" install --quiet "pyarrow==$VERSION" >&2
fi
echo "$PWD/$DIR/venv/bin/python"
