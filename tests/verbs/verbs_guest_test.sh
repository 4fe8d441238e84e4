#!/usr/bin/env bash
# Description: libfit's verbs provider and lego over it, for real, in a booted Debian 6.1
# guest (qemu, TCG; tests/lib/guest.sh: this machine's root shared read-only, so the
# guest has rdma-core, ibverbs-providers, libfabric and iproute2's rdma from
# .ci/bootstrap) with soft-RoCE: two rxe devices on the ends of a veth pair. Stages
# (tests/verbs/verbs_stages.sh), each a check here: rxe (the devices up), rpc
# (tests/libfit:provider_e2e_test over verbs: the same cases tcp and ofi_tcp pass on the
# host), bench (fit-bench --providers tcp,verbs in the guest: the table is printed here
# and kept as an undeclared output), memd (lego-memd with provider = "verbs", lego-run
# --config ... lego_integrity against it), rma (one-sided reads over verbs: lego_integrity
# with --rma auto timing both ways, rma_read and kFetch, then lego-bench --systems
# lego_config --rma off,on,auto --memd-busy 0,2, requests, one-sided reads and auto's
# choice side by side with the memory node idle and busy; the table is printed here and
# kept as an undeclared output). The guest's kernel log must show no BUG,
# WARNING or Oops. Under emulation a verbs round trip costs ~200 µs: this proves
# correctness, not speed.
#
# Run: bazel test //tests/verbs:verbs_guest_test, or directly after bazel build of the
# programs (//tests/libfit:provider_e2e_test //libfit/bench:fit-bench
# //daemons/memory:lego-memd //runtime:lego-run //tests/lego_run:lego_integrity
# //runtime/bench:lego-bench):
#   tests/verbs/verbs_guest_test.sh [NAME-PART...]      e.g. "guest rpc" (see tests/lib)
# A selection boots the guest with only the stages its checks need (rxe always).
# Env: LEGO_TEST_FILTER (tests/lib/check.sh), LEGO_KVER, GUEST_TIMEOUT (default 900),
# FIT_BENCH_ITERATIONS (default 300: under emulation a figure is a correctness check, not a speed),
# RMA_ACCESSES (the rma stage's lego-bench --accesses, default 2000).
# Needs: qemu-system-x86 linux-image-amd64 busybox-static kmod rdma-core ibverbs-providers
# libfabric-bin iproute2 (all in .ci/bootstrap).
set -uo pipefail
HERE=$(dirname "$0")
LEGO_TEST_TAIL=${LEGO_TEST_TAIL:-60}
. "$HERE/../lib/check.sh"
. "$HERE/../lib/guest.sh"
check_init "$@"

if [[ -n ${TEST_SRCDIR:-} ]]; then
  ROOT=$TEST_SRCDIR/${TEST_WORKSPACE:-lego}
  BIN=$ROOT
  SRCDIR=$TEST_SRCDIR
else
  ROOT=$(cd "$HERE/../.." && pwd)
  BIN=$ROOT/bazel-bin
  SRCDIR=$BIN/tests/libfit/provider_e2e_test.runfiles
fi
ROOT=$(readlink -f "$ROOT")
BIN=$(readlink -f "$BIN")
SRCDIR=$(readlink -f "$SRCDIR")
WORK=${TEST_TMPDIR:-$(mktemp -d /var/tmp/lego-verbs.XXXXXX)}/verbs_guest
rm -rf "$WORK"
mkdir -p "$WORK/out"

STAGE_ORDER="rxe rpc bench memd rma"
declare -A STAGE_CHECKS=(
  [rxe]="guest rxe: soft-RoCE devices rxe0 and rxe1 on a veth pair, listed by libfabric's verbs provider"
  [rpc]="guest rpc: provider_e2e_test over verbs between two processes (sync, async, channels, RMA, wrong keys, a peer that dies)"
  [bench]="guest bench: fit-bench --providers tcp,verbs in the same guest"
  [memd]="guest memd: lego-memd with provider verbs serves lego-run --config ... lego_integrity"
  [rma]="guest rma: one-sided reads over verbs keep lego_integrity intact; lego-bench --rma off,on,auto --memd-busy 0,2 side by side"
)
want=" "
for st in $STAGE_ORDER; do
  selected "${STAGE_CHECKS[$st]}" || continue
  for n in rxe $st; do [[ $want == *" $n "* ]] || want+="$n "; done
done
STAGES=""
for st in $STAGE_ORDER; do [[ $want == *" $st "* ]] && STAGES+="$st "; done
STAGES=${STAGES% }

for p in tests/libfit/provider_e2e_test tests/libfit/fit_test_peer libfit/bench/fit-bench \
  daemons/memory/lego-memd runtime/lego-run runtime/liblego_preload.so runtime/bench/lego-bench \
  tests/lego_run/lego_integrity; do
  [[ -n $STAGES && ! -r $BIN/$p ]] && { echo "verbs_guest_test: $BIN/$p missing: bazel build it" >&2; exit 1; }
done

if [[ -n $STAGES ]]; then
  echo "verbs_guest_test: booting the guest for stages: $STAGES" >&2
  t0=$SECONDS
  GUEST_TIMEOUT=${GUEST_TIMEOUT:-900} guest_boot "$WORK/out" "$ROOT/tests/verbs/verbs_stages.sh" \
    "$ROOT" "$BIN" "$SRCDIR" "$STAGES" "${FIT_BENCH_ITERATIONS:-300}" "${RMA_ACCESSES:-2000}"
  qrc=$?
  echo "verbs_guest_test: qemu exited $qrc after $((SECONDS - t0)) s" >&2
  if [[ -n ${TEST_UNDECLARED_OUTPUTS_DIR:-} ]]; then
    cp "$WORK/out/serial.txt" "$WORK"/out/fit-bench.* "$WORK"/out/rma-bench.* \
      "$TEST_UNDECLARED_OUTPUTS_DIR/" 2>/dev/null || true
  fi
  LOGF=$WORK/out/serial.txt
  for st in $STAGES; do check "${STAGE_CHECKS[$st]}" guest_stage_ok "$LOGF" "$st" 80; done
  check "the guest's kernel log shows no BUG, WARNING or Oops" guest_kernel_log_clean "$LOGF"
  check "the guest ran to its end" guest_finished "$LOGF" LEGO_VERBS "$qrc"
  grep -E '^guest: stage .*: (ok|FAIL)' "$LOGF" >&2
  [[ -s $WORK/out/fit-bench.txt ]] && cat "$WORK/out/fit-bench.txt" >&2
fi
check_summary
