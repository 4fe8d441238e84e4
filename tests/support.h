// What the C++ tests share: running code in a forked child to see how it exits, and
// finding the test's files. Header-only, for Catch2 tests.
#pragma once

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <functional>
#include <string>
#include <vector>

namespace lego::testing {

// How a child ended: its exit status (-1 if a signal killed it), stdout and stderr.
struct Outcome {
  int status = -1;
  std::string out, err;
};

inline std::string drain(int fd) {
  std::string s;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) s.append(buf, static_cast<size_t>(n));
  close(fd);
  return s;
}

// Runs fn in a forked child (which exits with fn's result if fn returns): for code that
// exits, such as a command line's error paths.
inline Outcome in_child(const std::function<int()>& fn) {
  int out[2], err[2];
  REQUIRE(pipe(out) == 0);
  REQUIRE(pipe(err) == 0);
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    dup2(out[1], 1);
    dup2(err[1], 2);
    close(out[0]);
    close(err[0]);
    int rc = fn();
    fflush(stdout);
    _exit(rc);
  }
  close(out[1]);
  close(err[1]);
  Outcome o;
  o.out = drain(out[0]);
  o.err = drain(err[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  o.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return o;
}

// A file of a data dependency, by its workspace path ("daemons/memory/lego-memd").
inline std::string runfile(const std::string& rel) {
  const char* srcdir = getenv("TEST_SRCDIR");
  return (srcdir ? std::string(srcdir) + "/lego/" : std::string()) + rel;
}

// A fresh directory under the test's temporary directory, its name starting with `tag`.
inline std::string temp_dir(const std::string& tag) {
  const char* tmp = getenv("TEST_TMPDIR");
  std::string tmpl = std::string(tmp ? tmp : "/tmp") + "/" + tag + "-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  REQUIRE(mkdtemp(buf.data()) != nullptr);
  return buf.data();
}

}  // namespace lego::testing
