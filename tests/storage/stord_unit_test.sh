#!/usr/bin/env bash
# daemons/storage/lego-stord@.service, the systemd unit for lego-stord.
# Guards: systemd-analyze accepts the unit; its ExecStart line, expanded as systemd would
# (%i, the export and options from /etc/default/lego-stord), starts a lego-stord that
# serves (answers --status) and stops cleanly on SIGTERM.
# usage: stord_unit_test.sh [NAME-PART...]   (checks whose names contain one; see tests/lib)
set -uo pipefail
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

# Under Bazel the runfiles; run by hand (no TEST_SRCDIR), this checkout: never a /lego
# that happens to exist on the machine.
root=${TEST_SRCDIR:+$TEST_SRCDIR/lego}
[ -n "$root" ] && [ -d "$root" ] || root=$(cd "$(dirname "$0")/../.." && pwd)
STORD=$root/daemons/storage/lego-stord
[ -x "$STORD" ] || STORD=$root/bazel-bin/daemons/storage/lego-stord
UNIT=$root/daemons/storage/lego-stord@.service
tmp=${TEST_TMPDIR:-$(mktemp -d)}
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null' EXIT

unit_verifies() {
  # systemd-analyze wants the binary where ExecStart says: point it at the built one.
  sed "s|/usr/local/bin/lego-stord|$STORD|" "$UNIT" >"$tmp/lego-stord@.service"
  local out
  out=$(systemd-analyze verify "$tmp/lego-stord@.service" 2>&1)
  echo "$out"
  [ -z "$out" ]
}
check "systemd-analyze verify accepts the unit" unit_verifies

one_exec_start() { [ "$(sed -n 's/^ExecStart=//p' "$UNIT" | wc -l)" -eq 1 ]; }
check "the unit has one ExecStart line" one_exec_start

# Set-up: what systemd would run for lego-stord@3 with LEGO_STORD_EXPORT and
# LEGO_STORD_OPTS set, started.
start_from_unit() {
  local port=$((20000 + $$ % 20000))
  cluster_toml "$tmp/cluster.toml" "key = \"$(random_key)\"" -- \
    "1 processor 127.0.0.1 $port" "3 storage 127.0.0.1 $((port + 1))"
  mkdir -p "$tmp/export"
  echo unit >"$tmp/export/hello"
  local cmd
  cmd=$(sed -n 's/^ExecStart=//p' "$UNIT")
  cmd=${cmd//\/usr\/local\/bin\/lego-stord/$STORD}
  cmd=${cmd//\/etc\/lego\/cluster.toml/$tmp/cluster.toml}
  cmd=${cmd//%i/3}
  cmd=${cmd//\$\{LEGO_STORD_EXPORT\}/$tmp/export}
  cmd=${cmd//\$LEGO_STORD_OPTS/--lease-ms 30000 --ready-fd 3}
  echo "running: $cmd"
  rm -f "$tmp/ready"
  eval "exec $cmd" 3>"$tmp/ready" 2>"$tmp/stord.log" &
  pid=$!
  wait_ready "$tmp/ready" "$pid" || { cat "$tmp/stord.log"; return 1; }
}

check "lego-stord started from the unit's command line is ready" need start_from_unit

serves_with_unit_options() {
  need start_from_unit || return 1
  local status
  status=$("$STORD" --status --config "$tmp/cluster.toml" --node 3 2>&1)
  echo "$status"
  grep -q "export $tmp/export, lease 30000 ms" <<<"$status"
}
check "lego-stord from the unit serves the export with the unit's options" \
  serves_with_unit_options

stops_on_sigterm() {
  need start_from_unit || return 1
  kill -TERM "$pid"
  wait "$pid"
  local rc=$?
  pid=""
  cat "$tmp/stord.log"
  [ "$rc" -eq 0 ] && grep -q "node 3 stopping" "$tmp/stord.log"
}
check "lego-stord from the unit stops cleanly on SIGTERM" stops_on_sigterm

check_summary
