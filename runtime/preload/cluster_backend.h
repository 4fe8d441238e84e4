// ClusterBackend: the runtime's one LineBackend, over every memory node a process uses.
//
// The region is cut into vRegions of mem::kVRegionBytes (16 MiB, README "The cluster"). Each
// vRegion the program allocates in is placed on R memory nodes (its replica set: the monitor
// chooses them, or, in a cluster without one, this backend with lego/placement.h). A fetch
// reads one full replica; a write-back goes to every live replica at once (all requests
// started, then all finished) and carries the process's version counter; a release goes to
// all. A single memory node is the case N = 1, R = 1 of the same code.
//
// Failure: a call whose result lego/retry.h classifies "peer gone" (or ECONNRESET twice, or
// EACCES for a space the node forgot, or ETIMEDOUT kAttempts times) marks that node LOST for
// this process (an atomic flag; it is never read again). A fetch then goes to the next full
// replica at once; a write-back counts as done when the live replicas stored it. The repair
// thread re-replicates every vRegion that lost a replica (docs/cluster.md: place a
// replacement, mark it joining, kCopyRange from a survivor, poll kCopyStatus, promote), and
// tells the monitor. A vRegion with no full replica left is lost: the call fails with
// EHOSTDOWN, which the ExCache treats as fatal (exit 69 under lego-run); loss_message() then
// names the node.
//
// Threads: the miss path (fetch*, write_back*, the snapshot calls) may run in a SIGBUS
// handler: it allocates nothing, takes no lock program code can hold, reads the vRegion map
// with atomic loads and sends through preallocated buffers (lego/excache.h's rules). place()
// and unplace() run in program context, from jemalloc's extent hooks: they hand the work to
// the placer thread (which may allocate, from the runtime's own arena, and may wait for the
// monitor) and wait for it. Three service threads: heartbeats, placement, repair.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "lego/excache.h"
#include "lego/fit.h"
#include "lego/memory_proto.h"
#include "lego/monitor_proto.h"

namespace lego::runtime {

// Every backend counter, once (the ExCache's list's pattern): the stats report and lego-run
// --stats print them after the ExCache's.
#define LEGO_CLUSTER_COUNTERS(X)                                                          \
  X(memory_nodes_used, "memory nodes this process opened a space on")                     \
  X(vregions_placed, "vRegions placed (each on `replicas` memory nodes)")                 \
  X(vregions_unplaced, "vRegions whose last byte was freed: their replicas dropped them") \
  X(nodes_lost, "memory nodes this process found lost (never used again)")                \
  X(failovers, "fetches served by another replica after one was found lost")              \
  X(replica_write_failures, "write-backs a replica failed (it was then marked lost)")     \
  X(vregions_rereplicated, "vRegions given a new full replica after a loss")              \
  X(bytes_copied, "bytes copied between memory nodes by re-replication")                  \
  X(copy_ms, "milliseconds spent re-replicating (sum over vRegions)")                     \
  X(monitor_waits, "placements that waited for an unreachable monitor")                   \
  X(rma_lines, "lines fetched by one-sided reads (--rma)")                                \
  X(rma_fallbacks, "one-sided reads that failed and were asked for by kFetch instead")    \
  X(rma_requests, "one-line fetches of a granted vRegion --rma auto sent as kFetch")      \
  X(rma_probes, "one-line fetches --rma auto sent the way it did not favour, to time it") \
  /* Gauges: the first memory node's averages (rma_chooser.h; 0: not measured). */        \
  X(rma_request_ns, "--rma auto: average one-line kFetch from the first memory node, ns") \
  X(rma_one_sided_ns, "--rma auto: average one-line rma_read from it, ns")                \
  /* Times, CLOCK_MONOTONIC ns (0: not yet), for lego-bench's failover figures. */        \
  X(first_loss_ns, "when this process first found a memory node lost")                    \
  X(first_failover_ns, "when the first miss that met a lost node was done by the others") \
  X(rereplication_start_ns, "when the first re-replication began")                        \
  X(rereplication_end_ns, "when the last re-replication so far ended")

struct ClusterStats {
#define LEGO_CLUSTER_FIELD(name, doc) uint64_t name = 0;
  LEGO_CLUSTER_COUNTERS(LEGO_CLUSTER_FIELD)
#undef LEGO_CLUSTER_FIELD
};

struct ClusterStatsField {
  const char* name;
  uint64_t ClusterStats::*field;
  const char* doc;
};
inline constexpr ClusterStatsField kClusterStatsFields[] = {
#define LEGO_CLUSTER_STATS_FIELD(name, doc) {#name, &ClusterStats::name, doc},
    LEGO_CLUSTER_COUNTERS(LEGO_CLUSTER_STATS_FIELD)
#undef LEGO_CLUSTER_STATS_FIELD
};

struct ClusterBackendOptions {
  // Copies of every vRegion (1..mon::kMaxReplicas). Default 1.
  uint32_t replicas = 1;
  // The memory nodes to place on without a monitor (each gets a space at open()). With a
  // monitor, spaces open as its placements reach nodes (nodes not in the cluster file are
  // learned from its replies).
  std::vector<fit::NodeId> memory_nodes;
  // The monitor (0: none; the cluster file's, when it has one).
  fit::NodeId monitor = 0;
  // How long a placement waits for an unreachable monitor before the allocation fails
  // (ENOMEM). Default 30 s (the cluster file's monitor_wait_ms).
  uint32_t monitor_wait_ms = 30000;
  std::string program;
  // Fetch lines by one-sided reads of the memory nodes' pool blocks (kPlaceRma) instead of
  // kFetch where a node grants them; write-backs, releases and snapshots stay requests
  // (docs/rma.md). Pays on verbs (the NIC reads, the memory node's CPU is not involved);
  // elsewhere the read is a request by another name. Default off (lego-run --rma auto turns
  // it on for verbs).
  bool rma = false;
  // With rma: choose per memory node, for each one-line miss, the way that has been
  // faster lately (rma_chooser.h: one-sided reads cost more than requests while the memory
  // node's CPU is free, far less while it is busy), trying the other one fetch in 64.
  // Windows of several lines follow the choice unmeasured. Default off: rma alone reads
  // one-sided wherever it can (lego-run --rma on); lego-run --rma auto sets both on
  // verbs.
  bool rma_adaptive = false;
  // Told of every space opened or closed, from open() on (lego-run's registry:
  // launch_contract.h). Runs on the calling thread; must allocate nothing and not call back
  // into the backend.
  void (*observer)(fit::NodeId node, const mem::SpaceHandle& space, bool opened) = nullptr;
  // Called first on each service thread (lego-run: the runtime's own jemalloc arena).
  void (*on_thread_start)() = nullptr;
};

class ClusterBackend : public LineBackend {
 public:
  // Without a monitor, opens a space on each of options.memory_nodes (connecting one
  // channel; the heartbeat thread connects the others soon after, and the miss path's
  // calls wait for that rather than connect: they allocate nothing); starts the service
  // threads. The region is set later
  // (set_region: the ExCache that owns it needs the backend first). Errors name the node.
  static Result<std::unique_ptr<ClusterBackend>> open(fit::Node* node,
                                                      const ClusterBackendOptions& options);
  ~ClusterBackend() override;

  // Before the process ends (its exit runs library destructors, libfabric's among them;
  // _exit): returns once no deferred channel connection (cluster_backend.cc, "Lazy
  // channels") is under way and no call is in flight (fit::Node::drain: over shm a reply
  // the process never takes stalls the memory node for every other process), and starts
  // neither after: fetches are then waited for where they start. Calls still work (a
  // channel not yet connected is connected by the call that takes it). Waits at most one
  // channel's connection and the replies in flight (the cluster's timeout at most).
  void quiesce();

  // The ExCache region [base, base + bytes): vRegion i is [base + i*16M, base + (i+1)*16M).
  // Once, before any other call but close().
  Status set_region(uint64_t base, uint64_t bytes);

  Status fetch(uint64_t line_addr, std::span<std::byte, kExCacheLineBytes> out) override;
  Status fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out) override;
  Status start_fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out,
                           FetchTicket* ticket) override;
  Status finish_fetch_batch(FetchTicket* ticket) override;
  bool fetch_ready(FetchTicket* ticket) override;
  Status write_back(std::span<const WriteBack> lines) override;
  Status start_write_back(std::span<const WriteBack> lines, WriteBackTicket* ticket) override;
  Status finish_write_back(WriteBackTicket* ticket) override;
  Status release(uint64_t addr, uint64_t length) override;

  // A snapshot is a kFork of the process's space on every node it uses, and a copy of the
  // vRegion map as it was (a child reads what the parent had at the fork, wherever the
  // parent's vRegions move afterwards). At most kMaxSnapshots alive.
  Result<uint32_t> snapshot() override;
  Status fetch_snapshot(uint32_t id, uint64_t line_addr,
                        std::span<std::byte, kExCacheLineBytes> out) override;
  Status write_back_snapshot(uint32_t id, std::span<const WriteBack> lines) override;
  Status release_snapshot(uint32_t id, uint64_t addr, uint64_t length) override;
  void drop_snapshot(uint32_t id) override;
  // The parent's side of a child's adoption (below): forgets snapshot `id` without closing
  // its spaces (the child owns them now); the observer is told they closed here.
  void disown_snapshot(uint32_t id) override;
  static constexpr uint32_t kMaxSnapshots = 64;

  // In a forked child (runtime/excache/fork.cc, "Adoption"): a backend of the child's own
  // whose spaces are snapshot `id` of `parent` (the child's copy of its parent's backend,
  // which is never used or destroyed here: its channels and threads are the parent's).
  // Talks through `node` (the child's own, fresh libfit channels), starts its own service
  // threads, reads the vRegion map as it was at the snapshot, numbers its write-backs
  // above every version the parent could have used, and tells options.observer (the
  // child's registry) of each space. A node the parent had no snapshot space on (opened
  // after the snapshot) is lost for the child. The region is set (no set_region).
  // Program context. Errors name the node.
  static Result<std::unique_ptr<ClusterBackend>> adopt_snapshot(
      const ClusterBackend& parent, uint32_t id, fit::Node* node,
      const ClusterBackendOptions& options);

  // Makes vRegions [first, last] placed if `used(v)` says they hold allocated bytes, and
  // unplaced (kUnplace on every replica) if not; waits for the placer thread. ENOMEM when a
  // vRegion could not be placed (no R nodes can promise it, or the monitor did not answer
  // for monitor_wait_ms). Program context; allocates nothing on the calling thread.
  using UsedFn = bool (*)(uint64_t vregion);
  void set_used_fn(UsedFn used);
  Status sync_placement(uint64_t first, uint64_t last);

  // Closes every space. Later calls fail.
  void close();

  ClusterStats stats() const;
  // Where this process's memory is now, for lego-stat and lego-run's re-replication
  // progress (the stats thread, every 250 ms): each memory node it opened a space on, lost
  // or not, with the vRegions that have a full copy there and those being copied there; and
  // the placed vRegions with a copy on a lost node (re-replication still to do). One pass of
  // atomic loads over the vRegion map; allocates (the nodes' addresses): not for the miss
  // path.
  struct NodeView {
    fit::NodeId id = 0;
    bool lost = false;
    uint32_t vregions = 0, copying = 0;
    std::string address;  // "address:port"
  };
  struct PlacementView {
    uint32_t replicas = 0;
    uint64_t vregions_placed = 0, vregions_degraded = 0;
    std::vector<NodeView> nodes;  // by slot: in the order the process opened them
  };
  PlacementView placement_view() const;
  // Service threads this backend started (lego-run waits for each to take its arena).
  static constexpr int kServiceThreads = 3;
  // The last vRegion loss, "vRegion 3 (0x7f..): its last copy was on memory node 2
  // (10.1.2.3:18602, tcp), lost: ECONNREFUSED", or "" (a fixed buffer: async-signal-safe).
  const char* loss_message() const;
  uint64_t process_key() const;

  struct Impl;  // cluster_backend.cc

 private:
  explicit ClusterBackend(std::unique_ptr<Impl> impl);
  // The backend over `impl`, its heartbeat, placer and repair threads started (open and
  // adopt_snapshot end here).
  static std::unique_ptr<ClusterBackend> start(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lego::runtime
