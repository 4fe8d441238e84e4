#!/bin/bash
# Description: runs in the qemu guest of tests/ops/ops_guest_test.sh (tests/lib/guest.sh:
# Debian's 6.1 kernel on this machine's root file system), as an operator would: lego
# installed with daemons/install/install.sh, lego_pcache with DKMS and modprobe, the daemons under
# systemd. Each stage prints "guest: stage NAME: start: WHAT", its output, then
# "guest: stage NAME: ok (T s)" or "... FAIL rc=N (T s)"; the host script makes each a
# check. Arguments (one a line in /lego-out/args): ROOT (the sources: kmod/, include/,
# tools/), BIN (the built programs, bazel-bin's layout), STAGES (names separated by
# spaces, in the order below), ABI_KO (lego_pcache.ko built to claim ABI major 99).
# Stages (each needs the ones before it that it names):
#   install     daemons/install/install.sh --prefix /usr/local; /etc/lego/cluster.toml
#   dkms        make -C kmod dkms-install: dkms add, build, install for this kernel
#   modprobe    modprobe lego_pcache (the DKMS build, from updates/dkms), its version
#   pcache-run  lego-memd and lego-run --pcache on --stats lego_integrity: uses the module
#   modprobe-r  modprobe -r lego_pcache while nothing uses it (after: refused while used)
#   upgrade     make -C kmod dkms-install LEGO_PCACHE_VERSION=1.2; modprobe; 1.2 loaded
#   abi         a module reporting ABI 99.x: lego-run --pcache auto warns and runs on
#               userfaultfd, --pcache on fails with the reason
#   units       (systemd) lego-memd@2, lego-stord@3 and lego-mond@9: start, serve a
#               real client (lego-mond: lego-memd@2 registers, --status lists it),
#               journal lines with the node id, stop, restart, SIGKILL then Restart=,
#               systemd-analyze security
set -u
exec </dev/null 2>&1
ROOT=$(sed -n 1p /lego-out/args)
BIN=$(sed -n 2p /lego-out/args)
STAGES=$(sed -n 3p /lego-out/args)
ABI_KO=$(sed -n 4p /lego-out/args)

. "$ROOT/tests/lib/guest_init.sh"
# PID 1 without systemd: the mounts systemd would make.
[ $$ != 1 ] || guest_mount_basics
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ip link set lo up
echo "guest: $(uname -r), $(nproc) CPUs, PID 1 $(cat /proc/1/comm), up $(cut -d" " -f1 /proc/uptime) s, stages: $STAGES"

KVER=$(uname -r)
CLUSTER=/etc/lego/cluster.toml
# Every lego program on one vCPU: under TCG a wake-up of the other vCPU costs
# milliseconds (see tests/kmod/run_in_qemu.sh).
PIN="taskset 1"
INTEGRITY="4 1 1500"

stage_install() {
  must "daemons/install/install.sh" "$ROOT/daemons/install/install.sh" --prefix /usr/local --bin "$BIN" || return 1
  mkdir -p /etc/lego /srv/lego
  . "$ROOT/tests/lib/check.sh"
  cluster_toml "$CLUSTER" "key = \"$(random_key)\"" -- \
    "1 processor 127.0.0.1 18701 blocking" "2 memory 127.0.0.1 18702 blocking" \
    "3 storage 127.0.0.1 18703 blocking"
  chmod 600 "$CLUSTER"
  command -v lego-run lego-stat lego-memd lego-mond lego-stord
}

# The installed module's version as modinfo sees it, and where it is.
stage_dkms() {
  must "make -C kmod dkms-install" make -C "$ROOT/kmod" dkms-install KVER="$KVER" || {
    cat /var/lib/dkms/lego_pcache/*/build/make.log 2>/dev/null | tail -n 30
    return 1
  }
  dkms status lego_pcache
  dkms status lego_pcache | grep -q "lego_pcache/1.1, $KVER, x86_64: installed" || return 1
  local f
  f=$(modinfo -n lego_pcache) && echo "modinfo: $f, version $(modinfo -F version lego_pcache)"
  case "$f" in */updates/dkms/lego_pcache.ko*) ;; *) echo "not DKMS's build: $f"; return 1 ;; esac
}

stage_modprobe() {
  must "modprobe lego_pcache" modprobe lego_pcache || return 1
  ls -l /dev/lego_pcache
  dmesg | grep 'lego_pcache' | tail -n 2
  [ -c /dev/lego_pcache ] && [ "$(cat /sys/module/lego_pcache/version)" = 1.1 ]
}

memd=""
start_memd() {
  [ -n "$memd" ] && kill -0 "$memd" 2>/dev/null && return 0
  rm -f /tmp/memd.ready
  $PIN lego-memd --config "$CLUSTER" --node 2 --capacity 256M --ready-fd 3 \
    3>/tmp/memd.ready 2>/tmp/memd.log &
  memd=$!
  . "$ROOT/tests/lib/check.sh"
  wait_ready /tmp/memd.ready "$memd" 60 || { cat /tmp/memd.log; return 1; }
}
# integrity PCACHE: lego-run --stats lego_integrity against lego-memd; its stderr in
# /tmp/run.err, its status returned.
integrity() {
  $PIN timeout 300 lego-run --config "$CLUSTER" --storage-node none --excache 2M \
    --pcache "$1" --stats -- "$BIN/tests/lego_run/lego_integrity" $INTEGRITY \
    >/tmp/run.out 2>/tmp/run.err
  local rc=$?
  cat /tmp/run.out
  grep -E 'lego-run|kernel_module|misses|evictions' /tmp/run.err
  [ "$rc" = 0 ] || { echo "lego-run exited $rc"; tail -n 20 /tmp/run.err; return 1; }
  grep -q '^integrity ok' /tmp/run.out
}

stage_pcache_run() {
  start_memd || return 1
  integrity on || return 1
  grep -q 'kernel_module *lego_pcache' /tmp/run.err || { echo "the run did not use the module"; return 1; }
  # While a program holds /dev/lego_pcache, the module stays: modprobe -r refuses.
  sleep 300 </dev/lego_pcache &
  local holder=$!
  sleep 0.5
  if modprobe -r lego_pcache 2>/tmp/rm.err; then
    echo "modprobe -r removed the module while a process held it"
    kill "$holder"
    return 1
  fi
  echo "in use: $(cat /tmp/rm.err)"
  kill "$holder"
  wait "$holder" 2>/dev/null
  return 0
}

stage_modprobe_r() {
  must "modprobe -r lego_pcache" modprobe -r lego_pcache || return 1
  [ ! -e /dev/lego_pcache ] && [ ! -d /sys/module/lego_pcache ]
}

stage_upgrade() {
  [ ! -d /sys/module/lego_pcache ] || must "modprobe -r" modprobe -r lego_pcache || return 1
  must "dkms-install of 1.2" make -C "$ROOT/kmod" dkms-install KVER="$KVER" LEGO_PCACHE_VERSION=1.2 ||
    return 1
  dkms status lego_pcache
  dkms status lego_pcache | grep -q "lego_pcache/1.2, $KVER, x86_64: installed" || return 1
  must "modprobe lego_pcache (1.2)" modprobe lego_pcache || return 1
  echo "loaded: $(cat /sys/module/lego_pcache/version), modinfo: $(modinfo -F version lego_pcache)"
  [ "$(cat /sys/module/lego_pcache/version)" = 1.2 ] && [ "$(modinfo -F version lego_pcache)" = 1.2 ] ||
    return 1
  start_memd || return 1
  integrity on && grep -q 'kernel_module *lego_pcache' /tmp/run.err || return 1
  must "modprobe -r (1.2)" modprobe -r lego_pcache
}

stage_abi() {
  [ ! -d /sys/module/lego_pcache ] || must "modprobe -r" modprobe -r lego_pcache || return 1
  must "insmod the ABI-99 module" insmod "$ABI_KO" || return 1
  dmesg | grep 'lego_pcache' | tail -n 1
  start_memd || return 1
  integrity auto || return 1
  grep -q 'lego-run: warning: lego_pcache refused: lego_pcache ABI 99\.1, this runtime speaks 1\.x' /tmp/run.err ||
    { echo "no refusal message"; return 1; }
  grep -q 'kernel_module *not used' /tmp/run.err || { echo "the run used the module"; return 1; }
  $PIN timeout 120 lego-run --config "$CLUSTER" --storage-node none --excache 2M --pcache on \
    -- /bin/true 2>/tmp/on.err
  local rc=$?
  cat /tmp/on.err
  [ "$rc" = 125 ] || { echo "--pcache on exited $rc, expected 125"; return 1; }
  grep -q -- '--pcache on: lego_pcache ABI 99\.1, this runtime speaks 1\.x (install the lego_pcache' /tmp/on.err ||
    return 1
  must "rmmod" rmmod lego_pcache
}

# active UNIT SECONDS: until systemctl calls UNIT active (and it has a main pid).
active() {
  local i
  for i in $(seq 1 $(($2 * 5))); do
    systemctl is-active -q "$1" && [ "$(systemctl show -P MainPID "$1")" != 0 ] && return 0
    sleep 0.2
  done
  systemctl status --no-pager "$1" | tail -n 15
  return 1
}
# serves_memd: a real client: lego_integrity under lego-run against lego-memd@2.
serves_memd() { integrity off; }
serves_stord() {
  local f=unit-$$-$RANDOM
  $PIN timeout 120 lego-run --config "$CLUSTER" --storage-node 3 --excache 2M --pcache off -- \
    /bin/sh -c "echo through-lego-stord >/lego/$f && cat /lego/$f" >/tmp/st.out 2>/tmp/st.err
  local rc=$?
  cat /tmp/st.out
  [ "$rc" = 0 ] || { echo "lego-run exited $rc"; tail -n 15 /tmp/st.err; return 1; }
  [ "$(cat /srv/lego/$f 2>&1)" = through-lego-stord ] || { echo "/srv/lego/$f: $(cat /srv/lego/$f 2>&1)"; return 1; }
}
# serves_mond: lego-memd@2 registered with lego-mond@9: `lego-mond --status` lists it alive
# (within 60 s: a restarted monitor learns of it at the node's next heartbeat).
serves_mond() {
  local i
  for i in $(seq 1 120); do
    lego-mond --status --config "$CLUSTER" --node 9 >/tmp/mond.status 2>&1 &&
      grep -q '^node 2 at 127.0.0.1:18702 alive ' /tmp/mond.status && break
    sleep 0.5
  done
  head -n 3 /tmp/mond.status
  grep -q '^node 2 at 127.0.0.1:18702 alive ' /tmp/mond.status ||
    { echo "lego-mond --status does not list memory node 2 alive"; return 1; }
}
# unit_lifecycle UNIT NODE SERVES: start, serve, journal, restart, SIGKILL, stop.
unit_lifecycle() {
  local u=$1 node=$2 serves=$3 pid pid2
  must "start $u" systemctl start "$u" && active "$u" 30 || return 1
  must "$u serves a client" "$serves" || { journalctl -u "$u" --no-pager | tail; return 1; }
  journalctl -u "$u" --no-pager -o cat | tail -n 3
  journalctl -u "$u" --no-pager -o cat | grep -q "node $node " ||
    { echo "no journal line of $u names node $node"; return 1; }
  pid=$(systemctl show -P MainPID "$u")
  must "restart $u" systemctl restart "$u" && active "$u" 30 || return 1
  pid2=$(systemctl show -P MainPID "$u")
  [ "$pid" != "$pid2" ] || { echo "restart kept pid $pid"; return 1; }
  must "$u serves after restart" "$serves" || return 1
  # Restart=on-failure: killed, it comes back (RestartSec=2) and serves again.
  kill -KILL "$pid2"
  sleep 1
  local i
  for i in $(seq 1 100); do
    pid=$(systemctl show -P MainPID "$u")
    [ "$pid" != 0 ] && [ "$pid" != "$pid2" ] && systemctl is-active -q "$u" && break
    sleep 0.2
  done
  [ "$pid" != 0 ] && [ "$pid" != "$pid2" ] || { echo "$u not restarted after SIGKILL"; systemctl status --no-pager "$u" | tail; return 1; }
  echo "after SIGKILL of $pid2: $u is pid $pid, NRestarts $(systemctl show -P NRestarts "$u")"
  must "$u serves after SIGKILL" "$serves" || return 1
  must "stop $u" systemctl stop "$u" || return 1
  systemctl is-active -q "$u" && { echo "$u still active after stop"; return 1; }
  [ "$(systemctl show -P Result "$u")" = success ] || { echo "$u stop result: $(systemctl show -P Result "$u")"; return 1; }
  systemd-analyze security --no-pager "$u" 2>/dev/null | tail -n 1 | sed "s/^/security $u: /"
  return 0
}

stage_units() {
  [ "$(cat /proc/1/comm)" = systemd ] || { echo "PID 1 is not systemd"; return 1; }
  [ -z "$memd" ] || { kill "$memd"; wait "$memd" 2>/dev/null; memd=""; }
  modprobe fuse
  must "daemon-reload" systemctl daemon-reload || return 1
  unit_lifecycle lego-memd@2.service 2 serves_memd || return 1
  # lego-run's storage client mounts node 3 only when memory is served too.
  systemctl start lego-memd@2.service && active lego-memd@2.service 30 || return 1
  unit_lifecycle lego-stord@3.service 3 serves_stord || return 1
  # The unit's comment says the export must be in ReadWritePaths under ProtectSystem=strict:
  # without it (a drop-in emptying it), no write through lego-stord succeeds.
  local d=/run/systemd/system/lego-stord@3.service.d
  mkdir -p "$d"
  printf '[Service]\nReadWritePaths=\n' >"$d/no-rw.conf"
  systemctl daemon-reload && systemctl start lego-stord@3.service && active lego-stord@3.service 30 ||
    return 1
  if serves_stord >/tmp/ro.out 2>&1; then
    echo "lego-stord wrote its export without ReadWritePaths"
    return 1
  fi
  echo "without ReadWritePaths: $(grep -m1 -iE 'read-only|EROFS|exited|error' /tmp/ro.out)"
  rm -rf "$d"
  systemctl stop lego-stord@3.service lego-memd@2.service
  systemctl daemon-reload
  # The monitor, node 9, added to the cluster file only now: with a monitor in the file,
  # lego-run places through it, and the stages above run without one. lego-memd@2,
  # restarted, registers with it; after each restart and SIGKILL of lego-mond@9 it
  # registers again (the monitor keeps nothing on disk), which --status shows.
  cp "$CLUSTER" /tmp/cluster.nomonitor
  printf '[[node]]\nid = 9\nrole = "monitor"\naddress = "127.0.0.1"\nport = 18709\nprogress = "blocking"\n' \
    >>"$CLUSTER"
  systemctl start lego-memd@2.service && active lego-memd@2.service 30 || return 1
  unit_lifecycle lego-mond@9.service 9 serves_mond || return 1
  journalctl -u lego-mond@9.service --no-pager -o cat | grep -m1 'memory node 2 registered' ||
    { echo "no journal line of lego-mond@9 says memory node 2 registered"; return 1; }
  systemctl stop lego-memd@2.service
  cp /tmp/cluster.nomonitor "$CLUSTER"
}

run_stage install "daemons/install/install.sh --prefix /usr/local, the cluster file" stage_install
run_stage dkms "make -C kmod dkms-install (dkms add, build, install) for $KVER" stage_dkms
run_stage modprobe "modprobe lego_pcache: DKMS's build, version 1.1" stage_modprobe
run_stage pcache-run "lego-run --pcache on --stats lego_integrity against lego-memd; modprobe -r refused while in use" stage_pcache_run
run_stage modprobe-r "modprobe -r lego_pcache" stage_modprobe_r
run_stage upgrade "dkms-install of 1.2, modprobe, 1.2 loaded and used" stage_upgrade
run_stage abi "a module reporting ABI 99.1: auto falls back with a warning, on fails" stage_abi
run_stage units "lego-memd@2, lego-stord@3 and lego-mond@9 under systemd" stage_units
[ -z "$memd" ] || kill "$memd"
guest_poweroff LEGO_OPS lego_pcache
