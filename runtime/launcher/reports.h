// What the run's processes tell lego-run through the run directory's report FIFO
// (runtime/launch_contract.h: "stats", "lost", "error" lines), and lego-run --stats.
//
// Thread-safety: one thread (lego-run's main loop).
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace lego::launch {

class Reports {
 public:
  // Takes `len` bytes read from the FIFO (lines may arrive in pieces). `program` is
  // PROGRAM's pid: an "error" from it means the runtime could not start in PROGRAM itself.
  // An "error" is printed on stderr at once, as the process that failed would have.
  void feed(const char* data, size_t len, pid_t program);

  // One "stats" block per process that reported, in arrival order.
  const std::vector<std::string>& stats() const { return stats_; }
  // The first "lost" message ("" when none).
  const std::string& lost() const { return lost_; }
  bool program_error() const { return program_error_; }

 private:
  void line(const std::string& l, pid_t program);
  std::string partial_;  // text after the last complete line
  bool in_stats_ = false;
  std::string block_;
  std::vector<std::string> stats_;
  std::string lost_;
  bool program_error_ = false;
};

// lego-run --stats: one process's "stats" block on stderr, every counter and gauge of
// LEGO_EXCACHE_COUNTERS / _GAUGES by name, then bytes moved, miss-latency percentiles
// and the histogram with each bucket's share of misses and of the time spent in misses.
void print_stats(const std::string& block);
// After the blocks, when more than one process reported (PROGRAM and its forked children,
// each a lego process with an ExCache of its own: runtime/excache/fork.cc): one line per
// process with its main counters, and their sum.
void print_stats_summary(const std::vector<std::string>& blocks);

}  // namespace lego::launch
