#!/usr/bin/env bash
# Runs every lego test on this machine: installs what is missing (.ci/bootstrap), builds
# everything, runs the whole suite, then the suite again under AddressSanitizer + UBSan,
# and ends with one summary line "N passed, N failed".
#
# Needs root: tests create network namespaces and veth pairs.
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "run_all: the tests create network namespaces; run as root" >&2
  exit 2
fi
.ci/bootstrap || exit 2

# Bazel's own output is long; keep the per-test result lines.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
run() {
  echo "run_all: bazel $*"
  bazel "$@" 2>&1 | tee -a "$log" | grep -E '^//|^FAIL|ERROR|Executed|error:' || true
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
run build //...
run test //...
# Tests tagged no_asan inject a preload library into uninstrumented programs.
run test --config=asan --test_tag_filters=-no_asan //...

passed=$(grep -cE '^//.* PASSED' "$log")
failed=$(grep -cE '^//.* (FAILED|TIMEOUT|NO STATUS|FAILED TO BUILD)' "$log")
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi  # a build error counts
echo "$passed passed, $failed failed"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
