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

// Every memory-node counter, once: X(name, counter|gauge, "what it counts"). This list
// makes MemoryNodeStats, --status's lines and the daemon's Prometheus metrics
// (lego_memd_NAME, --metrics), in this order.
#define LEGO_MEMORY_NODE_COUNTERS(X)                                                          \
  X(spaces_open, gauge, "address spaces alive now")                                           \
  X(spaces_opened, counter, "address spaces ever created")                                    \
  X(spaces_expired, counter, "address spaces freed because their lease ran out")              \
  X(lines_stored, gauge, "lines held now")                                                    \
  X(lines_capacity, gauge, "lines the pool can hold")                                         \
  X(bytes_reserved, gauge, "bytes promised to processes now (placed vRegions x 16 MiB)")      \
  X(vregions_placed, gauge, "vRegions placed now, over all spaces")                           \
  X(fetches, counter, "lines asked for")                                                      \
  X(fetch_zero, counter, "lines asked for that were never stored (answered as zeros)")        \
  X(write_backs, counter, "lines written back")                                               \
  X(zero_drops, counter, "written-back lines that were all zeros (freed)")                    \
  X(released, counter, "lines freed by kRelease")                                             \
  X(refused, counter, "requests refused (bad handle, bad lengths, full)")                     \
  X(places, counter, "kPlace requests that placed a vRegion")                                 \
  X(unplaces, counter, "kUnplace requests that dropped one")                                  \
  X(zero_kept, counter, "all-zero write-backs kept as lines (incoming copy)")                 \
  X(copies_started, counter, "kCopyRange jobs accepted (this node the source)")               \
  X(copies_done, counter, "kCopyRange jobs that completed")                                   \
  X(copies_failed, counter, "kCopyRange jobs that failed (the error is in kCopyStatus)")      \
  X(copy_lines_sent, counter, "lines this node's copy worker sent")                           \
  X(copy_lines_applied, counter, "copied lines this node received and stored")                \
  X(copy_lines_skipped, counter, "copied lines dropped: a newer version or release was here") \
  X(rma_grants, counter, "vRegion blocks registered for one-sided reads (kPlaceRma)")         \
  X(rma_grant_failures, counter, "kPlaceRma registrations that failed (served by kFetch)")    \
  X(rma_revoked, counter, "grants ended (kUnplace, kClose, lease expiry): their key refused") \
  X(requests, counter, "requests served (kUsage's load)")                                     \
  X(generation, gauge, "changes with spaces, placements and copy states")

struct MemoryNodeStats {
#define LEGO_MEMORY_NODE_FIELD(name, type, doc) uint64_t name = 0;
  LEGO_MEMORY_NODE_COUNTERS(LEGO_MEMORY_NODE_FIELD)
#undef LEGO_MEMORY_NODE_FIELD
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
