#!/usr/bin/env bash
# Checks that scripts/azurite.sh, scripts/s3.sh and scripts/registry.sh repair a stale instance
# instead of reusing it (the CI failure of a reused Azurite whose clone, and so its data folder,
# had been deleted: every blob PUT answered 500), reuse a healthy one quickly, and refuse a
# foreign program on their port without killing it.
#
# For each service it builds throwaway checkouts under .tools/stale-test (the three scripts and
# scripts/service-check.py, with hard-linked copies of this checkout's installed .tools), on free
# ports chosen here (FHIRHOSE_{AZURITE,S3,REGISTRY}_PORT), so the suite's own instances on
# 10000/5000/5001 are not touched. Cases, each ending with "a working instance answers (the
# functional probe passes) and the stale process is gone":
#   data-gone      an instance started from checkout "old" loses its data folder while it runs
#                  (moto has none: its virtualenv is deleted instead); the script of checkout
#                  "new" is run
#   checkout-gone  the whole "old" checkout is deleted while its instance runs (the CI case)
#   reuse          the script is run again: same pid, well under a second or two
#   race           two checkouts' scripts start it on a free port at the same moment: both
#                  succeed and one instance runs
#   foreign        a plain `python3 -m http.server` holds the port: the script fails naming the
#                  port and the process, which is still running afterwards
# Needs the three services installed once in this checkout (run ./scripts/azurite.sh,
# ./scripts/s3.sh and ./scripts/registry.sh) and a filesystem allowing hard links in .tools.
# Not part of ./scripts/test.sh. Usage: ./scripts/tests/stale-services.sh [azurite|s3|registry]...
# Prints one line per check and ends with "stale-services: N passed, M failed"; stops every
# process it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=$ROOT/.tools/stale-test
KINDS=("$@")
[[ ${#KINDS[@]} -gt 0 ]] || KINDS=(azurite s3 registry)

passed=0
failed=0
started=() # pids to stop on exit
ok() { echo "ok    $*"; passed=$((passed + 1)); }
bad() { echo "FAIL  $*"; failed=$((failed + 1)); }

cleanup() {
  local pid
  for pid in "${started[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
  done
  sleep 0.5
  for pid in "${started[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# tools_of KIND: the installed parts copied into a throwaway checkout; var_of KIND: the port variable.
tools_of() {
  case $1 in
    azurite) echo node_modules ;;
    s3) echo venv ;;
    registry) echo root ;;
  esac
}
dir_of() {
  case $1 in
    azurite) echo .tools/azurite ;;
    s3) echo .tools/moto ;;
    registry) echo .tools/registry ;;
  esac
}
var_of() {
  case $1 in
    azurite) echo FHIRHOSE_AZURITE_PORT ;;
    s3) echo FHIRHOSE_S3_PORT ;;
    registry) echo FHIRHOSE_REGISTRY_PORT ;;
  esac
}

# checkout KIND NAME: a throwaway checkout $WORK/NAME able to run KIND's script without installing.
checkout() {
  local kind=$1 dir
  dir=$(dir_of "$kind")
  local co=$WORK/$2
  rm -rf "$co"
  mkdir -p "$co/scripts" "$co/$dir"
  cp scripts/azurite.sh scripts/s3.sh scripts/registry.sh scripts/service-check.py "$co/scripts/"
  cp -al "$ROOT/$dir/$(tools_of "$kind")" "$co/$dir/"
  echo "$co"
}

# run_script KIND CHECKOUT PORT: runs the checkout's script; its output goes to $WORK/out.
run_script() {
  local script=$1.sh
  env "$(var_of "$1")=$3" "$2/scripts/$script" >"$WORK/out" 2>&1
}

owner() { python3 scripts/service-check.py "$1" "$2" owner | cut -f1; }
probe() { python3 scripts/service-check.py "$1" "$2" probe 2>>"$WORK/out"; }
alive() { [[ -e /proc/$1 ]] && ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2>/dev/null; }

# start_old KIND NAME PORT: an instance from a throwaway checkout; prints its pid (the caller
# adds it to $started: this runs in a subshell).
start_old() {
  local co pid
  co=$(checkout "$1" "$2")
  run_script "$1" "$co" "$3" || { cat "$WORK/out" >&2; return 1; }
  owner "$1" "$3"
}

# repaired KIND CASE PORT OLD_PID: runs checkout "new"'s script and checks the result.
repaired() {
  local kind=$1 case=$2 port=$3 old=$4 pid
  if ! run_script "$kind" "$WORK/new" "$port"; then
    bad "$kind $case: the script failed: $(tr '\n' ' ' <"$WORK/out")"
    return
  fi
  pid=$(owner "$kind" "$port" || true)
  started+=("$pid")
  if alive "$old"; then
    bad "$kind $case: the stale pid $old still runs"
  elif [[ -z "$pid" || "$pid" == "$old" ]]; then
    bad "$kind $case: no new listener on $port"
  elif ! grep -q "$WORK/new/" "/proc/$pid/cmdline"; then
    bad "$kind $case: the listener (pid $pid) is not from checkout new"
  elif ! probe "$kind" "$port"; then
    bad "$kind $case: the new instance fails the probe: $(tr '\n' ' ' <"$WORK/out")"
  else
    ok "$kind $case: stale pid $old stopped, pid $pid from checkout new passes the probe ($(grep -o 'stopping.*: .*' "$WORK/out" | sed 's/.*): //'))"
  fi
}

for kind in "${KINDS[@]}"; do
  dir=$(dir_of "$kind")
  if [[ ! -e "$ROOT/$dir/$(tools_of "$kind")" ]]; then
    bad "$kind: not installed in this checkout ($dir/$(tools_of "$kind")); run ./scripts/$kind.sh once"
    continue
  fi
  port=$(free_port)
  mkdir -p "$WORK"
  checkout "$kind" new >/dev/null

  # data-gone: the old instance's data folder (moto: its virtualenv) is deleted while it runs.
  old=$(start_old "$kind" old "$port")
  started+=("$old")
  case $kind in
    s3) rm -rf "$WORK/old/$dir/venv" ;;
    *) rm -rf "$WORK/old/$dir/data" ;;
  esac
  if [[ $kind == azurite ]]; then
    # The CI failure itself: a blob PUT into the reused instance answers 500.
    if probe "$kind" "$port"; then
      bad "$kind data-gone: the broken instance still passes the probe"
    else
      ok "$kind data-gone: the broken instance fails the probe ($(tail -n 1 "$WORK/out" | cut -c1-100))"
    fi
  fi
  repaired "$kind" data-gone "$port" "$old"

  # checkout-gone: the old checkout is deleted while its instance runs (stop "new" first).
  python3 scripts/service-check.py "$kind" "$port" stop >/dev/null
  old=$(start_old "$kind" old "$port")
  started+=("$old")
  rm -rf "$WORK/old"
  repaired "$kind" checkout-gone "$port" "$old"

  # reuse: a healthy instance is kept, quickly.
  pid=$(owner "$kind" "$port")
  t0=$(date +%s%N)
  if run_script "$kind" "$WORK/new" "$port"; then
    ms=$((($(date +%s%N) - t0) / 1000000))
    if [[ "$(owner "$kind" "$port")" != "$pid" ]]; then
      bad "$kind reuse: the healthy instance (pid $pid) was replaced"
    elif ((ms > 2000)); then
      bad "$kind reuse: took $ms ms"
    else
      ok "$kind reuse: pid $pid kept, $ms ms"
    fi
  else
    bad "$kind reuse: the script failed: $(tr '\n' ' ' <"$WORK/out")"
  fi

  # race: two checkouts start the service on a free port at the same moment: both succeed, one
  # instance serves (the scripts' lock per port), and every pid a script reports is that one's
  # (without the lock the loser starts its own, which cannot bind and dies, and still reports
  # it: the other's instance answered its probe).
  python3 scripts/service-check.py "$kind" "$port" stop >/dev/null
  checkout "$kind" twin >/dev/null
  env "$(var_of "$kind")=$port" "$WORK/new/scripts/$kind.sh" >"$WORK/out-a" 2>&1 &
  a=$!
  env "$(var_of "$kind")=$port" "$WORK/twin/scripts/$kind.sh" >"$WORK/out-b" 2>&1 &
  b=$!
  rc_a=0 rc_b=0
  wait "$a" || rc_a=$?
  wait "$b" || rc_b=$?
  pid=$(owner "$kind" "$port" || true)
  started+=("$pid")
  pids=$(cat "$WORK/new/$dir/"*.pid "$WORK/twin/$dir/"*.pid 2>/dev/null | sort -u | tr '\n' ' ' || true)
  orphans=""
  for p in $pids; do
    if [[ "$p" != "$pid" ]] && alive "$p"; then orphans+="$p "; started+=("$p"); fi
  done
  if [[ $rc_a != 0 || $rc_b != 0 ]]; then
    bad "$kind race: exit codes $rc_a and $rc_b: $(tr '\n' ' ' <"$WORK/out-a") | $(tr '\n' ' ' <"$WORK/out-b")"
  elif [[ -z "$pid" ]] || ! probe "$kind" "$port"; then
    bad "$kind race: no working instance on $port"
  elif [[ -n "$orphans" ]]; then
    bad "$kind race: a second instance runs beside pid $pid: $orphans"
  elif reported=$(grep -ho '(pid [0-9]*)' "$WORK/out-a" "$WORK/out-b" | tr -dc '0-9\n' | sort -u | tr '\n' ' ') &&
    [[ "$reported" != "$pid " ]]; then
    bad "$kind race: the scripts reported pids '$reported', the instance is $pid"
  else
    ok "$kind race: both scripts succeeded, one instance (pid $pid)"
  fi
  python3 scripts/service-check.py "$kind" "$port" stop >/dev/null

  # foreign: something else on the port is named and left alone.
  python3 -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1 &
  foreign=$!
  started+=("$foreign")
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  if run_script "$kind" "$WORK/new" "$port"; then
    bad "$kind foreign: the script succeeded with http.server on $port"
  elif ! alive "$foreign"; then
    bad "$kind foreign: the foreign process $foreign was stopped"
  elif ! grep -q "127.0.0.1:$port is held by pid $foreign" "$WORK/out"; then
    bad "$kind foreign: the message does not name the port and pid: $(tr '\n' ' ' <"$WORK/out")"
  else
    ok "$kind foreign: refused, http.server pid $foreign left running ($(cut -c1-90 "$WORK/out" | head -n 1)…)"
  fi
  kill "$foreign" 2>/dev/null || true
  wait "$foreign" 2>/dev/null || true
done

echo "stale-services: $passed passed, $failed failed"
[[ $failed == 0 ]]
