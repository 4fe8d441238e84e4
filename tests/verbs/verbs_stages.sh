#!/bin/bash
# Description: runs in the qemu guest of tests/verbs/verbs_guest_test.sh (tests/lib/guest.sh:
# Debian's 6.1 kernel on this machine's root file system, so rdma-core, ibverbs-providers,
# libfabric and iproute2's rdma from .ci/bootstrap are there): soft-RoCE, then libfit and
# lego over the verbs provider. Each stage prints "guest: stage NAME: start: WHAT", its
# output, then "guest: stage NAME: ok (T s)" or "... FAIL rc=N (T s)"; the host script
# makes each a check. Arguments (one a line in /lego-out/args): ROOT (the sources: tests/lib),
# BIN (the built programs, bazel-bin's layout), SRCDIR (TEST_SRCDIR for provider_e2e_test: a runfiles root holding
# lego/tests/libfit/fit_test_peer), STAGES (names separated by spaces, in the order below),
# ITERATIONS (fit-bench's), RMA_ACCESSES (lego-bench's --accesses in the rma stage).
# Stages (each after rxe needs it):
#   rxe     modules rdma_rxe and veth; a veth pair, one address on each end; an rxe device
#           on each end (rxe0 on lgv0 10.77.0.1, rxe1 on lgv1 10.77.0.2); libfabric's verbs
#           provider lists both
#   rpc     tests/libfit:provider_e2e_test with LEGO_FIT_PROVIDERS=verbs between the two
#           devices: send_reply sync (polling, blocking) and async, several channels, RMA
#           reads and writes, a wrong RMA key, a wrong cluster key, a peer that dies
#   bench   fit-bench --providers tcp,verbs --addresses 10.77.0.1,10.77.0.2 --sizes 4096: the table
#           (also in /lego-out/fit-bench.txt and .csv)
#   memd    lego-memd with provider = "verbs", lego-run --config ... --stats lego_integrity
#           against it (and a fork child's integrity)
#   rma     one-sided reads over verbs (docs/rma.md): a lego-memd of its own; lego-run
#           --config (--rma auto) lego_integrity must time both ways (lines fetched with
#           rma_read and probes: the runtime's rma_lines, rma_probes; memd's rma_grants)
#           and stay intact; then lego-bench --systems lego_config --rma off,on,auto
#           --memd-busy 0,2: requests, one-sided reads and auto's choice side by side in this
#           guest, with the memory node idle and with two other clients loading it (the
#           table in /lego-out/rma-bench.txt and .csv)
set -u
exec </dev/null 2>&1
ROOT=$(sed -n 1p /lego-out/args)
BIN=$(sed -n 2p /lego-out/args)
SRCDIR=$(sed -n 3p /lego-out/args)
STAGES=$(sed -n 4p /lego-out/args)
ITERATIONS=$(sed -n 5p /lego-out/args)
RMA_ACCESSES=$(sed -n 6p /lego-out/args)
. "$ROOT/tests/lib/check.sh"

. "$ROOT/tests/lib/guest_init.sh"
guest_mount_basics
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ip link set lo up
echo "guest: $(uname -r), $(nproc) CPUs, up $(cut -d" " -f1 /proc/uptime) s, stages: $STAGES"
# A stage after a failed rxe stage is not run (it would only fail for the same reason).
GUEST_STAGE_GATES=rxe

A=10.77.0.1
B=10.77.0.2

# Soft-RoCE on a veth pair in this one namespace (an rxe device cannot move into another:
# its netdev must be in the namespace that adds it). Both addresses are this host's, so
# a packet from one end to the other must be accepted with a local source (accept_local)
# and without the reverse-path filter.
stage_rxe() {
  local m
  for m in crc32_generic veth rdma_rxe rdma_ucm; do must "modprobe $m" modprobe "$m" || return 1; done
  must "veth pair" ip link add lgv0 type veth peer name lgv1 || return 1
  ip addr add $A/24 dev lgv0 && ip addr add $B/24 dev lgv1 || return 1
  ip link set lgv0 up && ip link set lgv1 up || return 1
  local d
  for d in all default lgv0 lgv1; do
    sysctl -qw "net.ipv4.conf.$d.accept_local=1" "net.ipv4.conf.$d.rp_filter=0" || return 1
  done
  must "rdma link add rxe0" rdma link add rxe0 type rxe netdev lgv0 || return 1
  must "rdma link add rxe1" rdma link add rxe1 type rxe netdev lgv1 || return 1
  # libfabric resolves names through /etc/hosts.
  printf '%s lego-verbs-a\n%s lego-verbs-b\n' $A $B >>/etc/hosts
  rdma link show
  ls /dev/infiniband
  [ "$(rdma link show | grep -c 'state ACTIVE')" = 2 ] || { echo "rxe devices not ACTIVE"; return 1; }
  local domains
  domains=$(fi_info -p verbs -t FI_EP_MSG 2>&1 | awk '/domain:/ { print $2 }' | sort -u | tr '\n' ' ')
  echo "libfabric verbs domains: $domains"
  [ "$domains" = "rxe0 rxe1 " ] || { echo "libfabric does not list rxe0 and rxe1"; return 1; }
}

stage_rpc() {
  TEST_SRCDIR=$SRCDIR TEST_TMPDIR=/tmp LEGO_FIT_PROVIDERS=verbs LEGO_FIT_ADDRESSES=$A,$B \
    timeout 600 "$BIN/tests/libfit/provider_e2e_test" --durations yes --use-colour no
}

stage_bench() {
  timeout 900 "$BIN/libfit/bench/fit-bench" --providers tcp,verbs --addresses $A,$B --sizes 4096 \
    --iterations "$ITERATIONS" --csv /lego-out/fit-bench.csv >/lego-out/fit-bench.txt
  local rc=$?
  cat /lego-out/fit-bench.txt
  [ "$rc" = 0 ] && grep -q '^verbs ' /lego-out/fit-bench.txt && grep -q '^tcp ' /lego-out/fit-bench.txt
}

memd=""
stage_memd() {
  local cluster=/tmp/verbs-cluster.toml
  # Under emulation on a busy host a request can wait seconds for a descheduled thread.
  cluster_toml $cluster "key = \"$(random_key)\"" "timeout_ms = 30000" -- \
    "1 processor $A 18801 polling" "2 memory $B 18802 polling"
  sed -i '/^port = /a provider = "verbs"' $cluster
  cat $cluster | grep -v key
  rm -f /tmp/memd.ready
  "$BIN/daemons/memory/lego-memd" --config $cluster --node 2 --capacity 256M --ready-fd 3 3>/tmp/memd.ready \
    2>/tmp/memd.log &
  memd=$!
  wait_ready /tmp/memd.ready "$memd" 120 || { echo "lego-memd did not start"; cat /tmp/memd.log; return 1; }
  local rc
  timeout 600 "$BIN/runtime/lego-run" --config $cluster --storage-node none --excache 2M --stats -- \
    "$BIN/tests/lego_run/lego_integrity" 4 1 1500 >/tmp/run.out 2>/tmp/run.err
  rc=$?
  cat /tmp/run.out
  grep -E 'lego-run|misses|fetches|evictions|write' /tmp/run.err | head -n 20
  [ "$rc" = 0 ] || { echo "lego-run exited $rc"; tail -n 30 /tmp/run.err; cat /tmp/memd.log; return 1; }
  grep -q '^integrity ok' /tmp/run.out || return 1
  # The memory node served it over verbs: its FIT counters.
  "$BIN/daemons/memory/lego-memd" --status --config $cluster --node 2 >/tmp/status.txt 2>&1
  grep -E 'requests_served|connections_accepted|spaces' /tmp/status.txt
  grep -q 'requests_served [1-9]' /tmp/status.txt || { cat /tmp/status.txt; return 1; }
}

rma_memd=""
stage_rma() {
  local cluster=/tmp/verbs-rma.toml
  cluster_toml $cluster "key = \"$(random_key)\"" "timeout_ms = 30000" -- \
    "1 processor $A 18811 polling" "2 memory $B 18812 polling"
  sed -i '/^port = /a provider = "verbs"' $cluster
  rm -f /tmp/rma-memd.ready
  "$BIN/daemons/memory/lego-memd" --config $cluster --node 2 --capacity 256M --ready-fd 3 \
    3>/tmp/rma-memd.ready 2>/tmp/rma-memd.log &
  rma_memd=$!
  wait_ready /tmp/rma-memd.ready "$rma_memd" 120 || { echo "lego-memd did not start"; cat /tmp/rma-memd.log; return 1; }
  # --rma auto (the default) must time both ways over verbs (each is measured first, then the
  # one not in use 1 fetch in 64: rma_lines and rma_probes), and the program's data be intact.
  local rc
  timeout 600 "$BIN/runtime/lego-run" --config $cluster --storage-node none --excache 2M --stats -- \
    "$BIN/tests/lego_run/lego_integrity" 4 1 1500 >/tmp/rma-run.out 2>/tmp/rma-run.err
  rc=$?
  cat /tmp/rma-run.out
  grep -E 'misses|fetches |rma_|miss_latency' /tmp/rma-run.err | head -n 20
  [ "$rc" = 0 ] || { echo "lego-run exited $rc"; tail -n 30 /tmp/rma-run.err; cat /tmp/rma-memd.log; return 1; }
  grep -q '^integrity ok' /tmp/rma-run.out || return 1
  grep -Eq '^ *rma_lines +[1-9]' /tmp/rma-run.err || { echo "no line was read one-sided"; return 1; }
  grep -Eq '^ *rma_probes +[1-9]' /tmp/rma-run.err || { echo "--rma auto probed neither way"; return 1; }
  grep -Eq '^ *rma_fallbacks +0$' /tmp/rma-run.err || { echo "one-sided reads failed"; return 1; }
  "$BIN/daemons/memory/lego-memd" --status --config $cluster --node 2 >/tmp/rma-status.txt 2>&1
  grep -E 'rma_|requests_served' /tmp/rma-status.txt
  grep -q '^rma_grants [1-9]' /tmp/rma-status.txt || { cat /tmp/rma-status.txt; return 1; }
  # The A/B: the same random runs with requests, one-sided reads and auto's choice, side by
  # side, three rounds in turn (the table has each mode's median), with the memory node
  # serving them alone and with two other clients loading it. Random only: its misses are
  # one line each, the ones auto chooses for (a sequential run's are prefetch windows,
  # pipelined requests in every mode). Small: under emulation each run costs a few seconds.
  LEGO_RUN=$BIN/runtime/lego-run timeout 1200 "$BIN/runtime/bench/lego-bench" --only memory \
    --systems lego_config --config $cluster --workloads random --fractions 0.5 \
    --cap 2M --accesses "$RMA_ACCESSES" --deliveries handler --rma off,on,auto,off,on,auto,off,on,auto \
    --memd-busy 0,2 --no-floors --csv /lego-out/rma-bench.csv >/lego-out/rma-bench.txt \
    2>/tmp/rma-bench.err
  rc=$?
  cat /lego-out/rma-bench.txt
  [ "$rc" = 0 ] || { echo "lego-bench exited $rc"; tail -n 20 /tmp/rma-bench.err; return 1; }
  grep -q 'requests (--rma off), one-sided reads (--rma on) and the measured choice' \
    /lego-out/rma-bench.txt || return 1
  # Every run of the table ran (a busy client that died fails its rows).
  ! grep -Eq '^[^,]*,[^,]*,[^,]*,[^,]*,[^,]*,(failed|oom),' /lego-out/rma-bench.csv || { tail -n 20 /tmp/rma-bench.err; return 1; }
}

run_stage rxe "soft-RoCE: rxe0 on lgv0 $A, rxe1 on lgv1 $B" stage_rxe
run_stage rpc "provider_e2e_test over verbs ($A -> $B)" stage_rpc
run_stage bench "fit-bench --providers tcp,verbs --addresses $A,$B" stage_bench
run_stage memd "lego-memd over verbs; lego-run --config ... lego_integrity" stage_memd
[ -z "$memd" ] || kill "$memd"
run_stage rma "one-sided reads over verbs: lego_integrity, lego-bench --rma off,on,auto --memd-busy 0,2" stage_rma
[ -z "$rma_memd" ] || kill "$rma_memd"
guest_poweroff LEGO_VERBS rdma_rxe
