#!/usr/bin/env bash
# Installs s3s-fs (crates.io s3s-fs 0.14.1, feature `binary`: an S3-compatible server that keeps
# buckets and objects as files in a folder, from the s3s project) into .tools/s3s-fs. Unlike moto,
# whose buckets live in memory, it keeps what it stored across a stop and a restart: the fault
# suite (crates/fhirhose/tests/faults.rs, case s3-down-then-back) stops and restarts it during an
# export. The suite starts its own servers on free ports from this installation.
# Idempotent: an installed binary of this version is kept. Built with `--debug` (it compiles in
# about a third of a release build's time; a test server needs no optimiser).
#
# Usage: ./scripts/s3fs.sh            (prints the binary's path as the last line)
# Run one by hand: .tools/s3s-fs/bin/s3s-fs --host 127.0.0.1 --port 4599 \
#   --access-key test --secret-key test DIR      (a bucket is a directory of DIR)
# 0.14.1 is the last release that builds on Rust 1.95 (0.15 needs 1.96).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.14.1
ROOT=.tools/s3s-fs
BIN="$ROOT/bin/s3s-fs"

if [[ -x "$BIN" && -f "$ROOT/version" && "$(cat "$ROOT/version")" == "$VERSION" ]]; then
  echo "s3s-fs: $VERSION installed"
  echo "$PWD/$BIN"
  exit 0
fi

mkdir -p "$ROOT"
# Its own target folder, so that it never waits for (or invalidates) the workspace's build.
CARGO_TARGET_DIR="$PWD/$ROOT/target" cargo install --quiet --debug \
  s3s-fs --version "$VERSION" --features binary --root "$ROOT"
rm -rf "$ROOT/target"
echo "$VERSION" >"$ROOT/version"
echo "s3s-fs: $VERSION installed"
echo "$PWD/$BIN"
