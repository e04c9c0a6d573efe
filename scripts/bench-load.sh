#!/usr/bin/env bash
# Loader benchmark: `fhirhose load --data-dir` of one data set into a fresh directory, several
# binaries run alternately (so that each round sees the same machine), median/min/max per binary.
#
#   scripts/bench-load.sh [-n ROUNDS] [-d DATA] BINARY... [-- LOAD-ARGS...]
#
# e.g. scripts/bench-load.sh -n 7 /tmp/fhirhose-old target/release/fhirhose -- --no-index
# DATA defaults to testdata/synthea-r4-100; results go to stdout, one line per run (wall seconds,
# peak RSS of the load process, load average), then a summary.
set -euo pipefail
rounds=5
data="$(dirname "$0")/../testdata/synthea-r4-100"
while getopts "n:d:" opt; do
  case $opt in
    n) rounds=$OPTARG ;;
    d) data=$OPTARG ;;
    *) echo "usage: $0 [-n ROUNDS] [-d DATA] BINARY... [-- LOAD-ARGS...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
bins=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do bins+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#bins[@]} -gt 0 ] || { echo "no binary given" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for ((r = 1; r <= rounds; r++)); do
  for i in "${!bins[@]}"; do
    rm -rf "$work/data"
    start=$(date +%s.%N)
    /usr/bin/time -o "$work/time" -f '%M' "${bins[$i]}" load "$@" --data-dir "$work/data" "$data" > /dev/null
    end=$(date +%s.%N)
    secs=$(echo "$end - $start" | bc)
    echo "$i ${bins[$i]} $secs load=$(cut -d' ' -f1 /proc/loadavg) peak_rss=$(($(tail -n 1 "$work/time") / 1024))MiB" |
      tee -a "$work/runs"
  done
done
echo "--- seconds per load (median, min, max over $rounds rounds), largest peak RSS"
for i in "${!bins[@]}"; do
  grep "^$i " "$work/runs" | awk '{print $3}' | sort -n |
    awk -v b="${bins[$i]}" -v rss="$(grep "^$i " "$work/runs" | sed 's/.*peak_rss=//; s/MiB//' | sort -n | tail -n 1)" \
      '{a[NR] = $1} END {printf "%-40s median %.2f  min %.2f  max %.2f  peak RSS %s MiB\n", b, a[int((NR + 1) / 2)], a[1], a[NR], rss}'
done
