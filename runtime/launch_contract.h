// The launch contract between lego-run (runtime/launcher/) and the runtime it preloads
// into every program of a run (runtime/preload/): the environment, the run directory,
// the report lines and the exit statuses. Both sides include this header; nothing else
// defines these names or defaults, and the variables are read and written only by
// settings_from_environment() and export_settings() below.
//
// Environment (set by lego-run on PROGRAM; inherited by its descendants, and kept by
// those that close inherited descriptors, as python's subprocess does):
//   LEGO_CONFIG        the cluster file, an absolute path (a relative one would break in
//                      every process that ran after a cd). Unset: not under lego-run, and
//                      the preloaded library does nothing.
//   LEGO_NODE          this processor node's id
//   LEGO_MEMORY_NODE   0: the process places its memory over every memory node of the
//                      cluster file (or where its monitor says); N: on memory node N alone
//   LEGO_REPLICAS      copies of each vRegion (0 or unset: the cluster file's `replicas`)
//   LEGO_EXCACHE       local bytes for the ExCache (a size: "64M")
//   LEGO_REGION        the ExCache region's virtual size (optional; kDefaultRegionBytes)
//   LEGO_POLICY        fifo | clock
//   LEGO_PREFETCH      0..kMaxPrefetchLines
//   LEGO_DELIVERY      handler | sigbus
//   LEGO_PCACHE        auto | on | off
//   LEGO_RMA           auto | on | off: fetch lines by one-sided reads (auto: on verbs)
//   LEGO_FORK_CHILDREN own | parent (lego-run --fork-children)
//   LEGO_RUN_DIR       the run directory (below)
//
// The run directory, /tmp/lego-run-<lego-run's pid>/, mode 0700, owned by the user that
// runs lego-run and removed by it at the end (or, after a kill -9, by the next lego-run's
// sweep). It holds:
//   run                 written by lego-run before PROGRAM starts (RunInfo below): who
//                       the run is, so that a later lego-run can tell a dead run from a
//                       live one and free what it left.
//   report              a FIFO lego-run reads while the run lasts; a process opens it by
//                       name for each report, so one that closed its inherited descriptors
//                       still reports. Lines, each written with one write() of at most
//                       PIPE_BUF bytes (so writers never interleave):
//                         "stats pid PID program NAME\n" KEY VALUE lines "end\n"
//                                    the ExCache counters at exit (lego-run --stats):
//                                    every one of LEGO_EXCACHE_COUNTERS and _GAUGES,
//                                    and kernel_module, miss_p50_ns, miss_p99_ns and
//                                    miss_histogram ("BUCKET:COUNT,..." or "-"),
//                                    then the backend's counters (LEGO_CLUSTER_COUNTERS:
//                                    runtime/preload/cluster_backend.h)
//                         "lost MESSAGE\n"   a miss could not be served: the memory node
//                                            is lost; the process exits kExitMemoryLost
//                         "error PID MESSAGE\n"  the runtime could not start in process
//                                            PID (config unreadable, key refused, memory
//                                            node unreachable, ExCache invalid, module
//                                            missing); the process exits kExitLegoError
//                       With lego-run gone (no reader) lost and error go to stderr.
//   space.PID.START.ID  one per address space: process PID, whose start time in
//                       /proc/PID/stat is START (pid reuse cannot fool it), holds space ID
//                       on the memory node: its own, and each fork() snapshot it keeps for
//                       a child (removed when the snapshot is dropped). Contents: one space
//                       line (format_space_line). Written (under a name starting with '.',
//                       then renamed) right after the space is opened. lego-run closes
//                       (mem::kClose) the spaces of a process that is gone within ~100 ms
//                       and removes their files, and closes the rest at the end. A process
//                       that execs opens a new space under the same PID and START: the new
//                       image closes the old one's.
//   stats.PID.START     the live stats page of process PID (START as above): its ExCache
//                       counters, published by a runtime thread every few hundred ms and
//                       read by lego-stat (runtime/stats_page.h has the layout). Removed by
//                       the process at exit; a reader removes the page of a process that is
//                       gone.
//   cluster.toml, *.log (lego-run's own: the private cluster's file and daemon logs)
//
// Thread-safety: the functions below are pure (process_info reads /proc) and callable
// from any thread.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lego/excache.h"
#include "lego/memory_proto.h"
#include "lego/status.h"

namespace lego::launch {

// Defaults, for lego-run's flags and for a variable the runtime finds unset: the
// ExCache's own where it has one.
inline constexpr uint64_t kDefaultExcacheBytes = ExCacheOptions{}.capacity_bytes;
inline constexpr uint64_t kMinExcacheBytes = kExCacheMinLines * kExCacheLineBytes;
// Virtual only: costs no memory up front (excache.h, region_bytes). The ExCache cannot be
// larger than its region. Larger than the ExCache's own default (16 GiB): a program's heap
// may grow that far.
inline constexpr uint64_t kDefaultRegionBytes = uint64_t{64} << 30;
inline constexpr long kDefaultPrefetchLines = ExCacheOptions{}.prefetch_lines;
inline constexpr long kMaxPrefetchLines = LineBackend::kMaxFetchBatch - 1;
// The values LEGO_POLICY, LEGO_DELIVERY and LEGO_PCACHE take (lego-run's --policy,
// --delivery, --pcache), the default first except for the policy. The handler thread by
// default, unlike a bare ExCache: it serves faults taken inside system calls, which any
// program may make. The refault policy by default, unlike a bare ExCache (FIFO): real
// programs re-use lines, and refault is the one policy that sees it without an access bit;
// at 25% local it missed 16% less than FIFO in python3 and 27% less in sqlite3, and the same
// under uniform random access, for a load and a compare per miss (docs/measurements.md).
inline constexpr const char* kPolicies[] = {"fifo", "clock", "refault"};
inline constexpr const char* kDeliveries[] = {"handler", "sigbus"};
inline constexpr const char* kPcacheModes[] = {"auto", "on", "off"};
// LEGO_RMA (lego-run --rma), the default first.
inline constexpr const char* kRmaModes[] = {"auto", "on", "off"};
inline constexpr const char* kDefaultRma = kRmaModes[0];
inline constexpr const char* kDefaultPolicy = kPolicies[2];
inline constexpr const char* kDefaultDelivery = kDeliveries[0];
inline constexpr const char* kDefaultPcache = kPcacheModes[0];
// --fork-children: "own" (default), a forked child becomes a lego process of its own with
// its own ExCache (runtime/excache/fork.cc, "Adoption"); "parent", it stays served by its
// parent's ExCache from the fork snapshot (cheaper for children that exec at once; their
// new memory is local and not bounded).
inline constexpr const char* kForkModes[] = {"own", "parent"};
inline constexpr const char* kDefaultFork = kForkModes[0];

// What lego-run tells the runtime in every process of the run (the LEGO_* variables).
struct Settings {
  std::string config;  // LEGO_CONFIG, absolute
  uint32_t node = 0;
  uint32_t memory_node = 0;  // 0: every memory node of the file
  uint32_t replicas = 0;     // 0: the cluster file's
  uint64_t excache_bytes = kDefaultExcacheBytes;
  uint64_t region_bytes = kDefaultRegionBytes;
  std::string policy = kDefaultPolicy;
  long prefetch_lines = kDefaultPrefetchLines;
  std::string delivery = kDefaultDelivery;
  std::string pcache = kDefaultPcache;
  std::string rma = kDefaultRma;
  std::string fork_children = kDefaultFork;
  std::string run_dir;  // "" when there is none
};
// In PROGRAM's child, before exec: sets the variables (all but LEGO_REGION, which is
// left as the user's environment has it).
void export_settings(const Settings& settings);
// True when LEGO_CONFIG is set: this process runs under lego-run.
bool under_lego_run();
// LEGO_RUN_DIR alone ("" when unset): where to report even when another variable is bad.
std::string run_dir_from_environment();
// The settings of this process's run; unset variables give the defaults. EINVAL names a
// variable whose value is not one the contract allows.
Result<Settings> settings_from_environment();
// The ExCache options `settings` ask for (on_thread_start and on_fatal left unset).
ExCacheOptions excache_options(const Settings& settings);

// Exit statuses. lego-run's own are 125..127 (like env(1) and docker run); PROGRAM's
// status otherwise passes through, 69 included: only a "lost" report (or the private
// memory node's death) makes lego-run say a memory node was lost.
inline constexpr int kExitMemoryLost = 69;  // EX_UNAVAILABLE
inline constexpr int kExitLegoError = 125;  // lego-run, or the runtime, failed itself
inline constexpr int kExitCannotExec = 126;
inline constexpr int kExitNotFound = 127;

// The run directory's parts.
inline constexpr char kRunDirPrefix[] = "/tmp/lego-run-";
inline constexpr char kRunFile[] = "run";
inline constexpr char kReportFifo[] = "report";
inline constexpr char kSpaceFilePrefix[] = "space.";
inline constexpr char kStatsFilePrefix[] = "stats.";

// "/tmp/lego-run-PID".
std::string run_dir_for(pid_t lego_run_pid);

// The run file: one "key value" line each.
struct RunInfo {
  pid_t pid = 0;       // lego-run's
  uint64_t start = 0;  // lego-run's start time (process_info)
  std::string config;  // the cluster file, absolute
  uint32_t node = 0;   // the processor node the run's processes speak as
  uint32_t memory_node = 0;
  bool private_memory = false;  // lego-run's own lego-memd: it dies with lego-run
};
std::string format_run_info(const RunInfo& info);
// False when a field is missing or malformed.
bool parse_run_info(const std::string& text, RunInfo* info);

// The formatters write into buf (cap bytes) and allocate nothing: the runtime registers
// spaces where it must not allocate (a fork's snapshot is taken under the eviction lock).
// They return the length, or -1 when it does not fit.

// "space NODE ID SECRET\n" (SECRET: 32 hex digits).
int format_space_line(char* buf, size_t cap, uint32_t node, const mem::SpaceHandle& handle);
bool parse_space_line(const std::string& line, uint32_t* node, mem::SpaceHandle* handle);

// "space.PID.START.ID".
int format_space_file_name(char* buf, size_t cap, pid_t pid, uint64_t start, uint64_t id);
bool parse_space_file_name(const char* name, pid_t* pid, uint64_t* start, uint64_t* id);

// The "stats" report: the counters of process `pid` running `program` at exit, whole,
// within PIPE_BUF (one write) into buf. Returns the length, or -1 when it does not fit.
// `extra`: the backend's counters, by name, after the ExCache's.
struct StatsValue {
  const char* name;
  uint64_t value;
};
int format_stats_report(char* buf, size_t cap, pid_t pid, const char* program,
                        const ExCacheStats& stats, bool kernel_module,
                        const StatsValue* extra = nullptr, size_t extra_count = 0);
// A "stats" report as lego-run reads it: the first line's text after "stats " ("pid 12
// program python3"), and each KEY VALUE line.
struct StatsReport {
  std::string head;
  std::vector<std::pair<std::string, std::string>> values;
  // The value of `key` as a number (0 when missing or not a number).
  uint64_t number(const std::string& key) const;
  // The value of `key` ("" when missing).
  std::string text(const std::string& key) const;
};
// `block`: the report's lines after "stats " up to, not including, "end".
StatsReport parse_stats_report(const std::string& block);

// A process as /proc/PID/stat shows it.
struct ProcessInfo {
  bool exists = false;
  char state = '?';    // R, S, D, Z, ...
  long threads = 0;    // num_threads
  uint64_t start = 0;  // starttime, clock ticks after boot: with the pid, unique
};
ProcessInfo process_info(pid_t pid);
// True when process `pid` that started at `start` has ended: no such pid, another
// process under it (pid reuse), or a zombie with no thread left (a zombie leader whose
// other threads still run is alive).
bool process_gone(pid_t pid, uint64_t start);

}  // namespace lego::launch
