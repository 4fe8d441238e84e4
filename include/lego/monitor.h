// The monitor (LegoOS's global memory monitor, GMM): the cluster's membership of memory nodes
// and where processes' vRegions go, served over FIT (monitor_proto.h). lego-mond
// (daemons/monitor/main.cc) is a Monitor on a fit::Node.
//
// It keeps no state on disk: memory nodes register and heartbeat, and what each holds is read
// from it (memory_proto.h's kListSpaces) by the monitor's lister thread. A restarted monitor
// answers the first heartbeat of each node with ENOENT; the node registers again, its spaces
// are listed again, and the view is whole within a heartbeat or two.
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

// Counters (lego-mond --status prints them with these names).
struct MonitorStats {
  uint64_t registrations = 0;       // kRegister accepted
  uint64_t refused_live_id = 0;     // kRegister refused: the id is live with another incarnation
  uint64_t heartbeats = 0;          // kNodeHeartbeat accepted
  uint64_t unknown_heartbeats = 0;  // answered ENOENT (the node then registers again)
  uint64_t nodes_lost = 0;          // nodes declared lost (unheard for lost_after)
  uint64_t lost_reports = 0;        // kReportLost hints received
  uint64_t placements = 0;          // kPlace answered with nodes
  uint64_t placements_refused = 0;  // kPlace answered ENOSPC
  uint64_t listings = 0;            // memory nodes' spaces read (kListSpaces, all pages)
  uint64_t listing_errors = 0;      // ... that failed (retried at the next heartbeat)
  uint64_t epoch = 0;               // bumped on every membership change
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
  // Declares lost the nodes unheard for lost_after; lego-mond calls it every 200 ms.
  void tick();
  MonitorStats stats() const;
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
