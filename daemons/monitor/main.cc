// lego-mond: the monitor daemon (LegoOS's global memory monitor): memory nodes register and
// heartbeat with it, processors ask it where to place their vRegions (include/lego/monitor.h,
// monitor_proto.h).
#include <chrono>
#include <memory>
#include <string>

#include "lego/daemon.h"
#include "lego/fit.h"
#include "lego/monitor.h"

using namespace lego;

namespace {

const char* kUsage = R"(usage: lego-mond --config FILE --node ID [options]
       lego-mond --status --config FILE --node ID [--as ID]

The lego monitor: keeps the cluster's membership of memory nodes (they register
when they start and heartbeat every heartbeat_ms of the cluster file; one unheard
for lost_after_ms is lost) and places each process's 16 MiB vRegions on them,
weighted by free capacity. When a memory node is lost it logs what went with it and
follows the re-replication of the rest until every vRegion has its copies again. It
keeps nothing on disk: restarted, it rebuilds its
view from the memory nodes within a heartbeat or two. Running programs do not
need it: only new placements wait for it.

options:
  --config FILE      the cluster file (TOML; see README.md): this node's role must
                     be "monitor"
  --node ID          this node's id in the cluster file
  --ready-fd FD      write "ready\n" to FD once serving (for supervisors and tests)
  --metrics ADDR:PORT  serve its counters (registrations, heartbeats, placements,
                     nodes lost, re-replications...), its view (nodes by state,
                     capacity, vRegions copying or short of copies) and FIT's in the
                     Prometheus text format at http://ADDR:PORT/metrics (lego_mond_*),
                     from a thread of its own; off by default. ADDR is an IPv4
                     address or [IPv6]; port 0 picks one
  --status           ask the running monitor --node for its nodes (id, address,
                     state, incarnation, capacity, reserved, stored, last heard),
                     each process's vRegions and their replicas, and its counters
  --as ID            with --status: the node id to speak as (default: the first
                     processor node in the cluster file)
  --help             this text

Stops cleanly on SIGTERM or SIGINT.
)";

}  // namespace

int main(int argc, char** argv) {
  daemon::NodeDaemon d{"lego-mond", kUsage, fit::Role::kMonitor, mon::kStatus, {}, {}};
  d.start = [&](const fit::NodeConfig&) {
    // The timings are the cluster file's (the node's config, at serve()).
    auto monitor = std::make_shared<mon::Monitor>(mon::MonitorOptions{});
    return daemon::Service{
        [monitor](fit::Node& node) { monitor->serve(node); },
        [monitor] { monitor->tick(); },
        "",
        "",
        [monitor](metrics::Exposition& e) {
          const mon::MonitorStats s = monitor->stats();
          for (const mon::MonitorStatsField& f : mon::kMonitorStatsFields) {
            e.add(f.name, "counter", f.doc, s.*(f.field));
          }
          const mon::MonitorGauges g = monitor->gauges();
#define LEGO_MOND_GAUGE(name, doc) e.add(#name, "gauge", doc, g.name);
          LEGO_MOND_GAUGE(nodes_alive, "memory nodes alive (heard within lost_after)")
          LEGO_MOND_GAUGE(nodes_suspect, "memory nodes a processor reported lost, being asked")
          LEGO_MOND_GAUGE(nodes_declared_lost,
                          "memory nodes declared lost and not registered again")
          LEGO_MOND_GAUGE(capacity_bytes, "capacity of the memory nodes alive")
          LEGO_MOND_GAUGE(reserved_bytes, "bytes promised to placed vRegions on the nodes alive")
          LEGO_MOND_GAUGE(stored_bytes, "bytes stored on the memory nodes alive")
          LEGO_MOND_GAUGE(processes, "processes with a space on a memory node not lost")
          LEGO_MOND_GAUGE(vregions, "distinct vRegions placed on memory nodes not lost")
          LEGO_MOND_GAUGE(vregions_copying, "replicas being copied in (re-replication)")
          LEGO_MOND_GAUGE(vregions_degraded,
                          "vRegions that had a copy on a lost node, not yet back at their copies")
#undef LEGO_MOND_GAUGE
        },
        [](fit::Node& node) {
          fprintf(stderr, "lego-mond: heartbeat %lld ms, lost after %lld ms\n",
                  static_cast<long long>(node.config().heartbeat.count()),
                  static_cast<long long>(node.config().lost_after.count()));
        },
        [monitor] { monitor->stop(); },
    };
  };
  return daemon::run_node(argc, argv, d);
}
