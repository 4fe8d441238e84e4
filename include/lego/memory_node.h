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

struct MemoryNodeStats {
  uint64_t spaces_open = 0;     // address spaces alive now
  uint64_t spaces_opened = 0;   // ever created
  uint64_t spaces_expired = 0;  // freed because their lease ran out
  uint64_t lines_stored = 0;    // lines held now
  uint64_t lines_capacity = 0;  // lines the pool can hold
  uint64_t bytes_reserved = 0;  // promised to processes now (kReserve)
  uint64_t fetches = 0;         // lines asked for
  uint64_t fetch_zero = 0;      // ... that were never stored (answered as zeros)
  uint64_t write_backs = 0;     // lines written back
  uint64_t zero_drops = 0;      // written-back lines that were all zeros (freed)
  uint64_t released = 0;        // lines freed by kRelease
  uint64_t refused = 0;         // requests refused (bad handle, bad lengths, full)
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
