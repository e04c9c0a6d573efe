#!/usr/bin/env bash
# Downloads every file of a Bulk Data manifest into OUT_DIR the way a bulk client does: one
# process, keep-alive connections, PARALLEL transfers at a time (curl --parallel), each file
# under the last segment of its URL. Used by the end-to-end benchmarks for both servers.
#
# Usage: scripts/bench/download.sh MANIFEST OUT_DIR PARALLEL [more curl options, e.g. -H ...]
set -euo pipefail
manifest="$1"
out="$2"
parallel="$3"
shift 3
jq -r --arg out "$out" \
  '.output[] | "url = \"\(.url)\"\noutput = \"\($out)/\(.url | split("/") | last)\""' "$manifest" |
  curl -fsS --no-progress-meter --parallel --parallel-max "$parallel" "$@" --config -
