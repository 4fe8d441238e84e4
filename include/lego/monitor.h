// The monitor (LegoOS's global memory monitor, GMM): the cluster's membership of memory nodes
// and where processes' vRegions go, served over FIT (monitor_proto.h). lego-mond
// (daemons/monitor/main.cc) is a Monitor on a fit::Node.
//
// It keeps no state on disk: memory nodes register and heartbeat, and what each holds is read
// from it (memory_proto.h's kListSpaces) by the monitor's lister thread. A restarted monitor
// answers the first heartbeat of each node with ENOENT; the node registers again, its spaces
// are listed again, and the view is whole within a heartbeat or two.
//
// A node's loss is logged with what it held: how many vRegions had their only copy there
// (lost with it) and how many had others, which the processes' runtimes then copy to another
// node. The monitor follows those copies in the nodes' listings and logs their progress
// (include/lego/progress.h: plain lines on stderr, so the journal gets one every 10 s or
// so) until every vRegion is back at the copies it had, or its process is gone.
//
// Thread-safety: all methods may be called from any thread; one mutex guards the membership
// (no call to another node is made with it held).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "lego/fit.h"
#include "lego/monitor_proto.h"

namespace lego::mon {

struct MonitorOptions {
  uint64_t seed = 0;  // the placement draws' (0: random)
  // How often memory nodes heartbeat, and how long unheard makes one lost (no placements
  // on it; the processes' runtimes find out for themselves) are the cluster file's
  // heartbeat_ms and lost_after_ms: serve() takes them from the node's config.
};

// Counters, once (lego-mond --status prints them with these names, --metrics as
// lego_mond_NAME with the comment as its HELP).
#define LEGO_MONITOR_COUNTERS(X)                                                            \
  X(registrations, "kRegister accepted")                                                    \
  X(refused_live_id, "kRegister refused: the id is live with another incarnation")          \
  X(heartbeats, "kNodeHeartbeat accepted")                                                  \
  X(unknown_heartbeats, "heartbeats answered ENOENT (the node then registers again)")       \
  X(nodes_lost, "memory nodes declared lost (unheard for lost_after, or gone when asked)")  \
  X(lost_reports, "kReportLost hints received from processors")                             \
  X(placements, "kPlace answered with nodes")                                               \
  X(placements_refused, "kPlace answered ENOSPC")                                           \
  X(replacements, "kPlace for a vRegion the process already holds: a re-replication's")     \
  X(vregions_rereplicated, "vRegions seen back at their copies after a memory node's loss") \
  X(vregions_lost, "vRegions whose only copy was on a memory node declared lost")           \
  X(listings, "memory nodes' spaces read (kListSpaces, all pages)")                         \
  X(listing_errors, "kListSpaces that failed (retried at the next heartbeat)")              \
  X(epoch, "bumped on every membership change")

struct MonitorStats {
#define LEGO_MONITOR_FIELD(name, doc) uint64_t name = 0;
  LEGO_MONITOR_COUNTERS(LEGO_MONITOR_FIELD)
#undef LEGO_MONITOR_FIELD
};

struct MonitorStatsField {
  const char* name;
  uint64_t MonitorStats::*field;
  const char* doc;
};
inline constexpr MonitorStatsField kMonitorStatsFields[] = {
#define LEGO_MONITOR_STATS_FIELD(name, doc) {#name, &MonitorStats::name, doc},
    LEGO_MONITOR_COUNTERS(LEGO_MONITOR_STATS_FIELD)
#undef LEGO_MONITOR_STATS_FIELD
};

// The monitor's view now (gauges: --metrics; --status prints the nodes and processes).
struct MonitorGauges {
  uint64_t nodes_alive = 0;          // memory nodes heard within lost_after
  uint64_t nodes_suspect = 0;        // reported lost by a processor, being asked
  uint64_t nodes_declared_lost = 0;  // declared lost and not registered again
  uint64_t capacity_bytes = 0;       // of the nodes alive
  uint64_t reserved_bytes = 0;       // promised to placed vRegions on the nodes alive
  uint64_t stored_bytes = 0;         // held on the nodes alive
  uint64_t processes = 0;            // with a space on a node not lost
  uint64_t vregions = 0;             // distinct (process, vRegion) placed on nodes not lost
  uint64_t vregions_copying = 0;     // replicas being copied in (re-replication under way)
  uint64_t vregions_degraded = 0;    // had a copy on a lost node and not all their copies yet
};

class Monitor {
 public:
  explicit Monitor(MonitorOptions options);
  ~Monitor();

  // Registers the monitor opcodes on `node` (before node.start()), takes the timings from
  // node.config(), and starts the lister
  // thread, which calls memory nodes through `node`. stop() (or the destructor) must run
  // before `node` is destroyed.
  void serve(fit::Node& node);
  void stop();
  // Declares lost the nodes unheard for lost_after, and logs the progress of the
  // re-replication that follows a loss (below); lego-mond calls it every 200 ms.
  void tick();
  MonitorStats stats() const;
  MonitorGauges gauges() const;
  // What kStatus returns and `lego-mond --status` prints: the nodes (id, address, state,
  // incarnation, capacity, reserved, stored, last heard), then each process (key, owner
  // node, pid, program) with each vRegion's replicas (copying ones marked), then the
  // counters. Nodes by id, processes by key, vRegions by index: two outputs compare line
  // by line (but for "last heard").
  std::string status_text() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lego::mon
