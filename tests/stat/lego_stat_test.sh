#!/usr/bin/env bash
# lego-stat, the live view of a node's lego processes (runtime/stat/, and the stats page
# each process publishes: runtime/stats_page.h). Guards: a program running under lego-run
# shows up in `lego-stat --once --json` with its counters moving between two calls, its
# ExCache use within its capacity and its memory node named; its page is gone once it
# exits; a page left by a process that is gone (kill -9) is removed as stale; a page of
# another layout is refused, not misread; the table is plain without a terminal; --help
# and bad flags. A process on several memory nodes (lego-run --memory-nodes 3 --replicas 2)
# shows every one of them with the vRegions it holds, in the table and the JSON; one of
# them SIGKILLed, it shows as lost and the re-replication as it happens, and lego-run's
# stderr says so (a line when it began, one when every vRegion had 2 copies again).
# Needs root (lego-run's private memory nodes in network namespaces).
set -u
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

root=$(lego_bin_root)
stat_bin="$root/runtime/lego-stat"
lego_run="$root/runtime/lego-run"
export LEGO_MOND=$root/daemons/monitor/lego-mond LEGO_MEMD=$root/daemons/memory/lego-memd
work=${TEST_TMPDIR:-/tmp}/lego-stat-test.$$
mkdir -p "$work"

# json_get FILE PYTHON-EXPR: evaluates EXPR with `p` bound to the one process of the
# document in FILE (`d` the document); prints the result.
json_get() {
  python3 - "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
p = d["processes"][0] if d["processes"] else None
print(eval(sys.argv[2]))
PY
}

# A python program with a 1 MiB ExCache over ~16 MiB of heap, touching it at random
# until $work/stop appears (at most 60 s): its misses go on while lego-stat looks.
# stats_page_up RUN-PID PID-FILE: waits up to 30 s for the program whose pid PID-FILE holds
# to publish its stats page in lego-run RUN-PID's run directory; prints that pid.
stats_page_up() {
  local p
  for _ in $(seq 1 300); do
    p=$(cat "$2" 2>/dev/null)
    [ -n "$p" ] && ls /tmp/lego-run-"$1"/stats."$p".* >/dev/null 2>&1 && echo "$p" && return 0
    sleep 0.1
  done
  return 1
}
start_workload() {
  cat >"$work/workload.py" <<PY
import os, random, time
open("$work/pid", "w").write(str(os.getpid()))
a = [bytearray(4096) for _ in range(4000)]
t = time.time()
while not os.path.exists("$work/stop") and time.time() - t < 60:
    for _ in range(200):
        b = a[random.randrange(4000)]
        b[0] = (b[0] + 1) % 256
PY
  # Debian's python3 itself (a python3 earlier in PATH may be a wrapper script).
  "$lego_run" --excache 1M -- /usr/bin/python3 "$work/workload.py" >"$work/run.out" 2>&1 &
  run_pid=$!
  # The page appears once PROGRAM's runtime has started.
  prog_pid=$(stats_page_up "$run_pid" "$work/pid") && return 0
  cat "$work/run.out"
  ls -l /tmp/lego-run-"$run_pid"/
  return 1
}

counters_move() {
  "$stat_bin" --once --json --interval 0.5 --pid "$prog_pid" >"$work/a.json" || return 1
  sleep 0.5
  "$stat_bin" --once --json --interval 0.5 --pid "$prog_pid" >"$work/b.json" || return 1
  cat "$work/a.json" "$work/b.json"
  [ "$(json_get "$work/a.json" 'p["pid"]')" = "$prog_pid" ] || return 1
  [ "$(json_get "$work/a.json" 'p["program"].startswith("python3")')" = True ] || return 1
  local m1 m2
  m1=$(json_get "$work/a.json" 'p["counters"]["misses"]')
  m2=$(json_get "$work/b.json" 'p["counters"]["misses"]')
  [ "$m2" -gt "$m1" ] || return 1
  [ "$(json_get "$work/b.json" 'p["misses_per_s"] > 0 and p["fetches_per_s"] > 0')" = True ] || return 1
  [ "$(json_get "$work/b.json" 'p["miss_p50_ns"] > 0 and p["miss_p99_ns"] >= p["miss_p50_ns"]')" = True ] || return 1
  [ "$(json_get "$work/b.json" 'p["capacity_bytes"] == 1 << 20 and 0 < p["resident_bytes"] <= 1 << 20')" = True ] || return 1
  # The private memory node: its id and address from the run's cluster file.
  [ "$(json_get "$work/b.json" 'p["memory_node"] > 0 and ":" in p["memory_address"]')" = True ] || return 1
}

plain_table() {
  "$stat_bin" --once --interval 0.3 --pid "$prog_pid" >"$work/table.out" || return 1
  cat "$work/table.out"
  grep -q "PID .*PROGRAM .*MISS/s" "$work/table.out" || return 1
  grep -q "^ *$prog_pid python3" "$work/table.out" || return 1
  ! grep -q $'\033' "$work/table.out"
}

page_gone_at_exit() {
  ls /tmp/lego-run-"$run_pid"/stats."$prog_pid".* || return 1
  touch "$work/stop"
  # The program has gone once its pid file's process is; lego-run may still be ending.
  for _ in $(seq 1 100); do
    kill -0 "$prog_pid" 2>/dev/null || break
    sleep 0.1
  done
  ! kill -0 "$prog_pid" 2>/dev/null || return 1
  # Removed by the program itself, not by lego-run's end (the run directory stays until
  # lego-run is done with it).
  ! ls /tmp/lego-run-"$run_pid"/stats."$prog_pid".* 2>/dev/null || return 1
  wait "$run_pid" || { cat "$work/run.out"; return 1; }
}

# A page named for this shell with a start time it never had: its process is gone.
stale_page_removed() {
  local dir=/tmp/lego-run-$$-stat-test
  mkdir -p "$dir"
  head -c 4096 /dev/zero >"$dir/stats.$$.1"
  "$stat_bin" --once --json --interval 0.1 >"$work/stale.json" || return 1
  [ ! -e "$dir/stats.$$.1" ] || { rm -rf "$dir"; return 1; }
  rm -rf "$dir"
}

# A page of this (live) shell whose layout is another version's: named, not read.
other_layout_refused() {
  local dir=/tmp/lego-run-$$-stat-test start
  mkdir -p "$dir"
  start=$(cut -d' ' -f22 /proc/$$/stat)
  # magic "LGST", version 99
  { printf 'LGST\143\000\000\000'; head -c 4088 /dev/zero; } >"$dir/stats.$$.$start"
  "$stat_bin" --once --json --interval 0.1 >"$work/other.json"
  local st=$?
  rm -rf "$dir"
  cat "$work/other.json"
  [ $st -eq 0 ] || return 1
  [ "$(json_get "$work/other.json" 'any("another version of lego" in x for x in d["problems"])')" = True ] || return 1
  [ "$(json_get "$work/other.json" "all(q['pid'] != $$ for q in d['processes'])")" = True ]
}

help_and_bad_flags() {
  "$stat_bin" --help | grep -q "^usage: lego-stat" || return 1
  "$stat_bin" --interval 0 2>"$work/err"; [ $? -eq 2 ] || return 1
  grep -q "interval" "$work/err" || return 1
  "$stat_bin" --bogus 2>/dev/null; [ $? -eq 2 ]
}

# A python program over 40 MiB (3 vRegions, each on 2 of the 3 memory nodes), touching it
# at random until $work/stop2 appears (at most 120 s).
start_cluster_workload() {
  cat >"$work/workload2.py" <<PY
import os, random, time
a = [bytearray(4096) for _ in range(10000)]
open("$work/pid2", "w").write(str(os.getpid()))
t = time.time()
while not os.path.exists("$work/stop2") and time.time() - t < 120:
    for _ in range(200):
        b = a[random.randrange(10000)]
        b[0] = (b[0] + 1) % 256
PY
  "$lego_run" --memory-nodes 3 --replicas 2 --memory-capacity 128M --excache 1M -- \
    /usr/bin/python3 "$work/workload2.py" >"$work/run2.out" 2>"$work/run2.err" &
  run2_pid=$!
  prog2_pid=$(stats_page_up "$run2_pid" "$work/pid2") && return 0
  cat "$work/run2.err"
  return 1
}

every_memory_node() {
  need start_cluster_workload || return 1
  "$stat_bin" --once --json --interval 0.3 --pid "$prog2_pid" >"$work/c.json" || return 1
  "$stat_bin" --once --interval 0.3 --pid "$prog2_pid" >"$work/c.table" || return 1
  cat "$work/c.json" "$work/c.table"
  [ "$(json_get "$work/c.json" 'p["replicas"]')" = 2 ] || return 1
  [ "$(json_get "$work/c.json" 'p["vregions_placed"] >= 3')" = True ] || return 1
  # Every vRegion twice, on distinct nodes, each named with its address.
  [ "$(json_get "$work/c.json" 'len(p["memory_nodes"]) >= 2 and all(":" in n["address"] and n["state"] == "open" for n in p["memory_nodes"])')" = True ] || return 1
  [ "$(json_get "$work/c.json" 'sum(n["vregions"] for n in p["memory_nodes"]) == 2 * p["vregions_placed"]')" = True ] || return 1
  # The table: R 2, then each node with its vRegions ("2:3 10:2 11:1").
  grep -qE "^ *$prog2_pid python3[.0-9]* .* 2  ([0-9]+:[0-9]+ ?){2,}$" "$work/c.table"
}

rereplication_shown() {
  need start_cluster_workload || return 1
  "$stat_bin" --once --json --interval 0.1 --pid "$prog2_pid" >"$work/d.json" || return 1
  local victim i memd
  victim=$(json_get "$work/d.json" 'max(p["memory_nodes"], key=lambda n: n["vregions"])["id"]')
  # lego-run starts the memory nodes in node order (2, 10, 11).
  if [ "$victim" -eq 2 ]; then i=1; else i=$((victim - 8)); fi
  memd=$(pgrep -P "$run2_pid" -x lego-memd | sort -n | sed -n "${i}p")
  [ -n "$memd" ] || { echo "no lego-memd for node $victim"; return 1; }
  kill -KILL "$memd"
  echo "killed memory node $victim (pid $memd)"
  wait_until 60 eval '"$stat_bin" --once --json --interval 0.1 --pid "$prog2_pid" >"$work/e.json" &&
    [ "$(json_get "$work/e.json" "[n[\"state\"] for n in p[\"memory_nodes\"] if n[\"id\"] == $victim] == [\"lost\"] and p[\"vregions_degraded\"] == 0 and p[\"vregions_rereplicated\"] >= 1")" = True ]' || {
    cat "$work/e.json" "$work/run2.err"
    return 1
  }
  cat "$work/e.json"
  "$stat_bin" --once --interval 0.1 --pid "$prog2_pid" | tail -n 1
  touch "$work/stop2"
  wait "$run2_pid" || { cat "$work/run2.err"; return 1; }
  grep -E "^lego-run: " "$work/run2.err"
  grep -qE "^lego-run: .*python3[.0-9]* \(pid $prog2_pid\): re-replicating [0-9]+ vRegions after losing memory node $victim \(" "$work/run2.err" &&
    grep -qE "^lego-run: python3[.0-9]* \(pid $prog2_pid\): [1-9][0-9]* vRegions have 2 copies again" "$work/run2.err"
}

check "a lego-run program under lego-run starts publishing its page" start_workload
check "lego-stat --once --json shows the program's counters moving" counters_move
check "without a terminal the table is plain" plain_table
check "the page is removed when the program exits" page_gone_at_exit
check "a page whose process is gone is removed as stale" stale_page_removed
check "a page of another layout is refused, not misread" other_layout_refused
check "--help and bad flags" help_and_bad_flags
check "a process on 3 memory nodes with 2 copies: every node, its vRegions, in JSON and the table" \
  every_memory_node
check "a memory node killed: lost in lego-stat, re-replication shown there and on lego-run's stderr" \
  rereplication_shown
touch "$work/stop" "$work/stop2"
rm -rf "$work"
check_summary
