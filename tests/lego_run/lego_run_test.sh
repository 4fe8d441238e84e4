#!/usr/bin/env bash
# End to end: real programs under lego-run, the memory node in its own network namespace
# over tcp (lego-run's embedded default as root), a tiny ExCache.
# Guards: data integrity with racing threads over a heap 8x the ExCache; Debian's python3
# and sqlite3 with checked results; the resident size of the disaggregated region stays
# within the ExCache (read from /proc/PID/smaps); exit status, stdin/stdout and signals
# pass through; a memory node killed mid-run ends the program with exit status 69 and a
# message naming the node; a cluster file with lego-memd started by hand works; fork()
# gives children (and grandchildren) the heap as it was at the fork (also when the parent
# evicts the lines its prefork handlers wrote during the fork, and when a thread's discard
# races the fork and releases late into the snapshot), and shell pipelines and
# python's os.fork work (fork integrity and stress-ng over shm too); forked children are lego processes with an ExCache of their own
# (stress-ng's vm workers verify, evict and report; a child's resident set is bounded). Defects an adversarial probe found (section 11): subprocess children's
# spaces freed as they exit; a relative --config after a cd; static programs refused; exit
# 69 only for a lost memory node, 125 for lego-run's own failures with a message of their
# own; flags and node roles checked; a kill -9 of lego-run kills the program and the next
# lego-run removes what it left. Start-up: the LEGO_STARTUP_TRACE marks, and no
# connection by lego-run to its own memory node after the program.
# usage: lego_run_test.sh [NAME-PART...]   (checks whose names contain one, with what they
# need set up; tests/lib/check.sh, LEGO_TEST_FILTER too)
set -uo pipefail
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

root=$(lego_bin_root)
LEGO_RUN=$root/runtime/lego-run
MEMD=$root/daemons/memory/lego-memd
INTEGRITY=$root/tests/lego_run/lego_integrity
FORK_INTEGRITY=$root/tests/lego_run/lego_fork_integrity
FORK_DISCARD=$root/tests/lego_run/lego_fork_discard
STATIC_HELLO=$root/tests/lego_run/static_hello
PYTHON=/usr/bin/python3  # Debian's, whatever PATH holds
HERE=$root/tests/lego_run
[ -f "$HERE/dict_list.py" ] || HERE=$(cd "$(dirname "$0")" && pwd)
tmp=${TEST_TMPDIR:-$(mktemp -d)}

# What set-ups leave running or made, removed at exit whatever was selected.
ns=lego-rt-$$
hand_memd=""
probe_memd=""
cleanup() {
  [ -n "$hand_memd" ] && kill "$hand_memd" 2>/dev/null
  [ -n "$probe_memd" ] && kill "$probe_memd" 2>/dev/null
  ip netns del "$ns" 2>/dev/null
  ip link del "lrt$$a" 2>/dev/null
}
trap cleanup EXIT

# integrity_ok OUTPUT: whether a program's output starts with "integrity ok".
integrity_ok() { [ "${1#integrity ok}" != "$1" ]; }

# 1. Integrity: 4 threads over a 64 MiB heap with an 8 MiB ExCache.
integrity_run() {
  integrity_out=$("$LEGO_RUN" --excache 8M --stats -- "$INTEGRITY" 64 4 60000 \
    2>"$tmp/integrity.err")
  integrity_rc=$?
  grep -E 'misses|write_backs|evictions' "$tmp/integrity.err" | while read -r l; do note "$l"; done
  echo "$integrity_out"
  tail -5 "$tmp/integrity.err"
}
check "integrity under lego-run (64 MiB heap, 8 MiB ExCache, 4 threads)" \
  eval 'need integrity_run; [ "$integrity_rc" -eq 0 ] && integrity_ok "$integrity_out"'
check "evictions and write-backs happened" \
  eval 'need integrity_run; grep -qE "write_backs +[1-9]" "$tmp/integrity.err"'

# 2. The same with the sigbus delivery and the clock policy.
sigbus_clock() {
  local out
  out=$("$LEGO_RUN" --excache 8M --delivery sigbus --policy clock -- "$INTEGRITY" 48 2 40000 2>&1)
  echo "exit status $?: $out"
  integrity_ok "$out"
}
check "integrity with --delivery sigbus --policy clock" sigbus_clock

# 2a. One-sided reads (--rma on; docs/rma.md) over tcp and shm, with 2 replicas: lines
#     come from the memory nodes' granted blocks by rma_read, and the data stays intact.
rma_on() {
  local out t=$1
  out=$("$LEGO_RUN" --excache 8M --transport "$t" --memory-nodes 2 --replicas 2 --rma on --stats \
    -- "$INTEGRITY" 48 2 40000 2>"$tmp/rma-$t.err")
  echo "exit status $?: $out"
  grep -E 'rma_|fetches ' "$tmp/rma-$t.err"
  integrity_ok "$out" && grep -Eq '^ *rma_lines +[1-9]' "$tmp/rma-$t.err" &&
    grep -Eq '^ *rma_fallbacks +0$' "$tmp/rma-$t.err"
}
check "integrity with --rma on over tcp, 2 replicas: lines read one-sided" rma_on tcp
check "integrity with --rma on over shm, 2 replicas: lines read one-sided" rma_on shm
# --rma auto (the default) is --rma off on tcp and shm: one-sided reads pay on verbs only,
# so no grant is asked for, no line read one-sided, and the chooser neither probes nor
# times (its counters and averages stay 0).
rma_auto_off() {
  local out t=$1 c
  out=$("$LEGO_RUN" --excache 8M --transport "$t" --stats -- "$INTEGRITY" 16 1 10000 \
    2>"$tmp/rma-auto-$t.err")
  echo "exit status $?: $out"
  grep -E 'rma_' "$tmp/rma-auto-$t.err"
  integrity_ok "$out" || return 1
  for c in rma_lines rma_fallbacks rma_requests rma_probes rma_request_ns rma_one_sided_ns; do
    grep -Eq "^ *$c +0\$" "$tmp/rma-auto-$t.err" || { echo "$c is not 0"; return 1; }
  done
}
check "--rma auto over tcp is --rma off: requests, nothing timed" rma_auto_off tcp
check "--rma auto over shm is --rma off: requests, nothing timed" rma_auto_off shm

# 2b. The memory node over shm on this host.
over_shm() {
  local out
  out=$("$LEGO_RUN" --excache 8M --transport shm -- "$INTEGRITY" 48 2 40000 2>&1)
  echo "exit status $?: $out"
  integrity_ok "$out"
}
check "integrity with --transport shm" over_shm
# The sigbus delivery over shm: its fetches run in a SIGBUS handler, so a prefetch window's
# reply, which comes in parts over shm, must be joined without malloc (libfit's MappedBytes:
# with a std::vector the program died of SIGBUS).
over_shm_sigbus() {
  local out
  out=$(timeout 120 "$LEGO_RUN" --excache 8M --transport shm --delivery sigbus -- \
    "$INTEGRITY" 48 2 40000 2>&1)
  echo "exit status $?: $out"
  integrity_ok "$out"
}
check "integrity with --transport shm --delivery sigbus" over_shm_sigbus
# A program that execs keeps its pid (env execs bash here; bash forks and execs): each
# image opens shm endpoints of its own, and none is left in /dev/shm after the run.
shm_exec_run() {
  shm_exec_out=$("$LEGO_RUN" --excache 8M --transport shm -- \
    env bash -c 'exec sh -c "echo \$((6*7))"; echo not reached' 2>&1)
  echo "$shm_exec_out"
}
check "exec'ing programs over shm (env, bash, exec sh)" \
  eval 'need shm_exec_run; [ "$shm_exec_out" = "42" ]'
shm_leaked() {  # a region of a lego process that is gone (other tests' may be live)
  local f pid
  for f in /dev/shm/lego-[0-9]*-*:*; do
    [ -e "$f" ] || continue
    pid=${f#/dev/shm/lego-}
    [ -d "/proc/${pid%%-*}" ] || { echo "left: $f"; return 0; }
  done
  return 1
}
check "no shm regions left by the run's processes" eval 'need shm_exec_run; ! shm_leaked'
# A killed private shm node leaves its doorbell and its region; the next lego-run removes
# them once the lego-run that started the node is gone (its pid is in the name), and no
# other.
stale_bell_swept() {
  local dead live=/dev/shm/lego-fit-bell-lego-run-$$-40001-0000000000000000
  true & dead=$!; wait $dead
  local stale=/dev/shm/lego-fit-bell-lego-run-$dead-40001-0000000000000000
  local stale_region=/dev/shm/lego-run-$dead:40001 live_region=/dev/shm/lego-run-$$:40001
  : >"$stale"; : >"$live"; : >"$stale_region"; : >"$live_region"
  "$LEGO_RUN" --excache 8M -- true
  local gone=0 kept=0
  [ -e "$stale" ] || [ -e "$stale_region" ] || gone=1
  [ -e "$live" ] && [ -e "$live_region" ] && kept=1
  rm -f "$stale" "$live" "$stale_region" "$live_region"
  echo "stale removed: $gone, live kept: $kept"
  [ $gone = 1 ] && [ $kept = 1 ]
}
check "a killed private node's shm doorbell and region are swept after its lego-run" \
  stale_bell_swept
# A program that closes every inherited descriptor (a daemon): lego-run waits for it without
# spinning.
idles() {
  "$LEGO_RUN" -- bash -c 'for fd in /proc/$$/fd/*; do fd=${fd##*/}
    [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done; sleep 2' &
  local runner=$! ticks
  sleep 1.5
  ticks=$(awk '{print $14 + $15}' "/proc/$runner/stat" 2>/dev/null || echo 0)
  wait $runner
  echo "lego-run used $ticks ticks of CPU in 1.5 s"
  [ "$ticks" -lt 50 ]
}
check "lego-run idles while the program runs with its descriptors closed" idles

# 2c. fork(): children and grandchildren see the heap as it was at the fork while the
# parent's writer threads keep evicting; a 32 MiB heap over a 4 MiB ExCache.
fork_integrity() {
  local out
  out=$(timeout 120 "$LEGO_RUN" --excache 4M -- "$FORK_INTEGRITY" 32 4 2>&1)
  echo "$out"
  [ "${out%fork integrity ok}" != "$out" ]
}
check "fork integrity (children and grandchildren, racing evictions)" fork_integrity
# The same over shm, where each forked child adopts over channels of its own. Before, the
# first child or grandchild to end with a prefetch reply in flight stalled lego-memd's shm
# endpoint for every process (libfabric 1.17's shm completes a large send only once its
# receiver copied it, in order): the children's and the parent's fetches timed out (exit 69)
# or the run hung. The children miss all along (a 32 MiB heap over a 4 MiB ExCache).
fork_integrity_shm() {
  local out
  out=$(timeout 120 "$LEGO_RUN" --transport shm --excache 4M -- "$FORK_INTEGRITY" "$@" 2>&1)
  echo "$out"
  [ "${out%fork integrity ok}" != "$out" ]
}
check "fork integrity over shm (32 MiB heap, 4 forks)" fork_integrity_shm 32 4
# A child sees its memory as of the clone, postfork_child's stores included. Before, a child
# adopting its cache zapped its line 0 (jemalloc's base, re-initialised by postfork_child)
# and read it back from the fork snapshot; LEGO_TEST_FORK_EVICT_LINE0 (test only, see
# runtime/excache/excache_impl.h) makes every eviction during a fork put line 0 into the
# snapshot, as the parent had it then, with the mutexes its prefork handler locked: every
# child's own fork() then hung in jemalloc's prefork (3 of 3 runs, each killed at 60 s).
fork_line0_in_snapshot() {
  local out
  out=$(LEGO_TEST_FORK_EVICT_LINE0=1 timeout 60 "$LEGO_RUN" "$@" --excache 4M -- \
    "$FORK_INTEGRITY" 32 4 2>&1)
  echo "$out"
  [ "${out%fork integrity ok}" != "$out" ]
}
check "fork integrity with line 0 evicted into every fork's snapshot (tcp)" fork_line0_in_snapshot
check "fork integrity with line 0 evicted into every fork's snapshot (shm)" \
  fork_line0_in_snapshot --transport shm
# A parent's discard during a fork cannot drop what the child wrote after adopting its
# memory. A discard that finds the fork under way releases its range in the snapshot too;
# the backend checks that the snapshot is alive, then sends. Before, the child could adopt
# the snapshot in between: LEGO_TEST_SNAPSHOT_RELEASE_DELAY_MS (test only, see
# runtime/preload/cluster_backend.cc) holds that release back for 1 s, and it dropped the
# lines the child had written and evicted since: the child read zeros (3 of 3 runs).
fork_discard_late_release() {
  local out
  out=$(LEGO_TEST_SNAPSHOT_RELEASE_DELAY_MS=1000 timeout 60 "$LEGO_RUN" --excache 4M -- \
    "$FORK_DISCARD" 16 2500 2>&1)
  echo "$out"
  [ "${out%fork discard ok}" != "$out" ]
}
check "a parent's discard during its fork keeps the child's writes (late release)" \
  fork_discard_late_release
pipelines() {
  local out
  out=$("$LEGO_RUN" --excache 1M -- bash -c \
    'n=$(seq 1 50000 | sort -n | tail -1); for i in 1 2; do echo $i | cat; done; echo "$n $(echo sub)"' 2>&1)
  echo "$out"
  [ "$out" = $'1\n2\n50000 sub' ]
}
check "bash pipelines, command substitution and subshells" pipelines
python_fork() {
  local out
  out=$("$LEGO_RUN" --excache 2M -- python3 -c '
import os
big = [str(i) * 10 for i in range(200000)]
pid = os.fork()
if pid == 0:
    ok = all(big[i] == str(i) * 10 for i in range(len(big)))
    big[5] = "child"
    os._exit(0 if ok else 1)
big[5] = "parent"
_, status = os.waitpid(pid, 0)
print("fork", os.waitstatus_to_exitcode(status), big[5])' 2>&1)
  echo "$out"
  [ "$out" = "fork 0 parent" ]
}
check "python3 os.fork" python_fork
sigbus_fork() {
  local out
  out=$("$LEGO_RUN" --excache 1M --delivery sigbus -- bash -c 'echo $(echo x)' 2>&1)
  echo "$out"
  grep -q "fork() failed: .*handler-thread" <<<"$out"
}
check "fork with --delivery sigbus fails clearly" sigbus_fork

# 2d. Forked children are lego processes (issue 14): each has its memory, inherited and
# new, on the memory node behind an ExCache of its own, and its counters reported. The
# issue's command: stress-ng's vm workers (forked) verify their memory; before, they ran in
# local memory (misses 31, evictions 0, for the parent only).
stress_ng_children() {
  local out rc rows
  out=$("$LEGO_RUN" --excache 32M --stats -- stress-ng --vm 2 --vm-bytes 128M \
    --vm-method all --verify -t 8s 2>&1)
  rc=$?
  grep -E "stress-ng:|processes, each|^  (process|pid|all) " <<<"$out"
  # The table's rows (pid N program P misses fetches zero_fills evictions write_backs
  # resident_lines): the two vm workers evicted, and none held more than the ExCache.
  rows=$(awk '/processes, each with an ExCache of its own/ {t = 1; next}
              t && $1 == "pid" && $8 > 1000 && $10 <= 8192 {n++} END {print n + 0}' <<<"$out")
  note "processes that evicted within the ExCache: $rows"
  [ "$rc" -eq 0 ] && grep -q "successful run completed" <<<"$out" && [ "$rows" -ge 2 ] &&
    ! grep -q "failed\|error" <<<"$out"
}
check "stress-ng --vm 2 --verify: the forked workers evict, within their own ExCache" \
  stress_ng_children
# Over shm too: workers that end (stress-ng's _exit) leave no reply in flight behind.
stress_ng_shm() {
  local out rc
  out=$(timeout 120 "$LEGO_RUN" --transport shm --excache 32M --stats -- stress-ng --vm 2 \
    --vm-bytes 64M --vm-method all --verify -t 8s 2>&1)
  rc=$?
  grep -E "stress-ng:|processes, each|^  (process|pid|all) " <<<"$out"
  [ "$rc" -eq 0 ] && grep -q "successful run completed" <<<"$out" && ! grep -q "failed\|error" <<<"$out"
}
check "stress-ng --vm 2 --verify over shm" stress_ng_shm
# A child's resident set is bounded by its own ExCache: it allocates and rewrites 96 MiB
# (8 MiB ExCache) while its memory is sampled from /proc. Before, its new memory was all
# local (VmRSS over 96 MiB).
child_resident() {
  local pidfile=$tmp/child_resident.pid max_kb=0 max_rss=0 samples=0 pid kb rss runner
  rm -f "$pidfile"
  "$LEGO_RUN" --excache 8M -- /usr/bin/python3 -c '
import os, sys, time
parent = bytearray(os.urandom(1 << 16)) * 256  # 16 MiB before the fork
pid = os.fork()
if pid == 0:
    b = bytearray(96 << 20)
    open(sys.argv[1], "w").write(str(os.getpid()))
    end = time.time() + 5
    n = 0
    while time.time() < end:
        for i in range(0, len(b), 4096): b[i] = n & 255
        n += 1
    ok = all(b[i] == (n - 1) & 255 for i in range(0, len(b), 4096)) and parent[70000] == parent[70000 + 65536]
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))' "$pidfile" >/dev/null 2>&1 &
  runner=$!
  for _ in $(seq 1 400); do
    pid=$(cat "$pidfile" 2>/dev/null)
    if [ -n "$pid" ]; then
      kb=$(python3 "$HERE/region_rss.py" "$pid")
      rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
      if [ -n "$kb" ] && [ -n "$rss" ]; then
        samples=$((samples + 1))
        [ "$kb" -gt "$max_kb" ] && max_kb=$kb
        [ "$rss" -gt "$max_rss" ] && max_rss=$rss
      fi
    fi
    kill -0 $runner 2>/dev/null || break
    sleep 0.05
  done
  wait $runner
  local rc=$?
  note "child $pid: region Rss max $max_kb KiB, VmRSS max $max_rss KiB over $samples samples"
  [ "$rc" -eq 0 ] && [ "$samples" -gt 0 ] && [ "$max_kb" -le $((8192 + 1024)) ] &&
    [ "$max_rss" -lt $((64 * 1024)) ]
}
check "a forked child's resident set stays within its own ExCache" child_resident

# 3. Resident size of the region never exceeds the ExCache (+ 1 MiB slack), from smaps.
resident_size() {
  "$LEGO_RUN" --excache 8M -- "$INTEGRITY" 64 2 150000 >/dev/null 2>&1 &
  local runner=$! max_kb=0 samples=0 pid kb
  for _ in $(seq 1 200); do
    pid=$(pgrep -f "lego_integrity 64 2 150000" | while read -r p; do
      [ "$(cat /proc/$p/comm 2>/dev/null)" = "lego_integrity" ] && echo "$p"; done | head -1)
    if [ -n "$pid" ]; then
      # The region is the largest mapping (64 GiB); its Rss is the resident part of the heap.
      kb=$(python3 "$HERE/region_rss.py" "$pid")
      if [ -n "$kb" ]; then
        samples=$((samples + 1))
        [ "$kb" -gt "$max_kb" ] && max_kb=$kb
      fi
    fi
    kill -0 $runner 2>/dev/null || break
    sleep 0.05
  done
  wait $runner
  note "region Rss: max $max_kb KiB over $samples samples (ExCache 8192 KiB)"
  [ "$samples" -gt 0 ] && [ "$max_kb" -le $((8192 + 1024)) ]
}
check "region resident size <= ExCache + 1 MiB" resident_size

# 4. python3 building and checking a large dict and list, 16 MiB ExCache.
python_dict() {
  local out
  out=$("$LEGO_RUN" --excache 16M -- /usr/bin/python3 "$HERE/dict_list.py" 2>&1)
  echo "$out"
  [ "$(echo "$out" | tail -1)" = "python ok" ]
}
check "python3 dict and list" python_dict

# 5. sqlite3 with a large in-memory database, 16 MiB ExCache.
sqlite_memory() {
  local out
  out=$("$LEGO_RUN" --excache 16M -- sqlite3 :memory: <"$HERE/sqlite.sql" 2>&1)
  echo "$out"
  [ "$out" = $'120000|7200060000|48000000\n1237\nok' ]
}
check "sqlite3 in-memory database" sqlite_memory

# 5b. A full memory node: the allocation fails as malloc failing would (Python's
# MemoryError), the program goes on, and the memory node stays up.
memory_error() {
  local out
  out=$("$LEGO_RUN" --excache 8M --memory-capacity 64M -- /usr/bin/python3 -c '
try:
    x = bytearray(200 * 1024 * 1024)
except MemoryError:
    print("MemoryError")
y = bytearray(16 * 1024 * 1024)
y[-1] = 7
print("alive", y[-1])' 2>&1)
  echo "$out"
  [ "$out" = $'MemoryError\nalive 7' ]
}
check "full memory node: MemoryError, and the program goes on" memory_error

# 6. Exit status, stdin/stdout and signals pass through.
exit_status() {
  "$LEGO_RUN" --excache 1M -- sh -c 'exit 7'
  [ $? -eq 7 ]
}
check "exit status passes through" exit_status
check "stdin and stdout pass through" \
  eval '[ "$(echo "hello lego" | "$LEGO_RUN" --excache 1M -- cat)" = "hello lego" ]'
sigterm() {
  "$LEGO_RUN" --excache 1M -- sleep 30 &
  local runner=$!
  sleep 1.5
  kill -TERM $runner
  wait $runner
  [ $? -eq 143 ]
}
check "SIGTERM reaches the program (128+15)" sigterm
missing_program() {
  "$LEGO_RUN" --excache 1M -- /nonexistent/program
  [ $? -eq 127 ]
}
check "a missing program gives 127" missing_program

# 7. Killing the memory node mid-run: exit status 69 and a message naming the node.
killed_memd_run() {
  "$LEGO_RUN" --excache 4M -- "$INTEGRITY" 64 2 5000000 >"$tmp/kill.out" 2>"$tmp/kill.err" &
  local runner=$!
  sleep 3
  pkill -KILL -P $runner -x lego-memd
  wait $runner
  killed_rc=$?
  grep -E 'lego|memory' "$tmp/kill.err" | head -3
}
check "killed memory node: exit 69" eval 'need killed_memd_run; [ "$killed_rc" -eq 69 ]'
check "killed memory node: message names it" \
  eval 'need killed_memd_run; grep -q "memory node 2" "$tmp/kill.err"'

# 8. A cluster file and a lego-memd started by hand in its own namespace.
hand_net() {
  local net=$((100 + $$ % 100))
  ip netns add "$ns" &&
    veth_link "" "lrt$$a" "10.$net.77.1/30" "$ns" "lrt$$b" "10.$net.77.2/30" || return 1
  cluster_toml "$tmp/cluster.toml" "key = \"$(random_key)\"" -- \
    "1 processor 10.$net.77.1 19101" "7 memory 10.$net.77.2 19107 blocking"
}
hand_memd() {
  need hand_net || return 1
  ip netns exec "$ns" "$MEMD" --config "$tmp/cluster.toml" --node 7 --capacity 256M \
    --ready-fd 3 3>"$tmp/memd.ready" 2>>"$tmp/memd.err" &
  hand_memd=$!
  wait_ready "$tmp/memd.ready" "$hand_memd" || { cat "$tmp/memd.err"; return 1; }
}
hand_config() {
  need hand_memd || return 1
  local out
  out=$("$LEGO_RUN" --config "$tmp/cluster.toml" --excache 4M -- "$INTEGRITY" 32 2 50000 2>&1)
  echo "$out"
  integrity_ok "$out"
}
check "--config with a hand-started lego-memd" hand_config
# Two programs on one memory node at once, each in its own address space.
two_programs() {
  need hand_memd || return 1
  "$LEGO_RUN" --config "$tmp/cluster.toml" --excache 4M -- "$INTEGRITY" 24 2 60000 >"$tmp/a.out" 2>&1 &
  local a=$! b ra rb spaces=0
  "$LEGO_RUN" --config "$tmp/cluster.toml" --excache 4M -- "$INTEGRITY" 24 2 60000 >"$tmp/b.out" 2>&1 &
  b=$!
  for _ in $(seq 1 40); do  # until both have opened their spaces (or one of them ended)
    spaces=$("$MEMD" --status --config "$tmp/cluster.toml" --node 7 2>&1 | grep -c '^space ')
    [ "$spaces" -ge 2 ] && break
    kill -0 $a 2>/dev/null && kill -0 $b 2>/dev/null || break
    sleep 0.25
  done
  wait $a
  ra=$?
  wait $b
  rb=$?
  echo "exit statuses $ra $rb, $spaces spaces seen at once"
  tail -n 3 "$tmp/a.out" "$tmp/b.out"
  [ "$ra" -eq 0 ] && [ "$rb" -eq 0 ] && [ "$spaces" -eq 2 ]
}
check "two programs at once on one memory node" two_programs
hand_status() {
  need hand_memd || return 1
  local status
  status=$("$MEMD" --status --config "$tmp/cluster.toml" --node 7 2>&1)
  echo "$status"
  grep -q '^spaces_open 0' <<<"$status"
}
check "lego-memd --status answers, and the finished processes' spaces were freed" hand_status

# A memory node that stalls (SIGSTOP) mid-run. Shorter than the retries (8 of timeout_ms):
# misses time out, are sent again and the program finishes with its data intact. Longer:
# the program ends with exit status 69 and a message naming the node, not a hang.
stall_run() {  # stall_run SECONDS: the program's exit status in $stall_rc
  need hand_net || return 1
  if [ -n "$hand_memd" ]; then  # the stalled one takes its address
    kill "$hand_memd"
    wait "$hand_memd" 2>/dev/null
    hand_memd=""
  fi
  sed 's/^\[cluster\]$/[cluster]\ntimeout_ms = 500/' "$tmp/cluster.toml" >"$tmp/stall.toml"
  ip netns exec "$ns" "$MEMD" --config "$tmp/stall.toml" --node 7 --capacity 256M \
    --ready-fd 3 3>"$tmp/stall.ready" 2>>"$tmp/memd.err" &
  local m=$! r
  wait_ready "$tmp/stall.ready" "$m" || { cat "$tmp/memd.err"; return 1; }
  "$LEGO_RUN" --config "$tmp/stall.toml" --excache 4M -- "$INTEGRITY" 32 2 100000 \
    >"$tmp/stall.out" 2>"$tmp/stall.err" &
  r=$!
  # Stall it once the program runs against it (20 ticks of CPU), not during lego-run's
  # start, which a loaded host can stretch past the whole stall.
  local p="" i
  for i in $(seq 1 300); do
    p=$(pgrep -n -f -- "^$INTEGRITY 32 2 100000")
    [ -n "$p" ] && [ "$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)" -ge 20 ] &&
      break
    sleep 0.1
  done
  kill -STOP $m
  sleep "$1"
  kill -CONT $m
  wait $r
  stall_rc=$?
  kill $m
  wait $m 2>/dev/null
  echo "exit status $stall_rc"
  tail -n 3 "$tmp/stall.out" "$tmp/stall.err"
}
short_stall() {
  stall_run 1.2 || return 1
  [ "$stall_rc" -eq 0 ] && integrity_ok "$(cat "$tmp/stall.out" "$tmp/stall.err")"
}
check "a memory node stalled 1.2 s (timeout_ms 500): the program finishes intact" short_stall
long_stall() {
  stall_run 6 || return 1
  [ "$stall_rc" -eq 69 ] && grep -q "memory node 7" "$tmp/stall.err"
}
check "a memory node stalled 6 s: exit 69 naming the node" long_stall

# 9. The namespace of a lego-run that was SIGKILLed (no chance to clean up) is removed by
#    the next lego-run; a live one's is kept.
sweep_namespaces() {
  sh -c 'exit 0' &
  swept_dead=$!
  wait $swept_dead
  ip netns add "lego-run-$swept_dead"
  ip netns add "lego-run-$$"
  "$LEGO_RUN" --excache 1M -- true
  [ ! -e "/var/run/netns/lego-run-$swept_dead" ] && swept=yes || swept=no
  [ -e "/var/run/netns/lego-run-$$" ] && kept=yes || kept=no
  ip netns del "lego-run-$swept_dead" 2>/dev/null
  ip netns del "lego-run-$$" 2>/dev/null
  echo "dead run's namespace swept: $swept; live run's kept: $kept"
}
check "a killed lego-run's namespace is swept" eval 'need sweep_namespaces; [ "$swept" = yes ]'
check "a live lego-run's namespace is kept" eval 'need sweep_namespaces; [ "$kept" = yes ]'

# 10. Bad flags get a clear message and exit status 125 (lego-run: its own failures, as
#     documented) or 2 (lego-memd); --help exits 0.
check "lego-run --excache abc" bad_flag 125 "not a size" "$LEGO_RUN" --excache abc -- true
check "lego-run with no program" bad_flag 125 "no PROGRAM" "$LEGO_RUN" --excache 1M
check "lego-run --policy lru" bad_flag 125 "fifo, clock or refault" "$LEGO_RUN" --policy lru -- true
check "lego-run --rma always" bad_flag 125 "auto, on or off" "$LEGO_RUN" --rma always -- true
check "lego-run --config missing.toml" bad_flag 125 "missing.toml" "$LEGO_RUN" --config "$tmp/missing.toml" -- true
check "lego-run --no-such-flag" bad_flag 125 "no-such-flag" "$LEGO_RUN" --no-such-flag -- true
check "lego-run --prefetch -1 names the flag and its range" \
  bad_flag 125 "^lego-run: --prefetch: '-1' is not a number in 0..31$" "$LEGO_RUN" --prefetch -1 -- true
check "lego-memd --capacity 1" bad_flag 2 "at least one 16 MiB vRegion" "$MEMD" --config x --node 1 --capacity 1
check "lego-memd without --node" bad_flag 2 "required" "$MEMD" --config x
check "lego-run --help" "$LEGO_RUN" --help
check "lego-memd --help" "$MEMD" --help

# 11. Defects found by an adversarial probe, each checked by symptom. A lego-memd on
#     loopback (ports from $$), with a lease long enough that only lego-run frees spaces.
port=$((10000 + $$ % 10000 * 2))
probe_cluster() {
  mkdir -p "$tmp/probe"
  cluster_toml "$tmp/probe/cluster.toml" "key = \"$(random_key)\"" -- \
    "1 processor 127.0.0.1 $port" "7 memory 127.0.0.1 $((port + 1)) blocking"
}
probe_memd() {
  need probe_cluster
  "$MEMD" --config "$tmp/probe/cluster.toml" --node 7 --capacity 512M --lease-ms 600000 \
    --ready-fd 3 3>"$tmp/probe/memd.ready" 2>"$tmp/probe/memd.err" &
  probe_memd=$!
  wait_ready "$tmp/probe/memd.ready" "$probe_memd" || { cat "$tmp/probe/memd.err"; return 1; }
}
memd_status() {  # memd_status FIELD: its value on the probe's memory node
  "$MEMD" --status --config "$tmp/probe/cluster.toml" --node 7 2>&1 | awk -v f="$1" '$1 == f {print $2}'
}

# 11.3 python's subprocess closes every inherited descriptor in its children: their spaces
# are still freed as each child exits (the program asks the memory node itself, without
# lego's library, after 20 children), and nothing is left after the run.
subprocess_run() {
  need probe_memd || return 1
  subprocess_out=$("$LEGO_RUN" --config "$tmp/probe/cluster.toml" --excache 4M -- "$PYTHON" -c '
import os, subprocess, sys, time
for _ in range(20):
    subprocess.run(["/bin/true"], check=True)
time.sleep(0.5)
env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
st = subprocess.run([sys.argv[1], "--status", "--config", sys.argv[2], "--node", "7"], env=env,
                    capture_output=True, text=True).stdout
print("during", [l.split()[1] for l in st.splitlines() if l.startswith("spaces_open ")][0])
' "$MEMD" "$tmp/probe/cluster.toml" 2>&1)
  subprocess_rc=$?
  echo "$subprocess_out"
}
check "subprocess children's spaces are freed as they exit (python3 alone holds one)" \
  eval 'need subprocess_run && [ "$subprocess_rc" -eq 0 ] && [ "$subprocess_out" = "during 1" ]'
after_run() {
  need subprocess_run || return 1
  local open reserved
  open=$(memd_status spaces_open)
  reserved=$(memd_status bytes_reserved)
  echo "spaces_open $open, bytes_reserved $reserved"
  [ "$open" = 0 ] && [ "$reserved" = 0 ]
}
check "after the run: spaces_open 0 and bytes_reserved 0" after_run

# 11.4 A relative --config keeps working in children that run after a cd.
relative_config() {
  need probe_memd || return 1
  local out
  out=$(cd "$tmp/probe" && "$LEGO_RUN" --config cluster.toml -- sh -c 'cd / && /bin/true && echo ok' 2>&1)
  echo "$out"
  [ "$out" = "ok" ]
}
check "a relative --config works after the program's cd" relative_config

# 11.5 A static program (or a script run by one) would run all in local memory: refused,
# or with --allow-local run with a warning, and --stats says that nothing was remote.
static_refused() {
  local out rc
  out=$("$LEGO_RUN" -- "$STATIC_HELLO" 2>&1)
  rc=$?
  echo "$out"
  [ "$rc" -eq 125 ] && [ "${out#*statically linked}" != "$out" ] && [ "${out#*--allow-local}" != "$out" ]
}
check "a static program is refused (125) saying why" static_refused
static_script() {
  mkdir -p "$tmp/probe"
  printf '#!%s\n' "$STATIC_HELLO" >"$tmp/probe/static.sh"
  chmod +x "$tmp/probe/static.sh"
  bad_flag 125 "statically linked" "$LEGO_RUN" -- "$tmp/probe/static.sh"
}
check "a script whose interpreter is static is refused" static_script
allow_local() {
  mkdir -p "$tmp/probe"
  local out
  out=$("$LEGO_RUN" --allow-local --stats -- "$STATIC_HELLO" 2>"$tmp/probe/static.err")
  echo "$out"
  cat "$tmp/probe/static.err"
  [ "$out" = "static hello 7" ] &&
    [ "$(grep -c 'warning: .*statically linked' "$tmp/probe/static.err")" = 1 ] &&
    grep -q "memory was all local" "$tmp/probe/static.err"
}
check "--allow-local runs it, warns once, and --stats says its memory was all local" allow_local

# 11.6 Exit 69 and "memory node N was lost" only for a lost memory node; lego-run's own
# failures exit 125 with a message of their own.
own_69() {
  need probe_memd || return 1
  local out rc
  out=$("$LEGO_RUN" --config "$tmp/probe/cluster.toml" -- sh -c 'exit 69' 2>&1)
  rc=$?
  echo "exit status $rc: $out"
  [ "$rc" -eq 69 ] && [ -z "$out" ]
}
check "a program's own exit 69 passes through silently" own_69
# own_failure STATUS-TEXT COMMAND...: exit 125, saying TEXT and nothing of a lost node.
own_failure() {
  local want=$1 out rc
  shift
  out=$("$@" 2>&1)
  rc=$?
  echo "exit status $rc: $out"
  [ "$rc" -eq 125 ] && [ "${out#*"$want"}" != "$out" ] && [ "${out#*lost}" = "$out" ]
}
check "--excache 1T: 125, more than this host's memory" \
  own_failure "--excache 1.0 TiB: more than this host" "$LEGO_RUN" --excache 1T -- true
if [ ! -e /dev/lego_pcache ]; then
  check "--pcache on without the module: 125 naming /dev/lego_pcache" \
    own_failure "--pcache on: /dev/lego_pcache" "$LEGO_RUN" --pcache on -- true
fi
wrong_key() {
  need probe_memd || return 1
  sed "s/^key = .*/key = \"$(random_key)\"/" "$tmp/probe/cluster.toml" >"$tmp/probe/wrong-key.toml"
  own_failure "memory node 7 (127.0.0.1:$((port + 1)), tcp) refused" \
    "$LEGO_RUN" --config "$tmp/probe/wrong-key.toml" -- true &&
    grep -q "cluster key" <<<"$("$LEGO_RUN" --config "$tmp/probe/wrong-key.toml" -- true 2>&1)"
}
check "a wrong cluster key: 125 naming the memory node and the key" wrong_key
nobody_serves() {
  need probe_cluster
  sed "s/^port = $((port + 1))$/port = $((port + 2))/" "$tmp/probe/cluster.toml" >"$tmp/probe/nobody.toml"
  own_failure "cannot reach memory node 7 (127.0.0.1:$((port + 2))" \
    "$LEGO_RUN" --config "$tmp/probe/nobody.toml" -- true &&
    grep -q "Connection refused" <<<"$("$LEGO_RUN" --config "$tmp/probe/nobody.toml" -- true 2>&1)"
}
check "a memory node nobody serves: 125, cannot reach it, its address and errno" nobody_serves
# The runtime failing to start in a process (here: its cluster file vanished) is said by
# lego-run, with the status 125 and no word of a lost node.
runtime_fails() {
  need probe_memd || return 1
  own_failure "cannot open cluster file $tmp/probe/gone.toml" \
    "$LEGO_RUN" --config "$tmp/probe/cluster.toml" -- \
    sh -c "LEGO_CONFIG=$tmp/probe/gone.toml exec /bin/true"
}
check "the runtime failing to start: 125 and its reason" runtime_fails

# 11.7 Node ids must have the role their flag names.
check "--node 7 (a memory node) is refused" eval 'need probe_cluster; bad_flag 125 \
  "--node 7: node 7 is a memory node in $tmp/probe/cluster.toml, not a processor node" \
  "$LEGO_RUN" --config "$tmp/probe/cluster.toml" --node 7 -- true'
check "--memory-node 1 (a processor node) is refused" eval 'need probe_cluster; bad_flag 125 \
  "node 1 is a processor node in .*, not a memory node" \
  "$LEGO_RUN" --config "$tmp/probe/cluster.toml" --memory-node 1 -- true'

# 11.8 kill -9 of lego-run: the program dies with it, and the next lego-run removes what
# was left. With --config: the dead program's space is closed by that next run's sweep
# (the lease here is 10 minutes).
gone_within() {  # gone_within SECONDS COMMAND-LINE: no process runs exactly it within SECONDS
  local i
  for i in $(seq 1 $(($1 * 10))); do
    pgrep -xf "$2" >/dev/null || return 0
    sleep 0.1
  done
  return 1
}
killed_config_run() {
  need probe_memd || return 1
  "$LEGO_RUN" --config "$tmp/probe/cluster.toml" -- sleep 61.$$ &
  killed_config=$!
  wait_until 5 pgrep -xf "sleep 61.$$" >/dev/null  # until the program runs
  sleep 0.5
  killed_config_open=$(memd_status spaces_open)
  kill -KILL $killed_config
  wait $killed_config 2>/dev/null
  echo "spaces open before the kill: $killed_config_open"
}
check "kill -9 of lego-run --config: the program dies with it" \
  eval 'need killed_config_run && gone_within 2 "sleep 61.$$"'
space_kept() {
  need killed_config_run || return 1
  local open
  open=$(memd_status spaces_open)
  echo "spaces open: $killed_config_open before the kill, $open after it"
  [ "$killed_config_open" = 1 ] && [ "$open" = 1 ] && [ -d "/tmp/lego-run-$killed_config" ]
}
check "kill -9 of lego-run --config: its space is still open until a lego-run sweeps it" space_kept
config_swept() {
  need killed_config_run || return 1
  "$LEGO_RUN" --excache 1M -- true
  [ "$(memd_status spaces_open)" = 0 ] && [ ! -e "/tmp/lego-run-$killed_config" ]
}
check "kill -9 of lego-run --config: the next lego-run closes its space and removes its run directory" \
  config_swept
killed_private_run() {
  "$LEGO_RUN" --excache 1M -- sleep 62.$$ &
  killed_private=$!
  # until the private memory node's network is up and the program runs
  wait_until 5 pgrep -xf "sleep 62.$$" >/dev/null
  kill -KILL $killed_private
  wait $killed_private 2>/dev/null
}
check "kill -9 of lego-run (private memory node): the program dies with it" \
  eval 'need killed_private_run; gone_within 2 "sleep 62.$$"'
left_behind() {
  need killed_private_run
  local r=$killed_private
  [ -d "/tmp/lego-run-$r" ] && [ -e "/var/run/netns/lego-run-$r" ] && [ -e "/sys/class/net/lgo${r}a" ]
}
check "kill -9 of lego-run (private memory node): its run directory (and key), namespace and veth are left" \
  left_behind
# A lego-run killed between making its veth pair and moving one end into its namespace
# leaves both ends on the host (the pair goes with the namespace otherwise).
private_swept() {
  need killed_private_run
  local r=$killed_private dead
  sh -c 'exit 0' &
  dead=$!
  wait $dead
  ip link add "lgo${dead}a" type veth peer name "lgo${dead}b"
  "$LEGO_RUN" --excache 1M -- true
  [ ! -e "/tmp/lego-run-$r" ] && [ ! -e "/var/run/netns/lego-run-$r" ] &&
    [ ! -e "/sys/class/net/lgo${r}a" ] && [ ! -e "/sys/class/net/lgo${dead}a" ]
  local rc=$?
  ip link del "lgo${dead}a" 2>/dev/null
  return $rc
}
check "the next lego-run removes what a killed one left, and a dead run's veth pair outside a namespace" \
  private_swept

# 12. Start-up (issue 14): LEGO_STARTUP_TRACE shows a run's steps across its processes, in
# order; with its own memory node lego-run opens no connection once the program is done
# (closing the program's space there cost a libfabric load and a channel over shm; the
# memory node stops and frees it anyway).
startup_trace_run() {
  startup_trace=$tmp/startup.trace
  rm -f "$startup_trace"
  LEGO_STARTUP_TRACE=$startup_trace "$LEGO_RUN" --excache 1M --transport shm -- true
  startup_trace_rc=$?
  sed 's/^/  /' "$startup_trace"
}
# in_order FILE WHAT...: each WHAT is the text of a line of FILE, after the one before it.
in_order() {
  local file=$1 last=0 n
  shift
  for what in "$@"; do
    n=$(grep -n -m1 -- " $what\$" "$file" | cut -d: -f1)
    [ -n "$n" ] && [ "$n" -gt "$last" ] || { echo "'$what' missing or out of order"; return 1; }
    last=$n
  done
}
check "start-up trace: lego-run, lego-memd and the runtime mark their steps in order" \
  eval 'need startup_trace_run; [ "$startup_trace_rc" -eq 0 ] && in_order "$startup_trace" \
    "lego-run: start" "node: serving" "lego-run: private cluster up" "runtime: start" \
    "runtime: ready" "runtime: exit" "lego-run: the program exited" "node: stop requested" \
    "lego-run: cluster stopped" "lego-run: exit"'
no_late_connection() {
  need startup_trace_run
  local lego_run_pid
  lego_run_pid=$(awk '$3 == "lego-run:" && $4 == "start" { print $2; exit }' "$startup_trace")
  [ -n "$lego_run_pid" ] && ! grep -q "^[0-9]* $lego_run_pid libfit: " "$startup_trace"
}
check "start-up: with its own memory node, lego-run connects to it neither before nor after the program" \
  no_late_connection

check_summary
