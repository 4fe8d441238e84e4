#!/usr/bin/env bash
# The README's main job: runs Debian's python3, unmodified, with its memory on a memory
# node. lego-run (no cluster file) starts a private lego-memd in its own network namespace,
# gives python3 a 16 MiB ExCache for a working set of ~200 MiB, and prints its counters.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lego_run=$here/lego-run
[ -x "$lego_run" ] || lego_run=${RUNFILES_DIR:-$0.runfiles}/lego/runtime/lego-run
echo "demo: python3 builds a 300k-entry dict and a 1M-entry list (~60 MiB) with a 16 MiB ExCache;"
echo "demo: its memory lives on a lego-memd in another network namespace, over tcp."
"$lego_run" --excache 16M --stats -- /usr/bin/python3 -c '
import time
t = time.time()
d = {i: str(i) * 3 for i in range(300_000)}
l = list(range(1_000_000))
assert d[277_777] == "277777" * 3 and sum(l) == 1_000_000 * 999_999 // 2
print("python3: built and checked %d dict entries and %d list items in %.1f s" % (len(d), len(l), time.time() - t))
'
