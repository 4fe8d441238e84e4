// The live stats page: each process of a run publishes its ExCache counters, and where its
// memory is (every memory node it uses, lost or not, with the vRegions each holds; its
// replicas; its re-replication), in a small shared file that lego-stat, and lego-run for its
// re-replication lines (runtime/launcher/rereplication.h), read while the process runs (the
// "stats" report of launch_contract.h comes only at exit).
//
// The page is the file "stats.PID.START" in the run directory (launch::kStatsFilePrefix;
// PID and START as in the space files: pid reuse cannot fool a reader), one 4 KiB page,
// mapped shared by its process. A runtime thread of that process sums the ExCache's
// per-thread counters (ExCache::stats(), lock-free) into it every kPublishInterval: the
// miss path itself makes no syscall and touches no shared page for it. The page appears
// whole (written under a '.' name, then renamed); the process removes it at exit, and a
// reader removes the page of a process that is gone (killed, say) as stale.
//
// Layout (StatsPage below), versioned: kMagic, kVersion, and the number and a hash of the
// field names of excache.h's counter list (LEGO_EXCACHE_COUNTERS, _GAUGES) in the order
// the values are stored. A reader refuses a page whose layout is not its own ("written by
// another version of lego") rather than misreading it. The values are written under a
// sequence lock (odd while the writer is between its two increments): a reader copies
// them and retries when the sequence moved.
//
// Thread-safety: a StatsPublisher is used by one thread (publish); remove() may be
// called from another once publishing has stopped or the process is ending (the mapping
// stays valid: only the name goes). read_stats_pages() is callable from any thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lego/excache.h"
#include "lego/status.h"

namespace lego::launch {

inline constexpr uint32_t kStatsPageMagic = 0x5453474c;  // "LGST"
// 2: the memory nodes of the process (all of them, not only the first) and its placement.
inline constexpr uint32_t kStatsPageVersion = 2;
// How often a process's counters reach its page: a reader's rates are this precise.
inline constexpr std::chrono::milliseconds kPublishInterval{250};
inline constexpr size_t kStatsPageFields = std::size(kExCacheStatsFields);
// Memory nodes a page names (a process may use more: node_count says how many).
inline constexpr size_t kStatsPageNodes = 16;

// One memory node of the process, as its runtime sees it.
struct StatsPageNode {
  uint32_t id;
  uint32_t lost;      // 1: the process found it lost (it is never used again)
  uint32_t vregions;  // vRegions with a full copy there
  uint32_t copying;   // vRegions being copied there (re-replication)
  char address[48];   // address:port, NUL-terminated
};
static_assert(sizeof(StatsPageNode) == 64);

// Where the process's memory is: its memory nodes and its re-replication (cluster_backend.h).
struct ClusterSample {
  struct Node {
    uint32_t id = 0;
    bool lost = false;
    uint32_t vregions = 0, copying = 0;
    std::string address;
  };
  uint32_t replicas = 0;                // copies of every vRegion
  uint64_t vregions_placed = 0;         // placed now
  uint64_t vregions_degraded = 0;       // placed now with a copy on a lost node: to re-replicate
  uint64_t vregions_rereplicated = 0;   // given a new copy after a loss, since the start
  uint64_t bytes_copied = 0;            // by re-replication, since the start
  uint64_t rereplication_start_ns = 0;  // CLOCK_MONOTONIC of the first one (0: none)
  uint32_t node_count = 0;              // all of them; `nodes` holds at most kStatsPageNodes
  std::vector<Node> nodes;              // by id
};

struct StatsPage {
  uint32_t magic;
  uint32_t version;
  uint32_t fields;       // kStatsPageFields of the writer
  uint32_t buckets;      // ExCacheStats::kLatencyBuckets of the writer
  uint64_t fields_hash;  // stats_fields_hash() of the writer
  int32_t pid;
  uint32_t memory_node;       // the node holding the process's space (and its fork snapshots)
  uint64_t start;             // /proc/PID/stat starttime
  char program[64];           // NUL-terminated
  char memory_address[64];    // the memory node's address:port in the cluster file
  uint32_t kernel_module;     // 1 when the ExCache uses lego_pcache.ko
  uint32_t interval_ms;       // the writer's publishing period
  std::atomic<uint64_t> seq;  // sequence lock: odd while the writer updates
  uint64_t published_ns;      // CLOCK_MONOTONIC of the last publish (0: never)
  uint64_t values[kStatsPageFields];                // kExCacheStatsFields order
  uint64_t latency[ExCacheStats::kLatencyBuckets];  // miss_latency_log2_ns
  // Version 2: ClusterSample's fields, under the same sequence lock.
  uint32_t replicas;
  uint32_t node_count;
  uint64_t vregions_placed;
  uint64_t vregions_degraded;
  uint64_t vregions_rereplicated;
  uint64_t bytes_copied;
  uint64_t rereplication_start_ns;
  StatsPageNode nodes[kStatsPageNodes];
};
static_assert(sizeof(StatsPage) <= 4096, "one page");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared between processes");

// FNV-1a over the field names of kExCacheStatsFields in order, each ended by a NUL.
uint64_t stats_fields_hash();

// "stats.PID.START" / its parse (false when `name` is not one).
std::string stats_file_name(pid_t pid, uint64_t start);
bool parse_stats_file_name(const char* name, pid_t* pid, uint64_t* start);

// The writer, in the runtime of a process.
class StatsPublisher {
 public:
  // Creates the page in `run_dir` for this process (pid, start) and maps it. EIO-class
  // errors name the path; the process runs on without a page (lego-stat does not list it).
  static Result<std::unique_ptr<StatsPublisher>> create(const std::string& run_dir, pid_t pid,
                                                        uint64_t start, const std::string& program,
                                                        uint32_t memory_node,
                                                        const std::string& memory_address);
  ~StatsPublisher();  // unmaps; the file stays unless remove() was called
  // Copies `stats` and `cluster` into the page. No allocation, no syscall but
  // clock_gettime (vDSO).
  void publish(const ExCacheStats& stats, bool kernel_module, const ClusterSample& cluster);
  // Removes the page's name: the process is ending.
  void remove();

 private:
  StatsPublisher(std::string path, StatsPage* page) : path_(std::move(path)), page_(page) {}
  std::string path_;
  StatsPage* page_;
};

// A page as a reader found it.
struct StatsSample {
  std::string path;
  pid_t pid = 0;
  uint64_t start = 0;
  std::string program;
  uint32_t memory_node = 0;
  std::string memory_address;
  bool kernel_module = false;
  uint64_t published_ns = 0;  // CLOCK_MONOTONIC
  ExCacheStats stats;         // p50/p99 recomputed from the histogram
  ClusterSample cluster;      // every memory node, replicas, re-replication
};

// Every live page under `tmp_dir`'s run directories (launch::kRunDirPrefix's folder,
// "/tmp" by default), or only under `run_dir` when not empty (lego-run, its own run's):
// one sample per process, by pid. Pages of processes that are gone
// are removed (when this process may) and skipped; a page of another layout is skipped
// and named in *problems (when not null), as is a page that cannot be read.
std::vector<StatsSample> read_stats_pages(std::vector<std::string>* problems = nullptr,
                                          const std::string& tmp_dir = "/tmp",
                                          const std::string& run_dir = "");

// The bucket upper bound holding the `per_mille`th miss of a log2 latency histogram (0
// when empty): ExCacheStats's own percentile rule, for a histogram of differences.
uint64_t latency_percentile_ns(const uint64_t* buckets, size_t n, uint64_t per_mille);

}  // namespace lego::launch
