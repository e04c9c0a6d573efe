#!/usr/bin/env bash
# Database round trips per request: `sendto` calls of `fhirhose serve` to the PostgreSQL server,
# counted with strace attached to the running server, per REST search, `_history`, PUT,
# transaction Bundle of 10 entries and export file (docs/performance.md, "Prepared once per
# connection").
#
#   scripts/pg-round-trips.sh BINARY POSTGRES_URL [N]
#
# BINARY: a built `fhirhose`; POSTGRES_URL: a cluster (scripts/postgres.sh start DIR prints one),
# where a database of its own is created and dropped. N: requests per measured operation
# (default 50). Each operation runs 3 times unmeasured first (the steady state of a warm
# server), then N times under `strace -f -yy -e trace=sendto -p PID`; the printed figure is the
# calls to the database's port divided by N. Needs curl, psql and strace (ptrace permitted).
set -euo pipefail

BIN=$1
BASE=$2
N=${3:-50}
PGPORT=$(sed -E 's#.*:([0-9]+)/[^/]*$#\1#' <<<"$BASE")
DB=fh_rt_$$
psql -q "$BASE" -c "CREATE DATABASE $DB"
URL=${BASE%/*}/$DB
WORK=$(mktemp -d)
PORT=$((20000 + $$ % 20000))
H=http://127.0.0.1:$PORT
"$BIN" serve --data-dir "$WORK/data" --database "$URL" --listen "127.0.0.1:$PORT" \
  --export-file-resources 1 --export-workers 1 >"$WORK/server.log" 2>&1 &
PID=$!
cleanup() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  psql -q "$BASE" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 100); do
  curl -sf -o /dev/null "$H/metadata" && break
  sleep 0.2
done

J='content-type: application/fhir+json'
# 1 Patient with 200 Observations (codes C0..C9), 300 more Patients for the export.
obs() { printf '{"request":{"method":"POST","url":"Observation"},"resource":{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"C%d"}]},"subject":{"reference":"Patient/p1"},"valueQuantity":{"value":%d}}}' $(($1 % 10)) "$1"; }
pat() { printf '{"request":{"method":"PUT","url":"Patient/%s"},"resource":{"resourceType":"Patient","id":"%s","active":true}}' "$1" "$1"; }
bundle() { # TYPE ENTRIES...
  local t=$1 sep='' e
  shift
  printf '{"resourceType":"Bundle","type":"%s","entry":[' "$t"
  for e in "$@"; do printf '%s%s' "$sep" "$e"; sep=,; done
  printf ']}'
}
entries=("$(pat p1)")
for i in $(seq 200); do entries+=("$(obs "$i")"); done
for i in $(seq 300); do entries+=("$(pat "x$i")"); done
bundle batch "${entries[@]}" >"$WORK/load.json"
curl -sf -o /dev/null -X POST -H "$J" --data-binary @"$WORK/load.json" "$H/"
tx=()
for i in $(seq 10); do tx+=("$(obs "$i")"); done
bundle transaction "${tx[@]}" >"$WORK/tx.json"

search() { curl -sf -o /dev/null "$H/Observation?code=http://loinc.org%7CC$((RANDOM % 10))&_count=10"; }
history() { curl -sf -o /dev/null "$H/Patient/p1/_history"; }
put() { curl -sf -o /dev/null -X PUT -H "$J" -d "{\"resourceType\":\"Patient\",\"id\":\"p1\",\"active\":$(((RANDOM % 2)) && echo true || echo false)}" "$H/Patient/p1"; }
transaction() { curl -sf -o /dev/null -X POST -H "$J" --data-binary @"$WORK/tx.json" "$H/"; }

# Runs "$@" under strace; prints the server's sendto calls to the database.
traced() {
  strace -f -yy -e trace=sendto -o "$WORK/trace" -p "$PID" 2>/dev/null &
  local st=$!
  sleep 1.5
  "$@"
  sleep 0.5
  kill -INT "$st"
  wait "$st" 2>/dev/null || true
  grep -c -- "->127.0.0.1:$PGPORT\]" "$WORK/trace" || true
}
repeat() { local i; for i in $(seq "$1"); do "$2"; done; }
idle() { sleep 2; }

printf 'idle window (no request): %s sendto\n' "$(traced idle)"
for op in search history put transaction; do
  repeat 3 "$op"
  total=$(traced repeat "$N" "$op")
  printf '%-12s %4d requests: %6d sendto, %6.1f per request\n' "$op" "$N" "$total" \
    "$(bc -l <<<"$total / $N")"
done

export_all() {
  local loc
  loc=$(curl -sf -D - -o /dev/null -H 'Accept: application/fhir+json' -H 'Prefer: respond-async' \
    "$H/\$export?_type=Patient" | tr -d '\r' | sed -n 's/^[Cc]ontent-[Ll]ocation: //p')
  until [[ $(curl -s -o "$WORK/manifest.json" -w '%{http_code}' "$loc") == 200 ]]; do sleep 1; done
}
total=$(traced export_all)
files=$(grep -o '"url"' "$WORK/manifest.json" | wc -l)
printf 'export       %4d files:    %6d sendto, %6.1f per file (kick-off and status polls included)\n' \
  "$files" "$total" "$(bc -l <<<"$total / $files")"
