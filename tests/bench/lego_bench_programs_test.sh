#!/usr/bin/env bash
# lego-bench --only programs, at a tiny size: every program (python3, sqlite3, sort with 2
# threads, stress-ng's forked workers, redis-server driven by redis-benchmark) under local
# and lego_shm. Guards the benchmark's behaviour, not its timings: one CSV row per program
# and system with the documented columns, each lego row's output compared with local's
# (stress-ng's own --verify) and the same, lego's --stats misses in the table; and the
# output check itself: runs given a perturbed input (--corrupt-output) must be reported as
# differing, loudly, with lego-bench exiting 1 and their CSV rows not ok; and the zram
# peer's cap: the ExCache's plus the page cache and kernel memory its cgroup also charges.
# usage: lego_bench_programs_test.sh [NAME-PART...]   (tests/lib/check.sh)
set -uo pipefail
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

root=$(lego_bin_root)
BENCH=$root/runtime/bench/lego-bench
export LEGO_RUN=$root/runtime/lego-run
tmp=${TEST_TMPDIR:-$(mktemp -d)}
programs="python sqlite sort stress-ng redis"
# Tiny: each program's peak is a few MiB; the whole run takes ~30 s.
size=0.03

same_run() {
  "$BENCH" --only programs --program-size $size --systems local,lego_shm --fractions 0.25 \
    --csv "$tmp/same.csv" >"$tmp/same.out" 2>"$tmp/same.err"
  same_rc=$?
  cat "$tmp/same.out"
  tail -5 "$tmp/same.err"
}

# row CSV PROGRAM SYSTEM: the CSV row of PROGRAM under SYSTEM at 25% local.
row() { grep -E "^$2,0\.25,$3," "$1"; }

# Each check is a function: check runs it in this shell, so it says what failed and returns
# 1 (an exit would end the whole script).
all_ran() {
  need same_run
  [ "$same_rc" -eq 0 ] || { echo "exit status $same_rc"; return 1; }
}
csv_rows() {
  need same_run
  [ "$(head -1 "$tmp/same.csv")" = "program,local_fraction,system,seconds,ok,oom_killed" ] ||
    { echo "bad header: $(head -1 "$tmp/same.csv")"; return 1; }
  [ "$(wc -l <"$tmp/same.csv")" -eq 11 ] || { cat "$tmp/same.csv"; return 1; }
  for p in $programs; do
    for s in local lego_shm; do
      row "$tmp/same.csv" "$p" "$s" | grep -qE ",[0-9]+\.[0-9]+,1,0$" ||
        { echo "no ok row: $p $s"; cat "$tmp/same.csv"; return 1; }
    done
  done
}
outputs_same() {
  need same_run
  for p in python sqlite sort redis; do
    grep -E "^$p +25% .* lego_shm .* same " "$tmp/same.out" || { echo "not same: $p"; return 1; }
  done
  grep -E "^stress-ng +25% .* lego_shm .* verify ok " "$tmp/same.out" || return 1
  ! grep "DIFFERS" "$tmp/same.out" "$tmp/same.err"
}
stats_in_rows() {
  need same_run
  for p in python sqlite sort redis; do
    grep -E "^$p +25% .* lego_shm .* same +[1-9][0-9]* +[0-9]+$" "$tmp/same.out" ||
      { echo "no misses: $p"; return 1; }
  done
}
redis_rps() {
  need same_run
  grep -E "^redis +25% .* local +[0-9.]+ +[1-9][0-9]* " "$tmp/same.out" &&
    grep -E "^redis +25% .* lego_shm +[0-9.]+ +[1-9][0-9]* " "$tmp/same.out"
}
check "all programs run under local and lego_shm (exit 0)" all_ran
check "CSV: the header and one ok row per program and system" csv_rows
check "each lego_shm run's output is local's (stress-ng: its own verify)" outputs_same
check "lego rows carry --stats misses and evictions" stats_in_rows
check "redis rows have requests per second" redis_rps

# stress-ng's memory is in its two forked workers, each a lego process with an ExCache of its
# own: each gets half the cap (the local row's), so that lego holds no more locally than the
# zram peer's cgroup, which caps both together.
stress_cap_per_worker() {
  need same_run
  local whole each
  whole=$(awk '$1 == "stress-ng" && $4 == "local" {print $3}' "$tmp/same.out")
  each=$(awk '$1 == "stress-ng" && $4 == "lego_shm" {print $3}' "$tmp/same.out")
  [ -n "$whole" ] && [ -n "$each" ] || { echo "no caps ('$whole' '$each')"; return 1; }
  awk -v w="${whole%M}" -v e="${each%M}" 'BEGIN { d = w / 2 - e; exit !(d > -0.1 && d < 0.1) }' ||
    { echo "stress-ng: lego cap $each is not half of $whole"; return 1; }
}
check "stress-ng's workers each get half the cap under lego" stress_cap_per_worker

# The floors table: one row per lego_shm run but redis's, with misses, whose floor is local's
# seconds plus the cost of its misses and evictions (at this size that may round to local's
# own), and is below lego's own seconds (a floor lego beat would not be one); its last column
# is lego's seconds over the floor.
floors_per_run() {
  need same_run
  grep -qE "^Floors: what each lego run cannot cost less than on this host" "$tmp/same.out" ||
    { echo "no floors table"; return 1; }
  for p in python sqlite sort stress-ng; do
    local local_s fl
    local_s=$(awk -v p="$p" '$1 == p && $4 == "local" {print $5}' "$tmp/same.out")
    fl=$(awk -v p="$p" '$1 == p && $3 == "lego_shm" && NF == 9' "$tmp/same.out")
    [ -n "$local_s" ] && [ -n "$fl" ] || { echo "$p: no local seconds or floors row"; return 1; }
    # (The seconds are printed to 0.01: the ratio may be off by what that rounding allows.)
    echo "$fl" | awk -v l="$local_s" '{ s = $6; f = $7; r = $9; sub(/x$/, "", r)
      tol = s / f * (0.005 / s + 0.005 / f) + 0.006; d = r - s / f; if (d < 0) d = -d
      exit !($4 > 0 && f >= l && f <= s && d <= tol) }' ||
      { echo "$p: bad floors row (local $local_s s): $fl"; return 1; }
  done
  ! awk '$1 == "redis" && $3 == "lego_shm"' "$tmp/same.out" | grep -q . &&
    grep -q "^(redis has none" "$tmp/same.out"
}
check "each lego run but redis's has a floor between local's seconds and its own" floors_per_run

corrupt_run() {
  "$BENCH" --only programs --program-size $size --systems local,lego_shm --fractions 0.25 \
    --programs python,sqlite,sort,redis --corrupt-output lego_shm --no-floors \
    --csv "$tmp/corrupt.csv" >"$tmp/corrupt.out" 2>"$tmp/corrupt.err"
  corrupt_rc=$?
  cat "$tmp/corrupt.out"
}
differences_flagged() {
  need corrupt_run
  [ "$corrupt_rc" -eq 1 ] || { echo "exit status $corrupt_rc, expected 1"; return 1; }
  for p in python sqlite sort redis; do
    grep -qE "^$p +25% .* lego_shm .* DIFFERS! " "$tmp/corrupt.out" &&
      grep -qE "^!!! OUTPUT DIFFERS: $p under lego_shm at 25% local: line [0-9]+: local .* this run " "$tmp/corrupt.out" &&
      grep -q "lego-bench: !!! $p under lego_shm at 25% local: OUTPUT DIFFERS FROM LOCAL" "$tmp/corrupt.err" &&
      row "$tmp/corrupt.csv" "$p" lego_shm | grep -qE ",0,0$" ||
      { echo "not flagged: $p"; return 1; }
  done
}
check "a differing output is reported loudly, per program, and lego-bench exits 1" \
  differences_flagged
no_floors() {
  need corrupt_run
  ! grep -q "^Floors:" "$tmp/corrupt.out"
}
check "--no-floors leaves the floors out" no_floors

# The zram peer's limit: the ExCache's cap plus what else its cgroup charges (page cache and
# kernel memory, measured under local), so that both have the same anonymous budget.
zram_run() {
  "$BENCH" --only programs --program-size $size --systems local,zram_swap,lego_shm \
    --fractions 0.25 --programs python,sqlite --oom-retries 0 --no-floors >"$tmp/zram.out" 2>"$tmp/zram.err"
  zram_rc=$?
  cat "$tmp/zram.out"
}
# mib "12.3M" -> 12.3
mib() { echo "${1%M}"; }
zram_cap_adds_other_charges() {
  need zram_run
  for p in python sqlite; do
    local other lego zram
    other=$(sed -nE "s/^$p under local: peak anonymous [0-9.]+M, peak page cache \+ kernel memory ([0-9.]+)M$/\1/p" "$tmp/zram.out")
    lego=$(awk -v p="$p" '$1 == p && $4 == "lego_shm" {print $3}' "$tmp/zram.out")
    zram=$(awk -v p="$p" '$1 == p && $4 == "zram_swap" {print $3}' "$tmp/zram.out")
    [ -n "$other" ] && [ -n "$lego" ] && [ -n "$zram" ] ||
      { echo "$p: no peaks line or cap (other '$other' lego '$lego' zram '$zram')"; return 1; }
    # Each figure is rounded to 0.1M on its own: allow 0.15M either way.
    awk -v o="$other" -v l="$(mib "$lego")" -v z="$(mib "$zram")" \
      'BEGIN { d = z - l - o; exit !(d > -0.15 && d < 0.15) }' ||
      { echo "$p: zram cap $zram is not lego's $lego + $other"; return 1; }
  done
  # python's interpreter alone has page tables and slab: a non-zero charge.
  awk '$1 == "python" && $4 == "zram_swap" {z = $3} $1 == "python" && $4 == "lego_shm" {l = $3}
       END { exit !(z + 0 > l + 0) }' "$tmp/zram.out" || { echo "python: zram cap not above lego's"; return 1; }
}
check "the zram peer's cap is the ExCache's plus the program's page cache and kernel memory" \
  zram_cap_adds_other_charges

# The zram peer's extra limit must not depend on what an earlier run left in the page cache:
# with python's files dropped from it (dd iflag=nocache), the measured local run still finds
# them cached (lego-bench's warm-up run) and its cgroup's page cache + kernel memory stays
# small (0.1 MiB here; 7-13 MiB cold without the warm-up).
drop_python_files() {
  local f
  for f in "$(readlink -f /usr/bin/python3)" /usr/lib/x86_64-linux-gnu/libcrypto.so.3 \
    $(find /usr/lib/python3.11 -maxdepth 3 -type f \( -name "*.so" -o -path "*__pycache__*" \)); do
    dd if="$f" iflag=nocache count=0 status=none 2>/dev/null
  done
}
cold_run() {
  drop_python_files
  "$BENCH" --only programs --program-size $size --systems local --fractions 0.25 \
    --programs python --no-floors >"$tmp/cold.out" 2>"$tmp/cold.err"
  cold_rc=$?
  grep "under local" "$tmp/cold.out"
}
other_charge_warm() {
  need cold_run
  [ "$cold_rc" -eq 0 ] || { echo "exit status $cold_rc"; return 1; }
  local other
  other=$(sed -nE "s/^python under local: peak anonymous [0-9.]+M, peak page cache \+ kernel memory ([0-9.]+)M$/\1/p" "$tmp/cold.out")
  [ -n "$other" ] || { echo "no peaks line"; return 1; }
  awk -v o="$other" 'BEGIN { exit !(o < 2) }' || { echo "python's other charges ${other}M (cold page cache?)"; return 1; }
}
check "the zram peer's extra limit is measured with the program's files cached" other_charge_warm

bad_flags() {
  bad_flag 2 "nosuch" "$BENCH" --only programs --programs nosuch &&
    bad_flag 2 "program-size" "$BENCH" --only programs --program-size 0 &&
    bad_flag 2 "corrupt-output" "$BENCH" --only programs --corrupt-output mars
}
check "bad --programs, --program-size and --corrupt-output are refused" bad_flags

check_summary
