// For tests of the ExCache's fatal path: code that must end the process runs in a forked
// child, which reports through a pipe what it was about to do and what its fatal hook
// said; the parent collects that and the child's exit status.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <string>

namespace lego::testing {

struct ChildEnd {
  int status = 0;      // waitpid's
  std::string report;  // all the child wrote to its report descriptor
};

// Forks; the child runs body(report_fd) with SIGABRT at its default (the test runner's
// handler would report the expected abort as a failure) and _exits 0 if the body returns.
// The child has only the calling thread: it builds what it uses itself.
template <typename Body>
ChildEnd run_child(Body body) {
  ChildEnd end;
  int fds[2];
  if (pipe(fds) != 0) {
    end.status = -1;
    return end;
  }
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    signal(SIGABRT, SIG_DFL);
    body(fds[1]);
    _exit(0);
  }
  close(fds[1]);
  char buf[512];
  ssize_t n;
  while (pid > 0 && (n = read(fds[0], buf, sizeof buf)) > 0) {
    end.report.append(buf, static_cast<size_t>(n));
  }
  close(fds[0]);
  if (pid < 0 || waitpid(pid, &end.status, 0) != pid) end.status = -1;
  return end;
}

// Writes "line 0x...\n" for the line the child is about to touch.
inline void report_line(int fd, const void* line) {
  char buf[40];
  int n = snprintf(buf, sizeof buf, "line 0x%lx\n", reinterpret_cast<unsigned long>(line));
  (void)!write(fd, buf, static_cast<size_t>(n));
}

// The address a report's first line named, as the fatal message prints it.
inline std::string reported_line(const std::string& report) {
  if (report.rfind("line ", 0) != 0) return "(no line named)";
  return report.substr(5, report.find('\n') - 5);
}

}  // namespace lego::testing
