#include "tests/netns/netns.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

namespace lego::testing {
namespace {

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (auto& a : v) s += (s.empty() ? "" : " ") + a;
  return s;
}

std::string read_all(int fd) {
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  return out;
}

}  // namespace

Result<std::string> run_command(const std::vector<std::string>& argv) {
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) {
    return Status::from_errno(errno, "pipe");
  }
  pid_t pid = fork();
  if (pid < 0) return Status::from_errno(errno, "fork for " + join(argv));
  if (pid == 0) {
    dup2(out[1], 1);
    dup2(err[1], 2);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    fprintf(stderr, "exec %s: %s\n", args[0], strerror(errno));
    _exit(127);
  }
  close(out[1]);
  close(err[1]);
  // stderr of ip is short; read stdout fully first, then stderr.
  std::string o = read_all(out[0]);
  std::string e = read_all(err[0]);
  close(out[0]);
  close(err[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    while (!e.empty() && e.back() == '\n') e.pop_back();
    return Status(EIO, "'" + join(argv) + "' failed: " + (e.empty() ? "(no message)" : e));
  }
  return o;
}

Result<std::unique_ptr<Topology>> Topology::create(int hosts, const std::string& prefix) {
  if (hosts < 1 || hosts > 200) return Status(EINVAL, "Topology: 1..200 hosts");
  static std::atomic<int> counter{0};
  const int serial = counter++;
  const pid_t pid = getpid();
  const std::string tag = prefix + "-" + std::to_string(pid) + "-" + std::to_string(serial);
  netns::NetworkSpec spec;
  for (int i = 0; i < hosts; i++) spec.namespaces.push_back(tag + "-" + std::to_string(i));
  spec.switch_namespace = tag + "-sw";
  auto network = netns::Network::create(spec);
  if (!network) return network.status();
  return std::unique_ptr<Topology>(new Topology(std::move(network.value())));
}

Status Topology::enter(int host) const {
  return network_->enter(host);
}

Result<pid_t> Topology::spawn(int host, const std::vector<std::string>& argv,
                              const std::vector<std::string>& extra_env) const {
  if (argv.empty()) return Status(EINVAL, "spawn: empty argv");
  int report[2];
  if (pipe2(report, O_CLOEXEC) != 0) return Status::from_errno(errno, "pipe");
  const std::string path = netns::namespace_path(name(host));
  pid_t pid = fork();
  if (pid < 0) return Status::from_errno(errno, "fork");
  if (pid == 0) {
    close(report[0]);
    int err = 0;
    int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
      err = errno;
    } else {
      for (auto& e : extra_env) putenv(const_cast<char*>(e.c_str()));
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      err = errno;
    }
    (void)!write(report[1], &err, sizeof(err));
    _exit(127);
  }
  close(report[1]);
  int err = 0;
  ssize_t n = read(report[0], &err, sizeof(err));
  close(report[0]);
  if (n == sizeof(err)) {
    waitpid(pid, nullptr, 0);
    return Status::from_errno(err, "spawn '" + join(argv) + "' in " + name(host));
  }
  return pid;
}

Result<int> Topology::wait_exit(pid_t pid, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (r < 0) return Status::from_errno(errno, "waitpid " + std::to_string(pid));
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      return Status(ETIMEDOUT, "process " + std::to_string(pid) + " did not exit in " +
                                   std::to_string(timeout.count()) + " ms; killed");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace lego::testing
