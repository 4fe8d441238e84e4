#!/usr/bin/env bash
# The daemons' Prometheus metrics (--metrics ADDR:PORT, include/lego/metrics.h). Guards:
# lego-memd, lego-stord and lego-mond answer GET /metrics with their own counters and
# FIT's, named lego_<daemon>_<counter> with HELP (the counter's comment) and TYPE lines; the
# values move with the work (a program run against the memory node, --status calls, a
# memory node registering with the monitor, heartbeating, then lost: the monitor's nodes by
# state and its counters follow); other
# paths and methods are refused; a hostile scraper -- dozens of slow-loris connections,
# a request of megabytes -- neither stalls the scrape of an honest one nor bloats the
# daemon; a malformed address is a usage error. Ports from the pid, loopback only.
set -u
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

root=$(lego_bin_root)
MEMD=$root/daemons/memory/lego-memd
MOND=$root/daemons/monitor/lego-mond
STORD=$root/daemons/storage/lego-stord
LEGO_RUN=$root/runtime/lego-run
tmp=${TEST_TMPDIR:-/tmp}/metrics-test.$$
mkdir -p "$tmp/export"
port=$((20000 + $$ % 5000 * 8))
memd_metrics=127.0.0.1:$((port + 3))
stord_metrics=127.0.0.1:$((port + 4))
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

daemons() {
  cluster_toml "$tmp/cluster.toml" "key = \"$(random_key)\"" -- \
    "1 processor 127.0.0.1 $port" "7 memory 127.0.0.1 $((port + 1)) blocking" \
    "9 storage 127.0.0.1 $((port + 2)) blocking"
  "$MEMD" --config "$tmp/cluster.toml" --node 7 --capacity 256M --metrics "$memd_metrics" \
    --ready-fd 3 3>"$tmp/memd.ready" 2>"$tmp/memd.err" &
  memd=$!
  "$STORD" --config "$tmp/cluster.toml" --node 9 --export "$tmp/export" \
    --metrics "$stord_metrics" --ready-fd 3 3>"$tmp/stord.ready" 2>"$tmp/stord.err" &
  stord=$!
  pids="$memd $stord"
  wait_ready "$tmp/memd.ready" "$memd" || { cat "$tmp/memd.err"; return 1; }
  wait_ready "$tmp/stord.ready" "$stord" || { cat "$tmp/stord.err"; return 1; }
  grep "metrics at" "$tmp/memd.err" "$tmp/stord.err"
}

scrape() { curl -sS --max-time 5 "http://$1/metrics"; }
value() { scrape "$1" | awk -v m="$2" '$1 == m {print $2}'; }

memd_exposition() {
  need daemons || return 1
  scrape "$memd_metrics" >"$tmp/memd.prom" || return 1
  head -n 12 "$tmp/memd.prom"
  grep -qx "# HELP lego_memd_fetches lines asked for" "$tmp/memd.prom" || return 1
  grep -qx "# TYPE lego_memd_fetches counter" "$tmp/memd.prom" || return 1
  grep -qx "# TYPE lego_memd_spaces_open gauge" "$tmp/memd.prom" || return 1
  grep -qx "lego_memd_lines_capacity 65536" "$tmp/memd.prom" || return 1
  grep -q "^# HELP lego_memd_fit_requests_served " "$tmp/memd.prom" || return 1
  # Every sample has its HELP and TYPE lines, and is a plain integer.
  awk '/^# TYPE/ {t[$3]=1} /^# HELP/ {h[$3]=1}
       !/^#/ { if (!t[$1] || !h[$1] || $2 !~ /^[0-9]+$/) { print "bad: " $0; bad=1 } }
       END { exit bad }' "$tmp/memd.prom"
}

memd_values_move() {
  need daemons || return 1
  local opened0 served0 wb opened1 served1
  opened0=$(value "$memd_metrics" lego_memd_spaces_opened)
  served0=$(value "$memd_metrics" lego_memd_fit_requests_served)
  # 8 MiB written through a 1 MiB ExCache: write-backs and fetches on node 7.
  "$LEGO_RUN" --config "$tmp/cluster.toml" --excache 1M -- /usr/bin/python3 -c \
    'b = bytearray(8 << 20)
for i in range(0, len(b), 4096): b[i] = 1
print(sum(b[::4096]))' || return 1
  opened1=$(value "$memd_metrics" lego_memd_spaces_opened)
  served1=$(value "$memd_metrics" lego_memd_fit_requests_served)
  wb=$(value "$memd_metrics" lego_memd_write_backs)
  echo "spaces_opened $opened0 -> $opened1, fit_requests_served $served0 -> $served1, write_backs $wb"
  [ "$opened1" -gt "$opened0" ] && [ "$served1" -gt "$served0" ] && [ "$wb" -gt 0 ]
}

stord_exposition() {
  need daemons || return 1
  local before after
  scrape "$stord_metrics" >"$tmp/stord.prom" || return 1
  grep -qx "# TYPE lego_stord_sessions_open gauge" "$tmp/stord.prom" || return 1
  grep -qx "# HELP lego_stord_reads kRead requests served" "$tmp/stord.prom" || return 1
  before=$(value "$stord_metrics" lego_stord_fit_requests_served)
  "$STORD" --status --config "$tmp/cluster.toml" --node 9 >/dev/null || return 1
  after=$(value "$stord_metrics" lego_stord_fit_requests_served)
  echo "fit_requests_served $before -> $after"
  [ "$after" -gt "$before" ]
}

refusals() {
  need daemons || return 1
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$memd_metrics/")" = 404 ] || return 1
  [ "$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://$memd_metrics/metrics")" = 405 ] || return 1
  [ "$(printf 'hello\r\n\r\n' | timeout 5 python3 -c '
import socket, sys
h, p = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((h, int(p)))
s.sendall(sys.stdin.buffer.read())
print(s.recv(100).split(b" ")[1].decode())' "$memd_metrics")" = 400 ]
}

# 40 connections that send half a request and then nothing (more than the server's 16
# slots), one that sends 4 MiB of header, and one that never reads: an honest scrape in
# the middle of it all still answers at once, and the daemon's memory stays put.
hostile_scrapers() {
  need daemons || return 1
  local rss0 rss1 t0 t1
  rss0=$(awk '/VmRSS/ {print $2}' /proc/"$memd"/status)
  python3 - "$memd_metrics" >"$tmp/hostile.out" 2>&1 <<'PY' &
import socket, sys, time
h, p = sys.argv[1].rsplit(":", 1)
addr = (h, int(p))
loris = []
for _ in range(40):
    s = socket.create_connection(addr)
    s.sendall(b"GET /met")
    loris.append(s)
big = socket.create_connection(addr)
try:
    for _ in range(1024):
        big.sendall(b"X-Junk: " + b"a" * 4088)
except OSError as e:
    print("huge request cut off:", e)
mute = socket.create_connection(addr)
mute.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # and never reads
time.sleep(8)
PY
  local hostile=$!
  sleep 1
  t0=$(date +%s%N)
  scrape "$memd_metrics" >"$tmp/honest.prom" || { kill $hostile; return 1; }
  t1=$(date +%s%N)
  rss1=$(awk '/VmRSS/ {print $2}' /proc/"$memd"/status)
  kill $hostile 2>/dev/null
  wait $hostile 2>/dev/null
  cat "$tmp/hostile.out"
  echo "honest scrape took $(((t1 - t0) / 1000000)) ms; lego-memd VmRSS ${rss0} kB -> ${rss1} kB"
  grep -q "^lego_memd_fetches " "$tmp/honest.prom" || return 1
  # Generous bounds: the point is "not stalled for the slow-loris deadline" and "did not
  # buffer the 4 MiB request".
  [ $(((t1 - t0) / 1000000)) -lt 4000 ] && [ $((rss1 - rss0)) -lt 2048 ]
}

# A cluster of its own: monitor 5 (with --metrics) and memory node 6, short timings.
mond_metrics=127.0.0.1:$((port + 5))
mond_daemons() {
  cluster_toml "$tmp/mon.toml" "key = \"$(random_key)\"" "heartbeat_ms = 100" \
    "lost_after_ms = 800" -- "1 processor 127.0.0.1 $port" \
    "5 monitor 127.0.0.1 $((port + 6)) blocking" "6 memory 127.0.0.1 $((port + 7)) blocking"
  "$MOND" --config "$tmp/mon.toml" --node 5 --metrics "$mond_metrics" --ready-fd 3 \
    3>"$tmp/mond.ready" 2>"$tmp/mond.err" &
  mond=$!
  pids="$pids $mond"
  wait_ready "$tmp/mond.ready" "$mond" || { cat "$tmp/mond.err"; return 1; }
  "$MEMD" --config "$tmp/mon.toml" --node 6 --capacity 64M --ready-fd 3 3>"$tmp/memd6.ready" \
    2>"$tmp/memd6.err" &
  memd6=$!
  pids="$pids $memd6"
  wait_ready "$tmp/memd6.ready" "$memd6" || { cat "$tmp/memd6.err"; return 1; }
}

mond_exposition() {
  need mond_daemons || return 1
  wait_until 10 eval '[ "$(value "$mond_metrics" lego_mond_nodes_alive)" = 1 ]' || {
    scrape "$mond_metrics" | grep -v '^#'
    cat "$tmp/mond.err"
    return 1
  }
  scrape "$mond_metrics" >"$tmp/mond.prom" || return 1
  grep -E '^lego_mond_(registrations|heartbeats|nodes_alive|capacity_bytes|placements|nodes_lost) ' \
    "$tmp/mond.prom"
  grep -qx "# HELP lego_mond_registrations kRegister accepted" "$tmp/mond.prom" || return 1
  grep -qx "# TYPE lego_mond_heartbeats counter" "$tmp/mond.prom" || return 1
  grep -qx "# TYPE lego_mond_nodes_alive gauge" "$tmp/mond.prom" || return 1
  grep -qx "# TYPE lego_mond_vregions_degraded gauge" "$tmp/mond.prom" || return 1
  grep -qx "# TYPE lego_mond_vregions_rereplicated counter" "$tmp/mond.prom" || return 1
  grep -qx "lego_mond_registrations 1" "$tmp/mond.prom" || return 1
  grep -qx "lego_mond_capacity_bytes $((64 << 20))" "$tmp/mond.prom" || return 1
  grep -q "^# HELP lego_mond_fit_requests_served " "$tmp/mond.prom" || return 1
  awk '/^# TYPE/ {t[$3]=1} /^# HELP/ {h[$3]=1}
       !/^#/ { if (!t[$1] || !h[$1] || $2 !~ /^[0-9]+$/) { print "bad: " $0; bad=1 } }
       END { exit bad }' "$tmp/mond.prom"
}

# Heartbeats count up; the memory node killed, the monitor declares it lost (800 ms):
# nodes_alive 1 -> 0, nodes_declared_lost 0 -> 1, the nodes_lost counter 0 -> 1.
mond_values_move() {
  need mond_daemons || return 1
  local hb0 hb1
  hb0=$(value "$mond_metrics" lego_mond_heartbeats)
  sleep 0.5
  hb1=$(value "$mond_metrics" lego_mond_heartbeats)
  echo "heartbeats $hb0 -> $hb1"
  [ "$hb1" -gt "$hb0" ] || return 1
  kill -KILL "$memd6"
  wait_until 10 eval '[ "$(value "$mond_metrics" lego_mond_nodes_declared_lost)" = 1 ]' || {
    scrape "$mond_metrics" | grep -E '^lego_mond_nodes'
    return 1
  }
  scrape "$mond_metrics" | grep -E '^lego_mond_nodes'
  [ "$(value "$mond_metrics" lego_mond_nodes_alive)" = 0 ] &&
    [ "$(value "$mond_metrics" lego_mond_nodes_lost)" = 1 ] &&
    grep -q "lego-mond: memory node 6 at 127.0.0.1:$((port + 7)) lost" "$tmp/mond.err"
}

bad_address() {
  cluster_toml "$tmp/bad.toml" "key = \"$(random_key)\"" -- "7 memory 127.0.0.1 $((port + 1))"
  bad_flag 2 "is not ADDRESS:PORT" "$MEMD" --config "$tmp/bad.toml" --node 7 --metrics localhost
}

check "lego-memd's /metrics: its counters and FIT's, each with HELP and TYPE" memd_exposition
check "lego-memd's counters move with a program run against it" memd_values_move
check "lego-stord's /metrics, moving with --status calls" stord_exposition
check "lego-mond's /metrics: its counters, its nodes by state and FIT's, each with HELP and TYPE" \
  mond_exposition
check "lego-mond's counters and gauges follow heartbeats and a memory node's loss" mond_values_move
check "other paths, methods and non-HTTP are refused" refusals
check "hostile scrapers do not stall an honest one or bloat the daemon" hostile_scrapers
check "a malformed --metrics address is a usage error" bad_address
check_summary
