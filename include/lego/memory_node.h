// The memory node (LegoOS memory component): owns processes' memory and serves their
// processor nodes' line misses, write-backs and unmaps over FIT (memory_proto.h).
//
// MemoryNode holds one address space per lego process image; lines live in a pool of at most
// `capacity_bytes`, promised to processes in whole vRegions (kPlace). lego-memd
// (daemons/memory/main.cc) is a MemoryNode on a fit::Node.
//
// Re-replication (kCopyRange) runs on a copy worker thread of the MemoryNode's own, which
// calls the target memory node through the same fit::Node: a long copy never holds up a
// server thread, and so never the other processes' requests.
//
// Thread-safety: all methods may be called from any thread; spaces are independent and
// locked one by one, so requests of different processes do not serialize.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "lego/fit.h"
#include "lego/memory_proto.h"
#include "lego/status.h"

namespace lego::mem {

struct MemoryNodeOptions {
  size_t capacity_bytes = size_t{1} << 30;  // default 1 GiB of lines
  // A space with no request for this long is freed: its processor node is lost. The
  // runtime heartbeats every lease/4. Default 20 s. Counted in the FIT node's serving
  // time (fit::LeaseClock): time in which its server threads could not serve (a slow
  // handler, the daemon stopped) does not count against any space.
  std::chrono::milliseconds lease{20000};
};

struct MemoryNodeStats {
  uint64_t spaces_open = 0;         // address spaces alive now
  uint64_t spaces_opened = 0;       // ever created
  uint64_t spaces_expired = 0;      // freed because their lease ran out
  uint64_t lines_stored = 0;        // lines held now
  uint64_t lines_capacity = 0;      // lines the pool can hold
  uint64_t bytes_reserved = 0;      // promised to processes now (placed vRegions x 16 MiB)
  uint64_t vregions_placed = 0;     // vRegions placed now, over all spaces
  uint64_t fetches = 0;             // lines asked for
  uint64_t fetch_zero = 0;          // ... that were never stored (answered as zeros)
  uint64_t write_backs = 0;         // lines written back
  uint64_t zero_drops = 0;          // written-back lines that were all zeros (freed)
  uint64_t released = 0;            // lines freed by kRelease
  uint64_t refused = 0;             // requests refused (bad handle, bad lengths, full)
  uint64_t places = 0;              // kPlace requests that placed a vRegion
  uint64_t unplaces = 0;            // kUnplace requests that dropped one
  uint64_t zero_kept = 0;           // all-zero write-backs kept as lines (incoming copy)
  uint64_t copies_started = 0;      // kCopyRange jobs accepted (this node the source)
  uint64_t copies_done = 0;         // ... that completed
  uint64_t copies_failed = 0;       // ... that failed (the error is in kCopyStatus)
  uint64_t copy_lines_sent = 0;     // lines this node's copy worker sent
  uint64_t copy_lines_applied = 0;  // copied lines this node received and stored
  uint64_t copy_lines_skipped = 0;  // ... and dropped: a newer version or release was here
  uint64_t requests = 0;            // requests served (kUsage's load)
  uint64_t generation = 0;          // changes with spaces, placements and copy states
};

class MemoryNode {
 public:
  explicit MemoryNode(MemoryNodeOptions options);
  ~MemoryNode();

  // Registers the memory-node opcodes on `node` (before node.start()); leases then follow
  // its serving time and status_text() shows its FIT counters. Starts the copy worker,
  // which calls other memory nodes through `node`. `node` must outlive every later call
  // of expire_idle() and status_text(), and stop() (or the destructor) must run before
  // `node` is destroyed.
  void serve(fit::Node& node);
  // Stops the copy worker: a copy in progress ends "failed" (ECANCELED). Idempotent.
  void stop();
  // Frees spaces whose lease ran out; returns how many. lego-memd calls it periodically
  // (every 200 ms): each call also advances the lease clock.
  size_t expire_idle();
  MemoryNodeStats stats() const;
  // Random per MemoryNode, never 0: tells a restarted daemon from the one before.
  uint64_t incarnation() const;
  // What kUsage answers: capacity, promised and stored bytes, incarnation, load and the
  // generation of what kListSpaces would list.
  UsageReply usage() const;
  // Multi-line human-readable state: what kStatus returns and `lego-memd --status` prints.
  std::string status_text() const;
  // Lines status_text() adds after the counters (lego-memd: the monitor's state). Set
  // before serve().
  void set_status_extra(std::function<std::string()> extra);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lego::mem
