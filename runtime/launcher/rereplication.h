// lego-run's view of re-replication: after a memory node is lost, a process with
// --replicas 2 or more goes on from its other copies while its runtime copies every vRegion
// that lost one to another node (runtime/preload/cluster_backend.h). That can take a while
// for a large heap, and until it is done the process has fewer copies than it asked for:
// lego-run says so on its stderr, whether or not --stats was given. It reads the stats page
// each process of the run publishes (runtime/stats_page.h) and shows, per process,
//   lego-run: [1] python3 (pid 812): re-replicating 40 vRegions after losing memory node 2
//             (10.1.2.3:18602)  35% 0:04
// redrawn in place on a terminal, or as plain lines (one every 10 s at most) elsewhere
// (include/lego/progress.h), then one line when its memory has all its copies again:
//   lego-run: python3 (pid 812): 40 vRegions have 2 copies again (640 MiB copied, 8.2 s)
//
// Thread-safety: one thread (lego-run's wait loop).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>

#include "lego/progress.h"

namespace lego::launch {

class RereplicationWatch {
 public:
  // Every `period` at most, poll() reads the pages under `run_dir`; output to `fd`.
  explicit RereplicationWatch(std::string run_dir, int fd = 2,
                              std::chrono::milliseconds period = std::chrono::milliseconds(500));
  ~RereplicationWatch();
  // Reads the pages when `period` has passed since the last read; prints what changed.
  void poll();
  // Ends a progress line left open (the run is over): "... (stopped at 12 of 40)".
  void finish();

 private:
  // A process's re-replication counters when it was last seen with all its copies: a
  // re-replication that began and ended between two looks still shows as their growth.
  struct Seen {
    uint64_t rereplicated = 0, bytes = 0;
    std::set<uint32_t> lost;  // memory nodes already named in a line
  };
  struct Track {
    std::string program;
    Seen at_start;
    std::chrono::steady_clock::time_point since;
    uint64_t last_done = 0, last_total = 0;
  };
  const std::string run_dir_;
  const int fd_;
  const std::chrono::milliseconds period_;
  std::chrono::steady_clock::time_point next_{};
  std::unique_ptr<Progress> progress_;                  // made at the first re-replication
  std::map<std::pair<pid_t, uint64_t>, Seen> seen_;     // (pid, start) of every process
  std::map<std::pair<pid_t, uint64_t>, Track> tracks_;  // of those re-replicating
};

}  // namespace lego::launch
