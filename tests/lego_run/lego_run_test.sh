#!/usr/bin/env bash
# End to end: real programs under lego-run, the memory node in its own network namespace
# over tcp (lego-run's embedded default as root), a tiny ExCache.
# Guards: data integrity with racing threads over a heap 8x the ExCache; Debian's python3
# and sqlite3 with checked results; the resident size of the disaggregated region stays
# within the ExCache (read from /proc/PID/smaps); exit status, stdin/stdout and signals
# pass through; a memory node killed mid-run ends the program with exit status 69 and a
# message naming the node; a cluster file with lego-memd started by hand works; fork()
# gives children (and grandchildren) the heap as it was at the fork, and shell pipelines and
# python's os.fork work. Defects an adversarial probe found (section 11): subprocess children's
# spaces freed as they exit; a relative --config after a cd; static programs refused; exit
# 69 only for a lost memory node, 125 for lego-run's own failures with a message of their
# own; flags and node roles checked; a kill -9 of lego-run kills the program and the next
# lego-run removes what it left.
set -uo pipefail

root=${TEST_SRCDIR:-}/lego
[ -d "$root" ] || root=$(cd "$(dirname "$0")/../.." && pwd)/bazel-bin
LEGO_RUN=$root/runtime/lego-run
MEMD=$root/daemons/memory/lego-memd
INTEGRITY=$root/tests/lego_run/lego_integrity
FORK_INTEGRITY=$root/tests/lego_run/lego_fork_integrity
STATIC_HELLO=$root/tests/lego_run/static_hello
PYTHON=/usr/bin/python3  # Debian's, whatever PATH holds
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
# A program that closes every inherited descriptor (a daemon): lego-run waits for it without
# spinning.
"$LEGO_RUN" -- bash -c 'for fd in /proc/$$/fd/*; do fd=${fd##*/}
  [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done; sleep 2' &
runner=$!
sleep 1.5
ticks=$(awk '{print $14 + $15}' "/proc/$runner/stat" 2>/dev/null || echo 0)
wait $runner
check "lego-run idles while the program runs with its descriptors closed ($ticks ticks)" \
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

# 10. Bad flags get a clear message and exit status 125 (lego-run: its own failures, as
#     documented) or 2 (lego-memd); --help exits 0.
bad_flag() {  # bad_flag STATUS EXPECTED-TEXT COMMAND...
  local want_rc=$1 want=$2
  shift 2
  local out
  out=$("$@" 2>&1)
  [ $? -eq "$want_rc" ] && grep -q -- "$want" <<<"$out"
}
check "lego-run --excache abc" bad_flag 125 "not a size" "$LEGO_RUN" --excache abc -- true
check "lego-run with no program" bad_flag 125 "no PROGRAM" "$LEGO_RUN" --excache 1M
check "lego-run --policy lru" bad_flag 125 "fifo or clock" "$LEGO_RUN" --policy lru -- true
check "lego-run --config missing.toml" bad_flag 125 "missing.toml" "$LEGO_RUN" --config "$tmp/missing.toml" -- true
check "lego-run --no-such-flag" bad_flag 125 "no-such-flag" "$LEGO_RUN" --no-such-flag -- true
check "lego-run --prefetch -1 names the flag and its range" \
  bad_flag 125 "^lego-run: --prefetch: '-1' is not a number in 0..31$" "$LEGO_RUN" --prefetch -1 -- true
check "lego-memd --capacity 1" bad_flag 2 "at least one 4 KiB line" "$MEMD" --config x --node 1 --capacity 1
check "lego-memd without --node" bad_flag 2 "required" "$MEMD" --config x
check "lego-run --help" "$LEGO_RUN" --help >/dev/null
check "lego-memd --help" "$MEMD" --help >/dev/null

# 11. Defects found by an adversarial probe, each checked by symptom. A lego-memd on
#     loopback (ports from $$), with a lease long enough that only lego-run frees spaces.
port=$((10000 + $$ % 10000 * 2))
key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
mkdir -p "$tmp/probe"
cat >"$tmp/probe/cluster.toml" <<TOML
[cluster]
key = "$key"
[[node]]
id = 1
role = "processor"
address = "127.0.0.1"
port = $port
[[node]]
id = 7
role = "memory"
address = "127.0.0.1"
port = $((port + 1))
progress = "blocking"
TOML
"$MEMD" --config "$tmp/probe/cluster.toml" --node 7 --capacity 512M --lease-ms 600000 \
  2>"$tmp/probe/memd.err" &
memd=$!
sleep 1
memd_status() {  # memd_status FIELD: its value on the probe's memory node
  "$MEMD" --status --config "$tmp/probe/cluster.toml" --node 7 2>&1 | awk -v f="$1" '$1 == f {print $2}'
}

# 11.3 python's subprocess closes every inherited descriptor in its children: their spaces
# are still freed as each child exits (the program asks the memory node itself, without
# lego's library, after 20 children), and nothing is left after the run.
out=$("$LEGO_RUN" --config "$tmp/probe/cluster.toml" --excache 4M -- "$PYTHON" -c '
import os, subprocess, sys, time
for _ in range(20):
    subprocess.run(["/bin/true"], check=True)
time.sleep(0.5)
env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
st = subprocess.run([sys.argv[1], "--status", "--config", sys.argv[2], "--node", "7"], env=env,
                    capture_output=True, text=True).stdout
print("during", [l.split()[1] for l in st.splitlines() if l.startswith("spaces_open ")][0])
' "$MEMD" "$tmp/probe/cluster.toml" 2>&1)
rc=$?
check "subprocess children's spaces are freed as they exit (python3 alone holds one: $out)" \
  [ "$rc" -eq 0 -a "$out" = "during 1" ]
open_after=$(memd_status spaces_open)
reserved_after=$(memd_status bytes_reserved)
check "after the run: spaces_open 0 and bytes_reserved 0 ($open_after, $reserved_after)" \
  [ "$open_after" = 0 -a "$reserved_after" = 0 ]

# 11.4 A relative --config keeps working in children that run after a cd.
out=$(cd "$tmp/probe" && "$LEGO_RUN" --config cluster.toml -- sh -c 'cd / && /bin/true && echo ok' 2>&1)
check "a relative --config works after the program's cd" [ "$out" = "ok" ]

# 11.5 A static program (or a script run by one) would run all in local memory: refused,
# or with --allow-local run with a warning, and --stats says that nothing was remote.
out=$("$LEGO_RUN" -- "$STATIC_HELLO" 2>&1)
rc=$?
check "a static program is refused (125) saying why" \
  [ "$rc" -eq 125 -a "${out#*statically linked}" != "$out" -a "${out#*--allow-local}" != "$out" ]
printf '#!%s\n' "$STATIC_HELLO" >"$tmp/probe/static.sh"
chmod +x "$tmp/probe/static.sh"
out=$("$LEGO_RUN" -- "$tmp/probe/static.sh" 2>&1)
check "a script whose interpreter is static is refused" \
  [ $? -eq 125 -a "${out#*statically linked}" != "$out" ]
out=$("$LEGO_RUN" --allow-local --stats -- "$STATIC_HELLO" 2>"$tmp/probe/static.err")
check "--allow-local runs it, warns once, and --stats says its memory was all local" \
  [ "$out" = "static hello 7" -a "$(grep -c 'warning: .*statically linked' "$tmp/probe/static.err")" = 1 ] &&
  grep -q "memory was all local" "$tmp/probe/static.err"

# 11.6 Exit 69 and "memory node N was lost" only for a lost memory node; lego-run's own
# failures exit 125 with a message of their own.
out=$("$LEGO_RUN" --config "$tmp/probe/cluster.toml" -- sh -c 'exit 69' 2>&1)
check "a program's own exit 69 passes through silently" [ $? -eq 69 -a -z "$out" ]
out=$("$LEGO_RUN" --excache 1T -- true 2>&1)
check "--excache 1T: 125, more than this host's memory" \
  [ $? -eq 125 -a "${out#*--excache 1.0 TiB: more than this host}" != "$out" -a "${out#*lost}" = "$out" ]
if [ ! -e /dev/lego_pcache ]; then
  out=$("$LEGO_RUN" --pcache on -- true 2>&1)
  check "--pcache on without the module: 125 naming /dev/lego_pcache" \
    [ $? -eq 125 -a "${out#*--pcache on: /dev/lego_pcache}" != "$out" -a "${out#*lost}" = "$out" ]
fi
other=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
sed "s/^key = .*/key = \"$other\"/" "$tmp/probe/cluster.toml" >"$tmp/probe/wrong-key.toml"
out=$("$LEGO_RUN" --config "$tmp/probe/wrong-key.toml" -- true 2>&1)
check "a wrong cluster key: 125 naming the memory node and the key" \
  [ $? -eq 125 -a "${out#*memory node 7 (127.0.0.1:$((port + 1)), tcp) refused}" != "$out" \
    -a "${out#*cluster key}" != "$out" -a "${out#*lost}" = "$out" ]
sed "s/^port = $((port + 1))$/port = $((port + 2))/" "$tmp/probe/cluster.toml" >"$tmp/probe/nobody.toml"
out=$("$LEGO_RUN" --config "$tmp/probe/nobody.toml" -- true 2>&1)
check "a memory node nobody serves: 125, cannot reach it, its address and errno" \
  [ $? -eq 125 -a "${out#*cannot reach memory node 7 (127.0.0.1:$((port + 2))}" != "$out" \
    -a "${out#*Connection refused}" != "$out" -a "${out#*lost}" = "$out" ]
# The runtime failing to start in a process (here: its cluster file vanished) is said by
# lego-run, with the status 125 and no word of a lost node.
out=$("$LEGO_RUN" --config "$tmp/probe/cluster.toml" -- \
  sh -c "LEGO_CONFIG=$tmp/probe/gone.toml exec /bin/true" 2>&1)
check "the runtime failing to start: 125 and its reason" \
  [ $? -eq 125 -a "${out#*cannot open cluster file $tmp/probe/gone.toml}" != "$out" -a "${out#*lost}" = "$out" ]

# 11.7 Node ids must have the role their flag names.
check "--node 7 (a memory node) is refused" bad_flag 125 \
  "--node 7: node 7 is a memory node in $tmp/probe/cluster.toml, not a processor node" \
  "$LEGO_RUN" --config "$tmp/probe/cluster.toml" --node 7 -- true
check "--memory-node 1 (a processor node) is refused" bad_flag 125 \
  "node 1 is a processor node in .*, not a memory node" \
  "$LEGO_RUN" --config "$tmp/probe/cluster.toml" --memory-node 1 -- true

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
"$LEGO_RUN" --config "$tmp/probe/cluster.toml" -- sleep 61.$$ &
runner=$!
for _ in $(seq 1 50); do  # until the program runs
  pgrep -xf "sleep 61.$$" >/dev/null && break
  sleep 0.1
done
sleep 0.5
open_before=$(memd_status spaces_open)
kill -KILL $runner
wait $runner 2>/dev/null
check "kill -9 of lego-run --config: the program dies with it" gone_within 2 "sleep 61.$$"
check "... its space is still open until a lego-run sweeps it ($open_before)" \
  [ "$open_before" = 1 -a "$(memd_status spaces_open)" = 1 -a -d /tmp/lego-run-$runner ]
"$LEGO_RUN" --excache 1M -- true
check "... the next lego-run closes it and removes its run directory" \
  [ "$(memd_status spaces_open)" = 0 -a ! -e /tmp/lego-run-$runner ]
"$LEGO_RUN" --excache 1M -- sleep 62.$$ &
runner=$!
for _ in $(seq 1 50); do  # until the private memory node's network is up and the program runs
  pgrep -xf "sleep 62.$$" >/dev/null && break
  sleep 0.1
done
kill -KILL $runner
wait $runner 2>/dev/null
check "kill -9 of lego-run (private memory node): the program dies with it" \
  gone_within 2 "sleep 62.$$"
check "... leaving its run directory (and key), namespace and veth" \
  [ -d /tmp/lego-run-$runner -a -e /var/run/netns/lego-run-$runner -a -e /sys/class/net/lgo${runner}a ]
# A lego-run killed between making its veth pair and moving one end into its namespace
# leaves both ends on the host (the pair goes with the namespace otherwise).
sh -c 'exit 0' &
dead=$!
wait $dead
ip link add lgo${dead}a type veth peer name lgo${dead}b
"$LEGO_RUN" --excache 1M -- true
check "... which the next lego-run removes, and a dead run's veth pair outside a namespace" \
  [ ! -e /tmp/lego-run-$runner -a ! -e /var/run/netns/lego-run-$runner \
    -a ! -e /sys/class/net/lgo${runner}a -a ! -e /sys/class/net/lgo${dead}a ]
ip link del lgo${dead}a 2>/dev/null
kill $memd
wait $memd 2>/dev/null

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
