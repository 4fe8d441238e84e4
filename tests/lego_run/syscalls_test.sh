#!/usr/bin/env bash
# lego-run --syscalls (runtime/launcher/syscalls.h): per-call counts like strace -c.
# Guards: a program making 1000 getppid() is shown with exactly 1000 getppid calls and
# its 7 failed close() among the errors; its descendants are counted too (a shell running
# two of them: 300 + 200); the table is sorted by time; PROGRAM's exit status passes
# through; and without the flag nothing traces the program (TracerPid 0) and no table is
# printed. Needs root (lego-run's private memory node in a network namespace).
set -u
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

root=$(lego_bin_root)
LEGO_RUN=$root/runtime/lego-run
LOOP=$root/tests/lego_run/getppid_loop
tmp=${TEST_TMPDIR:-/tmp}/syscalls-test.$$
mkdir -p "$tmp"

# calls_of NAME FILE: "calls errors" of syscall NAME in the table in FILE.
calls_of() {
  awk -v n="$1" '$NF == n { if (NF == 6) print $4, $5; else print $4, 0 }' "$2"
}

exact_count() {
  "$LEGO_RUN" --syscalls -- "$LOOP" 1000 >"$tmp/out" 2>"$tmp/err" || { cat "$tmp/err"; return 1; }
  cat "$tmp/err"
  [ "$(calls_of getppid "$tmp/err")" = "1000 0" ] || return 1
  # close: the program's 7 EBADF, and whatever the runtime closed besides.
  local c e
  read -r c e <<<"$(calls_of close "$tmp/err")"
  [ "$e" -ge 7 ] && [ "$c" -ge 7 ] || return 1
  grep -q "^100.00 .* total$" "$tmp/err"
}

sorted_by_time() {
  "$LEGO_RUN" --syscalls -- "$LOOP" 1000 >/dev/null 2>"$tmp/err" || return 1
  # The seconds column of the rows between the rules never increases.
  awk '/^------/ {r++; next} r == 1 {print $2}' "$tmp/err" | sort -c -r -g
}

descendants() {
  # The shell's own getppid() calls (dash makes one) are counted too: measured alone.
  local base
  "$LEGO_RUN" --syscalls -- /bin/sh -c "true" >/dev/null 2>"$tmp/base" || return 1
  base=$(calls_of getppid "$tmp/base" | awk '{print $1 + 0}')
  "$LEGO_RUN" --syscalls -- /bin/sh -c "'$LOOP' 300; '$LOOP' 200" >"$tmp/out" 2>"$tmp/err" ||
    { cat "$tmp/err"; return 1; }
  grep getppid "$tmp/err"
  echo "the shell alone: $base"
  [ "$(calls_of getppid "$tmp/err")" = "$((500 + base)) 0" ]
}

exit_status() {
  "$LEGO_RUN" --syscalls -- "$LOOP" 10 3 >/dev/null 2>"$tmp/err"
  local rc=$?
  echo "exit status $rc"
  [ $rc -eq 3 ] && grep -q " getppid$" "$tmp/err"
}

# The program reads its own TracerPid while running.
tracer_pid() {
  "$LEGO_RUN" "$@" -- /bin/sh -c 'grep TracerPid /proc/self/status' 2>"$tmp/err"
}
off_costs_nothing() {
  local off on
  off=$(tracer_pid) || return 1
  on=$(tracer_pid --syscalls) || return 1
  echo "without: $off; with: $on"
  [ "$(echo "$off" | awk '{print $2}')" = 0 ] || return 1
  [ "$(echo "$on" | awk '{print $2}')" != 0 ] || return 1
  "$LEGO_RUN" -- "$LOOP" 10 >/dev/null 2>"$tmp/err" || return 1
  ! grep -q "syscall$" "$tmp/err"
}

check "1000 getppid() are counted as 1000, and close()'s errors" exact_count
check "the table is sorted by time" sorted_by_time
check "descendants are counted too" descendants
check "PROGRAM's exit status passes through" exit_status
check "without --syscalls nothing traces the program" off_costs_nothing
rm -rf "$tmp"
check_summary
