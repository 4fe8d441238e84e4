# lego's qemu guest with a real Debian userland: Debian's 6.1 kernel booted under
# qemu (TCG) on this machine's own root file system, shared read-only over 9p (virtio)
# and made writable in the guest by an overlayfs whose upper layer is a tmpfs. The guest
# therefore has everything installed here (dkms, systemd, linux-headers, modprobe, ip,
# lego's built programs at their paths on this machine) without a download or an image
# to build, and nothing it writes reaches this machine, except through the one writable
# share, the "out" directory (mounted at /lego-out in the guest).
#
# Source it from a bash test script:
#
#   . "$(dirname "$0")/../lib/guest.sh"
#   guest_boot OUT_DIR INIT [ARG...]    # boots; INIT runs in the guest (see below)
#
# INIT is a path on this machine (so also in the guest): an executable run as the guest's
# PID 1 after the switch to the overlay root when GUEST_SYSTEMD is 0, or, when it is 1,
# run by systemd (the guest's PID 1) as the service lego-guest.service, the only unit
# of the target the guest boots (lego-guest.target: sysinit, journald, udev, nothing
# else of this machine's units). Its arguments come through a file (/lego-out/args),
# its output goes to the serial console. INIT sources tests/lib/guest_init.sh (the guest
# side: the PID-1 mounts, run_stage and the stage lines the checks below read) and ends
# with its `guest_poweroff`, or the guest runs until GUEST_TIMEOUT.
# guest_boot returns qemu's status (124 on timeout); the serial log is OUT_DIR/serial.log
# (carriage returns removed: OUT_DIR/serial.txt).
#
# Measured on a 2-vCPU machine (TCG): the initramfs (busybox and 11 modules, 1.2 MB)
# builds in ~0.3 s; the guest reaches INIT ~6 s after qemu starts without systemd and
# ~25 s with it (see tests/ops/README.md for the stage times).
#
# Environment: LEGO_KVER (default: the newest /boot/vmlinuz-6.1.*), GUEST_SYSTEMD (0 or
# 1, default 0), GUEST_TIMEOUT (seconds, default 600), GUEST_MEM (MiB, default 2048),
# GUEST_SMP (default 2), GUEST_APPEND (more kernel command line).
# Needs: qemu-system-x86 linux-image-amd64 busybox-static cpio kmod (all in .ci/bootstrap).

# guest_kernel: sets LEGO_KVER and GUEST_KERNEL, or says what is missing.
guest_kernel() {
  if [ -z "${LEGO_KVER:-}" ]; then
    local vmlinuz
    vmlinuz="$(ls -1 /boot/vmlinuz-6.1.* 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$vmlinuz" ] || { echo "guest: no /boot/vmlinuz-6.1.*: apt-get install linux-image-amd64" >&2; return 1; }
    LEGO_KVER="${vmlinuz#/boot/vmlinuz-}"
  fi
  GUEST_KERNEL="/boot/vmlinuz-$LEGO_KVER"
  [ -r "$GUEST_KERNEL" ] || { echo "guest: $GUEST_KERNEL missing" >&2; return 1; }
  [ -d "/lib/modules/$LEGO_KVER/kernel" ] || { echo "guest: /lib/modules/$LEGO_KVER missing" >&2; return 1; }
}

# guest_initramfs DIR: DIR/initrd.cpio.gz, the early userland that mounts the shared root.
guest_initramfs() {
  local dir=$1 r=$1/initramfs m
  rm -rf "$r"
  mkdir -p "$r"/{bin,dev,proc,sys,newroot,lower,upper,mods}
  [ -x /bin/busybox ] || { echo "guest: /bin/busybox missing: apt-get install busybox-static" >&2; return 1; }
  cp /bin/busybox "$r/bin/busybox"
  # The modules the 9p root and the overlay need, in load order (modprobe's own resolution
  # of their dependencies, read from this machine's copy of the guest kernel's modules).
  for m in 9p 9pnet_virtio virtio_pci overlay; do
    modprobe -S "$LEGO_KVER" --show-depends "$m" || return 1
  done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$r/mods/order"
  while read -r m; do cp "$m" "$r/mods/"; done <"$r/mods/order"
  sed -i 's|.*/||' "$r/mods/order"
  cat >"$r/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "guest-init: $*"; poweroff -f; }
while read -r m; do insmod "/mods/$m" || fail "insmod $m"; done </mods/order
# msize: 9p's default (8 KiB) makes every read of the shared root several round trips.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,ro,cache=loose hostroot /lower ||
  fail "mount hostroot"
mount -t tmpfs -o mode=755 upper /upper
mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot ||
  fail "mount overlay"
mkdir -p /newroot/lego-out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 out /newroot/lego-out || fail "mount out"
# A fresh /tmp, as at any boot (else systemd-tmpfiles empties this machine's /tmp into
# the overlay, file by file).
mount -t tmpfs -o mode=1777 tmp /newroot/tmp
# Except the checkout the test runs from, when it lies under /tmp (CI clones there): the
# runfiles' links point into it.
while read -r p; do
  mkdir -p "/newroot$p" && mount -o bind "/lower$p" "/newroot$p" || fail "bind $p"
done </newroot/lego-out/keep
init=/lego-out/init.sh
mode=$(cat /newroot/lego-out/mode)
# This machine's own mounts and identity are not the guest's.
: >/newroot/etc/fstab
# A machine id of its own; not an empty one, which would make systemd apply every unit
# preset of this machine (first boot), file by file over 9p.
tr -d '-' </proc/sys/kernel/random/uuid >/newroot/etc/machine-id
if [ "$mode" = systemd ]; then
  u=/newroot/etc/systemd/system
  cp /newroot/lego-out/lego-guest.service /newroot/lego-out/lego-guest.target "$u/"
  ln -sf lego-guest.target "$u/default.target"
  umount /proc /sys /dev
  exec switch_root /newroot /lib/systemd/systemd
fi
umount /proc /sys /dev
exec switch_root /newroot "$init"
EOF
  chmod +x "$r/init"
  (cd "$r" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$dir/initrd.cpio.gz"
}

# guest_boot OUT_DIR INIT [ARG...]: see the top of this file.
guest_boot() {
  local out=$1 init=$2
  shift 2
  guest_kernel || return 1
  mkdir -p "$out"
  guest_initramfs "$out" || return 1
  # Run from the share: the guest's /tmp is its own.
  cp "$init" "$out/init.sh" && chmod +x "$out/init.sh" || return 1
  : >"$out/args"
  # The checkout this file is in (tests/lib/guest.sh; under Bazel, what its runfile links
  # to): the guest's fresh /tmp would hide it if it is under /tmp.
  local checkout
  checkout=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)
  case $checkout in /tmp/*) echo "$checkout" >"$out/keep" ;; *) : >"$out/keep" ;; esac
  local a
  for a in "$@"; do printf '%s\n' "$a" >>"$out/args"; done
  if [ "${GUEST_SYSTEMD:-0}" = 1 ]; then
    echo systemd >"$out/mode"
    cat >"$out/lego-guest.target" <<'EOF'
[Unit]
Description=lego guest test
Requires=lego-guest.service sysinit.target
After=lego-guest.service
AllowIsolate=yes
EOF
    cat >"$out/lego-guest.service" <<EOF
[Unit]
Description=lego guest test ($init)
After=sysinit.target systemd-journald.service

[Service]
Type=oneshot
ExecStart=/lego-out/init.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
EOF
  else
    echo script >"$out/mode"
  fi
  # no_timer_check: on a busy host the emulated timer can miss the kernel's IO-APIC check
  # ("IO-APIC + timer doesn't work!", a panic at boot: seen here under load).
  local append="console=ttyS0 quiet panic=-1 oops=panic panic_on_warn=1 no_timer_check rdinit=/init"
  [ "${GUEST_SYSTEMD:-0}" = 1 ] && append+=" systemd.show_status=false systemd.log_level=warning"
  append+=" ${GUEST_APPEND:-}"
  : >"$out/serial.log"
  timeout --foreground -k 5 "${GUEST_TIMEOUT:-600}" \
    qemu-system-x86_64 -accel tcg -m "${GUEST_MEM:-2048}" -smp "${GUEST_SMP:-2}" -cpu max \
    -kernel "$GUEST_KERNEL" -initrd "$out/initrd.cpio.gz" -append "$append" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$out",mount_tag=out,security_model=none \
    -nodefaults -display none -serial stdio -no-reboot </dev/null >"$out/serial.log" 2>&1
  local rc=$?
  tr -d '\r' <"$out/serial.log" >"$out/serial.txt"
  return $rc
}

# The checks every guest test makes of a finished guest's serial log (OUT_DIR/serial.txt),
# for check() (tests/lib/check.sh), e.g. check "..." guest_stage_ok "$LOG" dkms 60.
# A stage reports "guest: stage NAME: start", then ": ok" or ": FAIL ...".

# guest_stage_ok LOG STAGE LINES: the stage ended ok; else the last LINES lines of its
# part of the log, and whether it ever started.
guest_stage_ok() {
  local log=$1 stage=$2 lines=$3
  grep -q "^guest: stage $stage: ok" "$log" && return 0
  awk -v s="guest: stage $stage: " 'index($0, s "start") == 1 { p = 1 } p { print } index($0, s "FAIL") == 1 { p = 0 }' "$log" | tail -n "$lines"
  grep -q "^guest: stage $stage: start" "$log" || echo "the guest never started stage $stage"
  return 1
}

# guest_kernel_log_clean LOG [IGNORE_ERE]: no BUG, WARNING, Oops, GPF, panic or call
# trace in the guest kernel's log, nor what slub_debug and page poisoning report (a list
# corruption, a poison overwritten, a red zone), but for lines matching IGNORE_ERE.
guest_kernel_log_clean() {
  local bad
  bad=$(grep -nE 'BUG:|WARNING:|Oops|general protection|Kernel panic|Call Trace:|list_(add|del) corruption|Poison overwritten|Redzone' "$1")
  [[ -n ${2:-} ]] && bad=$(grep -vE "$2" <<<"$bad")
  [[ -z $bad ]] && return 0
  echo "$bad"
  return 1
}

# guest_finished LOG PREFIX QEMU_STATUS: the guest's init printed PREFIX_PASS or
# PREFIX_FAIL, its last word; else the log's tail and whether qemu timed out (124).
guest_finished() {
  grep -qE "^$2_(PASS|FAIL)" "$1" && return 0
  tail -n 40 "$1"
  [[ $3 -eq 124 ]] && echo "guest timed out"
  echo "the guest did not finish (no $2_PASS or $2_FAIL)"
  return 1
}
