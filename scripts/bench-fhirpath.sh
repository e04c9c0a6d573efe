#!/usr/bin/env bash
# FHIRPath "cold" evaluation, Fhirhose against the HL7 JavaScript engine fhirpath.js (issue 24):
# for each resource of the first BUNDLES Synthea bundles of testdata/synthea-r4-100, every
# expression that applies to it is parsed and evaluated once (no compiled expression kept):
#   - the 193 rule paths of the Microsoft sample anonymizer configuration, on every resource;
#   - the paths and forEach of the SQL-on-FHIR views of benches/views, on the view's resource type.
# The two sides (crates/views/examples/fhirpath_cold.rs and scripts/bench-fhirpath/cold.js) run
# alternately, ROUNDS times each, one process per round; each times only its loop (loading the
# bundles is outside), and reports its peak RSS. The script checks that both sides return the
# same number of items for every expression, then prints per side the median evaluations/s
# (resource x expression pairs), the median ratio, the ratio of the median CPU times of the loops,
# and the largest peak RSS.
# Usage: scripts/bench-fhirpath.sh [BUNDLES] [ROUNDS]     (defaults 5 and 5)
# Env: CARGO_TARGET_DIR (the example is built with --release); FHIRPATH_COLD_BIN runs that binary
# instead of building the example.
set -euo pipefail
BUNDLES="${1:-5}"
ROUNDS="${2:-5}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
HERE="$ROOT/scripts/bench-fhirpath"

# fhirpath.js into .tools/ (gitignored), the version crates/fhirpath/benches/compare.sh uses.
bash "$ROOT/crates/fhirpath/benches/js/install.sh"
export NODE_PATH="$ROOT/.tools/fhirpath-js/node_modules"
if [[ -n "${FHIRPATH_COLD_BIN:-}" ]]; then
  BIN="$FHIRPATH_COLD_BIN"   # e.g. the example built at an earlier commit, for a before/after
else
  (cd "$ROOT" && cargo build -q --release -p views --no-default-features --example fhirpath_cold)
  BIN="$TARGET/release/examples/fhirpath_cold"
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 "$HERE/expressions.py" "$ROOT/crates/deid/tests/corpus/shipped-configs/r4-configuration-sample.json" \
  "$ROOT"/benches/views/*.json > "$WORK/expressions.tsv"
DATA="$ROOT/testdata/synthea-r4-100"
for ((i = 1; i <= ROUNDS; i++)); do
  "$BIN" "$WORK/expressions.tsv" "$DATA" "$BUNDLES" > "$WORK/rust.$i.json"
  node "$HERE/cold.js" "$WORK/expressions.tsv" "$DATA" "$BUNDLES" > "$WORK/js.$i.json"
  echo "round $i: fhirhose $(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["seconds"], 3))' "$WORK/rust.$i.json") s, fhirpath.js $(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["seconds"], 3))' "$WORK/js.$i.json") s" >&2
done

python3 - "$WORK" "$ROUNDS" "$BUNDLES" <<'PY'
import json, statistics, sys
work, rounds, bundles = sys.argv[1], int(sys.argv[2]), sys.argv[3]
exprs = [l.rstrip("\n").split("\t") for l in open(f"{work}/expressions.tsv")]
runs = {side: [json.load(open(f"{work}/{side}.{i}.json")) for i in range(1, rounds + 1)]
        for side in ("rust", "js")}
r0, j0 = runs["rust"][0], runs["js"][0]
bad = [(e[2], a, b) for e, a, b in zip(exprs, r0["items"], j0["items"]) if a != b]
if bad or r0["evaluations"] != j0["evaluations"]:
    for name, a, b in bad:
        print(f"MISMATCH {name}: fhirhose {a} items, fhirpath.js {b}")
    sys.exit(f"results differ ({len(bad)} expressions)")
n = r0["evaluations"]
sets = sorted({e[0] for e in exprs})
print(f"{r0['resources']} resources ({bundles} bundles), {len(exprs)} expressions "
      f"({', '.join(f'{s}: {sum(1 for e in exprs if e[0] == s)}' for s in sets)}), "
      f"{n} evaluations (parse + evaluate), {r0['items_total']} result items, identical counts "
      f"per expression on both sides; {rounds} rounds, alternating")
rates = {}
for side, label in (("rust", "fhirhose"), ("js", "fhirpath.js")):
    secs = [r["seconds"] for r in runs[side]]
    rates[side] = n / statistics.median(secs)
    rss = max(r["peak_rss_kib"] for r in runs[side]) / 1024
    print(f"{label:12} median {statistics.median(secs):8.3f} s  {rates[side]:12,.0f} evaluations/s  "
          f"(rounds {', '.join(f'{s:.3f}' for s in secs)})  peak RSS {rss:.0f} MiB")
ratios = [j["seconds"] / r["seconds"] for r, j in zip(runs["rust"], runs["js"])]
print(f"ratio fhirhose/fhirpath.js: {rates['rust'] / rates['js']:.1f}x of the medians (wall); "
      f"per round {', '.join(f'{x:.1f}' for x in ratios)}")
cpu = {side: statistics.median(r["cpu_seconds"] for r in runs[side]) for side in runs}
print(f"CPU time of the loop (median): fhirhose {cpu['rust']:.3f} s, fhirpath.js {cpu['js']:.3f} s: "
      f"ratio {cpu['js'] / cpu['rust']:.1f}x (steadier than wall time on a shared machine)")
PY
