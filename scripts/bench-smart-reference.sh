#!/usr/bin/env bash
# Benchmark the SMART reference bulk-data server (smart-on-fhir/bulk-data-server, Node.js + SQLite)
# on the same NDJSON data as scripts/bench-export.sh: import the data into the reference server's
# SQLite schema, start it, run a system-level $export (all types, no auth) with its async flow,
# download every output file to disk and report resources, seconds, resources/s and peak RSS.
#
# The reference server does NOT write export files. The kick-off/status phase only counts rows (it
# streams the whole table once, in ORDER BY fhir_type LIMIT 1000 OFFSET n chunks) to build the
# manifest; each file's NDJSON is generated lazily from SQLite when it is downloaded. The fair end
# time is therefore the last byte of the last download, and that is what "resources/s" uses. (The
# time to the manifest is printed too, but it is not comparable to Fhirhose's kick-off-to-manifest.)
#
# Usage: scripts/bench-smart-reference.sh NDJSON_DIR|SQLITE_DB [WORK_DIR]
#   NDJSON_DIR: *.ndjson (one resource per line, e.g. `fhirhose synth` output); imported into
#               WORK_DIR/smart.db unless that file exists (IMPORT=1 forces a re-import).
#   SQLITE_DB:  a database already in the reference server's schema (e.g. a previous WORK_DIR/smart.db).
#   WORK_DIR defaults to /tmp/fhirhose-bench-smart; the downloads go to WORK_DIR/out (removed after
#   counting unless KEEP=1).
# Env: PORT (default 18490), SMART_DIR (install dir, default .tools/smart-bulk-data-server),
#      SMART_GIT / FHIR_FILTER_GIT (git sources; default: the local mirrors under /work/.mirror if
#      present, else GitHub), PARALLEL (concurrent downloads, default 2), PAGE (resources per file,
#      the server's own default 10000; the server refuses more than 1500 files),
#      TIMEOUT (seconds after kick-off; when reached, downloads are stopped and a PARTIAL result is
#      printed: complete NDJSON lines downloaded so far / elapsed seconds).
#
# Deviations from an out-of-the-box reference server, all needed to make it usable at this size:
#  - data are imported with an embedded Python importer (same table/columns/view as upstream
#    data/import.ts, which only reads Synthea Bundles and commits one row at a time);
#  - an index on data(fhir_type) is added (upstream has none; without it every 1000-row chunk of
#    every file is a full-table scan and sort);
#  - no Group membership assignment (system export does not use it); patient_id is taken from
#    subject/patient/beneficiary references, modified_date from meta.lastUpdated or a clinical date.
# Its status endpoint allows 60 requests/minute per client (then blocks for 5 min), so the status is
# polled every 1.1 s: the manifest time has up to ~1 s of polling slack.
# Measured 2026-12-02 (2 cores, Node 20.20.2, load 2-6 from other work): 79,491-resource subset:
# ~5 s to manifest, ~16-18 s to last byte (~4,400-5,000 resources/s). 3,974,407 resources (bench4m):
# import 483 s; manifest 1,333 s (22 min; rows are paged with growing OFFSETs); downloading every 8th
# file (490,203 resources) took 106 s (4,618 resources/s), so the full export is ~2,200 s (~1,800
# resources/s) -- use TIMEOUT for a partial number if that is too long.
set -euo pipefail

SRC="${1:?usage: $0 NDJSON_DIR|SQLITE_DB [WORK_DIR]}"
WORK="${2:-/tmp/fhirhose-bench-smart}"
PORT="${PORT:-18490}"
PARALLEL="${PARALLEL:-2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SMART="${SMART_DIR:-$ROOT/.tools/smart-bulk-data-server}"
MIRROR=/work/.mirror
default_git() { # $1 = owner+name
  if [[ -d "$MIRROR/$1/repo" ]]; then echo "$MIRROR/$1/repo"; else echo "https://github.com/${1/+//}"; fi
}
SMART_GIT="${SMART_GIT:-$(default_git smart-on-fhir+bulk-data-server)}"
FHIR_FILTER_GIT="${FHIR_FILTER_GIT:-$(default_git smart-on-fhir+fhir-filter)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

# ---------------------------------------------------------------------------------------- install
if [[ ! -f "$SMART/package.json" ]]; then
  echo "== fetch reference server from $SMART_GIT"
  mkdir -p "$(dirname "$SMART")"
  git clone -q --no-checkout "$SMART_GIT" "$SMART"
  # database.r4.db (its 100-patient sample DB) is large and not needed: we bring our own.
  git -C "$SMART" checkout -q HEAD -- . ':!database.r4.db'
fi
if [[ ! -f "$SMART/node_modules/sqlite3/build/Release/node_sqlite3.node" ]]; then
  echo "== npm install ($(node --version))"
  # fhir-filter is a GitHub dependency; install it from a git archive so no GitHub access is needed.
  if ! grep -q '"fhir-filter": "file:' "$SMART/package.json"; then
    tmp="$(mktemp -d)"
    git clone -q "$FHIR_FILTER_GIT" "$tmp/ff"
    rev="$(grep -o 'fhir-filter.git#[0-9a-f]*' "$SMART/package-lock.json" | head -1 | cut -d'#' -f2)"
    git -C "$tmp/ff" archive --prefix=package/ -o "$SMART/../fhir-filter.tgz" "${rev:-HEAD}"
    rm -rf "$tmp"
    sed -i 's#"fhir-filter": "github:smart-on-fhir/fhir-filter"#"fhir-filter": "file:../fhir-filter.tgz"#' \
      "$SMART/package.json"
  fi
  # sqlite3's prebuilt binary comes from GitHub; fall back to building it against the local headers.
  nodedir=""
  [[ -f /usr/include/node/node.h ]] && nodedir=/usr
  (cd "$SMART" && npm_config_nodedir="$nodedir" npm install --no-audit --no-fund)
fi

# ---------------------------------------------------------------------------------------- import
write_importer() {
  cat >"$SMART/import-ndjson.py" <<'PY'
"""Import FHIR NDJSON into bulk-data-server's SQLite schema (see scripts/bench-smart-reference.sh)."""
import json, sqlite3, sys, time

TIME_PATHS = ("issued", "effectiveDateTime", "authoredOn", "onsetDateTime", "performedDateTime",
              "recordedDate", "date", "occurrenceDateTime", "created")

def row_for(line):
    res = json.loads(line)
    rtype, rid, patient = res["resourceType"], res["id"], None
    if rtype == "Patient":
        patient = rid
    else:
        for key in ("subject", "patient", "beneficiary"):
            ref = res.get(key)
            if isinstance(ref, dict) and str(ref.get("reference", "")).startswith("Patient/"):
                patient = ref["reference"][8:]
                break
    modified = (res.get("meta") or {}).get("lastUpdated")
    if not modified:
        for p in TIME_PATHS:
            if isinstance(res.get(p), str):
                modified = res[p]
                break
        else:
            period = res.get("period") or res.get("billablePeriod") or {}
            modified = period.get("start") if isinstance(period, dict) else None
    return (rid, patient, rtype, modified or "2000-01-01T00:00:00Z", line)

db = sqlite3.connect(sys.argv[1], isolation_level=None)
for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-262144"):
    db.execute("PRAGMA " + pragma)
db.execute('DROP VIEW IF EXISTS "data_with_org"')
db.execute('DROP TABLE IF EXISTS "data"')
db.execute('''CREATE TABLE "data"("id" Integer NOT NULL PRIMARY KEY AUTOINCREMENT,
    "resource_id" Text UNIQUE ON CONFLICT REPLACE, "patient_id" Text, "fhir_type" Text,
    "modified_date" DateTime, "group_id" Text, "expires_at" DateTime, "resource_json" Text)''')
total, t_all = 0, time.time()
for path in sys.argv[2:]:
    t0, n = time.time(), 0
    db.execute("BEGIN")
    with open(path, encoding="utf-8") as f:
        def rows():
            global n
            for line in f:
                line = line.rstrip("\n")
                if line:
                    n += 1
                    yield row_for(line)
        db.executemany('INSERT INTO "data" (resource_id, patient_id, fhir_type, modified_date,'
                       ' resource_json) VALUES (?, ?, ?, ?, ?)', rows())
    db.execute("COMMIT")
    total += n
    print(f"  {path}: {n} resources in {time.time() - t0:.1f} s", flush=True)
t0 = time.time()
db.execute('CREATE INDEX "data_fhir_type" ON "data" ("fhir_type")')
print(f"  index on fhir_type: {time.time() - t0:.1f} s", flush=True)
db.execute('''CREATE VIEW "data_with_org" AS WITH "subject_orgs" AS (
    SELECT substr(json_extract(resource_json, '$.subject.reference'), 9) AS "subject",
           substr(json_extract(resource_json, '$.serviceProvider.reference'), 14) AS "org"
    FROM data WHERE fhir_type = 'Encounter' GROUP BY "subject", "org")
    SELECT d.*, o.org FROM data d LEFT JOIN subject_orgs o ON (d.patient_id = o.subject)''')
db.close()
dt = time.time() - t_all
print(f"import: {total} resources in {dt:.1f} s = {total / max(dt, 1e-9):.0f} resources/s")
PY
}

if [[ -d "$SRC" ]]; then
  DB="$WORK/smart.db"
  if [[ ! -f "$DB" || -n "${IMPORT:-}" ]]; then
    write_importer
    echo "== import $SRC into $DB (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    rm -f "$DB"
    python3 "$SMART/import-ndjson.py" "$DB.tmp" "$SRC"/*.ndjson
    mv "$DB.tmp" "$DB"
  fi
else
  DB="$(cd "$(dirname "$SRC")" && pwd)/$(basename "$SRC")"
fi
[[ -f "$DB" ]] || { echo "no database at $DB" >&2; exit 1; }
# The server opens ${__dirname}/database.r4.db; point it at ours.
ln -sfn "$DB" "$SMART/database.r4.db"

# ---------------------------------------------------------------------------------------- serve
echo "== serve + system export (node $(node --version), load: $(cut -d' ' -f1-3 /proc/loadavg))"
BASE="http://127.0.0.1:$PORT"
rm -rf "$SMART/jobs"/*.json 2>/dev/null || true
(cd "$SMART" && NODE_ENV=production PORT="$PORT" BASE_URL="$BASE" \
  exec node node_modules/ts-node/dist/bin.js --transpile-only .) >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -fsS "$BASE/fhir/metadata" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { echo "server died:" >&2; cat "$WORK/server.log" >&2; exit 1; }
  sleep 0.1
done
rss_before=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")

# Optional simulation settings go base64url-encoded into the path (here: resources per file).
FHIR="$BASE/fhir"
if [[ -n "${PAGE:-}" ]]; then
  FHIR="$BASE/$(printf '{"page":%d}' "$PAGE" | base64 -w0 | tr '+/' '-_' | tr -d '=')/fhir"
fi

t0=$(date +%s.%N)
status_url=$(curl -fsS -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \
  "$FHIR/\$export" | awk -F': ' 'tolower($1)=="content-location" {gsub(/\r/,"",$2); print $2}')
[[ -n "$status_url" ]] || { echo "kick-off failed" >&2; exit 1; }
while :; do
  code=$(curl -sS -o "$WORK/manifest.json" -w '%{http_code}' "$status_url")
  [[ "$code" == 200 ]] && break
  [[ "$code" == 202 ]] || { echo "status $code: $(cat "$WORK/manifest.json")" >&2; exit 1; }
  sleep 1.1 # rate limit: 60 status requests/minute, then blocked for 5 minutes
done
t_manifest=$(date +%s.%N)

OUT="$WORK/out"
rm -rf "$OUT"
mkdir -p "$OUT"
nfiles=$(jq '.output | length' "$WORK/manifest.json")
# The same client as scripts/bench-export-e2e.sh uses for Fhirhose.
STATUS_URL="$status_url" BASE_URL="$FHIR" FHIRHOSE_BIN="${FHIRHOSE_BIN:-}" \
  "$ROOT/scripts/bench/download.sh" "$WORK/manifest.json" "$OUT" "$PARALLEL" &
DL=$!
partial=""
while kill -0 "$DL" 2>/dev/null; do
  if [[ -n "${TIMEOUT:-}" ]] && (( $(echo "$(date +%s.%N) - $t0 > $TIMEOUT" | bc) )); then
    partial=1
    pkill -P "$DL" 2>/dev/null || true # the jq and curl of this download only
    kill "$DL" 2>/dev/null || true
    break
  fi
  sleep 0.05
done
if [[ -z "$partial" ]] && ! wait "$DL"; then
  echo "a download failed" >&2
  exit 1
fi
t1=$(date +%s.%N)
rss_peak=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

manifest_count=$(jq '[.output[].count] | add // 0' "$WORK/manifest.json")
exported=$(find "$OUT" -name '*.ndjson' -exec cat {} + </dev/null | wc -l)
bytes=$(du -sb "$OUT" | cut -f1)
secs=$(echo "$t1 - $t0" | bc)
msecs=$(echo "$t_manifest - $t0" | bc)
if [[ -n "$partial" ]]; then
  echo "PARTIAL: TIMEOUT=$TIMEOUT s reached; $(find "$OUT" -type f | wc -l) of $nfiles files started," \
    "counting complete lines only"
elif [[ "$exported" != "$manifest_count" ]]; then
  echo "WARNING: manifest lists $manifest_count resources but $exported lines were downloaded"
fi
echo "manifest: $nfiles files, $manifest_count resources, $msecs s after kick-off (counting only:" \
  "the reference server generates the NDJSON at download time)"
echo "export: $exported resources, $((bytes / 1048576)) MiB NDJSON downloaded ($PARALLEL parallel)" \
  "in $secs s from kick-off to last byte = $(echo "$exported / $secs" | bc) resources/s"
echo "server VmHWM: before export $((rss_before / 1024)) MiB, after export $((rss_peak / 1024)) MiB"
echo "load average after: $load_after"
[[ -n "${KEEP:-}" ]] || rm -rf "$OUT"
