#!/usr/bin/env bash
# Description: lego as an operator runs it, in a booted Debian 6.1 guest (qemu, TCG) with
# a real userland (tests/lib/guest.sh: this machine's root shared read-only, an overlay
# on it): daemons/install/install.sh; lego_pcache.ko through DKMS (`make -C kmod dkms-install`),
# modprobe, a lego-run that uses it, modprobe -r, an upgrade to another version; a
# module of an unknown ABI refused by lego-run; and lego-memd@.service,
# lego-stord@.service and lego-mond@.service under systemd (start, serve a real client --
# for the monitor, a lego-memd@ that registers with it --, journal, restart, SIGKILL then
# Restart=, stop). The guest's stages are tests/ops/guest_stages.sh; each is
# a check here ("guest dkms: ...") and the guest's kernel log must show no BUG, WARNING
# or Oops.
#
# Run: bazel test //tests/ops:ops_guest_test, or directly (after bazel build of the
# programs: //:install, //tests/lego_run:lego_integrity):
#   tests/ops/ops_guest_test.sh [NAME-PART...]      e.g. "guest abi" (see tests/lib)
# A selection boots the guest once with only the stages its checks need (and the stages
# those need); without "guest units" it boots without systemd, ~20 s sooner.
# Env: LEGO_TEST_FILTER (tests/lib/check.sh), LEGO_KVER, GUEST_TIMEOUT (default 900).
# Needs: qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static dkms
# systemd kmod (all in .ci/bootstrap).
set -uo pipefail
HERE=$(dirname "$0")
LEGO_TEST_TAIL=${LEGO_TEST_TAIL:-40}
. "$HERE/../lib/check.sh"
. "$HERE/../lib/guest.sh"
check_init "$@"

if [[ -n ${TEST_SRCDIR:-} ]]; then
  ROOT=$TEST_SRCDIR/${TEST_WORKSPACE:-lego}
  BIN=$ROOT
else
  ROOT=$(cd "$HERE/../.." && pwd)
  BIN=$ROOT/bazel-bin
fi
ROOT=$(readlink -f "$ROOT")
BIN=$(readlink -f "$BIN")
WORK=${TEST_TMPDIR:-$(mktemp -d /var/tmp/lego-ops.XXXXXX)}/ops_guest
rm -rf "$WORK"
mkdir -p "$WORK/out"

# The guest's stages, in order, each with its check and the stages it needs.
STAGE_ORDER="install dkms modprobe pcache-run modprobe-r upgrade abi units"
declare -A STAGE_CHECKS=(
  [install]="guest install: daemons/install/install.sh --prefix /usr/local"
  [dkms]="guest dkms: make -C kmod dkms-install adds, builds and installs lego_pcache 1.1"
  [modprobe]="guest modprobe: modprobe lego_pcache loads DKMS's build"
  [pcache-run]="guest pcache-run: lego-run --pcache on uses the module; modprobe -r refused while in use"
  [modprobe-r]="guest modprobe-r: modprobe -r lego_pcache"
  [upgrade]="guest upgrade: dkms-install of 1.2, modprobe loads 1.2 and lego-run uses it"
  [abi]="guest abi: a module of ABI 99 is refused: auto warns and falls back, on fails"
  [units]="guest units: lego-memd@2, lego-stord@3 and lego-mond@9 under systemd: start, serve, journal, restart, SIGKILL, stop"
)
declare -A STAGE_NEEDS=(
  [install]="" [dkms]="install" [modprobe]="install dkms" [pcache-run]="install dkms modprobe"
  [modprobe-r]="install dkms modprobe" [upgrade]="install dkms" [abi]="install" [units]="install"
)
want=" "
for st in $STAGE_ORDER; do
  selected "${STAGE_CHECKS[$st]}" || continue
  for n in ${STAGE_NEEDS[$st]} $st; do [[ $want == *" $n "* ]] || want+="$n "; done
done
STAGES=""
for st in $STAGE_ORDER; do [[ $want == *" $st "* ]] && STAGES+="$st "; done
STAGES=${STAGES% }

for p in runtime/lego-run runtime/lego-stat runtime/liblego_preload.so daemons/memory/lego-memd \
  daemons/monitor/lego-mond daemons/storage/lego-stord tests/lego_run/lego_integrity; do
  [[ -n $STAGES && ! -r $BIN/$p ]] && { echo "ops_guest_test: $BIN/$p missing: bazel build it" >&2; exit 1; }
done

# The module that claims ABI major 99 (kmod/main.c), built here: the runtime's refusal
# is what the guest tests, not a second DKMS build.
abi_module() {
  guest_kernel || return 1
  mkdir -p "$WORK/out/abi99/include/lego"
  cp -L "$ROOT"/kmod/*.c "$ROOT"/kmod/*.h "$ROOT"/kmod/Makefile "$ROOT"/kmod/dkms.conf "$WORK/out/abi99/"
  cp -L "$ROOT/include/lego/pcache_abi.h" "$WORK/out/abi99/include/lego/"
  make -s -C "/usr/src/linux-headers-$LEGO_KVER" M="$WORK/out/abi99" LEGO_PCACHE_TEST_ABI_MAJOR=99 modules
}
if [[ $STAGES == *abi* ]]; then
  # Named for the stage, so that selecting the stage selects it.
  check "guest abi: first, a lego_pcache.ko that reports ABI 99 builds here (LEGO_PCACHE_TEST_ABI_MAJOR)" abi_module
fi

if [[ -n $STAGES ]]; then
  systemd=0
  [[ $STAGES == *units* ]] && systemd=1
  echo "ops_guest_test: booting the guest (systemd: $systemd) for stages: $STAGES" >&2
  t0=$SECONDS
  # The units want network-online.target: in a guest whose only network is its loopback,
  # systemd-networkd-wait-online would wait 2 minutes for a link that never comes.
  GUEST_APPEND="systemd.mask=systemd-networkd-wait-online.service ${GUEST_APPEND:-}" \
    GUEST_SYSTEMD=$systemd GUEST_TIMEOUT=${GUEST_TIMEOUT:-900} \
    guest_boot "$WORK/out" "$ROOT/tests/ops/guest_stages.sh" "$ROOT" "$BIN" "$STAGES" \
    /lego-out/abi99/lego_pcache.ko
  qrc=$?
  echo "ops_guest_test: qemu exited $qrc after $((SECONDS - t0)) s" >&2
  [[ -n ${TEST_UNDECLARED_OUTPUTS_DIR:-} ]] && cp "$WORK/out/serial.txt" "$TEST_UNDECLARED_OUTPUTS_DIR/" || true
  LOGF=$WORK/out/serial.txt
  for st in $STAGES; do check "${STAGE_CHECKS[$st]}" guest_stage_ok "$LOGF" "$st" 60; done
  check "the guest's kernel log shows no BUG, WARNING or Oops" guest_kernel_log_clean "$LOGF"
  check "the guest ran to its end" guest_finished "$LOGF" LEGO_OPS "$qrc"
  grep -E '^guest: stage .*: (ok|FAIL)|^security |^guest: [0-9]' "$LOGF" >&2
fi
check_summary
