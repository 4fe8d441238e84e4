// The processes lego-run starts besides PROGRAM: its private lego-memd and lego-stord,
// and lego-fs. Each is found where lego installs it, started in its own process group
// with its stderr in a log, and reported ready through --ready-fd before lego-run goes
// on; none outlives lego-run.
//
// Thread-safety: call from lego-run's main thread (they fork).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

namespace lego::launch {

// A file shipped with lego: $ENV when set, else the first readable of Bazel's runfiles
// (<lego-run>.runfiles/lego/<workspace_path>), beside the running program, in
// bazel-bin (../<workspace_path>), ../lib/lego/, /usr/local/lib/lego/, /usr/lib/lego/.
// "" when none is.
std::string find_part(const char* env, const std::string& workspace_path, const std::string& name);

// Debian's libjemalloc.so.2, or "".
std::string jemalloc_path();

// Starts `path` with `args` (args[0] is its name) and "--ready-fd 3" appended, in the
// named network namespace `netns` (none when empty), in a process group of its own (a
// ^C at the terminal is PROGRAM's), with SIGTERM when its parent dies, its stderr in
// `log_path`; waits up to 20 s for its "ready". Returns its pid, or -1 when it did not
// get ready (it is then killed and reaped; its log says why).
pid_t start_daemon(const std::string& path, std::vector<std::string> args,
                   const std::string& log_path, const std::string& netns);

// Waits up to `limit` for child `pid` to exit, woken the moment it does (a pidfd); reaps
// it. True when it exited (or pid <= 0).
bool wait_exit(pid_t pid, std::chrono::milliseconds limit);

// SIGTERM, up to 3 s to exit, then SIGKILL; reaps it. Nothing for pid <= 0.
void stop_process(pid_t pid);

// Prints each line of the log at `path` as "<who>: <name>: <line>" on stderr.
void show_log(const std::string& path, const std::string& who, const std::string& name);

}  // namespace lego::launch
