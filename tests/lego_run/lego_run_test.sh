#!/usr/bin/env bash
# End to end: real programs under lego-run, the memory node in its own network namespace
# over tcp (lego-run's embedded default as root), a tiny ExCache.
# Guards: data integrity with racing threads over a heap 8x the ExCache; Debian's python3
# and sqlite3 with checked results; the resident size of the disaggregated region stays
# within the ExCache (read from /proc/PID/smaps); exit status, stdin/stdout and signals
# pass through; a memory node killed mid-run ends the program with exit status 69 and a
# message naming the node; a cluster file with lego-memd started by hand works; fork()
# gives children (and grandchildren) the heap as it was at the fork, and shell pipelines and
# python's os.fork work.
set -uo pipefail

root=${TEST_SRCDIR:-}/lego
[ -d "$root" ] || root=$(cd "$(dirname "$0")/../.." && pwd)/bazel-bin
LEGO_RUN=$root/runtime/lego-run
MEMD=$root/daemons/memory/lego-memd
INTEGRITY=$root/tests/lego_run/lego_integrity
FORK_INTEGRITY=$root/tests/lego_run/lego_fork_integrity
HERE=$root/tests/lego_run
[ -f "$HERE/dict_list.py" ] || HERE=$(cd "$(dirname "$0")" && pwd)
tmp=${TEST_TMPDIR:-$(mktemp -d)}

passed=0
failed=0
check() {  # check NAME CONDITION-COMMAND...
  local name=$1
  shift
  if "$@"; then
    echo "PASS: $name"
    passed=$((passed + 1))
  else
    echo "FAIL: $name"
    # What the program said (most checks capture it in $out), to tell a bug from a stall.
    [ -n "${out:-}" ] && printf '%s\n' "$out" | tail -5 | sed 's/^/    | /'
    failed=$((failed + 1))
  fi
}

# 1. Integrity: 4 threads over a 64 MiB heap with an 8 MiB ExCache.
out=$("$LEGO_RUN" --excache 8M --stats -- "$INTEGRITY" 64 4 60000 2>"$tmp/integrity.err")
rc=$?
cat "$tmp/integrity.err" | grep -E 'misses|write_backs|evictions' | sed 's/^/  /'
check "integrity under lego-run (64 MiB heap, 8 MiB ExCache, 4 threads)" \
  [ "$rc" -eq 0 -a "${out#integrity ok}" != "$out" ]
check "evictions and write-backs happened" grep -qE 'write_backs +[1-9]' "$tmp/integrity.err"

# 2. The same with the sigbus delivery and the clock policy.
out=$("$LEGO_RUN" --excache 8M --delivery sigbus --policy clock -- "$INTEGRITY" 48 2 40000 2>&1)
check "integrity with --delivery sigbus --policy clock" [ "${out#integrity ok}" != "$out" ]

# 2b. The memory node over shm on this host.
out=$("$LEGO_RUN" --excache 8M --transport shm -- "$INTEGRITY" 48 2 40000 2>&1)
check "integrity with --transport shm" [ "${out#integrity ok}" != "$out" ]
# A program that execs keeps its pid (env execs bash here; bash forks and execs): each
# image opens shm endpoints of its own, and none is left in /dev/shm after the run.
out=$("$LEGO_RUN" --excache 8M --transport shm -- env bash -c 'exec sh -c "echo \$((6*7))"; echo not reached' 2>&1)
check "exec'ing programs over shm (env, bash, exec sh)" [ "$out" = "42" ]
shm_leaked() {  # a region of a lego process that is gone (other tests' may be live)
  for f in /dev/shm/lego-[0-9]*-*:*; do
    [ -e "$f" ] || continue
    pid=${f#/dev/shm/lego-}
    [ -d "/proc/${pid%%-*}" ] || return 0
  done
  return 1
}
check "no shm regions left by the run's processes" eval '! shm_leaked'
# A program that closes the runtime's report pipe early (a daemon closing its fds): lego-run
# waits for it without spinning on the closed pipe.
"$LEGO_RUN" -- bash -c 'eval "exec $LEGO_REPORT_FD>&-"; sleep 2' &
runner=$!
sleep 1.5
ticks=$(awk '{print $14 + $15}' "/proc/$runner/stat" 2>/dev/null || echo 0)
wait $runner
check "lego-run idles while the program runs with the report pipe closed ($ticks ticks)" \
  [ "$ticks" -lt 50 ]

# 2c. fork(): children and grandchildren see the heap as it was at the fork while the
# parent's writer threads keep evicting; a 32 MiB heap over a 4 MiB ExCache.
out=$("$LEGO_RUN" --excache 4M -- "$FORK_INTEGRITY" 32 4 2>&1)
check "fork integrity (children and grandchildren, racing evictions)" \
  [ "${out%fork integrity ok}" != "$out" ]
[ "${out%fork integrity ok}" != "$out" ] || echo "$out" | tail -5 | sed 's/^/  /'
out=$("$LEGO_RUN" --excache 1M -- bash -c \
  'n=$(seq 1 50000 | sort -n | tail -1); for i in 1 2; do echo $i | cat; done; echo "$n $(echo sub)"' 2>&1)
check "bash pipelines, command substitution and subshells" [ "$out" = $'1\n2\n50000 sub' ]
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
check "python3 os.fork" [ "$out" = "fork 0 parent" ]
out=$("$LEGO_RUN" --excache 1M --delivery sigbus -- bash -c 'echo $(echo x)' 2>&1)
check "fork with --delivery sigbus fails clearly" grep -q "fork() failed: .*handler-thread" <<<"$out"

# 3. Resident size of the region never exceeds the ExCache (+ 1 MiB slack), from smaps.
"$LEGO_RUN" --excache 8M -- "$INTEGRITY" 64 2 150000 >/dev/null 2>&1 &
runner=$!
max_kb=0
samples=0
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
echo "  region Rss: max $max_kb KiB over $samples samples (ExCache 8192 KiB)"
check "region resident size <= ExCache + 1 MiB" [ "$samples" -gt 0 -a "$max_kb" -le $((8192 + 1024)) ]

# 4. python3 building and checking a large dict and list, 16 MiB ExCache.
out=$("$LEGO_RUN" --excache 16M -- /usr/bin/python3 "$HERE/dict_list.py" 2>&1)
check "python3 dict and list" [ "$(echo "$out" | tail -1)" = "python ok" ]

# 5. sqlite3 with a large in-memory database, 16 MiB ExCache.
out=$("$LEGO_RUN" --excache 16M -- sqlite3 :memory: < "$HERE/sqlite.sql" 2>&1)
expected=$'120000|7200060000|48000000\n1237\nok'
check "sqlite3 in-memory database" [ "$out" = "$expected" ]
[ "$out" = "$expected" ] || echo "$out" | head -5

# 5b. A full memory node: the allocation fails as malloc failing would (Python's
# MemoryError), the program goes on, and the memory node stays up.
out=$("$LEGO_RUN" --excache 8M --memory-capacity 64M -- /usr/bin/python3 -c '
try:
    x = bytearray(200 * 1024 * 1024)
except MemoryError:
    print("MemoryError")
y = bytearray(16 * 1024 * 1024)
y[-1] = 7
print("alive", y[-1])' 2>&1)
check "full memory node: MemoryError, and the program goes on" [ "$out" = $'MemoryError\nalive 7' ]

# 6. Exit status, stdin/stdout and signals pass through.
"$LEGO_RUN" --excache 1M -- sh -c 'exit 7' >/dev/null 2>&1
check "exit status passes through" [ $? -eq 7 ]
out=$(echo "hello lego" | "$LEGO_RUN" --excache 1M -- cat)
check "stdin and stdout pass through" [ "$out" = "hello lego" ]
"$LEGO_RUN" --excache 1M -- sleep 30 &
runner=$!
sleep 1.5
kill -TERM $runner
wait $runner
check "SIGTERM reaches the program (128+15)" [ $? -eq 143 ]
"$LEGO_RUN" --excache 1M -- /nonexistent/program 2>/dev/null
check "a missing program gives 127" [ $? -eq 127 ]

# 7. Killing the memory node mid-run: exit status 69 and a message naming the node.
"$LEGO_RUN" --excache 4M -- "$INTEGRITY" 64 2 5000000 >"$tmp/kill.out" 2>"$tmp/kill.err" &
runner=$!
sleep 3
pkill -KILL -P $runner -x lego-memd
wait $runner
rc=$?
grep -E 'lego|memory' "$tmp/kill.err" | head -3 | sed 's/^/  /'
check "killed memory node: exit 69" [ "$rc" -eq 69 ]
check "killed memory node: message names it" grep -q "memory node 2" "$tmp/kill.err"

# 8. A cluster file and a lego-memd started by hand in its own namespace.
ns=lego-rt-$$
ip netns add $ns
ip link add lrt$$a type veth peer name lrt$$b
ip link set lrt$$b netns $ns
net=$((100 + $$ % 100))
ip addr add 10.$net.77.1/30 dev lrt$$a && ip link set lrt$$a up
ip -n $ns addr add 10.$net.77.2/30 dev lrt$$b && ip -n $ns link set lrt$$b up && ip -n $ns link set lo up
key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
cat > "$tmp/cluster.toml" <<TOML
[cluster]
key = "$key"
[[node]]
id = 1
role = "processor"
address = "10.$net.77.1"
port = 19101
[[node]]
id = 7
role = "memory"
address = "10.$net.77.2"
port = 19107
progress = "blocking"
TOML
ip netns exec $ns "$MEMD" --config "$tmp/cluster.toml" --node 7 --capacity 256M 2>"$tmp/memd.err" &
memd=$!
sleep 1
out=$("$LEGO_RUN" --config "$tmp/cluster.toml" --excache 4M -- "$INTEGRITY" 32 2 50000 2>&1)
check "--config with a hand-started lego-memd" [ "${out#integrity ok}" != "$out" ]
# Two programs on one memory node at once, each in its own address space.
"$LEGO_RUN" --config "$tmp/cluster.toml" --excache 4M -- "$INTEGRITY" 24 2 60000 >"$tmp/a.out" 2>&1 &
a=$!
"$LEGO_RUN" --config "$tmp/cluster.toml" --excache 4M -- "$INTEGRITY" 24 2 60000 >"$tmp/b.out" 2>&1 &
b=$!
spaces=0
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
check "two programs at once on one memory node ($spaces spaces seen)" \
  [ "$ra" -eq 0 -a "$rb" -eq 0 -a "$spaces" -eq 2 ]
status=$("$MEMD" --status --config "$tmp/cluster.toml" --node 7 2>&1)
check "lego-memd --status answers, and the finished process's space was freed" \
  grep -q '^spaces_open 0' <<<"$status"
kill $memd
wait $memd 2>/dev/null

# A memory node that stalls (SIGSTOP) mid-run. Shorter than the retries (8 of timeout_ms):
# misses time out, are sent again and the program finishes with its data intact. Longer:
# the program ends with exit status 69 and a message naming the node, not a hang.
sed 's/^\[cluster\]$/[cluster]\ntimeout_ms = 500/' "$tmp/cluster.toml" >"$tmp/stall.toml"
stall_run() {  # stall_run SECONDS: prints the program's exit status
  ip netns exec $ns "$MEMD" --config "$tmp/stall.toml" --node 7 --capacity 256M \
    2>>"$tmp/memd.err" &
  local m=$! r rc
  sleep 1
  "$LEGO_RUN" --config "$tmp/stall.toml" --excache 4M -- "$INTEGRITY" 32 2 100000 \
    >"$tmp/stall.out" 2>"$tmp/stall.err" &
  r=$!
  sleep 1.5
  kill -STOP $m
  sleep "$1"
  kill -CONT $m
  wait $r
  rc=$?
  kill $m
  wait $m 2>/dev/null
  echo $rc
}
rc=$(stall_run 1.2)
out=$(cat "$tmp/stall.out" "$tmp/stall.err")
check "a memory node stalled 1.2 s (timeout_ms 500): the program finishes intact" \
  [ "$rc" -eq 0 -a "${out#integrity ok}" != "$out" ]
rc=$(stall_run 6)
out=$(cat "$tmp/stall.err")
check "a memory node stalled 6 s: exit 69 naming the node" \
  [ "$rc" -eq 69 -a "${out#*memory node 7}" != "$out" ]
ip netns del $ns
ip link del lrt$$a 2>/dev/null

# 9. The namespace of a lego-run that was SIGKILLed (no chance to clean up) is removed by
#    the next lego-run; a live one's is kept.
sh -c 'exit 0' &
dead=$!
wait $dead
out=""
ip netns add "lego-run-$dead"
ip netns add "lego-run-$$"
"$LEGO_RUN" --excache 1M -- true >/dev/null 2>&1
check "a killed lego-run's namespace is swept" [ ! -e "/var/run/netns/lego-run-$dead" ]
check "a live lego-run's namespace is kept" [ -e "/var/run/netns/lego-run-$$" ]
ip netns del "lego-run-$dead" 2>/dev/null
ip netns del "lego-run-$$" 2>/dev/null

# 10. Bad flags get a clear message and exit status 2; --help exits 0.
bad_flag() {  # bad_flag EXPECTED-TEXT COMMAND...
  local want=$1
  shift
  local out
  out=$("$@" 2>&1)
  [ $? -eq 2 ] && grep -q -- "$want" <<<"$out"
}
check "lego-run --excache abc" bad_flag "not a size" "$LEGO_RUN" --excache abc -- true
check "lego-run with no program" bad_flag "no PROGRAM" "$LEGO_RUN" --excache 1M
check "lego-run --policy lru" bad_flag "fifo or clock" "$LEGO_RUN" --policy lru -- true
check "lego-run --config missing.toml" bad_flag "missing.toml" "$LEGO_RUN" --config "$tmp/missing.toml" -- true
check "lego-memd --capacity 1" bad_flag "at least one 4 KiB line" "$MEMD" --config x --node 1 --capacity 1
check "lego-memd without --node" bad_flag "required" "$MEMD" --config x
check "lego-run --help" "$LEGO_RUN" --help >/dev/null
check "lego-memd --help" "$MEMD" --help >/dev/null

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
