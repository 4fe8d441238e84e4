#!/usr/bin/env bash
# Hostile clients against lego-memd and lego-stord over tcp (issue 17): one attack at a
# time (tests/hostile/hostile_client), while real programs run under lego-run against the
# same daemon.
#
# Topology: lego-memd and lego-stord started by hand in a network namespace of their own
# with a cluster file; lego-run, the attacker and `--status` on the processor side (this
# namespace, one source address: the hard case for per-source caps); the idle attack also
# comes from a second namespace (another source address) at the same time.
#
# Guards, for each attack on each daemon:
#   (a) the programs exit 0 with correct data: tests/lego_run's lego_integrity (it checks
#       its own words; a 2 MiB ExCache under a 12 MiB heap keeps it missing) against
#       lego-memd, file_check.py (write, fsync, read back from the storage node, compare;
#       the last file is compared with what landed in the export) against lego-stord;
#       run again and again until the attack is over;
#   (b) `--status` answers within STATUS_MS, sampled throughout the attack;
#   (c) the daemon's VmRSS stays within RSS_PEAK_MB of what it was before the attack, and
#       is back within RSS_AFTER_MB of it after the attack;
#   (d) the attacker saw its connections closed as intended (hostile_client's verdict):
#       rejected or malformed frames get their promised error frame then EOF within 3 s;
#       connections that never finish the handshake are closed within 10 s; a peer that
#       does not read is cut off within timeout_ms + 3 s;
#   and the daemon is still running afterwards.
# Each attack prints one "figures:" line (RSS before/peak/after, status latency, program
# outcome, attacker's connections treated as intended), and the end a table of them.
#
# usage: hostile_test.sh [memd|stord]... [ATTACK]...   (default: both daemons, all attacks)
# ATTACK: none (the programs alone, as a control), flood, auth-flood, idle, half,
# bad-magic, bad-version, bad-kind, wrong-proof, early-request. LEGO_TEST_FILTER (a regex
# over the check names, "memd idle: (b)...") runs only the attacks whose checks it selects
# (tests/lib/check.sh).
set -uo pipefail
. "$(dirname "$0")/../lib/check.sh"
check_init

root=$(lego_bin_root)
LEGO_RUN=$root/runtime/lego-run
MEMD=$root/daemons/memory/lego-memd
STORD=$root/daemons/storage/lego-stord
INTEGRITY=$root/tests/lego_run/lego_integrity
HOSTILE=$root/tests/hostile/hostile_client
HERE=$root/tests/hostile
[ -f "$HERE/file_check.py" ] || HERE=$(cd "$(dirname "$0")" && pwd)
tmp=${TEST_TMPDIR:-$(mktemp -d)}

# The cluster's timeout_ms: a non-reading peer must be cut off within it plus CUTOFF_SLACK_MS.
TIMEOUT_MS=2000
CUTOFF_SLACK_MS=3000
# Both daemons' --lease-ms: a space or session is freed after this long unheard (lego-run
# and lego-fs send heartbeats every quarter of it). Short enough that a daemon stalled for
# the length of an attack loses the programs' state, as issue 17 saw with the default 20 s.
LEASE_MS=6000
# How long an attack lasts: floods longer than the cut-off they must meet, so that a late
# cut-off shows; single frames a few seconds (tens of thousands of connections once they
# are closed at once); idle and half until their connections are closed (10 s at most).
FLOOD_S=7
SINGLE_S=4
WARMUP_S=1.5     # the program runs this long before the attack starts
STATUS_MS=1000   # (b)
RSS_PEAK_MB=64   # (c) during the attack: at most this far above the RSS before it
RSS_AFTER_MB=16  # (c) after it: at most this far above the RSS before it
# lego-memd runs with the descriptor limit systemd gives its unit (LimitNOFILE unset: 1024
# soft); lego-stord raises its own to the hard limit, as its unit allows 1048576.
MEMD_NOFILE=1024

# with_out CONDITION...: prints $out (the figures and what went wrong, shown when the
# check fails), then tests CONDITION.
with_out() {
  [ -n "${out:-}" ] && printf '%s\n' "$out"
  "$@"
}

all_attacks="none flood auth-flood idle half bad-magic bad-version bad-kind wrong-proof early-request"
daemons=""
attacks=""
for a in "$@"; do
  case " memd stord " in *" $a "*) daemons="$daemons $a"; continue ;; esac
  case " $all_attacks " in
    *" $a "*) attacks="$attacks $a" ;;
    *) echo "hostile_test: '$a' is neither a daemon (memd, stord) nor an attack ($all_attacks)" >&2
       exit 2 ;;
  esac
done
daemons=${daemons:-memd stord}
attacks=${attacks:-$all_attacks}

# --- topology ---------------------------------------------------------------------------
# D: the daemons' namespace; this namespace (P, the processor side) reaches it over one
# veth pair, the second attacker's namespace (A) over another.
ns_d=lego-hostile-$$-d
ns_a=lego-hostile-$$-a
net=$((100 + $$ % 100))
p_addr=10.$net.78.1
d_addr=10.$net.78.2
a_addr=10.$net.79.1
base=$((20000 + ($$ % 10000) * 4))
cleanup() {
  # This script's own background jobs (programs, attackers, samplers), by their ids.
  local j
  for j in $(jobs -p); do kill "$j" 2>/dev/null; done
  [ -n "${memd_pid:-}" ] && kill -9 "$memd_pid" 2>/dev/null
  [ -n "${stord_pid:-}" ] && kill -9 "$stord_pid" 2>/dev/null
  ip netns del "$ns_d" 2>/dev/null
  ip netns del "$ns_a" 2>/dev/null
  ip link del "hsp$$" 2>/dev/null
  rmdir "$mnt" 2>/dev/null
}
mnt=/lego-hostile-$$  # not /lego: parallel runs must not share a mount point name
trap cleanup EXIT
ip netns add "$ns_d" && ip netns add "$ns_a" &&
  veth_link "" "hsp$$" "$p_addr/30" "$ns_d" "hsd$$" "$d_addr/30" &&
  veth_link "$ns_a" "hsa$$" "$a_addr/30" "$ns_d" "hse$$" "10.$net.79.2/30" &&
  ip -n "$ns_a" link set lo up && ip -n "$ns_a" route add default via "10.$net.79.2" ||
  { echo "hostile_test: cannot set up the network namespaces" >&2; exit 1; }

random_key >"$tmp/cluster.key"
cluster_toml "$tmp/cluster.toml" 'key_file = "cluster.key"' "timeout_ms = $TIMEOUT_MS" -- \
  "1 processor $p_addr $base" "2 memory $d_addr $((base + 1)) blocking" \
  "3 storage $d_addr $((base + 2)) blocking"
memd_port=$((base + 1))
stord_port=$((base + 2))

# --- helpers ----------------------------------------------------------------------------
at_most() { [ -n "$1" ] && [ -n "$2" ] && [ "$1" -le "$2" ]; }  # at_most VALUE LIMIT
now_ms() { echo $(($(date +%s%N) / 1000000)); }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null; }
mb() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

start_memd() {
  rm -f "$tmp/memd.ready"
  ip netns exec "$ns_d" bash -c 'ulimit -Sn '$MEMD_NOFILE' && exec "$@"' memd "$MEMD" \
    --config "$tmp/cluster.toml" --node 2 --capacity 256M --lease-ms $LEASE_MS --ready-fd 3 \
    3>"$tmp/memd.ready" 2>>"$tmp/memd.log" &
  memd_pid=$!
  wait_ready "$tmp/memd.ready" "$memd_pid"
}

start_stord() {
  rm -rf "$tmp/export" "$tmp/stord.ready"
  mkdir -p "$tmp/export"
  ip netns exec "$ns_d" "$STORD" --config "$tmp/cluster.toml" --node 3 --export "$tmp/export" \
    --lease-ms $LEASE_MS --ready-fd 3 3>"$tmp/stord.ready" 2>>"$tmp/stord.log" &
  stord_pid=$!
  wait_ready "$tmp/stord.ready" "$stord_pid"
}

stop_daemon() {  # stop_daemon PID: SIGTERM, SIGKILL after 5 s
  local pid=$1
  [ -n "$pid" ] || return
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
}

status_ms() {  # status_ms DAEMON: prints "MS RC" of one --status
  local t0 rc bin=$MEMD node=2
  [ "$1" = stord ] && bin=$STORD node=3
  t0=$(now_ms)
  timeout 20 "$bin" --status --config "$tmp/cluster.toml" --node $node >"$tmp/status.out" 2>&1
  rc=$?
  # An answer must be the daemon's counters, not just any output.
  [ $rc -eq 0 ] && ! grep -qE '^(spaces|sessions)_open ' "$tmp/status.out" && rc=99
  [ $rc -eq 0 ] || sed "s/^/exit $rc: /" "$tmp/status.out" >>"$tmp/status.errors"
  echo "$(($(now_ms) - t0)) $rc"
}

# The program, once: its exit status in $tmp/runs, its output in $tmp/run.N.
run_program() {  # run_program DAEMON N
  local rc
  if [ "$1" = memd ]; then
    "$LEGO_RUN" --config "$tmp/cluster.toml" --storage-node none --excache 2M -- \
      "$INTEGRITY" 8 2 20000 >"$tmp/run.$2" 2>&1
    rc=$?
    [ $rc -eq 0 ] && ! grep -q '^integrity ok' "$tmp/run.$2" && rc=98
  else
    "$LEGO_RUN" --config "$tmp/cluster.toml" --mount "$mnt" --excache 16M -- \
      /usr/bin/python3 "$HERE/file_check.py" "$mnt" 3 >"$tmp/run.$2" 2>&1
    rc=$?
    local want got
    want=$(sed -n 's/^files ok .* sha256 //p' "$tmp/run.$2")
    got=$(sha256sum "$tmp/export/check.bin" 2>/dev/null | cut -d' ' -f1)
    [ $rc -eq 0 ] && { [ -z "$want" ] || [ "$want" != "$got" ]; } && rc=98
  fi
  echo $rc >>"$tmp/runs"
}

# Runs the program again and again while $tmp/attacking exists (at least once).
program_loop() {  # program_loop DAEMON
  local n=0
  : >"$tmp/runs"
  while :; do
    run_program "$1" $n
    n=$((n + 1))
    [ -e "$tmp/attacking" ] || break
  done
}

rss_sampler() {  # rss_sampler PID: the largest VmRSS (KiB) while $tmp/sampling exists
  local max=0 kb
  while [ -e "$tmp/sampling" ]; do
    kb=$(rss_kb "$1")
    [ -n "$kb" ] && [ "$kb" -gt "$max" ] && max=$kb && echo "$max" >"$tmp/rss.peak"
    sleep 0.1
  done
}

# The attacker's command line for ATTACK on DAEMON (port).
attacker() {  # attacker ATTACK PORT DAEMON
  local opcode=memory-status
  [ "$3" = stord ] && opcode=storage-status
  case $1 in
    none) echo sleep $FLOOD_S ;;
    flood | auth-flood)
      echo "$HOSTILE" --attack "$1" --address "$d_addr" --port "$2" --seconds $FLOOD_S \
        --cutoff-ms $((TIMEOUT_MS + CUTOFF_SLACK_MS)) --key-file "$tmp/cluster.key" \
        --opcode $opcode ;;
    *)
      echo "$HOSTILE" --attack "$1" --address "$d_addr" --port "$2" --seconds $SINGLE_S \
        --opcode $opcode ;;
  esac
}

figures=()

# --- one attack on one daemon -----------------------------------------------------------
run_attack() {  # run_attack DAEMON ATTACK
  local daemon=$1 attack=$2 pid port label="$1 $2"
  echo "=== $label"
  rm -f "$tmp/rss.peak" "$tmp/status.samples" "$tmp/status.errors" "$tmp/attack.out" "$tmp/attack2.out" "$tmp"/run.*
  : >"$tmp/memd.log"
  : >"$tmp/stord.log"
  out=""
  if ! start_memd; then
    out=$(tail -5 "$tmp/memd.log")
    check "$label: lego-memd starts" with_out false
    stop_daemon "$memd_pid"
    return
  fi
  pid=$memd_pid
  port=$memd_port
  if [ "$daemon" = stord ]; then
    if ! start_stord; then
      out=$(tail -5 "$tmp/stord.log")
      check "$label: lego-stord starts" with_out false
      stop_daemon "$memd_pid"
      stop_daemon "$stord_pid"
      return
    fi
    pid=$stord_pid
    port=$stord_port
  fi

  touch "$tmp/attacking"
  program_loop "$daemon" &
  local loop=$!
  sleep $WARMUP_S
  local before
  before=$(rss_kb "$pid")
  echo "$before" >"$tmp/rss.peak"
  touch "$tmp/sampling"
  rss_sampler "$pid" &
  local sampler=$!

  # The attack, from the processor side (and, for idle, from namespace A too).
  local t0 rc2=0 a2=""
  t0=$(now_ms)
  $(attacker "$attack" "$port" "$daemon") >"$tmp/attack.out" 2>&1 &
  local a1=$!
  if [ "$attack" = idle ]; then
    ip netns exec "$ns_a" $(attacker "$attack" "$port" "$daemon") --connections 1000 \
      >"$tmp/attack2.out" 2>&1 &
    a2=$!
  fi
  # (b) status, sampled until the attackers are done.
  while kill -0 $a1 2>/dev/null || { [ -n "$a2" ] && kill -0 "$a2" 2>/dev/null; }; do
    echo "$(($(now_ms) - t0)) $(status_ms "$daemon")" >>"$tmp/status.samples"  # AT_MS MS RC
    sleep 0.3
  done
  wait $a1
  local rc1=$?
  if [ -n "$a2" ]; then
    wait "$a2"
    rc2=$?
  fi
  local attack_s
  attack_s=$(awk -v ms=$(($(now_ms) - t0)) 'BEGIN {printf "%.1f", ms / 1000}')
  rm -f "$tmp/attacking"
  # The programs finish (the one under way when the attack ended runs to its end).
  local waited=0
  while kill -0 $loop 2>/dev/null && [ $waited -lt 600 ]; do sleep 0.1; waited=$((waited + 1)); done
  if kill -0 $loop 2>/dev/null; then
    echo "  the program did not finish within 60 s of the attack's end: killing it"
    pkill -KILL -P $loop 2>/dev/null
  fi
  wait $loop 2>/dev/null
  # After: a second for the daemon to settle.
  sleep 1
  rm -f "$tmp/sampling"
  wait $sampler
  local after peak alive=1
  after=$(rss_kb "$pid")
  peak=$(cat "$tmp/rss.peak")
  kill -0 "$pid" 2>/dev/null || alive=0
  status_ms "$daemon" >"$tmp/status.after"
  # Spaces (memd) or sessions (stord) freed because their lease ran out.
  local expired
  expired=$(sed -nE 's/^(spaces|sessions)_expired //p' "$tmp/status.out")

  # The figures.
  local runs bad_runs max_status n_status failed_status result
  runs=$(wc -l <"$tmp/runs")
  bad_runs=$(grep -cv '^0$' "$tmp/runs")
  max_status=$(awk 'BEGIN {m = -1} $2 > m {m = $2} END {print m}' "$tmp/status.samples" 2>/dev/null)
  n_status=$(wc -l <"$tmp/status.samples" 2>/dev/null || echo 0)
  failed_status=$(awk -v lim=$STATUS_MS '$3 != 0 || $2 > lim' "$tmp/status.samples" 2>/dev/null | wc -l)
  result=$(grep '^result ' "$tmp/attack.out" | sed 's/^result //')
  [ -n "$a2" ] && result="$result | from A: $(grep '^result ' "$tmp/attack2.out" | sed 's/^result //')"
  [ "$attack" = none ] && result="(no attacker)"
  # Connections the daemon treated as intended, over all attackers.
  local conns
  conns=$(cat "$tmp/attack.out" "$tmp/attack2.out" 2>/dev/null | sed -n 's/^result //p' |
    tr ' ' '\n' | awk -F= '$1 == "ok" {ok += $2} $1 == "connections" {n += $2}
      END {if (n) printf "%d/%d", ok, n; else printf "-"}')
  local fig
  fig=$(printf '%-5s %-13s | RSS MB %6s %6s %6s | status max %5s ms, %2s/%-2s over | runs %2s, %s failed (exit %s), expired %s | conns ok %s | %4s s' \
    "$daemon" "$attack" "$(mb "${before:-0}")" "$(mb "${peak:-0}")" "$(mb "${after:-0}")" \
    "$max_status" "$failed_status" "$n_status" "$runs" "$bad_runs" \
    "$(tr '\n' ' ' <"$tmp/runs" | sed 's/ $//')" "${expired:-?}" "$conns" "$attack_s")
  figures+=("$fig")
  echo "figures: $fig"
  echo "  attacker: $result"
  grep -v '^result ' "$tmp/attack.out" | head -12 | sed 's/^/  | /'
  [ -n "$a2" ] && grep -v '^result ' "$tmp/attack2.out" | head -6 | sed 's/^/  A| /'

  # The checks.
  # The checks (names as attack_checks gives them; the figures in their output).
  out="$runs runs, $bad_runs failed"$'\n'$(for f in "$tmp"/run.*; do
    [ -e "$f" ] || continue
    grep -qE '^integrity ok|^files ok' "$f" || { echo "${f##*/}:"; tail -3 "$f"; }
  done)
  check "$label: (a) every program run exits 0 with correct data" \
    with_out [ "$runs" -ge 1 -a "$bad_runs" -eq 0 ]
  out="max $max_status ms over $n_status samples"$'\n'$(cat "$tmp/status.samples" "$tmp/status.errors" 2>/dev/null)
  check "$label: (b) --status answers within $STATUS_MS ms throughout" \
    with_out [ "$n_status" -ge 1 -a "$failed_status" -eq 0 ]
  out="$(mb "${before:-0}") -> peak $(mb "${peak:-0}") MB"
  check "$label: (c) VmRSS during the attack <= before + $RSS_PEAK_MB MB" \
    with_out at_most "$peak" $((${before:-0} + RSS_PEAK_MB * 1024))
  out="$(mb "${before:-0}") -> $(mb "${after:-0}") MB"
  check "$label: (c) VmRSS after the attack <= before + $RSS_AFTER_MB MB" \
    with_out at_most "$after" $((${before:-0} + RSS_AFTER_MB * 1024))
  if [ "$attack" != none ]; then
    out="$result"$'\n'$(grep -v '^result ' "$tmp/attack.out" | tail -5)
    check "$label: (d) the daemon closed the attacker's connections as intended" \
      with_out [ "$rc1" -eq 0 -a "$rc2" -eq 0 ]
  fi
  out=$(cat "$tmp/status.after")
  check "$label: the daemon is still running and answers --status after the attack" \
    with_out [ "$alive" -eq 1 -a "$(cut -d' ' -f2 <"$tmp/status.after")" = 0 ]

  stop_daemon "${stord_pid:-}"
  stop_daemon "$memd_pid"
  memd_pid=""
  stord_pid=""
  # Everything this attack left, for a closer look (undeclared outputs, kept by Bazel).
  local keep=${TEST_UNDECLARED_OUTPUTS_DIR:-$tmp}/$daemon-$attack
  mkdir -p "$keep"
  cp "$tmp"/run.* "$tmp/runs" "$tmp/status.samples" "$tmp/status.errors" "$tmp/attack.out" "$tmp/memd.log" \
    "$tmp/stord.log" "$keep/" 2>/dev/null
  [ -n "$a2" ] && cp "$tmp/attack2.out" "$keep/"
}

# attack_checks LABEL: the names of the checks run_attack makes for LABEL ("memd idle").
attack_checks() {
  printf '%s\n' "$1: lego-memd starts" "$1: lego-stord starts" \
    "$1: (a) every program run exits 0 with correct data" \
    "$1: (b) --status answers within $STATUS_MS ms throughout" \
    "$1: (c) VmRSS during the attack <= before + $RSS_PEAK_MB MB" \
    "$1: (c) VmRSS after the attack <= before + $RSS_AFTER_MB MB" \
    "$1: (d) the daemon closed the attacker's connections as intended" \
    "$1: the daemon is still running and answers --status after the attack"
}

for daemon in $daemons; do
  for attack in $attacks; do
    # An attack none of whose checks LEGO_TEST_FILTER selects is not made at all.
    mapfile -t names < <(attack_checks "$daemon $attack")
    selected "${names[@]}" && run_attack "$daemon" "$attack"
  done
done

echo
echo "figures: DAEMON ATTACK | RSS MB before peak after | --status: max latency, samples over $STATUS_MS ms"
echo "  or failed/samples | program runs, failed (exit statuses), leases expired | attacker's"
echo "  connections treated as intended/all | the attack's length"
printf '  %s\n' "${figures[@]}"
[ -z "${TEST_UNDECLARED_OUTPUTS_DIR:-}" ] && echo "each attack's logs: $tmp/DAEMON-ATTACK/"
check_summary
