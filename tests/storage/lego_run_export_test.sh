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
set -uo pipefail

root=${TEST_SRCDIR:-}/lego
[ -d "$root" ] || root=$(cd "$(dirname "$0")/../.." && pwd)/bazel-bin
LEGO_RUN=$root/runtime/lego-run
MEMD=$root/daemons/memory/lego-memd
STORD=$root/daemons/storage/lego-stord
tmp=${TEST_TMPDIR:-$(mktemp -d)}

passed=0
failed=0
check() {  # check NAME CONDITION-COMMAND...
  local name=$1
  shift
  if "$@"; then
    echo "PASS: $name"
    passed=$((passed + 1))
  else
    echo "FAIL: $name"
    failed=$((failed + 1))
  fi
}

exp=$tmp/export
mkdir -p "$exp"
echo "from the storage node" > "$exp/hello.txt"
mnt=/lego-test-$$  # not /lego: parallel runs must not share a mount point name
trap 'rmdir "$mnt" 2>/dev/null' EXIT

# 1. Files round trip; the mount is the run's own.
out=$("$LEGO_RUN" --excache 4M --export "$exp" --mount "$mnt" -- sh -c \
  "cat $mnt/hello.txt && echo new > $mnt/new.txt && mkdir $mnt/d && mv $mnt/new.txt $mnt/d/ &&
   ls $mnt/d && grep -q ' $mnt fuse' /proc/self/mounts && echo mounted" 2>&1)
rc=$?
echo "$out" | sed 's/^/  /'
check "lego-run --export: the program reads, creates, renames and lists files" \
  [ "$rc" -eq 0 -a "$out" = "$(printf 'from the storage node\nnew.txt\nmounted')" ]
check "the files landed in the export" [ "$(cat "$exp/d/new.txt" 2>/dev/null)" = "new" ]
# Left in place, empty: removing it could detach another run's mount on it.
check "a mount point lego-run created is left empty afterwards" [ -d "$mnt" -a -z "$(ls -A "$mnt")" ]
"$LEGO_RUN" --excache 4M --export "$exp" --mount "$mnt" -- sh -c "touch $mnt/during; sleep 3" &
run=$!
for _ in $(seq 100); do [ -e "$exp/during" ] && break; sleep 0.1; done
check "while the run lasts, its files are there and its mount is invisible outside" \
  bash -c "[ -e '$exp/during' ] && ! grep -q ' $mnt ' /proc/self/mounts"
wait "$run"
check "... and the run ends cleanly" [ $? -eq 0 ]

# 2. sqlite3 and python3 under lego-run: their memory remote, their files remote.
out=$("$LEGO_RUN" --excache 8M --export "$exp" --mount "$mnt" -- sqlite3 "$mnt/t.db" \
  "CREATE TABLE t(x); WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<5000)
   INSERT INTO t SELECT i FROM c; SELECT count(*), sum(x) FROM t; PRAGMA integrity_check;" 2>&1)
check "sqlite3 under lego-run with its database on the storage node" \
  [ "$out" = "$(printf '5000|12502500\nok')" ]
[ "$out" = "$(printf '5000|12502500\nok')" ] || echo "$out" | tail -5 | sed 's/^/  /'
check "the database is in the export" [ -s "$exp/t.db" ]
out=$("$LEGO_RUN" --excache 8M --export "$exp" --mount "$mnt" -- python3 -c "
import os
p = '$mnt/py'
os.mkdir(p)
with open(p + '/data', 'wb') as f: f.write(bytes(range(256)) * 4096)
with open(p + '/data', 'rb') as f: assert f.read() == bytes(range(256)) * 4096
print(sorted(os.listdir('$mnt')))" 2>&1)
check "python3 under lego-run writes and reads 1 MiB on the storage node" \
  [ "$out" = "['d', 'during', 'hello.txt', 'py', 't.db']" ]
[ "$out" = "['d', 'during', 'hello.txt', 'py', 't.db']" ] || echo "$out" | tail -5 | sed 's/^/  /'

# 3. Bad flags: exit status 125 (lego-run's own failures) and a message.
"$LEGO_RUN" --export "$tmp/missing" -- true 2>"$tmp/err"
rc=$?
check "--export of a missing directory: exit 125 with a message" \
  [ "$rc" -eq 125 ] && grep -q "not a directory" "$tmp/err"
"$LEGO_RUN" --export "$exp" --mount relative -- true 2>"$tmp/err"
check "--mount must be absolute" [ $? -eq 125 ]

# 4. A cluster file: lego-memd and lego-stord started by hand on loopback.
key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
port=$((20000 + RANDOM % 20000))
cat > "$tmp/cluster.toml" <<TOML
[cluster]
key = "$key"
[[node]]
id = 1
role = "processor"
address = "127.0.0.1"
port = $port
[[node]]
id = 2
role = "memory"
address = "127.0.0.1"
port = $((port + 1))
[[node]]
id = 3
role = "storage"
address = "127.0.0.1"
port = $((port + 2))
TOML
"$MEMD" --config "$tmp/cluster.toml" --node 2 2>"$tmp/memd.log" &
memd=$!
mkfifo "$tmp/ready"
"$STORD" --config "$tmp/cluster.toml" --node 3 --export "$exp" --ready-fd 6 \
  6>"$tmp/ready" 2>"$tmp/stord.log" &
stord=$!
read -t 20 line <"$tmp/ready"
sleep 0.5
out=$("$LEGO_RUN" --config "$tmp/cluster.toml" --mount "$mnt" -- cat "$mnt/d/new.txt" 2>&1)
check "lego-run --config mounts the cluster's storage node" [ "$out" = "new" ]
[ "$out" = "new" ] || { echo "$out" | sed 's/^/  /'; cat "$tmp/stord.log"; }
out=$("$LEGO_RUN" --config "$tmp/cluster.toml" --mount "$mnt" -- df -P "$mnt" 2>&1)
check "statfs through the mount (df)" bash -c "echo '$out' | grep -q '^lego '"
# Without root: lego-run mounts in a user namespace of its own; the program keeps its uid.
# (The binaries and the cluster file where user nobody can reach them.)
user_dir=$(mktemp -d /tmp/lego-run-user-test.XXXXXX)
cp -L "$LEGO_RUN" "$root/runtime/liblego_preload.so" "$root/runtime/fs/lego-fs" "$user_dir/"
cp "$tmp/cluster.toml" "$user_dir/"
mkdir "$user_dir/mnt"
chmod -R a+rX "$user_dir"
out=$(setpriv --reuid 65534 --regid 65534 --clear-groups "$user_dir/lego-run" \
  --config "$user_dir/cluster.toml" --mount "$user_dir/mnt" -- \
  sh -c "id -u; cat $user_dir/mnt/d/new.txt; echo by-user > $user_dir/mnt/user.txt" 2>&1)
check "lego-run --config without root mounts the storage node; the program keeps its uid" \
  [ "$out" = "$(printf '65534\nnew')" ]
[ "$out" = "$(printf '65534\nnew')" ] || echo "$out" | sed 's/^/  /'
check "... and its files land in the export" [ "$(cat "$exp/user.txt" 2>/dev/null)" = "by-user" ]
out=$(setpriv --reuid 65534 --regid 65534 --clear-groups "$user_dir/lego-run" \
  --config "$user_dir/cluster.toml" --mount /nonexistent-lego-$$/mnt -- true 2>&1)
check "... a mount point the user cannot create: exit 125 and what to do" \
  bash -c "[ $? -eq 125 ] && grep -q 'give --mount DIR' <<< '$out'"
out=$(setpriv --reuid 65534 --regid 65534 --clear-groups "$user_dir/lego-run" \
  --config "$user_dir/cluster.toml" --storage-node none -- sh -c "id -u; ls $user_dir/mnt" 2>&1)
check "--storage-node none: no mount" [ "$out" = "65534" ]
# --export without root: the private lego-stord runs in the run's user namespace too.
# (A forking shell cannot run here: fork() under lego-run needs root; python3 does not.)
mkdir "$user_dir/export"
chown nobody:nogroup "$user_dir/export"
cp "$root/daemons/memory/lego-memd" "$root/daemons/storage/lego-stord" "$user_dir/"
chmod -R a+rX "$user_dir"
out=$(setpriv --reuid 65534 --regid 65534 --clear-groups "$user_dir/lego-run" \
  --export "$user_dir/export" --mount "$user_dir/mnt" -- python3 -c "
import os
with open('$user_dir/mnt/f', 'w') as f: f.write('mine')
print(os.getuid(), os.stat('$user_dir/mnt/f').st_uid, open('$user_dir/mnt/f').read())" 2>&1)
check "lego-run --export without root: the user's files, written and read as the user" \
  [ "$out" = "65534 65534 mine" ]
[ "$out" = "65534 65534 mine" ] || echo "$out" | sed 's/^/  /'
check "... and they are the user's in the export" \
  [ "$(stat -c %u "$user_dir/export/f" 2>/dev/null)" = 65534 ]
rm -rf "$user_dir"

out=$("$STORD" --status --config "$tmp/cluster.toml" --node 3 2>&1)
check "lego-stord --status prints its counters" \
  bash -c "echo '$out' | grep -q '^sessions_opened [1-9]' && echo '$out' | grep -q '^escapes 0'"
[ "${out#*sessions_opened}" != "$out" ] || echo "$out" | sed 's/^/  /'
kill "$memd" "$stord"
wait "$memd" "$stord" 2>/dev/null

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
