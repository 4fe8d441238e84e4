# lego's shell test library: the harness of every end-to-end script (tests/*/*.sh) and of
# the qemu guest's /init. Source it; it defines functions and sets nothing else up.
#
#   . "$(dirname "$0")/../lib/check.sh"
#   check_init "$@"                  # the script's arguments select checks by name
#   check "python3 dict and list" python_dict_list
#   ...
#   check_summary                    # "N passed, N failed"; its status is the script's
#
# A check is a NAME and a command. check runs the command in this shell (so a function
# can set variables and start daemons for later checks) with its output captured, and
# prints "PASS: NAME (1.2 s)" or "FAIL: NAME (1.2 s)" followed by the last lines the
# command printed. Names are fixed strings: figures a check measures go in its output
# (shown when it fails) or in a note.
#
# Running some checks only: every argument given to check_init selects the checks whose
# names contain it (a fixed string), and LEGO_TEST_FILTER (an extended regex) those whose
# names match it; with both, a check must pass both tests. What a check needs beforehand
# goes in a set-up function the check asks for with `need FUNC`: it runs once, the first
# time any selected check needs it, and not at all when none does. Set-up that several
# checks share in another way (a daemon for a whole section) is guarded by
# `selected NAME...`. A filter that selects no check at all fails the run, so a
# misspelt name cannot pass.
#
# Environment: LEGO_TEST_FILTER (above); LEGO_TEST_VERBOSE=1 shows every command's output
# as it runs instead of the tail of a failure's; LEGO_TEST_TAIL (default 8): how many
# lines of a failure's output to show.
#
# POSIX sh (bash, and busybox's sh in the qemu guest). Uses file descriptor 9 for the
# script's own standard output, and defines names that start with check_, need, note,
# selected, wait_, bad_flag, lego_bin_root, random_key, cluster_toml and veth_ (and
# _check_ internally).

# check_init [NAME-PART...]: selects checks (see above) and sets up the bookkeeping.
check_init() {
  _check_passed=0
  _check_failed=0
  _check_skipped=0
  _check_n=0
  _check_dir=${TEST_TMPDIR:-${TMPDIR:-/tmp}}/lego-check.$$
  rm -rf "$_check_dir"
  mkdir -p "$_check_dir" || return 1
  : >"$_check_dir/failed"
  : >"$_check_dir/parts"
  for _check_a in "$@"; do printf '%s\n' "$_check_a" >>"$_check_dir/parts"; done
  exec 9>&1
}

# selected NAME...: true when the filter selects any of the names.
selected() {
  for _check_sel in "$@"; do
    if [ -s "$_check_dir/parts" ] &&
      ! printf '%s\n' "$_check_sel" | grep -qF -f "$_check_dir/parts"; then
      continue
    fi
    if [ -n "${LEGO_TEST_FILTER:-}" ] &&
      ! printf '%s\n' "$_check_sel" | grep -qE -e "$LEGO_TEST_FILTER"; then
      continue
    fi
    return 0
  done
  return 1
}

_check_now() { cut -d' ' -f1 /proc/uptime; }

# check NAME COMMAND...: runs COMMAND unless the filter leaves NAME out; PASS or FAIL.
# Returns COMMAND's status (0 when left out).
check() {
  _check_name=$1
  shift
  if ! selected "$_check_name"; then
    _check_skipped=$((_check_skipped + 1))
    return 0
  fi
  _check_n=$((_check_n + 1))
  _check_log=$_check_dir/$_check_n.log
  _check_t0=$(_check_now)
  if [ "${LEGO_TEST_VERBOSE:-0}" = 1 ]; then
    echo "--- $_check_name"
    "$@"
  else
    "$@" >"$_check_log" 2>&1 </dev/null
  fi
  _check_rc=$?
  _check_t=$(awk -v a="$_check_t0" -v b="$(_check_now)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$_check_rc" -eq 0 ]; then
    echo "PASS: $_check_name ($_check_t s)"
    _check_passed=$((_check_passed + 1))
    return 0
  fi
  echo "FAIL: $_check_name ($_check_t s, status $_check_rc)"
  if [ -s "$_check_log" ] && [ "${LEGO_TEST_VERBOSE:-0}" != 1 ]; then
    tail -n "${LEGO_TEST_TAIL:-8}" "$_check_log" | sed 's/^/    | /'
  fi
  printf '%s\n' "$_check_name" >>"$_check_dir/failed"
  _check_failed=$((_check_failed + 1))
  return "$_check_rc"
}

# need FUNC: runs the set-up function FUNC (in this shell) the first time it is needed;
# later calls return its first status without running it again.
need() {
  eval "_check_st=\${_check_need_$1-}"
  if [ -z "$_check_st" ]; then
    "$1"
    _check_st=$?
    eval "_check_need_$1=$_check_st"
  fi
  return "$_check_st"
}

# note TEXT...: a line of figures on the script's output, even inside a check.
note() { echo "  $*" >&9; }

# check_summary: "N passed, N failed" (and what the filter left out); lists the failed
# checks by name. Its status: 0 when nothing failed and something ran.
check_summary() {
  if [ "$_check_failed" -gt 0 ]; then
    echo "failed checks:"
    sed 's/^/  /' "$_check_dir/failed"
  fi
  _check_line="$_check_passed passed, $_check_failed failed"
  [ "$_check_skipped" -gt 0 ] && _check_line="$_check_line ($_check_skipped not selected)"
  echo "$_check_line"
  if [ $((_check_passed + _check_failed)) -eq 0 ]; then
    echo "no check's name matches the filter (arguments: $(tr '\n' ' ' <"$_check_dir/parts")LEGO_TEST_FILTER: '${LEGO_TEST_FILTER:-}')"
    return 1
  fi
  if [ "$_check_failed" -gt 0 ]; then
    echo "each check's output: $_check_dir/N.log"
    return 1
  fi
  rm -rf "$_check_dir"
  return 0
}

# wait_until SECONDS COMMAND...: polls COMMAND every 0.1 s until it succeeds (true) or
# SECONDS pass (false).
wait_until() {
  _check_i=$(($1 * 10))
  shift
  while [ "$_check_i" -gt 0 ]; do
    "$@" && return 0
    sleep 0.1
    _check_i=$((_check_i - 1))
  done
  return 1
}

# wait_ready FILE PID [SECONDS]: until a daemon started with --ready-fd writing to FILE
# says "ready" (true), dies or SECONDS (default 10) pass (false).
wait_ready() {
  _check_i=$((${3:-10} * 10))
  while [ "$_check_i" -gt 0 ]; do
    grep -q ready "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
    _check_i=$((_check_i - 1))
  done
  return 1
}

# bad_flag STATUS TEXT COMMAND...: COMMAND exits with STATUS and says TEXT (a basic regex,
# as grep reads it) on stdout or stderr.
bad_flag() {
  _check_want_rc=$1
  _check_want=$2
  shift 2
  _check_out=$("$@" 2>&1)
  _check_rc=$?
  printf '%s\n' "$_check_out"
  if [ "$_check_rc" -ne "$_check_want_rc" ]; then
    echo "exit status $_check_rc, expected $_check_want_rc"
    return 1
  fi
  printf '%s\n' "$_check_out" | grep -q -- "$_check_want"
}

# lego_bin_root: where lego's built programs are: the test's runfiles under Bazel, else
# this checkout's bazel-bin (found from the script's own path, tests/PKG/SCRIPT).
lego_bin_root() {
  # Run by hand TEST_SRCDIR is unset: a /lego that exists on the machine (lego-run's
  # mount point) is not the runfiles.
  if [ -n "${TEST_SRCDIR:-}" ] && [ -d "$TEST_SRCDIR/lego" ]; then
    echo "$TEST_SRCDIR/lego"
  else
    echo "$(cd "$(dirname "$0")/../.." && pwd)/bazel-bin"
  fi
}

# random_key: a fresh cluster key, 32 random bytes in hex.
random_key() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# cluster_toml FILE [SETTING...] -- NODE...: writes a cluster file. Each SETTING is a line
# of its [cluster] table ('key = "..."', 'timeout_ms = 500'); each NODE is
# "ID ROLE ADDRESS PORT [PROGRESS]".
cluster_toml() {
  _check_f=$1
  shift
  echo "[cluster]" >"$_check_f"
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    printf '%s\n' "$1" >>"$_check_f"
    shift
  done
  [ $# -gt 0 ] && shift
  for _check_node in "$@"; do
    printf '%s\n' "$_check_node" | awk '{
      printf "[[node]]\nid = %s\nrole = \"%s\"\naddress = \"%s\"\nport = %s\n", $1, $2, $3, $4
      if ($5 != "") printf "progress = \"%s\"\n", $5
    }' >>"$_check_f"
  done
}

# veth_link NS_A IF_A ADDR_A NS_B IF_B ADDR_B: a veth pair IF_A (in NS_A, "" for this
# namespace) -- IF_B (in NS_B, which must exist), addresses with their prefix
# ("10.1.2.1/30"), both ends and NS_B's loopback up.
_check_ip() {  # _check_ip NS ARGS...: ip ARGS in NS ("" for this namespace)
  if [ -n "$1" ]; then
    _check_ns=$1
    shift
    ip -n "$_check_ns" "$@"
  else
    shift
    ip "$@"
  fi
}
veth_link() {
  _check_ip "$1" link add "$2" type veth peer name "$5" &&
    _check_ip "$1" link set "$5" netns "$4" &&
    _check_ip "$1" addr add "$3" dev "$2" && _check_ip "$1" link set "$2" up &&
    ip -n "$4" addr add "$6" dev "$5" && ip -n "$4" link set "$5" up &&
    ip -n "$4" link set lo up
}
