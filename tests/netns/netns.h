// Test topologies of network namespaces: lego's "remote" nodes on one machine.
//
// Topology::create(n, prefix) makes n host namespaces, each with an eth0 on one private
// /24, joined by a bridge that lives in its own "switch" namespace (so the machine's
// root namespace gets no new interfaces or routes). Names carry the creating pid, so
// parallel tests never collide; the destructor removes everything.
//
// Thread-safety: a Topology is not shared between threads while being created or
// destroyed; name()/address() are const.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "lego/status.h"

namespace lego::testing {

class Topology {
 public:
  // Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN). Errors name the failing ip command and
  // its stderr.
  static Result<std::unique_ptr<Topology>> create(int hosts, const std::string& prefix);
  ~Topology();

  int hosts() const { return static_cast<int>(names_.size()); }
  const std::string& name(int host) const { return names_[host]; }         // netns name
  const std::string& address(int host) const { return addresses_[host]; }  // eth0's IPv4

  // Forks, enters host's namespace and execs argv (PATH searched). Exec failures are
  // reported here (through a close-on-exec pipe), not as a child exiting 127.
  Result<pid_t> spawn(int host, const std::vector<std::string>& argv,
                      const std::vector<std::string>& extra_env = {}) const;

  // Enters host's namespace on the calling thread (threads it starts later inherit it).
  Status enter(int host) const;

  // Waits for pid; returns its exit status, or 128+signal. After `timeout` the process is
  // killed and ETIMEDOUT returned.
  static Result<int> wait_exit(pid_t pid, std::chrono::milliseconds timeout);

 private:
  Topology() = default;
  std::string switch_ns_;
  std::vector<std::string> names_;
  std::vector<std::string> addresses_;
};

// Runs a command (no shell) and returns its stdout; errors carry its stderr.
Result<std::string> run_command(const std::vector<std::string>& argv);

}  // namespace lego::testing
