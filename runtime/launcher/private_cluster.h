// The private cluster: lego-run's whole single-host system when it has no cluster file.
//
// A fresh key, a cluster file holding it (mode 0600, in the run directory), a private
// lego-memd and, with an export, a lego-stord beside it. Over tcp as root the daemons run
// in a network namespace of their own, joined to this one by a veth pair (private_link):
// PROGRAM keeps its network, and the memory node is "remote".
// With memory_nodes N > 1 it is a cluster: N lego-memd and a lego-mond (the monitor that
// places memory), over tcp as root each in a network namespace of its own, all on one
// bridge that this namespace is attached to (netns::Network); the first memory node's
// namespace is the one a single node would have, and holds lego-stord too. Everything is stopped
// and removed by stop() (or the destructor); what a kill -9 of lego-run leaves is found by its
// names (private_link.h) and swept by the next lego-run (runtime/launcher/run_dir.h).
//
// The tests start and stop private clusters through this library too.
//
// Thread-safety: one thread at a time (start and stop fork, and the network's set-up
// moves the calling thread between namespaces for a moment).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lego/fit.h"
#include "lego/netns.h"
#include "lego/status.h"
#include "runtime/launcher/private_link.h"

namespace lego::launch {

struct PrivateClusterOptions {
  // Where the cluster file (with the key) and the daemons' logs go: lego-run's run
  // directory. Must exist.
  std::string dir;
  // tcp (libfit's sockets) or shm (libfabric's, same host).
  fit::Provider transport = fit::Provider::kTcp;
  // tcp only: the daemons in a network namespace of their own (needs root).
  bool isolate = false;
  // Each memory node's capacity (lego-memd --capacity).
  uint64_t memory_capacity = uint64_t{8} << 30;
  // Memory nodes (1..kMaxPrivateMemoryNodes); with more than one, a monitor too.
  int memory_nodes = 1;
  // Copies of each vRegion, written into the cluster file (`replicas`).
  uint32_t replicas = 1;
  // Not empty: a storage node too (node 3), serving this directory.
  std::string export_dir;
  // The daemons' executables (lego-stord only needed with export_dir).
  std::string memd_path, stord_path, mond_path;  // lego-mond: with memory_nodes > 1
  // Names, addresses and ports derive from it (lego-run's pid).
  pid_t id = 0;
  // The prefix of lines of a daemon's log shown when it did not start ("lego-run").
  std::string who = "lego-run";
};

inline constexpr int kMaxPrivateMemoryNodes = 16;
// Node ids: the processor 1, the memory nodes 2 and then 10, 11, ...; the storage node 3,
// the monitor 9.
inline constexpr fit::NodeId kPrivateMonitorNode = 9;
fit::NodeId private_memory_node(int index);

class PrivateCluster {
 public:
  // Node 1 is the processor (this host), 2 the (first) memory node, 3 the storage node. Errors
  // name what failed; a daemon that did not start has its log shown on stderr first.
  // Nothing is left running on failure.
  static Result<std::unique_ptr<PrivateCluster>> start(const PrivateClusterOptions& options);
  ~PrivateCluster() { stop(); }
  PrivateCluster(const PrivateCluster&) = delete;
  PrivateCluster& operator=(const PrivateCluster&) = delete;

  const fit::ClusterConfig& config() const { return config_; }
  const std::string& config_path() const { return config_path_; }
  // The network namespace the daemons run in ("" when they share this one).
  const std::string& network_namespace() const { return namespace_; }
  // The first memory node's lego-memd; memory node `index`'s (0..memory_nodes-1).
  pid_t memory_pid(int index = 0) const { return memd_.at(static_cast<size_t>(index)); }
  pid_t monitor_pid() const { return mond_; }
  pid_t storage_pid() const { return stord_; }
  int memory_nodes() const { return static_cast<int>(memd_.size()); }
  // Memory node `index`'s namespace ("" when it shares this one).
  std::string memory_namespace(int index) const;

  // How many lego-memd have exited by themselves so far (each is reaped). Does not wait.
  int memory_exited();
  // The daemons' logs on stderr, each line "<who>: lego-memd: ...".
  void show_logs() const;
  // Stops the daemons (SIGTERM, then SIGKILL after 3 s), removes the network namespace
  // and the logs. The cluster file stays: it is in the caller's directory. The veth pair
  // goes with the namespace, a few ms later (the kernel frees it asynchronously; deleting
  // it here would cost 15-40 ms): a cluster started again under the same id at once may
  // find the host's end still there (EEXIST). Idempotent.
  void stop();

 private:
  PrivateCluster() = default;
  Status launch(const PrivateClusterOptions& o);
  PrivateClusterOptions options_;
  fit::ClusterConfig config_;
  std::string config_path_, stord_log_, mond_log_, namespace_;
  std::vector<std::string> memd_logs_;
  std::unique_ptr<netns::Network> network_;
  std::vector<pid_t> memd_;  // -1 once reaped
  pid_t stord_ = -1, mond_ = -1;
  int memd_exited_ = 0;
};

}  // namespace lego::launch
