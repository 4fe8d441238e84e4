#!/usr/bin/env bash
# lego-bench's miss floors beside a tiny memory run: random at 25% local under lego_tcp and
# lego_shm with both deliveries, 1 MiB ExCache. Guards what the floors print, not their
# timings: the handler delivery's fault floor beside the SIGBUS one (free and pinned) and its
# fence, and
# per transport the line "handler/sigbus floor ratio" with lego's own handler/sigbus per
# miss, each figure on it following from the others printed (the table's µs per access and
# misses per access, the fault floors).
# And random_mt's miss floor by threads over tcp, at 1 and 2 threads, with the fetch alone and
# with each fetch carrying a write-back: the best of its three ways of waiting, and the line
# bounding lego_tcp's gain from a second thread, each figure following from the others
# printed.
# usage: lego_bench_floors_test.sh [NAME-PART...]   (tests/lib/check.sh)
set -uo pipefail
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

root=$(lego_bin_root)
BENCH=$root/runtime/bench/lego-bench
export LEGO_RUN=$root/runtime/lego-run
tmp=${TEST_TMPDIR:-$(mktemp -d)}

tiny_run() {
  "$BENCH" --only memory --workloads random --fractions 0.25 --systems lego_tcp,lego_shm \
    --cap 1M --accesses 2000 >"$tmp/floors.out" 2>"$tmp/floors.err"
  run_rc=$?
  cat "$tmp/floors.out"
  tail -5 "$tmp/floors.err"
}

# floor_us LABEL: the µs of the miss floors' line that starts with LABEL.
floor_us() {
  awk -v l="$1" 'index($0, "  " l) == 1 && $NF == "us" {print $(NF - 1)}' "$tmp/floors.out"
}

all_ran() {
  need tiny_run
  [ "$run_rc" -eq 0 ] || { echo "exit status $run_rc"; return 1; }
  for s in lego_tcp lego_shm; do
    for d in handler sigbus; do
      grep -qE "^random +25% +1 $s/$d +[0-9.]+ " "$tmp/floors.out" ||
        { echo "no row: $s/$d"; return 1; }
    done
  done
}
handler_fault_floors() {
  need tiny_run
  local sigbus handler pinned
  sigbus=$(floor_us "userfaultfd store miss (fault, SIGBUS, UFFDIO_COPY, return)")
  handler=$(floor_us "the same, a handler thread serving it (lego-run's default)")
  pinned=$(floor_us "the same, the handler pinned to the faulting thread's CPU")
  fence=$(floor_us "write-protecting a dirty victim (the handler delivery's fence)")
  echo "sigbus '$sigbus' handler '$handler' pinned '$pinned' fence '$fence'"
  awk -v s="$sigbus" -v h="$handler" -v p="$pinned" -v f="$fence" \
    'BEGIN { exit !(s > 0 && h > 0 && p > 0 && f > 0) }'
}
# Each transport's line: its lego ratio is the table's per-miss ratio, and its floor ratio
# is (lego's sigbus µs per miss + handler fault floor - SIGBUS fault floor + the fence) / the
# former.
ratio_lines() {
  need tiny_run
  local sf hf pf ff s line
  sf=$(floor_us "userfaultfd store miss (fault, SIGBUS, UFFDIO_COPY, return)")
  hf=$(floor_us "the same, a handler thread serving it (lego-run's default)")
  pf=$(floor_us "the same, the handler pinned to the faulting thread's CPU")
  ff=$(floor_us "write-protecting a dirty victim (the handler delivery's fence)")
  for s in lego_tcp lego_shm; do
    line=$(grep -E "^  random 25% $s: handler/sigbus floor ratio [0-9.]+x \(pinned [0-9.]+x\), lego's [0-9.]+x \(µs per miss: sigbus [0-9.]+, handler [0-9.]+\)$" "$tmp/floors.out") ||
      { echo "no handler/sigbus floor ratio line for $s"; return 1; }
    echo "$line"
    awk -v line="$line" -v sf="$sf" -v hf="$hf" -v pf="$pf" -v ff="$ff" -v s="$s" '
      $1 == "random" && $4 == s "/sigbus" { su = $5; sm = $8 }
      $1 == "random" && $4 == s "/handler" { hu = $5; hm = $8 }
      END {
        n = split(line, w, /[ x(),:]+/)
        for (i = 1; i <= n; i++) {
          if (w[i] == "ratio") floor = w[i + 1]
          if (w[i] == "pinned") pinned = w[i + 1]
          if (w[i] == "lego'"'"'s") lego = w[i + 1]
          if (w[i] == "sigbus" && w[i - 1] == "miss") sig = w[i + 1]
          if (w[i] == "handler" && w[i + 1] ~ /^[0-9.]+$/) han = w[i + 1]
        }
        bad = 0
        if (su <= 0 || sm <= 0 || hu <= 0 || hm <= 0) { print "no table rows for " s; exit 1 }
        d = sig - su / sm; if (d < 0) d = -d
        if (d > 0.01 * sig + 0.01) { print "sigbus per miss " sig " is not " su " / " sm; bad = 1 }
        d = han - hu / hm; if (d < 0) d = -d
        if (d > 0.01 * han + 0.01) { print "handler per miss " han " is not " hu " / " hm; bad = 1 }
        d = lego - han / sig; if (d < 0) d = -d
        if (d > 0.011) { print "lego ratio " lego " is not " han " / " sig; bad = 1 }
        d = floor - (sig + hf - sf + ff) / sig; if (d < 0) d = -d
        if (d > 0.011 + 0.016 / sig) { print "floor ratio " floor " is not (" sig " + " hf " - " sf " + " ff ") / " sig; bad = 1 }
        d = pinned - (sig + pf - sf + ff) / sig; if (d < 0) d = -d
        if (d > 0.011 + 0.016 / sig) { print "pinned ratio " pinned " is not (" sig " + " pf " - " sf " + " ff ") / " sig; bad = 1 }
        exit bad
      }' "$tmp/floors.out" || return 1
  done
}
# random_mt at 1 and 2 threads under lego_tcp, for its miss floor by threads.
mt_run() {
  "$BENCH" --only memory --workloads random_mt --fractions 0.25 --systems lego_tcp \
    --threads 1,2 --cap 1M --accesses 2000 >"$tmp/mt.out" 2>"$tmp/mt.err"
  mt_rc=$?
  sed -n "/miss floor over tcp/,\$p" "$tmp/mt.out"
  tail -5 "$tmp/mt.err"
}
# Each thread count's row, in both tables (the fetch alone, then with write-backs): three
# rates, the best of them, its ratio to the best at 1 thread, the CPUs kept busy; then per
# thread count above 1 the line bounding lego's gain, whose figures follow from that table's
# (lego's misses/s at 1 thread: 1e6 / µs per access x misses per access).
miss_floor_by_threads() {
  need mt_run
  [ "$mt_rc" -eq 0 ] || { echo "exit status $mt_rc"; return 1; }
  awk -v cpus="$(nproc)" '
    /miss floor over tcp/ { table = /with write-backs/ ? 2 : 1; tables[table] = 1 }
    $1 == "random_mt" && $4 == "lego_tcp/handler" && $3 == 1 { lego1 = 1e6 / $5 * $8 }
    table && $1 ~ /^[12]$/ && $2 ~ /^[0-9]+$/ && NF >= 7 {
      t = $1; best = $2; if ($3 > best) best = $3; if ($4 > best) best = $4
      if ($5 != best) { print "table " table ", threads " t ": best " $5 " is not the max of " $2 ", " $3 ", " $4; bad = 1 }
      b[table, t] = best; v[table, t] = $6; c[table, t] = $7
    }
    /threads: the floor.s best .* lego_tcp\/handler.s 1-thread/ {
      k = /with write-backs/ ? 2 : 1
      if (k != table) { print "a bounding line for table " k " under table " table; bad = 1 }
      n = split($0, w, /[ (),:]+/)
      for (i = 1; i <= n; i++) {
        if (w[i] == "misses/s") f[k] = w[i - 1]
        if (w[i] == "is") r[k] = w[i + 1]
        if (w[i] == "1-thread") l[k] = w[i + 1]
      }
      sub(/x$/, "", r[k]); got_line[k] = 1
    }
    END {
      if (!(1 in tables) || !(2 in tables)) { print "not both tables (fetch alone, with write-backs)"; exit 1 }
      for (k = 1; k <= 2; k++) {
        if (!((k, 1) in b) || !((k, 2) in b)) { print "table " k ": no rows for 1 and 2 threads"; exit 1 }
        if (v[k, 1] != "1.00x") { print "table " k ": 1 thread vs 1 is " v[k, 1]; bad = 1 }
        want = b[k, 2] / b[k, 1]; x = v[k, 2]; sub(/x$/, "", x); d = x - want; if (d < 0) d = -d
        if (d > 0.006) { print "table " k ": 2 threads vs 1 " x " is not " b[k, 2] " / " b[k, 1]; bad = 1 }
        for (t = 1; t <= 2; t++) if (!(c[k, t] > 0 && c[k, t] <= cpus + 0.3)) { print "table " k ": CPUs busy " c[k, t] " at " t; bad = 1 }
        if (!(k in got_line)) { print "table " k ": no line bounding lego_tcp at 2 threads"; exit 1 }
        if (f[k] != b[k, 2]) { print "table " k ": the line names " f[k] " misses/s, the table " b[k, 2]; bad = 1 }
        d = l[k] - lego1; if (d < 0) d = -d
        if (lego1 <= 0 || d > 0.01 * lego1 + 1) { print "table " k ": lego 1-thread " l[k] " is not " lego1; bad = 1 }
        d = r[k] - f[k] / l[k]; if (d < 0) d = -d
        if (d > 0.006) { print "table " k ": ratio " r[k] " is not " f[k] " / " l[k]; bad = 1 }
      }
      exit bad
    }' "$tmp/mt.out"
}

check "random under lego_tcp and lego_shm with both deliveries (exit 0)" all_ran
check "the miss floors have the handler delivery's fault, free and pinned, and its fence" handler_fault_floors
check "per transport, a handler/sigbus floor ratio line beside lego's, per miss" ratio_lines
check "random_mt's miss floor by threads: the best way of waiting, and what it leaves lego" miss_floor_by_threads

check_summary
