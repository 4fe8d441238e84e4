#!/usr/bin/env bash
# fit-bench leaves nothing behind: the two network namespaces (and their bridge) it
# makes for the client and the echo server are removed when it ends, whether the run
# completed or failed half-way (a run that died on a floor's error used to leave them).
# Needs root (network namespaces).
set -u
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

bench="$(lego_bin_root)/libfit/bench/fit-bench"

# run_bench ARGS...: runs fit-bench with ARGS, short; sets bench_pid and bench_status.
run_bench() {
  "$bench" --providers tcp --sizes 64 --iterations 100 "$@" >"$check_dir_out" 2>&1 &
  bench_pid=$!
  wait "$bench_pid"
  bench_status=$?
}

# no_namespaces_of PID: no network namespace named after fit-bench's PID is left.
no_namespaces_of() {
  left=$(ip netns list | grep -c "^fitb-$1-" || true)
  [ "$left" -eq 0 ] || { ip netns list | grep "^fitb-$1-"; return 1; }
}

check_dir_out=${TEST_TMPDIR:-/tmp}/fit-bench-test.$$.out

completed_run() {
  run_bench || true
  [ "$bench_status" -eq 0 ] || { cat "$check_dir_out"; return 1; }
  no_namespaces_of "$bench_pid"
}

failed_run() {
  # The --csv file is written last, after the namespaces exist: its error ends the run.
  run_bench --csv /nonexistent-dir/fit-bench.csv || true
  [ "$bench_status" -eq 2 ] || { cat "$check_dir_out"; return 1; }
  grep -q "cannot write /nonexistent-dir/fit-bench.csv" "$check_dir_out" || return 1
  no_namespaces_of "$bench_pid"
}

check "a completed run removes its network namespaces" completed_run
check "a run that fails half-way removes its network namespaces" failed_run
rm -f "$check_dir_out"
check_summary
