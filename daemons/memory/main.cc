// lego-memd: the memory node daemon. Serves the memory of lego processes running on
// processor nodes (see include/lego/memory_node.h and memory_proto.h).
#include <chrono>
#include <memory>
#include <string>

#include "daemons/memory/monitor_link.h"
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
  --capacity SIZE    most memory to hold for all processes (default 1G, at least
                     16M); promised in 16 MiB vRegions: a process's allocation that
                     needs a vRegion more than is left fails (ENOMEM), the daemon
                     stays up
  --lease-ms MS      free a process's memory when nothing was heard from it for this
                     long while this node was serving: its processor node is lost
                     (default 20000); time in which the node could not serve (stopped,
                     stuck) does not count
  --ready-fd FD      write "ready\n" to FD once serving (for supervisors and tests)
  --metrics ADDR:PORT  serve its counters and FIT's in the Prometheus text format at
                     http://ADDR:PORT/metrics (lego_memd_*), from a thread of its own;
                     off by default. ADDR is an IPv4 address or [IPv6]; port 0 picks one
  --status           ask the running memory node --node for its state and counters,
                     its monitor's state (registered, unreachable) and FIT's
                     counters (connections, handshakes, peers cut off)
  --as ID            with --status: the node id to speak as (default: the first
                     processor node in the cluster file)
  --help             this text

When the cluster file names a monitor (lego-mond), the node registers with it at
start and heartbeats every heartbeat_ms: a monitor refusing this node's key, or
another live lego-memd with the same --node, ends it with status 1; a monitor
that does not answer is retried while the node serves.

Stops cleanly on SIGTERM or SIGINT.
)";

}  // namespace

int main(int argc, char** argv) {
  mem::MemoryNodeOptions options;
  daemon::NodeDaemon d{"lego-memd", kUsage, fit::Role::kMemory, mem::kStatus, {}, {}};
  d.flags.push_back({"capacity", true, [&](const char* a) {
                       uint64_t v = daemon::size("--capacity", a);
                       if (v < mem::kVRegionBytes) {
                         daemon::die(
                             "--capacity must hold at least one 16 MiB vRegion "
                             "(memory is promised to processes in vRegions)",
                             daemon::kExitUsage);
                       }
                       options.capacity_bytes = v;
                     }});
  d.flags.push_back({"lease-ms", true, [&](const char* a) {
                       options.lease = std::chrono::milliseconds(
                           daemon::number("--lease-ms", a, 100, 86400000));
                     }});
  d.start = [&](const fit::NodeConfig&) {
    auto memory = std::make_shared<mem::MemoryNode>(options);
    // With a monitor in the cluster file: registered and heartbeating once serving.
    auto link = std::make_shared<std::unique_ptr<mem::MonitorLink>>();
    return daemon::Service{
        [memory, link](fit::Node& node) {
          if (const fit::NodeConfig* m = node.config().first_of(fit::Role::kMonitor)) {
            *link = std::make_unique<mem::MonitorLink>(memory.get(), *m);
            mem::MonitorLink* l = link->get();
            memory->set_status_extra([l] { return l->status_text(); });
          } else {
            memory->set_status_extra([] { return std::string("monitor none\n"); });
          }
          memory->serve(node);
        },
        [memory] { memory->expire_idle(); },
        "",
        ", capacity " + format_size(options.capacity_bytes) + ", lease " +
            std::to_string(options.lease.count()) + " ms",
        [memory](metrics::Exposition& e) {
          const mem::MemoryNodeStats s = memory->stats();
#define LEGO_MEMORY_NODE_METRIC(name, type, doc) e.add(#name, #type, doc, s.name);
          LEGO_MEMORY_NODE_COUNTERS(LEGO_MEMORY_NODE_METRIC)
#undef LEGO_MEMORY_NODE_METRIC
        },
        [link](fit::Node& node) {
          if (*link) (*link)->start(node);
        },
        [memory, link] {
          if (*link) (*link)->stop();
          memory->stop();
        },
    };
  };
  return daemon::run_node(argc, argv, d);
}
