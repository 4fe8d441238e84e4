// Where a run's start-up time goes: with LEGO_STARTUP_TRACE=FILE in the environment,
// each startup_mark("what") appends "<CLOCK_MONOTONIC ns> <pid> <what>" as one line to
// FILE. lego-run, its daemons and the runtime in PROGRAM all inherit the variable, so one
// file holds one run's whole start and end, in order (lego-bench --only startup reads it).
// Without the variable a mark costs a load and a branch.
//
// Thread-safety: any thread; each mark is one O_APPEND write(2), so lines never mix.
#pragma once

#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace lego {

inline void startup_mark(const char* what) {
  static const char* const path = getenv("LEGO_STARTUP_TRACE");
  if (path == nullptr || *path == '\0') return;
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  char line[256];
  const int n = snprintf(line, sizeof line, "%lld %d %s\n",
                         static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec,
                         static_cast<int>(getpid()), what);
  if (n <= 0) return;
  const int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return;
  (void)!write(fd, line,
               static_cast<size_t>(n) < sizeof line ? static_cast<size_t>(n) : sizeof line - 1);
  close(fd);
}

}  // namespace lego
