#!/usr/bin/env bash
# daemons/storage/lego-stord@.service, the systemd unit for lego-stord.
# Guards: systemd-analyze accepts the unit; its ExecStart line, expanded as systemd would
# (%i, the export and options from /etc/default/lego-stord), starts a lego-stord that
# serves (answers --status) and stops cleanly on SIGTERM.
set -uo pipefail

root=${TEST_SRCDIR:-}/lego
[ -d "$root" ] || root=$(cd "$(dirname "$0")/../.." && pwd)
STORD=$root/daemons/storage/lego-stord
[ -x "$STORD" ] || STORD=$root/bazel-bin/daemons/storage/lego-stord
UNIT=$root/daemons/storage/lego-stord@.service
tmp=${TEST_TMPDIR:-$(mktemp -d)}

failed=0
check() {  # check NAME CONDITION-COMMAND...
  local name=$1
  shift
  if "$@"; then echo "PASS: $name"; else echo "FAIL: $name"; failed=$((failed + 1)); fi
}

# systemd-analyze wants the binary where ExecStart says: point it at the built one.
sed "s|/usr/local/bin/lego-stord|$STORD|" "$UNIT" > "$tmp/lego-stord@.service"
out=$(systemd-analyze verify "$tmp/lego-stord@.service" 2>&1)
echo "$out" | sed 's/^/  /'
check "systemd-analyze verify accepts the unit" [ -z "$out" ]

port=$((20000 + $$ % 20000))
cat > "$tmp/cluster.toml" <<EOT
[cluster]
key = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[[node]]
id = 1
role = "processor"
address = "127.0.0.1"
port = $port
[[node]]
id = 3
role = "storage"
address = "127.0.0.1"
port = $((port + 1))
EOT
mkdir -p "$tmp/export"
echo unit > "$tmp/export/hello"
exec_start=$(sed -n 's/^ExecStart=//p' "$UNIT")
check "the unit has one ExecStart line" [ "$(echo "$exec_start" | wc -l)" -eq 1 ]
# What systemd would run for lego-stord@3 with LEGO_STORD_EXPORT and LEGO_STORD_OPTS set.
cmd=${exec_start//\/usr\/local\/bin\/lego-stord/$STORD}
cmd=${cmd//\/etc\/lego\/cluster.toml/$tmp/cluster.toml}
cmd=${cmd//%i/3}
cmd=${cmd//\$\{LEGO_STORD_EXPORT\}/$tmp/export}
cmd=${cmd//\$LEGO_STORD_OPTS/--lease-ms 30000 --ready-fd 3}
echo "  running: $cmd"
rm -f "$tmp/ready"
eval "exec $cmd" 3> "$tmp/ready" 2> "$tmp/stord.log" &
pid=$!
for _ in $(seq 100); do grep -q ready "$tmp/ready" 2>/dev/null && break; sleep 0.1; done
check "lego-stord started from the unit's command line is ready" grep -q ready "$tmp/ready"
status=$("$STORD" --status --config "$tmp/cluster.toml" --node 3 2>&1)
echo "$status" | sed 's/^/  /'
check "... serves the export with the unit's options" \
  bash -c "grep -q 'export $tmp/export, lease 30000 ms' <<< '$status'"
kill -TERM "$pid"
wait "$pid"
check "... and stops cleanly on SIGTERM" [ $? -eq 0 ]
sed 's/^/  lego-stord: /' "$tmp/stord.log"

[ "$failed" -eq 0 ] || { echo "$failed check(s) failed"; exit 1; }
echo "all checks passed"
