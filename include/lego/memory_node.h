// The memory node (LegoOS memory component): owns processes' memory and serves their
// processor nodes' line misses, write-backs and unmaps over FIT (memory_proto.h).
//
// MemoryNode holds one address space per lego process; lines live in a pool of at most
// `capacity_bytes`. lego-memd (daemons/memory/main.cc) is a MemoryNode on a fit::Node.
//
// Thread-safety: all methods may be called from any thread; spaces are independent and
// locked one by one, so requests of different processes do not serialize.
#pragma once

#include <chrono>
#include <cstdint>
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
#define LEGO_MEMORY_NODE_COUNTERS(X)                                                   \
  X(spaces_open, gauge, "address spaces alive now")                                    \
  X(spaces_opened, counter, "address spaces ever created")                             \
  X(spaces_expired, counter, "address spaces freed because their lease ran out")       \
  X(lines_stored, gauge, "lines held now")                                             \
  X(lines_capacity, gauge, "lines the pool can hold")                                  \
  X(bytes_reserved, gauge, "bytes promised to processes now (kReserve)")               \
  X(fetches, counter, "lines asked for")                                               \
  X(fetch_zero, counter, "lines asked for that were never stored (answered as zeros)") \
  X(write_backs, counter, "lines written back")                                        \
  X(zero_drops, counter, "written-back lines that were all zeros (freed)")             \
  X(released, counter, "lines freed by kRelease")                                      \
  X(refused, counter, "requests refused (bad handle, bad lengths, full)")

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
  // its serving time and status_text() shows its FIT counters. `node` must outlive every
  // later call of expire_idle() and status_text().
  void serve(fit::Node& node);
  // Frees spaces whose lease ran out; returns how many. lego-memd calls it periodically
  // (every 200 ms): each call also advances the lease clock.
  size_t expire_idle();
  MemoryNodeStats stats() const;
  // Multi-line human-readable state: what kStatus returns and `lego-memd --status` prints.
  std::string status_text() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lego::mem
