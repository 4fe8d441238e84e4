#!/usr/bin/env bash
# Description: boots Debian's 6.1 kernel in qemu (TCG) and runs there what the
# host kernel cannot: lego_pcache.ko (kmod/), and lego's real runtime with and
# without it. Builds the module with kbuild against Debian's 6.1 headers and
# tests/kmod/pcache_test.c statically, packs them with busybox-static, lego's
# binaries and every shared library those need into an initramfs, and has the
# guest's /init run, in order (each stage prints "guest: stage NAME: ok" or
# "... FAIL"):
#   a  insmod lego_pcache; pcache_test [args]; rmmod
#   b  without the module: excache_test (the Catch2 suite but its one slow
#      case, below); lego-memd on 127.0.0.1 and `lego-run --config` running
#      lego_integrity over a heap 3x its ExCache
#   c  insmod lego_pcache; the same two again (the runtime finds
#      /dev/lego_pcache by itself)
#   d  excache_bench (random accesses over 4x the ExCache, few stores:
#      eviction-heavy, write-light) with the module unloaded, then loaded,
#      and the ratio:
#      "guest: bench: no-module X us/access, module Y us/access, ratio Z"
#      then the same for a hot-set workload under CLOCK ("guest: bench1: ...")
# Passes only if the guest prints LEGO_KMOD_PASS (every stage ok) and its
# serial log shows no BUG, WARNING, Oops or general protection fault (as
# liburing's test/runtests.sh scans /dev/kmsg). Each of these is a check of
# tests/lib/check.sh, one per guest stage ("guest a: ...", "guest b: ..."):
# LEGO_TEST_FILTER (a regex over their names) runs only the stages whose checks
# it selects, e.g. LEGO_TEST_FILTER='guest c' for the runtime with the module.
#
# Run: bazel test //tests/kmod:pcache_qemu_test, or directly:
#   tests/kmod/run_in_qemu.sh [pcache_test args, e.g. -f evict]
# By hand the lego binaries come from bazel-bin: build them first with
#   bazel build //tests/runtime:excache_test //tests/runtime:excache_bench \
#     //daemons/memory:lego-memd //runtime:lego-run //runtime:liblego_preload.so \
#     //tests/lego_run:lego_integrity
# Env: LEGO_KVER (default: newest /boot/vmlinuz-6.1.*), LEGO_QEMU_TIMEOUT
# (seconds for the whole guest, default 600, or 2400 with LEGO_QEMU_PIN=0),
# LEGO_QEMU_RUNTIME (default 1; 0 runs stage a only and needs no lego
# binaries), LEGO_QEMU_PIN (default 1: stages b-d on one vCPU; 0: on both, ~5x
# slower, see below), LEGO_QEMU_EXCACHE_TEST (excache_test's arguments),
# LEGO_QEMU_INTEGRITY (lego_integrity's HEAP_MIB THREADS OPS),
# LEGO_QEMU_BENCH (excache_bench's flags; defaults below),
# LEGO_QEMU_BENCH_REPS (default 3: alternating runs per side in stage d, the
# best of each compared), LEGO_QEMU_BENCH_MORE (more flag sets for stage d, separated by ';', each
# printed as its own "guest: bench: ..." line, e.g. "--write-pct=0;
# --pattern=zipf"; each is appended to LEGO_QEMU_BENCH's flags, the later
# flag winning; default "--pattern=hotset --policy=clock --accesses=60000"; empty for
# none), LEGO_QEMU_STAGES (default abcd, or what LEGO_TEST_FILTER selects: the
# stages to run, e.g. "ad" to measure quickly), TEST_TMPDIR (scratch; default
# a mktemp dir).
# Needs: qemu-system-x86 linux-image-amd64 linux-headers-amd64 busybox-static
# cpio build-essential (all in .ci/bootstrap).
set -euo pipefail
LIB="$(dirname "$0")/../lib/check.sh"
# A failed stage shows this many lines of its output (the lib shows 8 by default).
LEGO_TEST_TAIL=${LEGO_TEST_TAIL:-60}
. "$LIB"
# The host-side checks of a guest's serial log (guest_stage_ok, guest_kernel_log_clean,
# guest_finished); this test builds its own initramfs rather than booting guest_boot's.
. "$(dirname "$0")/../lib/guest.sh"
check_init

log() { echo "run_in_qemu: $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# The checks, one per guest stage (and lego-memd, which stages b-d share), by the
# stage's name in the guest's "guest: stage NAME: ok" line.
declare -A STAGE_CHECKS=(
  [a]="guest a: pcache_test, the module's ioctl tests, with lego_pcache loaded"
  [memd]="guest: lego-memd serves on the guest's loopback"
  [b-excache_test]="guest b: excache_test without the module"
  [b-races]="guest b: excache_test's racing writers (quick, sigbus) without the module"
  [b-integrity]="guest b: lego-run --config lego_integrity against lego-memd without the module"
  [c-insmod]="guest c: insmod lego_pcache"
  [c-excache_test]="guest c: excache_test with the module"
  [c-races]="guest c: excache_test's racing writers (quick, sigbus) with the module"
  [c-integrity]="guest c: lego-run --config lego_integrity against lego-memd with the module"
  [d-bench]="guest d: excache_bench without and with the module"
)
STAGE_ORDER="a memd b-excache_test b-races b-integrity c-insmod c-excache_test c-races c-integrity d-bench"

# Sources and binaries: both in Bazel's runfiles (the sh_test's data), or this
# checkout and its bazel-bin when run by hand.
if [[ -n "${TEST_SRCDIR:-}" ]]; then
  ROOT="$TEST_SRCDIR/${TEST_WORKSPACE:-lego}"
  BIN="$ROOT"
else
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  BIN="$ROOT/bazel-bin"
fi
[[ -f "$ROOT/kmod/main.c" && -f "$ROOT/include/lego/pcache_abi.h" ]] ||
  die "module sources not found under $ROOT"

RUNTIME="${LEGO_QEMU_RUNTIME:-1}"
# Small on purpose: under TCG a fault costs 10-50x what it does natively.
# excache_bench: 2 MiB ExCache, 8 MiB region (4x), uniform random accesses,
# write-light (5% stores where excache_bench has --write-pct, else loads
# only), the SIGBUS delivery (no cross-CPU hand-off, so eviction is a larger
# share of each miss).
bench_writes=--op=read
if [[ "$RUNTIME" != 0 ]] && grep -qa -- '--write-pct=' "$BIN/tests/runtime/excache_bench" 2>/dev/null; then
  bench_writes=--write-pct=5
fi
BENCH_ARGS="${LEGO_QEMU_BENCH:---capacity-mb=2 --ratio=4 --accesses=20000 $bench_writes --delivery=sigbus}"
# And by default a second workload: 90% of accesses to a hot set of half the ExCache, the
# rest anywhere, 5% stores, CLOCK on both sides: what the module's accessed bits are for
# (without them CLOCK knows only of stores, and evicts hot lines it cannot tell are hot).
# 60000 accesses: it misses ~0.1 times per access, and with 20000 most of its misses were
# the first refill of a line after the fill phase, which stored to every line.
BENCH_MORE="${LEGO_QEMU_BENCH_MORE---pattern=hotset --policy=clock --accesses=60000}"
if [[ -n "${LEGO_QEMU_STAGES:-}" ]]; then
  STAGES=$LEGO_QEMU_STAGES
else
  # The stages with a check the filter selects (all of them without a filter).
  STAGES=""
  for st in $STAGE_ORDER; do
    [[ $st == memd ]] && continue
    selected "${STAGE_CHECKS[$st]}" && [[ $STAGES != *"${st:0:1}"* ]] && STAGES+=${st:0:1}
  done
  [[ -n "$STAGES" ]] || { check_summary; exit 1; }  # says that the filter selects nothing
fi
[[ "$STAGES" == *[bcd]* ]] || RUNTIME=0
REPS="${LEGO_QEMU_BENCH_REPS:-3}"
# lego_integrity: HEAP_MIB THREADS OPS_PER_THREAD; its heap plus its version
# array (half the heap's size) is 3x the 2 MiB ExCache.
INTEGRITY_ARGS="${LEGO_QEMU_INTEGRITY:-4 2 2000}"
EXCACHE=2M
# Stages b-d run on one vCPU (taskset 1): under TCG on this 2-core host every
# wake-up of the other vCPU (a fault handed to the handler thread, an RPC to
# lego-memd, a TLB-shootdown IPI) waits for the host to run that vCPU's thread,
# and costs milliseconds when the host is busy. Measured: the excache_test
# suite 195 s on two vCPUs, 21 s on one; lego_integrity 2-9x faster. Stage a
# keeps both vCPUs: it is where the module's cross-CPU TLB flushes and racing
# stores are tested. LEGO_QEMU_PIN=0 runs b-d on both.
PIN="${LEGO_QEMU_PIN:-1}"
# Seconds each runtime stage may take before the guest kills it and fails it
# (so a hang names its stage); the whole guest's limit is LEGO_QEMU_TIMEOUT.
if [[ "$PIN" != 0 ]]; then STAGE_TIMEOUT=180; else STAGE_TIMEOUT=900; fi
# excache_test: the whole suite but one case. "concurrent random writers never
# lose a write-back" (4 writer threads, 4 x 40k accesses per mode, smaps sampled
# every 1 ms) takes ~3 s per mode natively and did not finish one mode in 300 s
# under TCG; lego_integrity below races writers against evictions in the guest
# instead.
EXCACHE_TEST_ARGS="${LEGO_QEMU_EXCACHE_TEST:---use-colour no \"~concurrent random writers never lose a write-back\"}"

# guest name -> path under $BIN (the Bazel label's package and name).
declare -A LEGO_BINS=(
  [excache_test]=tests/runtime/excache_test
  [excache_bench]=tests/runtime/excache_bench
  [lego-memd]=daemons/memory/lego-memd
  [lego-run]=runtime/lego-run
  [liblego_preload.so]=runtime/liblego_preload.so
  [lego_integrity]=tests/lego_run/lego_integrity
)
if [[ "$RUNTIME" != 0 ]]; then
  for name in "${!LEGO_BINS[@]}"; do
    [[ -r "$BIN/${LEGO_BINS[$name]}" ]] ||
      die "$BIN/${LEGO_BINS[$name]} missing: build it (see the comment at the top of $0), or set LEGO_QEMU_RUNTIME=0"
  done
  # An ASan build cannot be injected into lego_integrity (as in
  # //tests/lego_run) and is far too slow under TCG.
  if ldd "$BIN/runtime/liblego_preload.so" | grep -q libasan; then
    die "$BIN holds an ASan build (bazel build --config=asan): rebuild without it"
  fi
fi

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
cp -L "$ROOT"/kmod/*.c "$ROOT"/kmod/*.h "$ROOT"/kmod/Makefile "$ROOT"/kmod/dkms.conf "$WORK/kmod/"
cp -L "$ROOT/include/lego/pcache_abi.h" "$WORK/kmod/include/lego/"
log "building lego_pcache.ko against $KDIR"
build_module() {
  make -s -C "$KDIR" M="$WORK/kmod" W=1 modules >"$WORK/kbuild.log" 2>&1 || return 1
  cat "$WORK/kbuild.log"
  ! grep -q 'warning:' "$WORK/kbuild.log"
}
# Every later step needs the module and the test program: without them, stop here.
check "lego_pcache.ko builds with kbuild, W=1, without a warning" build_module ||
  { check_summary; exit 1; }

# 2. The test program, static so that it runs even if library packing broke.
log "building pcache_test"
check "pcache_test builds (static, -Wall -Wextra -Werror)" \
  gcc -static -O2 -g -Wall -Wextra -Werror -pthread -I"$ROOT/include" \
  -o "$WORK/root/pcache_test" "$ROOT/tests/kmod/pcache_test.c" || { check_summary; exit 1; }

# 3. The initramfs.
R="$WORK/root"
mkdir -p "$R"/{bin,dev,proc,sys,tmp,etc,usr/lib,usr/lib64,lego/bin,lego/lib}
# Merged /usr, as on Debian 12: ldd names a library through /lib or /usr/lib,
# and either way it must land in one directory the guest's loader searches.
ln -s usr/lib "$R/lib"
ln -s usr/lib64 "$R/lib64"
cp "$BUSYBOX" "$R/bin/busybox"
cp "$WORK/kmod/lego_pcache.ko" "$R/"
cp "$LIB" "$R/check.sh"  # the tests' shell library: POSIX sh, busybox runs it

# copy_lib PATH: a system library goes to the same path in the guest (its
# loader searches /lib/x86_64-linux-gnu etc. without an ld.so.cache); any other
# (Bazel's _solib_k8 libraries, which cc_test links dynamically and finds
# through a $ORIGIN-relative RUNPATH) goes to /lego/lib, the guest's
# LD_LIBRARY_PATH.
copy_lib() {
  local src=$1 dst
  case "$src" in
    /lib/* | /lib64/* | /usr/lib/* | /usr/lib64/*) dst="$R$src" ;;
    *) dst="$R/lego/lib/${src##*/}" ;;
  esac
  if [[ -e "$dst" ]]; then
    cmp -s "$src" "$dst" || die "two different libraries named ${src##*/} (one is $src)"
    return 0
  fi
  mkdir -p "$(dirname "$dst")"
  cp -L "$src" "$dst"
}

# pack_deps FILE: every shared library FILE loads at start, and the loader.
pack_deps() {
  local f=$1 out line path
  if ! out="$(ldd "$f" 2>&1)"; then
    [[ "$out" == *"not a dynamic executable"* ]] && return 0
    die "ldd $f: $out"
  fi
  while read -r line; do
    case "$line" in
      *"not found"*) die "$f needs ${line%% *}, which this machine lacks" ;;
      *"=> /"*) path="${line#*=> }" ;;
      /*) path="$line" ;;   # the loader itself
      *) continue ;;        # linux-vdso.so.1, "statically linked"
    esac
    copy_lib "${path%% (*}"
  done <<<"$out"
}

# find_soname NAME: where the loader finds a library dlopen()ed by soname.
find_soname() {
  local d
  for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64 /lib /usr/lib; do
    [[ -e "$d/$1" ]] && { echo "$d/$1"; return 0; }
  done
  return 1
}

if [[ "$RUNTIME" != 0 ]]; then
  log "packing lego's binaries and their libraries from $BIN"
  # All in /lego/bin: lego-run finds liblego_preload.so beside itself
  # (runtime/launcher/process.cc find_part), as in an installed layout.
  for name in "${!LEGO_BINS[@]}"; do
    cp -L "$BIN/${LEGO_BINS[$name]}" "$R/lego/bin/$name"
    pack_deps "$BIN/${LEGO_BINS[$name]}"
  done
  # Loaded by name at run time, so ldd cannot see them: libfit dlopen()s
  # libfabric and libibverbs on first use (libfit/fabric_loader.cc), and
  # lego-run LD_PRELOADs jemalloc from this fixed path (runtime/launcher/process.cc
  # jemalloc_path), whatever path ldd showed it under.
  for so in libfabric.so.1 libibverbs.so.1 libjemalloc.so.2; do
    path="$(find_soname "$so")" || die "$so missing (apt-get install libfabric1 libibverbs1 libjemalloc2)"
    copy_lib "$path"
    pack_deps "$path"
  done
  [[ -e "$R/usr/lib/x86_64-linux-gnu/libjemalloc.so.2" ]] ||
    die "libjemalloc.so.2 is not where lego-run looks for it in the guest"
  # Its own cluster: a processor node and lego-memd on the guest's loopback.
  # Both sides sleep (blocking) rather than spin while waiting: on one vCPU a
  # spinning caller keeps the daemon it waits for off the CPU until the next
  # tick (measured: polling did not finish lego_integrity in 60 s; blocking, 19 s).
  cluster_toml "$R/etc/lego-cluster.toml" "key = \"$(random_key)\"" -- \
    "1 processor 127.0.0.1 18601 blocking" "2 memory 127.0.0.1 18602 blocking"
fi

# The guest's /init: settings from this script, then the fixed part below
# (quoted, so nothing in it is expanded here).
q() { local a out=""; for a in "$@"; do out+=" '${a//\'/}'"; done; echo "${out# }"; }
{
  echo '#!/bin/busybox sh'
  echo "TEST_ARGS=\"$(q "$@")\""
  echo "RUNTIME=$(q "$RUNTIME")"
  echo "BENCH_ARGS=$(q "$BENCH_ARGS")"
  echo "BENCH_MORE=$(q "$BENCH_MORE")"
  echo "STAGES=$(q "$STAGES")"
  echo "REPS=$(q "$REPS")"
  echo "INTEGRITY_ARGS=$(q "$INTEGRITY_ARGS")"
  echo "EXCACHE=$(q "$EXCACHE")"
  if [[ "$PIN" != 0 ]]; then echo "PIN='taskset 1'"; else echo "PIN="; fi
  echo "EXCACHE_TEST_ARGS=$(q "$EXCACHE_TEST_ARGS")"
  echo "T=$STAGE_TIMEOUT"
  cat <<'INIT'
/bin/busybox --install -s /bin
. /check.sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Debian's kernel has no CONFIG_DEVTMPFS_MOUNT.
mount -t devtmpfs devtmpfs /dev
export PATH=/lego/bin:/bin
export LD_LIBRARY_PATH=/lego/lib
echo "guest: $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2}' /proc/meminfo) KiB, cmdline: $(cat /proc/cmdline)"

failed=""
now() { cut -d' ' -f1 /proc/uptime; }
# begin NAME WHAT / end NAME RC: one line each, with the stage's wall time.
begin() { t0=$(now); echo "guest: stage $1: start: $2"; }
end() {
  t=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$2" = 0 ]; then
    echo "guest: stage $1: ok ($t s)"
  else
    echo "guest: stage $1: FAIL rc=$2 ($t s)"
    failed="$failed $1"
  fi
}
kmod_load() { insmod /lego_pcache.ko && [ -c /dev/lego_pcache ]; }
kmod_unload() { rmmod lego_pcache && [ ! -e /dev/lego_pcache ]; }
kmod_stats() {
  echo "guest: stats: $(cd /sys/class/misc/lego_pcache/stats && grep . * | tr '\n' ' ')"
}

# a. The module's own tests.
case "$STAGES" in *a*)
  begin a "insmod lego_pcache, pcache_test $TEST_ARGS, rmmod"
  rc=1
  if kmod_load; then
    ls -l /dev/lego_pcache
    eval "timeout 120 /pcache_test $TEST_ARGS"
    rc=$?
    kmod_stats
    kmod_unload || rc=1
  else
    echo "guest: insmod failed"
  fi
  end a $rc
;; esac

# runtime_tests STAGE: the ExCache's unit tests, and a real program under
# lego-run with its memory on the guest's lego-memd.
runtime_tests() {
  begin "$1-excache_test" "excache_test $EXCACHE_TEST_ARGS (module $2)"
  eval "$PIN timeout $T excache_test $EXCACHE_TEST_ARGS"
  end "$1-excache_test" $?
  # The race test (stores racing evictions), a tenth of its work, SIGBUS delivery
  # only: the handler-thread modes need cross-vCPU wake-ups that take
  # milliseconds under TCG (EXCACHE_TEST_QUICK / EXCACHE_TEST_MODES: excache_test.cc).
  begin "$1-races" "excache_test \"concurrent random writers*\" quick, sigbus (module $2)"
  EXCACHE_TEST_QUICK=1 EXCACHE_TEST_MODES=sigbus $PIN timeout $T excache_test --use-colour no \
    "concurrent random writers*"
  end "$1-races" $?
  begin "$1-integrity" "lego-run --config --excache $EXCACHE -- lego_integrity $INTEGRITY_ARGS (module $2)"
  if ! kill -0 "$memd" 2>/dev/null; then
    echo "guest: lego-memd is not running"; cat /tmp/lego-memd.log; end "$1-integrity" 1; return
  fi
  # lego-run without --config would set up a network namespace with `ip
  # netns`, which busybox lacks.
  $PIN timeout $T lego-run --config /etc/lego-cluster.toml --excache "$EXCACHE" --stats \
    -- lego_integrity $INTEGRITY_ARGS >/tmp/integrity.out 2>/tmp/integrity.err
  rc=$?
  cat /tmp/integrity.out
  grep -E 'lego|misses|evictions|write_backs|fetches|miss_latency' /tmp/integrity.err
  if [ "$rc" = 0 ] && ! grep -q '^integrity ok' /tmp/integrity.out; then rc=1; fi
  [ "$rc" = 0 ] || cat /tmp/integrity.err
  end "$1-integrity" $rc
}

# bench LABEL [EXTRA FLAGS]: excache_bench once; the first ExCache row's
# us/access on stdout (the column found by its name in the CSV header).
bench() {
  label=$1
  shift
  # For the host's CPU-time meter (below): to stderr, which is the console.
  echo "guest: mark begin $label" >&2
  $PIN timeout $T excache_bench $BENCH_ARGS "$@" --csv >/tmp/bench.$label.csv 2>&1
  rc=$?
  echo "guest: mark end $label" >&2
  sed "s/^/guest: bench $label: /" /tmp/bench.$label.csv >&2
  [ "$rc" = 0 ] || return 1
  awk -F, '/^setup,/ { for (i = 1; i <= NF; i++) if ($i == "us_per_access") col = i }
           /^excache-/ && col { print $col; found = 1; exit }
           END { exit !found }' /tmp/bench.$label.csv
}

if [ "$RUNTIME" != 0 ]; then
  begin memd "lo up, lego-memd on 127.0.0.1"
  ip link set lo up
  $PIN lego-memd --config /etc/lego-cluster.toml --node 2 --capacity 512M --ready-fd 3 \
    3>/tmp/lego-memd.ready 2>/tmp/lego-memd.log &
  memd=$!
  rc=0
  wait_ready /tmp/lego-memd.ready "$memd" 20 || rc=1
  [ "$rc" = 0 ] || cat /tmp/lego-memd.log
  end memd $rc

  # b. Without the module: the userfaultfd-only path.
  if [ -e /dev/lego_pcache ]; then echo "guest: lego_pcache is still loaded"; failed="$failed b"; fi
  case "$STAGES" in *b*) runtime_tests b unloaded ;; esac

  # c. With it: the runtime detects /dev/lego_pcache itself.
  begin c-insmod "insmod lego_pcache"
  kmod_load
  end c-insmod $?
  case "$STAGES" in *c*) runtime_tests c loaded; [ -e /dev/lego_pcache ] && kmod_stats ;; esac

  # d. The benchmark without and with the module, for BENCH_ARGS and then
  # each set of BENCH_MORE.
  # bench_pair LABEL [EXTRA FLAGS]: "guest: bench: ... ratio Z" (without/with).
  # REPS alternating runs each way; each side's best (lowest) time counts: the
  # vCPU's wall time only grows when the host is busy (other jobs share its 2
  # cores), so the minimum is the least disturbed run.
  bench_pair() {
    bl=$1
    shift
    all_without="" all_with=""
    for r in $(seq 1 "$REPS"); do
      if kmod_unload && without=$(bench no-module$bl.$r "$@") && kmod_load && with=$(bench module$bl.$r "$@"); then
        all_without="$all_without $without"
        all_with="$all_with $with"
      else
        return 1
      fi
    done
    kmod_stats
    without=$(echo $all_without | tr ' ' '\n' | sort -n | head -n 1)
    with=$(echo $all_with | tr ' ' '\n' | sort -n | head -n 1)
    echo "guest: bench$bl: no-module $without us/access, module $with us/access, ratio $(awk -v a="$without" -v b="$with" 'BEGIN { printf "%.2f", a / b }') (best of $REPS; all: no-module$all_without; module$all_with)"
  }
  if echo "$STAGES" | grep -q d; then
    begin d-bench "excache_bench $BENCH_ARGS, module unloaded then loaded"
    rc=0
    [ -e /dev/lego_pcache ] || kmod_load || rc=1
    bench_pair "" || rc=1
    k=0
    echo "$BENCH_MORE" | tr ';' '\n' | while read -r more; do
      [ -n "$more" ] || continue
      k=$((k + 1))
      echo "guest: bench$k: excache_bench $BENCH_ARGS $more"
      # word splitting of $more is wanted: it is a list of flags.
      bench_pair "$k" $more || echo "guest: bench$k failed"
    done
    [ -e /dev/lego_pcache ] && { kmod_unload || rc=1; }
    end d-bench $rc
  fi

  kill "$memd"
  wait "$memd"
fi

# quiet hides KERN_INFO: replay the kernel's log lines that matter here.
dmesg | grep -E 'lego_pcache|BUG|WARNING|Oops|general protection|Call Trace|corrupt|Poison|mem auto-init|slub|userfault|segfault|oom' || true
if [ -z "$failed" ]; then echo "LEGO_KMOD_PASS"; else echo "LEGO_KMOD_FAIL stages:$failed"; fi
poweroff -f
INIT
} >"$R/init"
chmod +x "$R/init"
(cd "$R" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$WORK/initrd.cpio.gz"
log "initramfs: $(du -h "$WORK/initrd.cpio.gz" | cut -f1)"

# 4. Boot. Debugging aids Debian's 6.1 kernel allows from the command line
#    (no DEBUG_VM, KASAN, KFENCE, lockdep, DEBUG_PAGEALLOC or
#    PAGE_TABLE_CHECK are built in): SLUB red zones/poisoning/sanity checks
#    and user tracking (slub_debug=FZPU), poisoning of freed pages
#    (page_poison=1), zeroing on free (init_on_free=1), and turning any
#    oops or WARN into a panic so that the guest stops at the first one.
#    2 GiB: lego-memd holds the programs' memory in the guest's RAM.
APPEND="console=ttyS0 quiet panic=-1 oops=panic panic_on_warn=1 softlockup_panic=1"
APPEND+=" slub_debug=FZPU page_poison=1 init_on_free=1"
LOGF="$WORK/serial.log"
log "booting $KERNEL (log: $LOGF)"
start=$SECONDS
: >"$LOGF"
# The host's CPU-time meter for stage d. The guest's clock is the host's wall
# clock, so a bench run's us/access grows whenever other jobs take the host's
# CPUs; the CPU time qemu spends between a run's "guest: mark begin/end" lines
# does not (it is the emulation work: the run's instructions, its TLB misses
# and so on). The meter follows the serial log and samples qemu's utime+stime
# at each mark; the ratios are printed after the guest is done. Whole
# excache_bench processes are metered, warm-up included.
MARKS="$WORK/marks"
: >"$MARKS"
(
  qpid=""
  for _ in $(seq 1 100); do
    qpid="$(pgrep -f "^qemu-system-x86_64 .*$WORK/initrd.cpio.gz" | head -n 1)" && [[ -n "$qpid" ]] && break
    sleep 0.1
  done
  [[ -n "$qpid" ]] || exit 0
  # (No filter between tail and read: tr or sed would buffer the lines.)
  tail -n +1 -F --pid="$qpid" "$LOGF" 2>/dev/null | while read -r line; do
    line="${line%$'\r'}"
    case "$line" in
      "guest: mark "*)
        ticks="$(awk '{ print $14 + $15 }' "/proc/$qpid/stat" 2>/dev/null)" || continue
        echo "${line#guest: mark } $ticks" >>"$MARKS"
        ;;
    esac
  done
) &
meter=$!
set +e
if [[ "$PIN" != 0 ]]; then QEMU_TIMEOUT="${LEGO_QEMU_TIMEOUT:-600}"; else QEMU_TIMEOUT="${LEGO_QEMU_TIMEOUT:-2400}"; fi
timeout --foreground -k 5 "$QEMU_TIMEOUT" \
  qemu-system-x86_64 -accel tcg -m 2048 -smp 2 -cpu max \
  -kernel "$KERNEL" -initrd "$WORK/initrd.cpio.gz" \
  -append "$APPEND" -nographic -no-reboot </dev/null >"$LOGF" 2>&1
qrc=$?
wait "$meter" 2>/dev/null
set -e
log "qemu exited $qrc after $((SECONDS - start)) s"
# host_cpu_ratios: per bench flag set, qemu's CPU seconds for the best
# no-module and module runs and their ratio (no-module/module).
host_cpu_ratios() {
  awk -v hz="$(getconf CLK_TCK)" '
    $1 == "begin" { b[$2] = $3 }
    $1 == "end" && ($2 in b) {
      t = ($3 - b[$2]) / hz; label = $2
      side = label ~ /^no-module/ ? "no-module" : "module"
      set = label; sub(/^(no-module|module)/, "", set); sub(/\.[0-9]+$/, "", set)
      if (!((set, side) in best) || t < best[set, side]) best[set, side] = t
      all[set, side] = all[set, side] " " sprintf("%.2f", t); sets[set] = 1
    }
    END {
      for (s in sets) if (((s, "no-module") in best) && ((s, "module") in best))
        printf "run_in_qemu: bench%s host CPU: no-module %.2f s, module %.2f s, ratio %.2f (best; all: no-module%s; module%s)\n",
          s, best[s, "no-module"], best[s, "module"], best[s, "no-module"] / best[s, "module"], all[s, "no-module"], all[s, "module"]
    }' "$MARKS" | sort
}
[[ -n "${TEST_UNDECLARED_OUTPUTS_DIR:-}" ]] && cp "$LOGF" "$TEST_UNDECLARED_OUTPUTS_DIR/" || true

# 5. Verdict: a check per guest stage that ran, the guest's end, the kernel log. The
# checks say what failed: no more exits on a failed command.
set +e
tr -d '\r' <"$LOGF" >"$LOGF.txt"
for st in $STAGE_ORDER; do
  case $st in
    a) [[ $STAGES == *a* ]] || continue ;;
    memd | c-insmod) [[ $RUNTIME != 0 ]] || continue ;;
    *) [[ $RUNTIME != 0 && $STAGES == *"${st:0:1}"* ]] || continue ;;
  esac
  check "${STAGE_CHECKS[$st]}" guest_stage_ok "$LOGF.txt" "$st" 60
done
# tests/lib/guest.sh's scan, which knows slub_debug's reports (corruption, poison, red zones).
check "the guest's kernel log shows no BUG, WARNING, Oops or corruption" guest_kernel_log_clean "$LOGF.txt"
check "the guest ran to its end" guest_finished "$LOGF.txt" LEGO_KMOD "$qrc"
summary() {
  grep -E '^(ok|FAIL) |^  [0-9]+ evictions|pcache_test:|^guest: (stage|bench|stats)|lego_pcache|^integrity |^  (kernel_module|misses|evictions|write_backs) |^All tests passed|^test cases' "$LOGF.txt" >&2 || true
}
summary
host_cpu_ratios >&2
check_summary
