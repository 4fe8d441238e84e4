#!/usr/bin/env bash
# tests/lib/check.sh, the harness of every end-to-end script. Guards: PASS/FAIL lines
# that name the check, a failure's output tail, the "N passed, N failed" line and the
# list of failed checks, the exit status; checks selected by a name part (the script's
# arguments) or LEGO_TEST_FILTER, the others not run at all; need() running a set-up once,
# only when a selected check needs it; a filter that selects nothing failing the run;
# cluster_toml's text. Run under bash and under busybox's sh (the qemu guest's shell).
set -uo pipefail
lib=$(cd "$(dirname "$0")" && pwd)/check.sh
tmp=${TEST_TMPDIR:-$(mktemp -d)}

# The script under test: two checks needing one set-up, one failing check, a note.
cat >"$tmp/sample.sh" <<EOF_SAMPLE
. "$lib"
check_init "\$@"
setup() { echo setup >>"$tmp/setups"; echo "set up"; }
first() { need setup && [ -s "$tmp/setups" ]; }
second() { need setup; note "a figure: 42"; true; }
boom() { echo "line 1"; echo "the reason it failed"; return 3; }
check "first one" first
check "second one" second
check "the failing one" boom
check_summary
EOF_SAMPLE

passed=0
failed=0
expect() {  # expect NAME CONDITION...
  local name=$1
  shift
  if "$@"; then
    echo "PASS: $name"
    passed=$((passed + 1))
  else
    echo "FAIL: $name"
    printf '%s\n' "$out" | sed 's/^/    | /'
    failed=$((failed + 1))
  fi
}
has() { grep -qxF -- "$2" <<<"$out"; }      # has NAME LINE: out holds LINE exactly
has_re() { grep -qE -- "$2" <<<"$out"; }    # has_re NAME REGEX
run() {  # run "SHELL" [ARGS...]: the sample's output in $out, its status in $rc, set-ups in $setups
  local sh=$1
  shift
  rm -f "$tmp/setups"
  # shellcheck disable=SC2086 # SHELL is a command line ("/bin/busybox sh")
  out=$(TEST_TMPDIR=$tmp $sh "$tmp/sample.sh" "$@" 2>&1)
  rc=$?
  setups=$(cat "$tmp/setups" 2>/dev/null | wc -l)
}

for shell in bash "/bin/busybox sh"; do
  s="($shell)"
  unset LEGO_TEST_FILTER
  run "$shell"
  expect "$s all checks run: PASS lines name them" has_re x '^PASS: first one \([0-9.]+ s\)$'
  expect "$s a FAIL line names the check and its status" \
    has_re x '^FAIL: the failing one \([0-9.]+ s, status 3\)$'
  expect "$s a failure shows its output's tail" has x "    | the reason it failed"
  expect "$s a passing check's output is not shown" eval '! has x "set up"'
  expect "$s a note is shown" has x "  a figure: 42"
  expect "$s the summary line and the failed checks' names" \
    eval 'has x "2 passed, 1 failed" && has x "failed checks:" && has x "  the failing one"'
  expect "$s a failure fails the script" [ "$rc" -ne 0 ]
  expect "$s a set-up two checks need runs once" [ "$setups" -eq 1 ]

  run "$shell" "second"
  expect "$s a name part selects its checks only" \
    eval 'has x "1 passed, 0 failed (2 not selected)" && ! has_re x "first one|failing one"'
  expect "$s ... with the set-up it needs, and passes" [ "$rc" -eq 0 -a "$setups" -eq 1 ]

  run "$shell" "failing"
  expect "$s a check needing no set-up runs without it" [ "$setups" -eq 0 -a "$rc" -ne 0 ]

  export LEGO_TEST_FILTER='^(first|second) one$'
  run "$shell"
  expect "$s LEGO_TEST_FILTER selects by regex" \
    eval 'has x "2 passed, 0 failed (1 not selected)" && [ "$rc" -eq 0 ]'
  run "$shell" "second"
  expect "$s a name part and LEGO_TEST_FILTER must both select" \
    eval 'has x "1 passed, 0 failed (2 not selected)"'
  unset LEGO_TEST_FILTER

  run "$shell" "no such check"
  expect "$s a filter that selects nothing fails, saying so" \
    eval '[ "$rc" -ne 0 ] && has_re x "^no check.s name matches the filter" && [ "$setups" -eq 0 ]'

  LEGO_TEST_VERBOSE=1 run "$shell" "second"
  expect "$s LEGO_TEST_VERBOSE shows the output as it runs" \
    eval 'has x "--- second one" && has x "set up"'
done

# cluster_toml writes what the cluster file parser reads (libfit's config_test covers
# the parser; here: the text).
out=$(bash -c ". '$lib'; cluster_toml '$tmp/c.toml' 'key = \"ab\"' -- '1 processor 127.0.0.1 10' \
  '2 memory 10.0.0.2 11 blocking'; cat '$tmp/c.toml'")
expect "cluster_toml: settings under [cluster], one [[node]] table per node" \
  [ "$out" = '[cluster]
key = "ab"
[[node]]
id = 1
role = "processor"
address = "127.0.0.1"
port = 10
[[node]]
id = 2
role = "memory"
address = "10.0.0.2"
port = 11
progress = "blocking"' ]

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
