#!/usr/bin/env bash
# Description: every daemon's systemd unit (daemons/*/NAME@.service), checked on this
# machine without running systemd: `systemd-analyze verify` accepts it as installed
# (daemons/install/install.sh's copy, ExecStart= at the installed program); it carries each
# hardening option of the table below; `systemd-analyze security` rates it at most
# MAX_EXPOSURE (the score is printed: before hardening these units scored 8.9 and 9.1);
# and daemons/install/install.sh installs the program its ExecStart= names. Under systemd in a
# booted guest the same units are started, used, killed and restarted by
# tests/ops/ops_guest_test.sh (stage units).
# usage: unit_test.sh [NAME-PART...]   (checks whose names contain one; see tests/lib)
set -uo pipefail
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

# The units, one a line: the daemon's Bazel package and name. A new daemon's unit is one
# more line here (and its unit and program in this test's data in BUILD.bazel).
UNITS=(
  "daemons/memory lego-memd"
  "daemons/monitor lego-mond"
  "daemons/storage lego-stord"
)
# What every unit must say; a unit that needs an exception says why in its comments and
# is listed in EXCEPT ("NAME OPTION").
HARDENING=(
  "NoNewPrivileges=true" "ProtectSystem=strict" "ProtectHome=true" "PrivateTmp=true"
  "CapabilityBoundingSet=" "ProtectKernelTunables=true" "ProtectKernelModules=true"
  "ProtectKernelLogs=true" "ProtectControlGroups=true" "ProtectClock=true"
  "ProtectHostname=true" "RestrictNamespaces=true" "RestrictRealtime=true"
  "RestrictSUIDSGID=true" "LockPersonality=true" "MemoryDenyWriteExecute=true"
  "SystemCallArchitectures=native" "SystemCallFilter=@system-service"
  "RestrictAddressFamilies=" "Restart=on-failure"
)
EXCEPT=(
  "lego-stord RestrictSUIDSGID=true"  # it would make openat2 fail (see the unit)
)
MAX_EXPOSURE=${MAX_EXPOSURE:-3.0}

if [ -n "${TEST_SRCDIR:-}" ]; then
  root=$TEST_SRCDIR/${TEST_WORKSPACE:-lego}
else
  root=$(cd "$(dirname "$0")/../.." && pwd)
fi
bin=$root
[ -x "$bin/daemons/memory/lego-memd" ] || bin=$root/bazel-bin
tmp=${TEST_TMPDIR:-${TMPDIR:-/tmp}}/unit_test.$$
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

# Installed as daemons/install/install.sh installs them, under a staging tree whose prefix is the
# tree itself, so that systemd-analyze finds ExecStart='s program.
install_all() {
  "$root/daemons/install/install.sh" --prefix "$tmp/prefix" --bin "$bin"
}

for entry in "${UNITS[@]}"; do
  read -r pkg name <<<"$entry"
  unit=$root/$pkg/$name@.service
  installed=$tmp/prefix/lib/systemd/system/$name@.service

  verifies() {
    need install_all || return 1
    [ -f "$installed" ] || { echo "daemons/install/install.sh did not install $name@.service"; return 1; }
    grep -q "^ExecStart=$tmp/prefix/bin/$name " "$installed" || { grep ExecStart "$installed"; return 1; }
    [ -x "$tmp/prefix/bin/$name" ] || { echo "daemons/install/install.sh did not install bin/$name"; return 1; }
    # An instance, as systemctl would load it (%i = 2).
    cp "$installed" "$tmp/$name@2.service"
    local out
    out=$(systemd-analyze verify "$tmp/$name@2.service" 2>&1)
    echo "$out"
    [ -z "$out" ]
  }
  check "$name: systemd-analyze verify accepts the installed unit; ExecStart= is the installed program" verifies

  hardened() {
    local opt bad=0 key
    for opt in "${HARDENING[@]}"; do
      [[ " ${EXCEPT[*]-} " == *" $name $opt "* ]] && continue
      key=${opt%%=*}
      if [[ $opt == *= ]]; then
        grep -q "^$opt" "$unit" || { echo "$name@.service lacks $key="; bad=1; }
      else
        grep -qx "$opt" "$unit" || { echo "$name@.service lacks $opt"; bad=1; }
      fi
    done
    return $bad
  }
  check "$name: the unit carries every hardening option of the table" hardened

  exposure() {
    need install_all || return 1
    cp "$installed" "$tmp/$name@2.service"
    local out score
    out=$(systemd-analyze security --offline=yes --no-pager "$tmp/$name@2.service" 2>&1)
    score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) .*/\1/p' <<<"$out")
    [ -n "$score" ] || { echo "$out" | tail -n 5; return 1; }
    note "$name@.service: systemd-analyze security exposure $score (at most $MAX_EXPOSURE)"
    echo "$out" | grep '✗' | tail -n 20
    awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s <= m) }'
  }
  check "$name: systemd-analyze security rates the unit at most MAX_EXPOSURE" exposure
done

check_summary
