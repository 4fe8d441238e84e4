#!/usr/bin/env bash
# lego-run with files on a storage node: `lego-run --export DIR` starts a private
# lego-stord serving DIR and mounts it at /lego (or --mount) in the run's own mount
# namespace; `lego-run --config` mounts the cluster's storage node.
# Guards: programs under lego-run (their memory on the memory node) create, read, list
# and rename files that land in DIR; sqlite3 and python3 work on them; the mount is
# invisible outside the run and gone after it (a mount point lego-run created is left
# empty); bad --export/--mount give exit status 125 with a message; a cluster file with
# lego-memd and lego-stord started by hand works, as root and as a user (a user
# namespace of the run's own), and --storage-node none runs without the mount; --export
# works without root.
# usage: lego_run_export_test.sh [NAME-PART...]   (checks whose names contain one; see
# tests/lib/check.sh, LEGO_TEST_FILTER too)
set -uo pipefail
. "$(dirname "$0")/../lib/check.sh"
check_init "$@"

root=$(lego_bin_root)
LEGO_RUN=$root/runtime/lego-run
MEMD=$root/daemons/memory/lego-memd
STORD=$root/daemons/storage/lego-stord
tmp=${TEST_TMPDIR:-$(mktemp -d)}

exp=$tmp/export
mkdir -p "$exp"
echo "from the storage node" >"$exp/hello.txt"
mnt=/lego-test-$$ # not /lego: parallel runs must not share a mount point name
memd=""
stord=""
user_dir=""
cleanup() {
  [ -n "$memd" ] && kill "$memd" 2>/dev/null
  [ -n "$stord" ] && kill "$stord" 2>/dev/null
  [ -n "$user_dir" ] && rm -rf "$user_dir"
  rmdir "$mnt" 2>/dev/null
}
trap cleanup EXIT

# 1. Files round trip; the mount is the run's own.
round_trip() {
  round_trip_out=$("$LEGO_RUN" --excache 4M --export "$exp" --mount "$mnt" -- sh -c \
    "cat $mnt/hello.txt && echo new > $mnt/new.txt && mkdir $mnt/d && mv $mnt/new.txt $mnt/d/ &&
     ls $mnt/d && grep -q ' $mnt fuse' /proc/self/mounts && echo mounted" 2>&1)
  round_trip_rc=$?
  echo "$round_trip_out"
}
reads_creates_renames() {
  need round_trip
  [ "$round_trip_rc" -eq 0 ] &&
    [ "$round_trip_out" = "$(printf 'from the storage node\nnew.txt\nmounted')" ]
}
check "lego-run --export: the program reads, creates, renames and lists files" \
  reads_creates_renames
check "the files landed in the export" \
  eval 'need round_trip; [ "$(cat "$exp/d/new.txt" 2>/dev/null)" = "new" ]'
# Left in place, empty: removing it could detach another run's mount on it.
check "a mount point lego-run created is left empty afterwards" \
  eval 'need round_trip; [ -d "$mnt" ] && [ -z "$(ls -A "$mnt")" ]'

during_run() {  # a run that lasts 3 s, in the background ($during)
  "$LEGO_RUN" --excache 4M --export "$exp" --mount "$mnt" -- sh -c "touch $mnt/during; sleep 3" &
  during=$!
  wait_until 10 [ -e "$exp/during" ]
}
invisible_outside() {
  need during_run
  [ -e "$exp/during" ] && ! grep -q " $mnt " /proc/self/mounts
}
check "while the run lasts, its files are there and its mount is invisible outside" \
  invisible_outside
check "a run with --export ends cleanly" eval 'need during_run; wait "$during"'

# 2. sqlite3 and python3 under lego-run: their memory remote, their files remote.
sqlite_run() {
  "$LEGO_RUN" --excache 8M --export "$exp" --mount "$mnt" -- sqlite3 "$mnt/t.db" \
    "CREATE TABLE t(x); WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<5000)
     INSERT INTO t SELECT i FROM c; SELECT count(*), sum(x) FROM t; PRAGMA integrity_check;" \
    >"$tmp/sqlite.out" 2>&1
  cat "$tmp/sqlite.out"
  [ "$(cat "$tmp/sqlite.out")" = "$(printf '5000|12502500\nok')" ]
}
check "sqlite3 under lego-run with its database on the storage node" need sqlite_run
check "the database is in the export" eval 'need sqlite_run; [ -s "$exp/t.db" ]'
python_files() {
  local out
  out=$("$LEGO_RUN" --excache 8M --export "$exp" --mount "$mnt" -- python3 -c "
import os
p = '$mnt/py'
os.mkdir(p)
with open(p + '/data', 'wb') as f: f.write(bytes(range(256)) * 4096)
with open(p + '/data', 'rb') as f: assert f.read() == bytes(range(256)) * 4096
print(sorted(os.listdir(p)), 'hello.txt' in os.listdir('$mnt'))" 2>&1)
  echo "$out"
  [ "$out" = "['data'] True" ] && cmp -s "$exp/py/data" <(python3 -c \
    "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4096)")
}
check "python3 under lego-run writes and reads 1 MiB on the storage node" python_files

# 3. Bad flags: exit status 125 (lego-run's own failures) and a message.
check "--export of a missing directory: exit 125 with a message" \
  bad_flag 125 "not a directory" "$LEGO_RUN" --export "$tmp/missing" -- true
check "--mount must be absolute" bad_flag 125 "" "$LEGO_RUN" --export "$exp" --mount relative -- true

# 4. A cluster file: lego-memd and lego-stord started by hand on loopback.
cluster() {
  local port=$((20000 + RANDOM % 20000))
  cluster_toml "$tmp/cluster.toml" "key = \"$(random_key)\"" -- "1 processor 127.0.0.1 $port" \
    "2 memory 127.0.0.1 $((port + 1))" "3 storage 127.0.0.1 $((port + 2))"
  mkdir -p "$exp/d"
  echo new >"$exp/d/new.txt"
  "$MEMD" --config "$tmp/cluster.toml" --node 2 --ready-fd 3 3>"$tmp/memd.ready" \
    2>"$tmp/memd.log" &
  memd=$!
  "$STORD" --config "$tmp/cluster.toml" --node 3 --export "$exp" --ready-fd 3 \
    3>"$tmp/stord.ready" 2>"$tmp/stord.log" &
  stord=$!
  wait_ready "$tmp/memd.ready" "$memd" 20 && wait_ready "$tmp/stord.ready" "$stord" 20 ||
    { cat "$tmp/memd.log" "$tmp/stord.log"; return 1; }
}
config_mount() {
  need cluster || return 1
  local out
  out=$("$LEGO_RUN" --config "$tmp/cluster.toml" --mount "$mnt" -- cat "$mnt/d/new.txt" 2>&1)
  echo "$out"
  [ "$out" = "new" ] || { cat "$tmp/stord.log"; return 1; }
}
check "lego-run --config mounts the cluster's storage node" config_mount
config_df() {
  need cluster || return 1
  "$LEGO_RUN" --config "$tmp/cluster.toml" --mount "$mnt" -- df -P "$mnt" >"$tmp/df.out" 2>&1
  cat "$tmp/df.out"
  grep -q '^lego ' "$tmp/df.out"
}
check "statfs through the mount (df)" config_df

# Without root: lego-run mounts in a user namespace of its own; the program keeps its uid.
# (The binaries and the cluster file where user nobody can reach them.)
user_copy() {
  user_dir=$(mktemp -d /tmp/lego-run-user-test.XXXXXX)
  cp -L "$LEGO_RUN" "$root/runtime/liblego_preload.so" "$root/runtime/fs/lego-fs" \
    "$root/daemons/memory/lego-memd" "$root/daemons/storage/lego-stord" "$user_dir/"
  mkdir "$user_dir/mnt"
  chmod -R a+rX "$user_dir"
}
as_user() { setpriv --reuid 65534 --regid 65534 --clear-groups "$user_dir/lego-run" "$@"; }
user_cluster() {
  need cluster && need user_copy || return 1
  cp "$tmp/cluster.toml" "$user_dir/" && chmod a+r "$user_dir/cluster.toml"
}
user_config_run() {
  need user_cluster || return 1
  user_config_out=$(as_user --config "$user_dir/cluster.toml" --mount "$user_dir/mnt" -- \
    sh -c "id -u; cat $user_dir/mnt/d/new.txt; echo by-user > $user_dir/mnt/user.txt" 2>&1)
  echo "$user_config_out"
}
check "lego-run --config without root mounts the storage node; the program keeps its uid" \
  eval 'need user_config_run && [ "$user_config_out" = "$(printf "65534\nnew")" ]'
check "lego-run --config without root: the user's files land in the export" \
  eval 'need user_config_run && [ "$(cat "$exp/user.txt" 2>/dev/null)" = "by-user" ]'
check "lego-run --config without root, a mount point the user cannot create: exit 125 and what to do" \
  eval 'need user_cluster && bad_flag 125 "give --mount DIR" as_user --config "$user_dir/cluster.toml" --mount /nonexistent-lego-$$/mnt -- true'
no_mount() {
  need user_cluster || return 1
  local out
  out=$(as_user --config "$user_dir/cluster.toml" --storage-node none -- \
    sh -c "id -u; ls $user_dir/mnt" 2>&1)
  echo "$out"
  [ "$out" = "65534" ]
}
check "--storage-node none: no mount" no_mount
# --export without root: the private lego-stord runs in the run's user namespace too.
# (A forking shell cannot run here: fork() under lego-run needs root; python3 does not.)
user_export_run() {
  need user_copy || return 1
  mkdir "$user_dir/export"
  chown nobody:nogroup "$user_dir/export"
  user_export_out=$(as_user --export "$user_dir/export" --mount "$user_dir/mnt" -- python3 -c "
import os
with open('$user_dir/mnt/f', 'w') as f: f.write('mine')
print(os.getuid(), os.stat('$user_dir/mnt/f').st_uid, open('$user_dir/mnt/f').read())" 2>&1)
  echo "$user_export_out"
}
check "lego-run --export without root: the user's files, written and read as the user" \
  eval 'need user_export_run && [ "$user_export_out" = "65534 65534 mine" ]'
check "lego-run --export without root: the files are the user's in the export" \
  eval 'need user_export_run && [ "$(stat -c %u "$user_dir/export/f" 2>/dev/null)" = 65534 ]'

stord_status() {
  need cluster || return 1
  # A session of its own, so that the counters have something to show.
  "$LEGO_RUN" --config "$tmp/cluster.toml" --mount "$mnt" -- true
  local out
  out=$("$STORD" --status --config "$tmp/cluster.toml" --node 3 2>&1)
  echo "$out"
  grep -q '^sessions_opened [1-9]' <<<"$out" && grep -q '^escapes 0' <<<"$out"
}
check "lego-stord --status prints its counters" stord_status

check_summary
