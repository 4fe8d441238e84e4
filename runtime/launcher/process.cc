// Starting and stopping lego-run's helper processes (runtime/launcher/process.h).
#include "runtime/launcher/process.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "lego/netns.h"
#include "runtime/launch_contract.h"

namespace lego::launch {
namespace {

bool readable(const std::string& p) {
  return access(p.c_str(), R_OK) == 0;
}

std::string dirname_of(const std::string& p) {
  size_t s = p.rfind('/');
  return s == std::string::npos ? "." : p.substr(0, s);
}

}  // namespace

std::string find_part(const char* env, const std::string& workspace_path, const std::string& name) {
  if (const char* v = getenv(env)) return v;
  char exe[4096] = {};
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  std::string self = n > 0 ? std::string(exe, static_cast<size_t>(n)) : "";
  std::string dir = dirname_of(self);
  std::vector<std::string> candidates = {
      self + ".runfiles/lego/" + workspace_path,
      dir + "/" + name,
      // bazel-bin/runtime/lego-run -> bazel-bin/<workspace_path>
      dir + "/../" + workspace_path,
      dir + "/../lib/lego/" + name,
      "/usr/local/lib/lego/" + name,
      "/usr/lib/lego/" + name,
  };
  for (auto& c : candidates) {
    if (readable(c)) return c;
  }
  return "";
}

std::string jemalloc_path() {
  for (const char* p : {"/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2",
                        "/usr/lib64/libjemalloc.so.2"}) {
    if (readable(p)) return p;
  }
  return "";
}

pid_t start_daemon(const std::string& path, std::vector<std::string> args,
                   const std::string& log_path, const std::string& netns) {
  int ready[2];
  if (pipe(ready) != 0) return -1;
  args.push_back("--ready-fd");
  args.push_back("3");
  // Built before fork: the child only makes system calls.
  const std::string ns_path = netns.empty() ? "" : netns::namespace_path(netns);
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(const_cast<char*>(s.c_str()));
  argv.push_back(nullptr);
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    close(ready[0]);
    close(ready[1]);
    return -1;
  }
  if (pid == 0) {
    close(ready[0]);
    if (ready[1] != 3) {
      dup2(ready[1], 3);
      close(ready[1]);
    }
    if (!ns_path.empty()) {
      int fd = open(ns_path.c_str(), O_RDONLY);
      if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) _exit(kExitLegoError);
    }
    // Its own process group: a ^C at the terminal goes to the program, not to it. And it
    // must not outlive lego-run, however lego-run ends.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    // Its messages go to a log lego-run shows only when something went wrong, so the
    // program's own stderr stays the program's.
    int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (log >= 0) dup2(log, 2);
    if (getppid() != parent) _exit(kExitLegoError);
    execv(path.c_str(), argv.data());
    _exit(kExitNotFound);
  }
  close(ready[1]);
  pollfd p{ready[0], POLLIN, 0};
  char buf[8] = {};
  int pr;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  do {  // a forwarded signal interrupts the wait; keep waiting
    pr = poll(&p, 1, 200);
  } while ((pr == 0 || (pr < 0 && errno == EINTR)) && std::chrono::steady_clock::now() < deadline);
  bool up = pr == 1 && read(ready[0], buf, 6) == 6 && memcmp(buf, "ready\n", 6) == 0;
  close(ready[0]);
  if (!up) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    return -1;
  }
  return pid;
}

bool wait_exit(pid_t pid, std::chrono::milliseconds limit) {
  if (pid <= 0) return true;
  // A pidfd polls readable the moment the child exits: no polling interval to wait out
  // (a 10 ms waitpid loop cost up to 10 ms per daemon, per run).
  const int fd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (fd >= 0) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      const auto left =
          std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now())
              .count();
      pollfd p{fd, POLLIN, 0};
      const int pr = poll(&p, 1, left > 0 ? static_cast<int>(left) : 0);
      if (pr < 0 && errno == EINTR) continue;  // a forwarded signal
      break;
    }
    close(fd);
    return waitpid(pid, nullptr, WNOHANG) == pid;
  }
  // No pidfds (Linux < 5.3): poll for the exit.
  for (auto waited = std::chrono::milliseconds(0); waited < limit;
       waited += std::chrono::milliseconds(5)) {
    if (waitpid(pid, nullptr, WNOHANG) == pid) return true;
    usleep(5000);
  }
  return waitpid(pid, nullptr, WNOHANG) == pid;
}

void stop_process(pid_t pid) {
  if (pid <= 0) return;
  kill(pid, SIGTERM);
  if (wait_exit(pid, std::chrono::seconds(3))) return;
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
}

void show_log(const std::string& path, const std::string& who, const std::string& name) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    fprintf(stderr, "%s: %s: %s\n", who.c_str(), name.c_str(), line.c_str());
  }
}

}  // namespace lego::launch
