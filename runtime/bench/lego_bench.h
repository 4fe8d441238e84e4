// lego-bench's parts (lego_bench.cc has the overview and main):
//   workers.cc      the workloads themselves, run in child processes (--worker,
//                   --file-worker): the same code under every system
//   peers.cc        running a worker, and the zram peer's swap device and cgroup
//   files.cc        the file workloads' systems and table
//   miss_floors.cc  what a miss cannot cost less than on this host
// Internal to lego-bench.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lego::bench {

constexpr size_t kPage = 4096;

// "lego-bench: m" on stderr, exit 2.
[[noreturn]] void die(const std::string& m);

// ---- workers.cc

// Runs one memory workload in this process (random_mt with `threads` threads) and prints
// "us_per_access <x>" and "cpu_us_per_access <program user> <program kernel> <memory
// node>" (CPU of the timed part; the memory node's -1 when not under lego-run).
int worker(const std::string& workload, size_t heap_bytes, long accesses, int threads);
// 1 MiB: the file workloads' I/O size.
constexpr size_t kFileChunk = 1 << 20;
// Runs the file workloads in order on DIR/lego-bench.dat and prints "<workload> <figure>"
// per workload: MB/s for seq_*, µs per read for rand_read_4k. The same code runs on local
// disk and, under lego-run, on /lego.
int file_worker(const std::string& dir, uint64_t size, long rand_reads,
                const std::vector<std::string>& workloads);

// ---- peers.cc

struct Outcome {
  bool ok = false;
  bool oom = false;
  double us = 0;
  std::string error;
  std::string text;   // the program's stdout
  int oom_kills = 0;  // the zram peer's runs the kernel OOM-killed (all of them if oom)
};

// This program's path.
std::string self_path();
// Runs argv, optionally first joining a memory cgroup (its tasks file); parses
// "us_per_access" unless `key` is null (then the caller parses o.text).
Outcome run(const std::vector<std::string>& argv, const std::string& cgroup_tasks,
            const char* key = "us_per_access ");

// A fresh zram swap device and a memory cgroup capped at `cap`, removed on destruction.
class ZramSwap {
 public:
  ~ZramSwap() { teardown(); }
  // "" or what failed.
  std::string setup(uint64_t cap);
  std::string tasks() const { return cg_ + "/tasks"; }
  void teardown();

 private:
  int dev_ = -1;
  bool swapped_ = false;
  std::string cg_;
};

// One memory workload under one system.
struct MemoryRow {
  std::string workload, system;
  double fraction;
  int threads;
  Outcome o;
  std::string delivery;  // lego_*: lego-run --delivery (handler or sigbus); else empty
  // CPU µs per access of the timed part: the program in user mode, in the kernel, and the
  // memory node (-1: not measured).
  double cpu_user = -1, cpu_kernel = -1, cpu_memd = -1;
};
// "lego_tcp/handler" for a lego row, else the system's name.
std::string system_label(const MemoryRow& r);
// µs per access of `system` on r's workload, fraction and threads, or 0 when it did not run
// or failed.
double peer_us(const std::vector<MemoryRow>& rows, const MemoryRow& r, const char* system);

// ---- files.cc

struct FileOptions {
  std::vector<std::string> workloads{"seq_write", "seq_read", "rand_read_4k"};
  std::vector<std::string> systems{"local", "lego", "tcp_floor"};
  uint64_t size = 1ull << 30;
  long rand_reads = 20000;
  std::string dir = "/var/tmp";
};

struct FileRow {
  std::string workload, system;
  bool ok = false;
  double figure = 0;  // MB/s for seq_*, µs per read for rand_read_4k
  std::string error;
};

// Each file system of fo on fo's workloads: rows in order. `self` runs the workers,
// `lego_run` the lego system.
std::vector<FileRow> run_files(const FileOptions& fo, const std::string& self,
                               const std::string& lego_run);
void print_files(const FileOptions& fo, const std::vector<FileRow>& rows);

// ---- miss_floors.cc

// For each random or sequential row lego ran: the floor per access beside lego's figure
// and zram's, measured now.
void report_miss_floors(const std::vector<MemoryRow>& rows, uint64_t cap);

}  // namespace lego::bench
