#!/usr/bin/env bash
# Description: builds lego_pcache.ko (kmod/) with kbuild against Debian's 6.1
# headers, builds tests/kmod/pcache_test.c statically, packs both with
# busybox-static into an initramfs and boots Debian's 6.1 kernel in qemu (TCG)
# to run them: the host kernel cannot load modules. Passes only if the guest
# prints LEGO_KMOD_PASS and its serial log shows no BUG, WARNING, Oops or
# general protection fault (as liburing's test/runtests.sh scans /dev/kmsg).
#
# Run: bazel test //tests/kmod:pcache_qemu_test, or directly:
#   tests/kmod/run_in_qemu.sh [pcache_test args, e.g. -f evict]
# Env: LEGO_KVER (default: newest /boot/vmlinuz-6.1.*), LEGO_QEMU_TIMEOUT
# (seconds, default 150), TEST_TMPDIR (scratch; default a mktemp dir).
# Needs: qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static
# cpio build-essential (all in .ci/bootstrap).
set -euo pipefail

log() { echo "run_in_qemu: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# Sources: Bazel runfiles, or the repository this script sits in.
if [[ -n "${TEST_SRCDIR:-}" ]]; then
  ROOT="$TEST_SRCDIR/${TEST_WORKSPACE:-main}"
else
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
fi
[[ -f "$ROOT/kmod/main.c" && -f "$ROOT/include/lego/pcache_abi.h" ]] ||
  die "module sources not found under $ROOT"

if [[ -z "${LEGO_KVER:-}" ]]; then
  vmlinuz="$(ls -1 /boot/vmlinuz-6.1.* 2>/dev/null | sort -V | tail -n 1 || true)"
  [[ -n "$vmlinuz" ]] || die "no /boot/vmlinuz-6.1.*: apt-get install linux-image-amd64"
  LEGO_KVER="${vmlinuz#/boot/vmlinuz-}"
fi
KERNEL="/boot/vmlinuz-$LEGO_KVER"
KDIR="/usr/src/linux-headers-$LEGO_KVER"
[[ -r "$KERNEL" ]] || die "$KERNEL missing"
[[ -d "$KDIR" ]] || die "$KDIR missing: apt-get install linux-headers-amd64"
# busybox-static installs a static /bin/busybox (plain busybox is dynamic).
BUSYBOX=/bin/busybox
[[ -x "$BUSYBOX" ]] || die "busybox missing: apt-get install busybox-static"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing"

WORK="${TEST_TMPDIR:-$(mktemp -d)}/pcache_qemu"
rm -rf "$WORK"
mkdir -p "$WORK/kmod/include/lego" "$WORK/root"

# 1. The module, built from a private copy (runfiles are read-only), laid out
#    as DKMS lays it out: the ABI header under include/ beside the sources.
cp -L "$ROOT"/kmod/*.c "$ROOT"/kmod/*.h "$ROOT"/kmod/Makefile "$WORK/kmod/"
cp -L "$ROOT/include/lego/pcache_abi.h" "$WORK/kmod/include/lego/"
log "building lego_pcache.ko against $KDIR"
make -s -C "$KDIR" M="$WORK/kmod" W=1 modules >"$WORK/kbuild.log" 2>&1 ||
  { cat "$WORK/kbuild.log" >&2; die "kbuild failed"; }
if grep -E 'warning:' "$WORK/kbuild.log" >&2; then die "module build has warnings"; fi

# 2. The test program, static so the initramfs needs no libraries.
log "building pcache_test"
gcc -static -O2 -g -Wall -Wextra -Werror -pthread -I"$ROOT/include" \
  -o "$WORK/root/pcache_test" "$ROOT/tests/kmod/pcache_test.c"

# 3. The initramfs.
R="$WORK/root"
mkdir -p "$R"/{bin,dev,proc,sys,tmp}
cp "$BUSYBOX" "$R/bin/busybox"
cp "$WORK/kmod/lego_pcache.ko" "$R/"
TEST_ARGS=""
for a in "$@"; do TEST_ARGS+=" '${a//\'/}'"; done
cat >"$R/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Debian's kernel has no CONFIG_DEVTMPFS_MOUNT.
mount -t devtmpfs devtmpfs /dev
echo "guest: \$(uname -r), cmdline: \$(cat /proc/cmdline)"
rc=1
if insmod /lego_pcache.ko; then
  ls -l /dev/lego_pcache
  /pcache_test $TEST_ARGS
  rc=\$?
  echo "guest: stats: \$(cd /sys/class/misc/lego_pcache/stats && grep . * | tr '\n' ' ')"
  rmmod lego_pcache || rc=1
else
  echo "guest: insmod failed"
fi
# quiet hides KERN_INFO: replay the kernel's log lines that matter here.
dmesg | grep -E 'lego_pcache|BUG|WARNING|Oops|general protection|Call Trace|corrupt|Poison|mem auto-init|slub' || true
if [ "\$rc" = 0 ]; then echo "LEGO_KMOD_PASS"; else echo "LEGO_KMOD_FAIL rc=\$rc"; fi
poweroff -f
INIT
chmod +x "$R/init"
(cd "$R" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$WORK/initrd.cpio.gz"

# 4. Boot. Debugging aids Debian's 6.1 kernel allows from the command line
#    (no DEBUG_VM, KASAN, KFENCE, lockdep, DEBUG_PAGEALLOC or
#    PAGE_TABLE_CHECK are built in): SLUB red zones/poisoning/sanity checks
#    and user tracking (slub_debug=FZPU), poisoning of freed pages
#    (page_poison=1), zeroing on free (init_on_free=1), and turning any
#    oops or WARN into a panic so that the guest stops at the first one.
APPEND="console=ttyS0 quiet panic=-1 oops=panic panic_on_warn=1 softlockup_panic=1"
APPEND+=" slub_debug=FZPU page_poison=1 init_on_free=1"
LOGF="$WORK/serial.log"
log "booting $KERNEL (log: $LOGF)"
start=$SECONDS
set +e
timeout --foreground -k 5 "${LEGO_QEMU_TIMEOUT:-150}" \
  qemu-system-x86_64 -accel tcg -m 1024 -smp 2 -cpu max \
  -kernel "$KERNEL" -initrd "$WORK/initrd.cpio.gz" \
  -append "$APPEND" -nographic -no-reboot </dev/null >"$LOGF" 2>&1
qrc=$?
set -e
log "qemu exited $qrc after $((SECONDS - start)) s"
[[ -n "${TEST_UNDECLARED_OUTPUTS_DIR:-}" ]] && cp "$LOGF" "$TEST_UNDECLARED_OUTPUTS_DIR/" || true

# 5. Verdict.
tr -d '\r' <"$LOGF" >"$LOGF.txt"
bad="$(grep -nE 'BUG:|WARNING:|Oops|general protection|Kernel panic|Call Trace:|list_(add|del) corruption|Poison overwritten|Redzone' "$LOGF.txt" || true)"
if [[ -n "$bad" ]]; then
  tail -n 80 "$LOGF.txt" >&2
  die "kernel log shows trouble:
$bad"
fi
if ! grep -qx 'LEGO_KMOD_PASS' "$LOGF.txt"; then
  tail -n 80 "$LOGF.txt" >&2
  [[ $qrc -eq 124 ]] && die "guest timed out"
  die "no LEGO_KMOD_PASS in the serial log"
fi
grep -E '^(ok|FAIL) |^  [0-9]+ evictions|pcache_test:|guest: stats|lego_pcache' "$LOGF.txt" >&2 || true
log "PASS: $(grep -x 'LEGO_KMOD_PASS' "$LOGF.txt")"
