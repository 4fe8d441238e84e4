#!/usr/bin/env bash
# End to end: the cluster (issue 13). lego-run's embedded cluster -- N lego-memd and a
# lego-mond, each in its own network namespace on one bridge, the program on the host --
# with small memory nodes, a tiny ExCache and the cluster's short default timings
# (heartbeat 500 ms, lost after 3 s). A memory node a check starts by hand gets a network
# namespace of its own on the run's bridge too.
# Guards: a heap larger than any one memory node (threads, and fork); a memory node
# SIGKILLed mid-run with replicas 2 disturbs neither the integrity program nor python3 nor
# sqlite3 (every word right, exit 0, the runtime's counters show the loss); a second node
# killed once the monitor shows every vRegion back at two full copies still loses nothing,
# and that re-replication was shown on lego-run's stderr and in the monitor's log;
# with replicas 1 the loss is exit 69 naming the node; the monitor killed mid-run does not
# disturb the program, and a restarted monitor shows the same placements; a memory node
# started later (absent from the program's cluster file) receives new placements; the whole
# cluster full makes malloc fail cleanly (python's MemoryError) with every daemon still up;
# a memory node with the wrong key, or with the id of a live one, is refused with a clear
# message.
# Three groups, one Bazel target each (tests/cluster/BUILD.bazel), selected by the start of
# the checks' names: "placement:", "failover:", "monitor:".
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

# Daemons and namespaces a check made by hand, gone at exit whatever was selected.
extra_pids=""
runner=""
cleanup() {
  [ -n "$runner" ] && kill "$runner" 2>/dev/null # a check that failed half-way
  for p in $extra_pids; do kill -KILL "$p" 2>/dev/null; done
  # join_bridge runs in $(...): the namespaces it made are listed in a file.
  [ -f "$tmp/extra_ns" ] && while read -r n; do ip netns del "$n" 2>/dev/null; done <"$tmp/extra_ns"
}
trap cleanup EXIT

integrity_ok() { grep -q "integrity ok" "$1"; }
# stat NAME FILE: the value of counter NAME in a --stats report (0 when absent).
stat() { awk -v k="$1" '$1 == k { v = $2 } END { print v + 0 }' "$2"; }

# start_run NAME LEGO-RUN-ARGS...: lego-run in the background, its output in $tmp/NAME.*;
# $runner is its pid, $run_dir its run directory once the cluster is up.
start_run() {
  local name=$1
  shift
  # The run of a check that failed half-way goes first (lego-run stops its cluster).
  if [ -n "$runner" ] && kill "$runner" 2>/dev/null; then wait "$runner" 2>/dev/null; fi
  # <&0: a background command of a script reads /dev/null unless told otherwise.
  "$LEGO_RUN" "$@" <&0 >"$tmp/$name.out" 2>"$tmp/$name.err" &
  runner=$!
  run_dir=/tmp/lego-run-$runner
  killed=""
  wait_until 20 test -s "$run_dir/cluster.toml" || return 1
}
# memd_pid NODE: the run's lego-memd serving memory node NODE (its --node argument).
memd_pid() {
  pgrep -P "$runner" -f "^lego-memd .*--node $1 "
}
mond_pid() { pgrep -P "$runner" -x lego-mond; }
# kill_node NODE: SIGKILLs the run's memory node NODE.
kill_node() {
  local p
  p=$(memd_pid "$1")
  [ -n "$p" ] || {
    echo "no lego-memd for node $1 under lego-run $runner"
    return 1
  }
  kill -KILL "$p" && killed="$killed $1" && echo "killed memory node $1 (pid $p)"
}
# mond_status: lego-mond --status of the run's monitor (its namespace, its cluster file).
mond_status() {
  ip netns exec "lego-run-$runner-mon" "$MOND" --config "$run_dir/cluster.toml" --node 9 --status
}
# vregions FILE: the "vregion V: NODE..." lines of a --status in FILE.
vregions() { grep -E '^ +vregion [0-9]+:' "$1"; }
# busiest_node FILE: the memory node holding the most vRegions in a --status, not counting
# those already killed.
busiest_node() {
  vregions "$1" | sed 's/^[^:]*://' | tr ' ' '\n' | grep -E '^[0-9]+$' |
    grep -vxF -e 0 $(for k in $killed; do printf -- '-e %s ' "$k"; done) |
    sort | uniq -c | sort -rn | awk 'NR == 1 { print $2 }'
}
# listed FILE MIN R: the --status in FILE shows at least MIN vRegions, each on R nodes
# (the monitor reads a node's vRegions a heartbeat or so after they change).
listed() {
  [ "$(vregions "$1" | wc -l)" -ge "$2" ] &&
    vregions "$1" | sed 's/^[^:]*://' | awk -v r="$3" 'NF != r { bad = 1 } END { exit bad }'
}
# kill_busiest MIN [R]: once the monitor shows the program's MIN vRegions on R nodes each
# (default 2), SIGKILLs the memory node holding most of them (so the loss is certainly felt).
kill_busiest() {
  wait_until 30 eval 'mond_status >"$tmp/victim.status" 2>&1 &&
    listed "$tmp/victim.status" '"$1 ${2:-2}" ||
    {
      cat "$tmp/victim.status"
      return 1
    }
  kill_node "$(busiest_node "$tmp/victim.status")"
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

# join_bridge NAME LAST-OCTET: a network namespace of this script's own, $tmp-unique, on the
# run's bridge (the bridge lives in namespace lego-run-PID-sw) at the subnet's address
# .LAST-OCTET; prints that address.
join_bridge() {
  local ns=lego-ct$$-$1 sw=lego-run-$runner-sw br host addr
  br=$(ip -n "$sw" -o link show type bridge | awk -F': ' 'NR == 1 { print $2 }')
  host=$(awk -F'"' '/^address/ { print $2; exit }' "$run_dir/cluster.toml")
  addr=${host%.*}.$2
  [ -n "$br" ] || {
    echo "no bridge in namespace $sw" >&2
    return 1
  }
  ip netns add "$ns" && echo "$ns" >>"$tmp/extra_ns" &&
    ip -n "$sw" link add "ct$$$1" type veth peer name eth0 netns "$ns" &&
    ip -n "$sw" link set "ct$$$1" master "$br" up &&
    ip -n "$ns" addr add "$addr/24" dev eth0 && ip -n "$ns" link set eth0 up &&
    ip -n "$ns" link set lo up && echo "$addr"
}
# with_node FILE ID ADDRESS PORT: the run's cluster file with memory node ID added.
with_node() {
  awk -v i="$2" -v a="$3" -v p="$4" '{ print } END {
    printf "[[node]]\nid = %s\nrole = \"memory\"\naddress = \"%s\"\nport = %d\n", i, a, p }' \
    "$1"
}

# --- placement: many memory nodes, one process

# 1P-3M + monitor: a heap larger than any one memory node (112 MiB of words + 56 MiB of
# versions over 160 MiB nodes, two copies each), 8 MiB ExCache, 4 threads. It takes 11-12
# vRegions, each twice, of the 30 the nodes hold (with 96 MiB nodes and 72 MiB of words it
# took 8-9 of 18, and failed once in six with the nodes full).
big_heap() {
  "$LEGO_RUN" --memory-nodes 3 --replicas 2 --memory-capacity 160M --excache 8M --stats \
    -- "$INTEGRITY" 112 4 30000 >"$tmp/big.out" 2>"$tmp/big.err"
  local rc=$?
  cat "$tmp/big.out"
  grep -E '^  memory_nodes_used' "$tmp/big.err"
  [ "$rc" -eq 0 ] && integrity_ok "$tmp/big.out" &&
    [ "$(stat memory_nodes_used "$tmp/big.err")" -eq 3 ]
}
check "placement: 1P-3M+monitor, integrity over a heap larger than any one memory node" big_heap
# fork: a snapshot is a copy on every node holding the process (kFork), promised again on
# that same node, and the child's own fork (the grandchild) a third: each node needs three
# times the vRegions it holds. 3 nodes of 112 MiB (7 vRegions each), one copy: 40 MiB of
# heap (3 vRegions, 144 MiB three times) is more than any one node holds, and a node given
# two of them has room for their copies (with 64 MiB nodes, two on one node were too many:
# it failed once in eight). Three on one node would still not fit; placement weighted by
# free capacity makes that a few in a hundred. A forked child is a lego process of its own
# (runtime/excache/fork.cc): what it allocates is placed too (new vRegions in its adopted
# space), and a grandchild's fork copies the child's space: with 112 MiB nodes a node was
# full for a fork once in four; 160 MiB (10 vRegions) leaves room for that. But then one
# node can hold all three, and the weighted choice put them all on one node in 1 of 14
# runs (a CI run failed on it): such a run still has to pass integrity, and is run again
# (at most three runs) for one whose heap spans nodes.
big_fork() {
  local attempt rc used
  for attempt in 1 2 3; do
    "$LEGO_RUN" --memory-nodes 3 --replicas 1 --memory-capacity 160M --excache 8M --stats \
      -- "$FORK_INTEGRITY" 40 3 >"$tmp/bigfork.out" 2>"$tmp/bigfork.err"
    rc=$?
    tail -3 "$tmp/bigfork.out"
    tail -3 "$tmp/bigfork.err"
    [ "$rc" -eq 0 ] && integrity_ok "$tmp/bigfork.out" || return 1
    used=$(stat memory_nodes_used "$tmp/bigfork.err")
    [ "$used" -ge 2 ] && return 0
    echo "run $attempt: the heap landed on $used memory node(s); again"
  done
  return 1
}
check "placement: 1P-3M+monitor, fork integrity over memory nodes none of which holds it all" \
  big_fork

# The whole cluster full: malloc fails cleanly (MemoryError), the program goes on, and
# every daemon is still up.
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
  wait_until 60 grep -q "allocated again" "$tmp/full.out" || {
    cat "$tmp/full.err"
    return 1
  }
  local up
  up=$(($(pgrep -P "$runner" -x lego-memd -r R,S,D | wc -l) + $(mond_pid | wc -l)))
  [ "$up" -eq 4 ] || ps -o pid,stat,comm --ppid "$runner"
  echo done >&7
  finish_run full
  exec 7>&-
  echo "daemons up while the program ran: $up of 4"
  [ "$run_rc" -eq 0 ] && grep -q "^MemoryError after" "$tmp/full.out" && [ "$up" -eq 4 ]
}
check "placement: the whole cluster full, MemoryError, and every daemon stays up" cluster_full_run

# A memory node joins mid-run: its own namespace on the run's bridge, its cluster file the
# run's with itself added (the program's file lacks it; the monitor's kPlace answer tells
# the program where it listens). Two 64 MiB nodes, one copy; the program then wants 160 MiB.
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
sys.stdout.flush()
sys.stdin.readline()          # held until the test read the monitor
' <&8 || return 1
  local addr port=$((40000 + $$ % 20000))
  addr=$(join_bridge plug 220) || return 1
  with_node "$run_dir/cluster.toml" 20 "$addr" "$port" >"$tmp/plug.toml"
  ip netns exec "lego-ct$$-plug" "$MEMD" --config "$tmp/plug.toml" --node 20 --capacity 256M \
    2>"$tmp/plug.memd.err" &
  extra_pids="$extra_pids $!"
  wait_until 15 eval 'mond_status 2>/dev/null | grep -qE "^node 20 .* alive"' || {
    mond_status
    cat "$tmp/plug.memd.err"
    return 1
  }
  echo go >&8
  wait_until 60 grep -q "^allocated" "$tmp/plug.out"
  mond_status >"$tmp/plug.status" 2>&1
  echo done >&8
  finish_run plug
  exec 8>&-
  echo "vRegions on node 20: $(vregions "$tmp/plug.status" | grep -cE ' 20( |$)')"
  [ "$run_rc" -eq 0 ] && grep -q "^allocated 167772160" "$tmp/plug.out" &&
    vregions "$tmp/plug.status" | grep -qE ' 20( |$)'
}
check "placement: a memory node started mid-run receives new placements" hot_plug_run

# A memory node with the wrong key, or with the id of a live one, is refused by the
# monitor with a clear message (and exits 1). Each in a namespace of its own.
refusals() {
  start_run refuse --memory-nodes 2 --replicas 1 --memory-capacity 64M \
    -- sleep 60 || return 1
  wait_until 10 eval 'mond_status 2>/dev/null | grep -qE "^node 2 .* alive"' || return 1
  local addr port=$((40000 + ($$ + 7) % 20000))
  # Wrong key: the run's file with another key, and a node of its own.
  addr=$(join_bridge key 221) || return 1
  sed "s/^key = .*/key = \"$(random_key)\"/" "$run_dir/cluster.toml" >"$tmp/wrongkey.base"
  with_node "$tmp/wrongkey.base" 21 "$addr" "$port" >"$tmp/wrongkey.toml"
  timeout 20 ip netns exec "lego-ct$$-key" "$MEMD" --config "$tmp/wrongkey.toml" --node 21 \
    --capacity 64M 2>"$tmp/wrongkey.err"
  local key_rc=$?
  # Duplicate: node 2 is live; another lego-memd --node 2, in a namespace of its own.
  addr=$(join_bridge dup 222) || return 1
  awk -v a="$addr" -v p="$((port + 1))" '
    /^id = / { mine = ($3 == 2) }
    mine && /^address = / { print "address = \"" a "\""; next }
    mine && /^port = / { print "port = " p; next }
    { print }' "$run_dir/cluster.toml" >"$tmp/dup.toml"
  timeout 30 ip netns exec "lego-ct$$-dup" "$MEMD" --config "$tmp/dup.toml" --node 2 \
    --capacity 64M 2>"$tmp/dup.err"
  local dup_rc=$?
  local up
  up=$(($(pgrep -P "$runner" -x lego-memd | wc -l) + $(mond_pid | wc -l)))
  kill "$runner"
  wait "$runner" 2>/dev/null
  echo "wrong key: exit $key_rc: $(tail -1 "$tmp/wrongkey.err")"
  echo "duplicate id: exit $dup_rc: $(tail -1 "$tmp/dup.err")"
  echo "the run's daemons up afterwards: $up of 3"
  [ "$key_rc" -eq 1 ] && grep -q "refused this node's key" "$tmp/wrongkey.err" &&
    [ "$dup_rc" -eq 1 ] && grep -q "node 2 is already live in this cluster" "$tmp/dup.err" &&
    [ "$up" -eq 3 ]
}
check "placement: a memory node with the wrong key, or a live node's id, is refused clearly" \
  refusals

# --- failover: memory nodes SIGKILLed mid-run

# kill_one NAME MIN-VREGIONS PROGRAM...: `lego-run --memory-nodes 3 --replicas 2` runs
# PROGRAM; once it holds MIN-VREGIONS vRegions, the node holding most of them is SIGKILLed.
# The program must finish as if nothing happened, and the runtime must have felt the loss.
kill_one() {
  local name=$1 min=$2
  shift 2
  start_run "$name" --memory-nodes 3 --replicas 2 --memory-capacity 256M --excache 8M \
    --stats -- "$@" || return 1
  kill_busiest "$min" || return 1
  kill -0 "$runner" 2>/dev/null || {
    echo "the program ended before the kill: make it longer"
    return 1
  }
  finish_run "$name"
  [ "$run_rc" -eq 0 ] && [ "$(stat nodes_lost "$tmp/$name.err")" -ge 1 ]
}
check "failover: lego-run --memory-nodes 3 --replicas 2, a lego-memd SIGKILLed: integrity intact" \
  eval 'kill_one kill_int 4 "$INTEGRITY" 48 4 40000 && integrity_ok "$tmp/kill_int.out"'
check "failover: a memory node SIGKILLed mid-run (replicas 2): python3 intact" \
  eval 'kill_one kill_py 3 "$PYTHON" "$HERE/dict_list.py" &&
        [ "$(tail -1 "$tmp/kill_py.out")" = "python ok" ]'
kill_sqlite() {
  kill_one kill_sql 3 sh -c "exec sqlite3 :memory: <'$HERE/sqlite.sql'" &&
    [ "$(cat "$tmp/kill_sql.out")" = $'120000|7200060000|48000000\n1237\nok' ]
}
check "failover: a memory node SIGKILLed mid-run (replicas 2): sqlite3 intact" kill_sqlite

# all_copied FILE: every vRegion of the --status in FILE has two full replicas, none on a
# killed node, none still copying: the first loss is repaired.
all_copied() {
  vregions "$1" | sed 's/^[^:]*://' | awk -v dead="$killed" '
    BEGIN { split(dead, d, " "); for (k in d) gone[d[k]] = 1 }
    { n++; if (NF != 2) bad = 1; for (i = 1; i <= NF; i++) if ($i in gone || $i !~ /^[0-9]+$/) bad = 1 }
    END { exit !(n > 0 && !bad) }'
}
# A second node killed once the monitor shows the first one's vRegions copied again: still
# nothing lost.
second_kill() {
  start_run second --memory-nodes 4 --replicas 2 --memory-capacity 256M --excache 8M \
    --stats -- "$INTEGRITY" 48 4 100000 || return 1
  kill_busiest 4 || return 1
  wait_until 30 eval 'mond_status >"$tmp/second.status" 2>&1 && all_copied "$tmp/second.status"' ||
    {
      vregions "$tmp/second.status"
      return 1
    }
  kill -0 "$runner" 2>/dev/null || {
    echo "the program ended before the second kill: make it longer"
    return 1
  }
  vregions "$tmp/second.status"
  # The re-replication was not silent: the monitor's log followed it to its end.
  local first=${killed# }
  wait_until 10 grep -q "re-replication after losing memory node $first done" \
    "$run_dir/lego-mond.log" || {
    echo "lego-mond's log:"
    cat "$run_dir/lego-mond.log"
    return 1
  }
  grep "lego-mond: .*memory node $first" "$run_dir/lego-mond.log"
  # And its counters: the copies' placements, and the vRegions seen back at 2 copies.
  mond_status >"$tmp/second.counters" 2>&1
  grep -E '^(replacements|vregions_rereplicated|vregions_lost) ' "$tmp/second.counters"
  grep -qE '^replacements [1-9]' "$tmp/second.counters" &&
    grep -qE '^vregions_rereplicated [1-9]' "$tmp/second.counters" &&
    grep -qx 'vregions_lost 0' "$tmp/second.counters" || return 1
  kill_busiest 1 || return 1
  finish_run second
  # Nor on lego-run's stderr: a line when it began, one when every vRegion had 2 copies again.
  grep -E "^lego-run: .*(re-replicating|copies again)" "$tmp/second.err"
  [ "$run_rc" -eq 0 ] && integrity_ok "$tmp/second.out" &&
    [ "$(stat nodes_lost "$tmp/second.err")" -ge 2 ] &&
    [ "$(stat vregions_rereplicated "$tmp/second.err")" -ge 1 ] &&
    grep -qE "^lego-run: .*re-replicating [0-9]+ vRegions after losing memory node $first " \
      "$tmp/second.err" &&
    grep -qE "^lego-run: .*: [0-9]+ vRegions have 2 copies again" "$tmp/second.err"
}
check "failover: a second memory node killed after re-replication, still no loss" second_kill

# Replicas 1: losing a memory node that holds the program's memory is exit 69 naming it.
one_copy() {
  start_run one --memory-nodes 3 --replicas 1 --memory-capacity 256M --excache 8M \
    -- "$INTEGRITY" 48 4 300000 || return 1
  kill_busiest 4 1 || return 1
  local victim=${killed# }
  finish_run one
  [ "$run_rc" -eq 69 ] && grep -q "memory node $victim\b" "$tmp/one.err"
}
check "failover: replicas 1, a killed memory node ends the run with 69 naming it" one_copy

# --- monitor: lego-mond killed mid-run

# The program carries on; a restarted monitor rebuilds the same placements from the memory
# nodes' reports.
monitor_kill() {
  start_run mon --memory-nodes 3 --replicas 2 --memory-capacity 256M --excache 8M \
    -- "$INTEGRITY" 48 4 60000 || return 1
  wait_until 20 eval 'mond_status >"$tmp/mon.before" 2>&1 && listed "$tmp/mon.before" 4 2' ||
    return 1
  kill -KILL "$(mond_pid)"
  sleep 0.5
  ip netns exec "lego-run-$runner-mon" "$MOND" --config "$run_dir/cluster.toml" --node 9 \
    2>"$tmp/mon.restarted.err" &
  extra_pids="$extra_pids $!"
  # Rebuilt within a few heartbeats: the same placements (usage figures move on).
  wait_until 15 eval 'mond_status >"$tmp/mon.after" 2>&1 &&
    diff <(vregions "$tmp/mon.before") <(vregions "$tmp/mon.after") >/dev/null' ||
    {
      diff "$tmp/mon.before" "$tmp/mon.after"
      return 1
    }
  kill -0 "$runner" 2>/dev/null || {
    echo "the program ended before the monitor came back: make it longer"
    return 1
  }
  vregions "$tmp/mon.after"
  finish_run mon
  [ "$run_rc" -eq 0 ] && integrity_ok "$tmp/mon.out"
}
check "monitor: killed mid-run, program unaffected, a restarted monitor shows the same placements" \
  monitor_kill

check_summary
