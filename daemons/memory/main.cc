// lego-memd: the memory node daemon. Serves the memory of lego processes running on
// processor nodes (see include/lego/memory_node.h and memory_proto.h).
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "lego/daemon.h"
#include "lego/fit.h"
#include "lego/memory_node.h"
#include "lego/units.h"

using namespace lego;

namespace {

const char* kUsage = R"(usage: lego-memd --config FILE --node ID [options]
       lego-memd --status --config FILE --node ID [--as ID]

The lego memory node: owns the anonymous memory of programs run with lego-run on
processor nodes, serving their line misses, write-backs and unmaps over FIT.

options:
  --config FILE      the cluster file (TOML; see README.md)
  --node ID          this memory node's id in the cluster file
  --capacity SIZE    most memory to hold for all processes (default 1G); a process
                     whose write-back does not fit gets ENOMEM, the daemon stays up
  --lease-ms MS      free a process's memory when nothing was heard from it for this
                     long while this node was serving: its processor node is lost
                     (default 20000); time in which the node could not serve (stopped,
                     stuck) does not count
  --ready-fd FD      write "ready\n" to FD once serving (for supervisors and tests)
  --status           ask the running memory node --node for its state and counters,
                     FIT's included (connections, handshakes, peers cut off)
  --as ID            with --status: the node id to speak as (default: the first
                     processor node in the cluster file)
  --help             this text

Stops cleanly on SIGTERM or SIGINT.
)";

}  // namespace

int main(int argc, char** argv) {
  daemon::NodeFlags f;
  mem::MemoryNodeOptions options;
  std::vector<daemon::Flag> flags = daemon::node_flags(f, true);
  flags.push_back({"capacity", true, [&](const char* a) {
                     uint64_t v = daemon::size("--capacity", a);
                     if (v < mem::kLineBytes) {
                       daemon::die("--capacity must hold at least one 4 KiB line",
                                   daemon::kExitUsage);
                     }
                     options.capacity_bytes = v;
                   }});
  flags.push_back({"lease-ms", true, [&](const char* a) {
                     options.lease =
                         std::chrono::milliseconds(daemon::number("--lease-ms", a, 100, 86400000));
                   }});
  const int first = daemon::parse_flags(argc, argv, "lego-memd", kUsage, flags);
  fit::ClusterConfig config = daemon::load_node_config(argc, argv, first, f);
  const auto id = static_cast<fit::NodeId>(f.node);
  if (f.status) return daemon::print_status(config, id, f.as, mem::kStatus, "memory node");
  const fit::NodeConfig& me = daemon::node_of_role(config, f.config, f.node, fit::Role::kMemory);

  daemon::install_stop_handlers();
  // Every connection is a descriptor: take all we may, so that clients are not refused
  // while peers hold connections open (at most 256 unauthenticated ones, see fit.h).
  const uint64_t fd_limit = daemon::raise_fd_limit();
  mem::MemoryNode memory(options);
  auto fit_node = fit::Node::create(config, id);
  if (!fit_node) daemon::die(fit_node.status().message());
  memory.serve(*fit_node.value());
  Status st = fit_node.value()->start();
  if (!st) daemon::die(st.message());
  fprintf(stderr,
          "lego-memd: node %ld serving at %s:%u (%s, %s), capacity %s, lease %lld ms, %llu "
          "descriptors\n",
          f.node, me.address.c_str(), me.port, fit::provider_name(me.provider),
          fit::progress_name(me.progress), format_size(options.capacity_bytes).c_str(),
          static_cast<long long>(options.lease.count()), static_cast<unsigned long long>(fd_limit));
  daemon::signal_ready(f.ready_fd);
  daemon::run_until_stopped(std::chrono::milliseconds(200), [&] { memory.expire_idle(); });
  fprintf(stderr, "lego-memd: node %ld stopping\n", f.node);
  fit_node.value()->stop();
  return 0;
}
