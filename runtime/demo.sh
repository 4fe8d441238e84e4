#!/usr/bin/env bash
# The README's main job, 1P-1M-1S: runs Debian's python3, unmodified, with its memory on a
# memory node and its files on a storage node. lego-run (no cluster file) starts a private
# lego-memd in its own network namespace and a private lego-stord serving a scratch
# directory, mounted for python3 at /lego; python3 gets a 16 MiB ExCache for a working set
# of ~60 MiB and writes its results to /lego. lego-run prints its counters at exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lego_run=$here/lego-run
[ -x "$lego_run" ] || lego_run=${RUNFILES_DIR:-$0.runfiles}/lego/runtime/lego-run
export_dir=$(mktemp -d /tmp/lego-demo-export.XXXXXX)
trap 'rm -rf "$export_dir"' EXIT
echo "demo: python3 builds a 300k-entry dict and a 1M-entry list (~60 MiB) with a 16 MiB ExCache;"
echo "demo: its memory lives on a lego-memd in another network namespace, over tcp,"
echo "demo: and its files under /lego on a lego-stord serving $export_dir."
"$lego_run" --excache 16M --export "$export_dir" --stats -- /usr/bin/python3 -c '
import json, time
t = time.time()
d = {i: str(i) * 3 for i in range(300_000)}
l = list(range(1_000_000))
assert d[277_777] == "277777" * 3 and sum(l) == 1_000_000 * 999_999 // 2
with open("/lego/result.json", "w") as f:
    json.dump({"dict_entries": len(d), "list_sum": sum(l)}, f)
with open("/lego/result.json") as f:
    assert json.load(f)["list_sum"] == sum(l)
print("python3: built and checked %d dict entries and %d list items, wrote /lego/result.json, in %.1f s"
      % (len(d), len(l), time.time() - t))
'
echo "demo: the storage node's export now holds result.json: $(cat "$export_dir/result.json")"
