# The guest side of tests/lib/guest.sh: what a script that runs in the qemu guest (as PID 1,
# or as the one service under systemd) needs to run its stages and report them the way
# guest.sh's host-side checks read them (guest_stage_ok, guest_finished). One copy for
# every guest test (tests/ops/guest_stages.sh, tests/verbs/verbs_stages.sh). POSIX sh.
#
#   . "$ROOT/tests/lib/guest_init.sh"
#   guest_mount_basics                 # as PID 1: the mounts systemd would make
#   STAGES="rxe rpc"                   # the stages to run (others are skipped)
#   GUEST_STAGE_GATES="rxe"            # once one of these failed, later stages fail at once
#   run_stage rxe "soft-RoCE" stage_rxe
#   run_stage rpc "provider_e2e_test" stage_rpc
#   guest_poweroff LEGO_VERBS 'rdma_rxe'
#
# Each stage prints "guest: stage NAME: start: WHAT", its output, then "guest: stage NAME:
# ok (T s)" or "guest: stage NAME: FAIL rc=N (T s)" (T from the guest's uptime). The
# failed stages are in $guest_failed.

guest_failed=""

# guest_mount_basics: proc, sys, devtmpfs, /run, devpts, /dev/shm and /dev/fd (bash's
# <(...), which dkms uses): for a script that is PID 1 without systemd (Debian's kernel has
# no CONFIG_DEVTMPFS_MOUNT).
guest_mount_basics() {
  mount -t proc proc /proc
  mount -t sysfs sysfs /sys
  mount -t devtmpfs devtmpfs /dev
  mount -t tmpfs -o mode=755 run /run
  mkdir -p /dev/pts /dev/shm
  mount -t devpts devpts /dev/pts
  mount -t tmpfs tmpfs /dev/shm
  ln -sf /proc/self/fd /dev/fd
}

guest_now() { cut -d' ' -f1 /proc/uptime; }

# guest_stage_begin NAME WHAT / guest_stage_end NAME RC: a stage's first and last line.
guest_stage_begin() {
  guest_stage_t0=$(guest_now)
  echo "guest: stage $1: start: $2"
}
guest_stage_end() {
  _t=$(awk -v a="$guest_stage_t0" -v b="$(guest_now)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$2" = 0 ]; then
    echo "guest: stage $1: ok ($_t s)"
  else
    echo "guest: stage $1: FAIL rc=$2 ($_t s)"
    guest_failed="$guest_failed $1"
  fi
}

# run_stage NAME WHAT FUNC: FUNC's output, its status the stage's; nothing when NAME is not
# in $STAGES. A stage after a failed one of $GUEST_STAGE_GATES is not run (it would only
# fail for the same reason): it fails, naming the gate.
run_stage() {
  case " $STAGES " in *" $1 "*) ;; *) return 0 ;; esac
  guest_stage_begin "$1" "$2"
  for _g in ${GUEST_STAGE_GATES:-}; do
    case " $guest_failed " in *" $_g "*)
      echo "guest: not run: stage $_g failed"
      guest_stage_end "$1" 1
      return 0
      ;;
    esac
  done
  "$3"
  guest_stage_end "$1" $?
}

# must WHAT COMMAND...: COMMAND succeeds, or the stage says what failed.
must() {
  _what=$1
  shift
  "$@" && return 0
  echo "guest: failed: $_what ($*)"
  return 1
}

# guest_poweroff PREFIX [ERE]: the kernel log's lines about ERE and any BUG, WARNING, Oops or
# call trace (the host scans them: guest_kernel_log_clean), then PREFIX_PASS or
# "PREFIX_FAIL stages: ..." (guest_finished), and the guest powers off: at once as PID 1,
# through systemd under it.
guest_poweroff() {
  _ere='BUG|WARNING|Oops|general protection|Call Trace'
  [ -n "${2:-}" ] && _ere="$2|$_ere"
  dmesg | grep -E "$_ere" || true
  if [ -z "$guest_failed" ]; then echo "$1_PASS"; else echo "$1_FAIL stages:$guest_failed"; fi
  sync
  if [ $$ = 1 ]; then
    echo o >/proc/sysrq-trigger
    # PID 1 must not exit while the kernel powers off (an exit panics it, with a call
    # trace the host's scan rejects), and the shared root may already be gone: neither
    # exec sleep nor return to read more of this script. Spin in the shell instead.
    while :; do :; done
  fi
  systemctl poweroff -ff
  sleep 30
}
