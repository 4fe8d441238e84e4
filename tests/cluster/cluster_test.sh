#!/usr/bin/env bash
# End to end: the cluster (issue 13). lego-run's embedded cluster -- N lego-memd and a
# lego-mond, each in its own network namespace on one bridge, the program on the host --
# with small memory nodes, a tiny ExCache and short timings.
# Guards: a heap larger than any one memory node (threads, and fork); a memory node
# SIGKILLed mid-run with replicas 2 disturbs neither the integrity program nor python3 nor
# sqlite3 (every word right, exit 0, the runtime's counters show the loss and the
# re-replication); a second node killed after the re-replication still loses nothing; with
# replicas 1 the loss is exit 69 naming the node; the monitor killed mid-run does not disturb
# the program, and a restarted monitor shows the same placements; a memory node started later
# (absent from the program's cluster file) receives new placements; the whole cluster full
# makes malloc fail cleanly (python's MemoryError) with every daemon still up; a memory node
# with the wrong key, or with the id of a live one, is refused with a clear message.
# usage: cluster_test.sh [NAME-PART...]   (tests/lib/check.sh; LEGO_TEST_FILTER too)
set -uo pipefail
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

root=$(lego_bin_root)
LEGO_RUN=$root/runtime/lego-run
MEMD=$root/daemons/memory/lego-memd
MOND=$root/daemons/monitor/lego-mond
INTEGRITY=$root/tests/lego_run/lego_integrity
FORK_INTEGRITY=$root/tests/lego_run/lego_fork_integrity
PYTHON=/usr/bin/python3 # Debian's, whatever PATH holds
HERE=$root/tests/lego_run
[ -f "$HERE/dict_list.py" ] || HERE=$(cd "$(dirname "$0")/../lego_run" && pwd)
tmp=${TEST_TMPDIR:-$(mktemp -d)}
export LEGO_MEMD=$MEMD LEGO_MOND=$MOND

# Daemons a check started by hand, killed at exit whatever was selected.
extra_pids=""
cleanup() {
  for p in $extra_pids; do kill -KILL "$p" 2>/dev/null; done
}
trap cleanup EXIT

integrity_ok() { grep -q "^integrity ok" "$1"; }
# stat NAME FILE: the value of counter NAME in a --stats report.
stat() { awk -v k="$1" '$1 == k { print $2; exit }' "$2"; }

# start_run NAME LEGO-RUN-ARGS...: lego-run in the background, its output in $tmp/NAME.*;
# $runner is its pid, $run_dir its run directory once the cluster is up.
start_run() {
  local name=$1
  shift
  "$LEGO_RUN" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
  runner=$!
  run_dir=/tmp/lego-run-$runner
  wait_until 20 test -s "$run_dir/cluster.toml" || return 1
}
# memd_pids: the run's lego-memd, in node order (lego-run starts them in order).
memd_pids() { pgrep -P "$runner" -x lego-memd | sort -n; }
mond_pid() { pgrep -P "$runner" -x lego-mond; }
# kill_memd INDEX: SIGKILLs the run's INDEX-th lego-memd (1-based).
kill_memd() {
  local p
  p=$(memd_pids | sed -n "${1}p")
  [ -n "$p" ] || {
    echo "no lego-memd number $1 under lego-run $runner"
    return 1
  }
  kill -KILL "$p"
}
finish_run() {
  wait "$runner"
  run_rc=$?
  echo "exit status $run_rc"
  tail -n 4 "$tmp/$1.out"
  grep -E '^  (nodes_lost|failovers|vregions_rereplicated|bytes_copied|memory_nodes_used)' \
    "$tmp/$1.err" | while read -r l; do note "$l"; done
  grep -E 'lego' "$tmp/$1.err" | grep -v 'ExCache stats' | head -5
}
# mond_status: lego-mond --status of the run's monitor (its namespace, its cluster file).
mond_status() {
  ip netns exec "lego-run-$runner-mon" "$MOND" --config "$run_dir/cluster.toml" --node 9 --status
}

# 1. 1P-3M + monitor: a heap larger than any one memory node (72 MiB of words + 36 MiB of
#    versions over 96 MiB nodes, two copies each: 9 vRegions' room), 8 MiB ExCache.
big_heap() {
  "$LEGO_RUN" --memory-nodes 3 --replicas 2 --memory-capacity 96M --excache 8M --stats \
    -- "$INTEGRITY" 72 4 100000 >"$tmp/big.out" 2>"$tmp/big.err"
  local rc=$?
  cat "$tmp/big.out"
  grep -E '^  memory_nodes_used' "$tmp/big.err"
  [ "$rc" -eq 0 ] && integrity_ok "$tmp/big.out" &&
    [ "$(stat memory_nodes_used "$tmp/big.err")" -eq 3 ]
}
check "1P-3M+monitor: integrity over a heap larger than any one memory node" big_heap
# A fork's snapshot is a copy on every node (kFork): the nodes need room for it too.
big_fork() {
  "$LEGO_RUN" --memory-nodes 3 --replicas 2 --memory-capacity 256M --excache 8M \
    -- "$FORK_INTEGRITY" 40 3 >"$tmp/bigfork.out" 2>&1
  local rc=$?
  tail -3 "$tmp/bigfork.out"
  [ "$rc" -eq 0 ] && integrity_ok "$tmp/bigfork.out"
}
check "1P-3M+monitor: fork integrity over three memory nodes, two copies" big_fork

# 2. A memory node SIGKILLed mid-run, replicas 2: the program does not notice. Which of the
#    three goes is drawn from the pid: any one must do.
kill_one() { # kill_one NAME SECONDS PROGRAM...
  local name=$1 after=$2
  shift 2
  start_run "$name" --memory-nodes 3 --replicas 2 --memory-capacity 256M --excache 8M \
    --stats -- "$@" || return 1
  sleep "$after"
  kill_memd $(($$ % 3 + 1)) || return 1
  finish_run "$name"
  [ "$run_rc" -eq 0 ] && [ "$(stat nodes_lost "$tmp/$name.err")" -ge 1 ]
}
check "SIGKILL of a memory node mid-run (replicas 2): integrity intact" \
  eval 'kill_one kill_int 2 "$INTEGRITY" 48 4 400000 && integrity_ok "$tmp/kill_int.out"'
check "SIGKILL of a memory node mid-run (replicas 2): python3 intact" \
  eval 'kill_one kill_py 1.5 "$PYTHON" "$HERE/dict_list.py" &&
        [ "$(tail -1 "$tmp/kill_py.out")" = "python ok" ]'
kill_sqlite() {
  start_run kill_sql --memory-nodes 3 --replicas 2 --memory-capacity 256M --excache 8M \
    --stats -- sh -c "sqlite3 :memory: <'$HERE/sqlite.sql'" || return 1
  sleep 1.5
  kill_memd $(($$ % 3 + 1)) || return 1
  finish_run kill_sql
  [ "$run_rc" -eq 0 ] && [ "$(cat "$tmp/kill_sql.out")" = $'120000|7200060000|48000000\n1237\nok' ]
}
check "SIGKILL of a memory node mid-run (replicas 2): sqlite3 intact" kill_sqlite

# 3. A second node killed once the first one's vRegions were copied again (the runtime's
#    counter, read from the monitor's view: no vRegion of the program still copying or
#    short of a replica): still nothing lost.
second_kill() {
  start_run second --memory-nodes 4 --replicas 2 --memory-capacity 256M --excache 8M \
    --stats -- "$INTEGRITY" 48 4 900000 || return 1
  sleep 2
  kill_memd 1 || return 1
  # Re-replicated: every placed vRegion lists two replicas, none copying, none on node 2.
  wait_until 30 eval 'mond_status >"$tmp/second.status" 2>&1 &&
    ! grep -qiE "copying|joining" "$tmp/second.status" &&
    [ "$(grep -cE "^ +vregion" "$tmp/second.status")" -gt 0 ] &&
    ! grep -E "^ +vregion" "$tmp/second.status" | grep -qE "(^|[^0-9])2([^0-9]|$)"' ||
    { cat "$tmp/second.status"; return 1; }
  kill_memd 1 || return 1 # the next one in node order
  finish_run second
  [ "$run_rc" -eq 0 ] && integrity_ok "$tmp/second.out" &&
    [ "$(stat nodes_lost "$tmp/second.err")" -ge 2 ] &&
    [ "$(stat vregions_rereplicated "$tmp/second.err")" -ge 1 ]
}
check "a second memory node killed after re-replication: still no loss" second_kill

# 4. Replicas 1: losing a memory node is exit 69 naming it.
one_copy() {
  start_run one --memory-nodes 3 --replicas 1 --memory-capacity 256M --excache 8M \
    -- "$INTEGRITY" 48 4 900000 || return 1
  sleep 2
  kill_memd 1 || return 1
  finish_run one
  [ "$run_rc" -eq 69 ] && grep -q "memory node 2" "$tmp/one.err"
}
check "replicas 1: a killed memory node ends the run with 69 naming it" one_copy

# 5. The monitor killed mid-run: the program carries on; a restarted monitor rebuilds the
#    same placements from the memory nodes' reports.
monitor_kill() {
  start_run mon --memory-nodes 3 --replicas 2 --memory-capacity 256M --excache 8M \
    -- "$INTEGRITY" 48 4 700000 || return 1
  sleep 2
  wait_until 10 eval 'mond_status >"$tmp/mon.before" 2>&1' || return 1
  local m
  m=$(mond_pid)
  kill -KILL "$m"
  sleep 0.5
  ip netns exec "lego-run-$runner-mon" "$MOND" --config "$run_dir/cluster.toml" --node 9 \
    2>"$tmp/mon.restarted.err" &
  extra_pids="$extra_pids $!"
  # Rebuilt within a few heartbeats: the same placements (the process lines and their
  # vRegions; node usage figures move on).
  wait_until 15 eval 'mond_status >"$tmp/mon.after" 2>&1 &&
    diff <(grep -E "^ +vregion" "$tmp/mon.before") \
         <(grep -E "^ +vregion" "$tmp/mon.after") >/dev/null' ||
    { diff "$tmp/mon.before" "$tmp/mon.after"; return 1; }
  finish_run mon
  [ "$run_rc" -eq 0 ] && integrity_ok "$tmp/mon.out"
}
check "monitor killed mid-run: program unaffected, a restarted monitor shows the same placements" \
  monitor_kill

# 6. A memory node joins mid-run (on the host's end of the bridge, absent from the program's
#    cluster file, which names the monitor): new placements reach it.
hot_plug_run() {
  rm -f "$tmp/plug.fifo"
  mkfifo "$tmp/plug.fifo"
  exec 8<>"$tmp/plug.fifo"
  start_run plug --memory-nodes 2 --replicas 1 --memory-capacity 64M --excache 8M --stats \
    -- "$PYTHON" -c '
import sys
sys.stdin.readline()          # the test says when the new node is up
blocks = [bytearray(8 << 20) for _ in range(20)]   # 160 MiB: more than two 64 MiB nodes hold
for b in blocks: b[::4096] = b"x" * len(b[::4096])
print("allocated", sum(len(b) for b in blocks))
' <&8 || return 1
  # The new node's cluster file: the run's, with itself on the host's bridge address.
  local host port=$((40000 + $$ % 20000))
  host=$(awk -F'"' '/^address/ { print $2; exit }' "$run_dir/cluster.toml")
  awk -v a="$host" -v p="$port" '{ print } END {
    printf "[[node]]\nid = 20\nrole = \"memory\"\naddress = \"%s\"\nport = %d\n", a, p }' \
    "$run_dir/cluster.toml" >"$tmp/plug.toml"
  "$MEMD" --config "$tmp/plug.toml" --node 20 --capacity 256M 2>"$tmp/plug.memd.err" &
  extra_pids="$extra_pids $!"
  wait_until 15 eval 'mond_status 2>/dev/null | grep -qE "^ *(node )?20[ :]"' ||
    { mond_status; cat "$tmp/plug.memd.err"; return 1; }
  echo go >&8
  finish_run plug
  exec 8>&-
  [ "$run_rc" -eq 0 ] && grep -q "^allocated 167772160" "$tmp/plug.out"
}
check "a memory node started mid-run receives new placements" hot_plug_run

# 7. The whole cluster full: malloc fails cleanly (MemoryError), the program goes on, and
#    every daemon is still up.
cluster_full_run() {
  rm -f "$tmp/full.fifo"
  mkfifo "$tmp/full.fifo"
  exec 7<>"$tmp/full.fifo"
  start_run full --memory-nodes 3 --replicas 2 --memory-capacity 32M --excache 8M \
    -- "$PYTHON" -c '
import sys
blocks = []
try:
    while True:
        blocks.append(bytearray(4 << 20))
except MemoryError:
    print("MemoryError after", len(blocks) * 4, "MiB")
blocks.clear()
blocks.append(bytearray(1 << 20))
print("allocated again")
sys.stdout.flush()
sys.stdin.readline()
' <&7 || return 1
  wait_until 60 grep -q "allocated again" "$tmp/full.out" || { cat "$tmp/full.err"; return 1; }
  local up
  up=$(($(memd_pids | wc -l) + $(mond_pid | wc -l)))
  echo done >&7
  finish_run full
  exec 7>&-
  echo "daemons up while the program ran: $up of 4"
  [ "$run_rc" -eq 0 ] && grep -q "^MemoryError after" "$tmp/full.out" && [ "$up" -eq 4 ]
}
check "the whole cluster full: MemoryError, and every daemon stays up" cluster_full_run

# 8. A memory node with the wrong key, or with the id of a live one, is refused by the
#    monitor with a clear message (and exits 1).
refusals() {
  start_run refuse --memory-nodes 2 --replicas 1 --memory-capacity 64M \
    -- sleep 30 || return 1
  local host port=$((40000 + ($$ + 7) % 20000))
  host=$(awk -F'"' '/^address/ { print $2; exit }' "$run_dir/cluster.toml")
  # Wrong key: the run's file with another key, and a node of its own.
  sed "s/^key = .*/key = \"$(random_key)\"/" "$run_dir/cluster.toml" |
    awk -v a="$host" -v p="$port" '{ print } END {
      printf "[[node]]\nid = 21\nrole = \"memory\"\naddress = \"%s\"\nport = %d\n", a, p }' \
      >"$tmp/wrongkey.toml"
  timeout 20 "$MEMD" --config "$tmp/wrongkey.toml" --node 21 --capacity 64M \
    2>"$tmp/wrongkey.err"
  local key_rc=$?
  # Duplicate: node 2 is live; another lego-memd --node 2, listening on the host's address.
  awk -v a="$host" -v p="$((port + 1))" '
    /^id = / { mine = ($3 == 2) }
    mine && /^address = / { print "address = \"" a "\""; next }
    mine && /^port = / { print "port = " p; next }
    { print }' "$run_dir/cluster.toml" >"$tmp/dup.toml"
  timeout 30 "$MEMD" --config "$tmp/dup.toml" --node 2 --capacity 64M 2>"$tmp/dup.err"
  local dup_rc=$?
  kill "$runner"
  wait "$runner" 2>/dev/null
  echo "wrong key: exit $key_rc: $(tail -2 "$tmp/wrongkey.err")"
  echo "duplicate id: exit $dup_rc: $(tail -2 "$tmp/dup.err")"
  [ "$key_rc" -eq 1 ] && grep -qi "key" "$tmp/wrongkey.err" &&
    [ "$dup_rc" -eq 1 ] && grep -qi "already live" "$tmp/dup.err"
}
check "a memory node with the wrong key, or a live node's id, is refused clearly" refusals

check_summary
