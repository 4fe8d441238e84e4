// Test topologies of network namespaces: lego's "remote" nodes on one machine, for tests.
//
// Topology::create(n, prefix) makes n host namespaces, each with an eth0 on one private
// /24, joined by a bridge that lives in its own "switch" namespace (so the machine's
// root namespace gets no new interfaces or routes): a lego::netns::Network
// (include/lego/netns.h) without the host, named for the test. Names carry the creating
// pid, so parallel tests never collide; the destructor removes everything. Beside it,
// what tests do in such namespaces: spawn a program in one, wait for it.
//
// Thread-safety: a Topology is not shared between threads while being created or
// destroyed; name()/address() are const.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "lego/netns.h"
#include "lego/status.h"

namespace lego::testing {

class Topology {
 public:
  // Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN). Errors name the step that failed.
  static Result<std::unique_ptr<Topology>> create(int hosts, const std::string& prefix);

  int hosts() const { return network_->size(); }
  const std::string& name(int host) const { return network_->name(host); }        // netns name
  const std::string& address(int host) const { return network_->address(host); }  // eth0's IPv4

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
  explicit Topology(std::unique_ptr<netns::Network> network) : network_(std::move(network)) {}
  std::unique_ptr<netns::Network> network_;
};

// Runs a command (no shell) and returns its stdout; errors carry its stderr.
Result<std::string> run_command(const std::vector<std::string>& argv);

}  // namespace lego::testing
