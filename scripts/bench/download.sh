#!/usr/bin/env bash
# Downloads every file of a Bulk Data manifest into OUT_DIR the way a bulk client with PARALLEL
# downloads at a time does, each file under the last segment of its URL, keep-alive connections.
# Used by the end-to-end benchmarks for both servers.
#
# DOWNLOAD_MODE=processes (default): PARALLEL `curl` processes, each with its own connection
#   fetching its share of the files one after another (dealt round-robin in manifest order) —
#   a client with one thread per download.
# DOWNLOAD_MODE=one-process: one `curl --parallel --parallel-max PARALLEL` process, the
#   transfers interleaved on its one thread; that thread's CPU time (receiving and writing the
#   bytes, about 0.5 s for 525 MiB here) is then the floor of the downloads on an idle machine
#   (docs/performance.md, "Where the downloads' time goes").
#
# DOWNLOAD_MODE=fhirhose: the product's own client, `fhirhose export --status-url $STATUS_URL
#   --parallel PARALLEL` ($FHIRHOSE_BIN; STATUS_URL and BASE_URL must be set): it reads the
#   manifest from the status URL (one request) and downloads every file, PARALLEL at a time on
#   the runtime's threads, into OUT_DIR as `<Type>.<n>.ndjson` (plus its `manifest.json`).
#
# Usage: scripts/bench/download.sh MANIFEST OUT_DIR PARALLEL [more curl options, e.g. -H ...]
set -euo pipefail
manifest="$1"
out="$2"
parallel="$3"
shift 3
# `url` / `output` lines of curl's config format for the files whose index modulo N is I.
config() {
  jq -r --arg out "$out" --argjson n "$1" --argjson i "$2" \
    '.output | to_entries[] | select(.key % $n == $i) | .value
     | "url = \"\(.url)\"\noutput = \"\($out)/\(.url | split("/") | last)\""' "$manifest"
}
case "${DOWNLOAD_MODE:-processes}" in
  one-process)
    config 1 0 | curl -fsS --no-progress-meter --parallel --parallel-max "$parallel" "$@" --config -
    ;;
  processes)
    pids=()
    for ((i = 0; i < parallel; i++)); do
      config "$parallel" "$i" | curl -fsS --no-progress-meter "$@" --config - &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do
      wait "$pid" || status=$?
    done
    exit "$status"
    ;;
  fhirhose)
    "${FHIRHOSE_BIN:?FHIRHOSE_BIN}" export --status-url "${STATUS_URL:?STATUS_URL}" --out "$out" \
      --parallel "$parallel" --quiet "${BASE_URL:?BASE_URL}" >/dev/null
    ;;
  *)
    echo "DOWNLOAD_MODE must be processes, one-process or fhirhose" >&2
    exit 2
    ;;
esac
