// A busy memory node for the --rma A/B (lego-bench --memd-busy N): N other processor
// clients of the same memory nodes, each a real lego-run --config running lego-bench's own
// random worker with a tiny ExCache, so nearly every access is a fetch (kFetch, served by
// lego-memd's server thread) and a write-back. They run --rma off: a client that asks by
// request is the one that keeps the memory node's CPU busy, as the other processors of a
// real cluster do; the measured program's one-sided reads then meet a node whose server
// thread has a queue, its requests wait in it.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "runtime/bench/lego_bench.h"

namespace lego::bench {
namespace {

// Each client's ExCache and heap: 8x the cache, so 7 accesses in 8 miss.
constexpr uint64_t kClientCache = 1ull << 20;
constexpr uint64_t kClientHeap = 8ull << 20;
// Accesses no client reaches before it is stopped.
constexpr long kClientAccesses = 1000000000000;
// How long the clients may take to start and fill their heaps (lego-run's start-up under
// emulation takes seconds; a client that needs more is reported).
constexpr auto kStartTimeout = std::chrono::seconds(120);

std::string ready_path(int i) {
  return "/tmp/lego-bench-busy-" + std::to_string(getpid()) + "-" + std::to_string(i) + ".ready";
}

}  // namespace

std::string BusyClients::start(int n, const std::string& lego_run, const std::string& config,
                               const std::string& self) {
  stop();
  for (int i = 0; i < n; i++) {
    char tmpl[] = "/tmp/lego-bench-busy-XXXXXX";
    const int err = mkostemp(tmpl, O_CLOEXEC);
    if (err < 0) return std::string("mkostemp for a busy client's stderr: ") + strerror(errno);
    unlink(tmpl);
    const std::vector<std::string> argv{lego_run,
                                        "--config",
                                        config,
                                        "--excache",
                                        std::to_string(kClientCache),
                                        "--rma",
                                        "off",
                                        "--",
                                        self,
                                        "--worker",
                                        "random",
                                        std::to_string(kClientHeap),
                                        std::to_string(kClientAccesses),
                                        "1"};
    const std::string ready = ready_path(i);  // this process's pid, not the child's
    unlink(ready.c_str());
    const pid_t pid = fork();
    if (pid < 0) {
      close(err);
      return std::string("fork of a busy client: ") + strerror(errno);
    }
    if (pid == 0) {
      setenv("LEGO_BENCH_READY", ready.c_str(), 1);
      const int null = open("/dev/null", O_WRONLY);
      if (null >= 0) dup2(null, 1);
      dup2(err, 2);
      std::vector<char*> a;
      for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
      a.push_back(nullptr);
      execv(a[0], a.data());
      _exit(127);
    }
    clients_.push_back({pid, err});
  }
  // Every client in its loop (its heap filled) before the rows are measured: the load is
  // then the same for each --rma mode.
  const auto end = std::chrono::steady_clock::now() + kStartTimeout;
  for (int i = 0; i < n; i++) {
    while (access(ready_path(i).c_str(), F_OK) != 0) {
      if (std::string st = check(); !st.empty()) return st;
      if (std::chrono::steady_clock::now() > end) {
        return "busy client " + std::to_string(i + 1) + " did not fill its heap within " +
               std::to_string(kStartTimeout.count()) + " s";
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    unlink(ready_path(i).c_str());
  }
  return "";
}

std::string BusyClients::check() {
  for (size_t i = 0; i < clients_.size(); i++) {
    int status = 0;
    if (clients_[i].pid <= 0 || waitpid(clients_[i].pid, &status, WNOHANG) != clients_[i].pid) {
      continue;
    }
    clients_[i].pid = -1;
    std::string err;
    char buf[512];
    ssize_t got;
    lseek(clients_[i].err, 0, SEEK_SET);
    while ((got = read(clients_[i].err, buf, sizeof buf)) > 0) err.append(buf, size_t(got));
    if (const size_t end = err.find_last_not_of('\n'); end != std::string::npos) {
      const size_t begin = err.rfind('\n', end);
      err = err.substr(begin == std::string::npos ? 0 : begin + 1, end - begin);
    }
    return "busy client " + std::to_string(i + 1) + " (lego-run --config) exited with status " +
           std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status)) +
           " while it should load the memory node" + (err.empty() ? "" : ": " + err);
  }
  return "";
}

std::string BusyClients::stop() {
  std::string st = clients_.empty() ? "" : check();
  for (Client& c : clients_) {
    if (c.pid > 0) kill(c.pid, SIGTERM);  // lego-run forwards it to the worker
  }
  for (Client& c : clients_) {
    if (c.pid > 0) waitpid(c.pid, nullptr, 0);
    close(c.err);
  }
  clients_.clear();
  return st;
}

}  // namespace lego::bench
