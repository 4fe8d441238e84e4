// lego-bench's parts (lego_bench.cc has the overview and main):
//   workers.cc      the workloads themselves, run in child processes (--worker,
//                   --file-worker): the same code under every system
//   peers.cc        running a worker, and the zram peer's swap device and cgroup
//   files.cc        the file workloads' systems and table
//   miss_floors.cc  what a miss cannot cost less than on this host
//   cluster.cc      the cluster rows: replication's cost, failover, re-replication
//   programs.cc     unmodified programs from Debian packages (--only programs)
// Internal to lego-bench.
#pragma once

#include <sys/types.h>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "lego/progress.h"
#include "lego/status.h"

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
  std::string err;    // its stderr, when run() was asked to keep it
  int oom_kills = 0;  // the zram peer's runs the kernel OOM-killed (all of them if oom)
  // CPU seconds of the run and every descendant it waited for (wait4's rusage).
  double cpu_user_s = 0, cpu_sys_s = 0;
};

// This program's path.
std::string self_path();
// Runs argv, optionally first joining a memory cgroup (its tasks file); parses
// "us_per_access" unless `key` is null (then the caller parses o.text). `keep_stderr`:
// the run's stderr goes to o.err instead of ours (lego-run --stats).
Outcome run(const std::vector<std::string>& argv, const std::string& cgroup_tasks,
            const char* key = "us_per_access ", bool keep_stderr = false);

// "  NAME   VALUE" in lego-run --stats output: VALUE, or -1.
double stat_value(const std::string& text, const std::string& name);

// lego-run: $LEGO_RUN, else beside this program (bazel-bin/runtime/lego-run); dies when
// it is not there.
std::string find_lego_run(const std::string& self);

// A memory cgroup (v1) of this run, /sys/fs/cgroup/memory/lego-bench-<pid>[-tag], removed
// on destruction (it must be empty by then: every process that joined it has exited).
class MemoryCgroup {
 public:
  ~MemoryCgroup() { remove(); }
  // Creates it, capped at `cap` bytes unless cap is 0. "" or what failed.
  std::string create(const std::string& tag, uint64_t cap);
  // Its tasks file: a process writes its pid there to join.
  std::string tasks() const { return path_ + "/tasks"; }
  // A memory.stat field in bytes (e.g. "rss": anonymous memory), 0 when absent.
  uint64_t stat(const char* key) const;
  // Kernel memory charged to it now (memory.kmem.usage_in_bytes: page tables, slab,
  // kernel stacks, socket buffers), 0 when unreadable.
  uint64_t kernel_bytes() const;
  // How many processes the kernel's OOM killer killed in it (memory.oom_control).
  int oom_kills() const;
  void remove();

 private:
  std::string path_;
};

// A fresh zram swap device and a memory cgroup capped at `cap`, removed on destruction.
class ZramSwap {
 public:
  ~ZramSwap() { teardown(); }
  // "" or what failed.
  std::string setup(uint64_t cap);
  std::string tasks() const { return cg_.tasks(); }
  const MemoryCgroup& cgroup() const { return cg_; }
  void teardown();

 private:
  int dev_ = -1;
  bool swapped_ = false;
  MemoryCgroup cg_;
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
  // lego rows: the eviction policy (lego-run --policy) and the loop's misses per access
  // (--stats fetches / accesses: after the heap's fill every line is backed, so every miss
  // of the loop is a fetch); -1 elsewhere.
  std::string policy;
  double misses_per_access = -1;
  // lego rows: lego-run --rma (auto, on, off), the median miss latency's bucket bound (µs,
  // from --stats' miss_latency p50) and the lines fetched one-sided (--stats rma_lines).
  std::string rma;
  double miss_p50_us = -1;
  double rma_lines = -1;
  // --rma auto rows: its last averages of a one-line fetch from the first memory node, by
  // request and one-sided (--stats rma_request_ns, rma_one_sided_ns; µs, -1: none).
  double auto_request_us = -1, auto_one_sided_us = -1;
  long accesses = 0;  // the run's --accesses
  // lego_config rows: other processor clients loading the memory node meanwhile
  // (--memd-busy; 0: the node served this run alone).
  int busy = 0;
};
// "lego_tcp/handler" for a lego row ("lego_tcp/handler/refault" beside another policy than
// fifo, ".../rma_on" or ".../rma_off" for a row with --rma on or off, ".../busy2" under
// --memd-busy 2), else the system's name.
std::string system_label(const MemoryRow& r);
// µs per access of `system` on r's workload, fraction and threads, or 0 when it did not run
// or failed.
double peer_us(const std::vector<MemoryRow>& rows, const MemoryRow& r, const char* system);
// µs per access of r's configuration (system, delivery, policy, --rma, --memd-busy) on its
// workload and fraction at one thread, or 0 when it did not run or failed: the base of
// random_mt's "vs 1" figures.
double one_thread_us(const std::vector<MemoryRow>& rows, const MemoryRow& r);
// That row itself (nullptr when it did not run or failed).
const MemoryRow* one_thread_row(const std::vector<MemoryRow>& rows, const MemoryRow& r);
// r's twin under lego-run --delivery `d` (the same workload, fraction, threads, system,
// policy, --rma and --memd-busy), or null when it did not run or failed.
const MemoryRow* delivery_twin(const std::vector<MemoryRow>& rows, const MemoryRow& r,
                               const std::string& d);

// ---- memd_busy.cc

// N processor clients loading the memory nodes of a cluster file while rows are measured
// (--memd-busy): each a lego-run --config --rma off of this program's random worker with a
// 1 MiB ExCache over an 8 MiB heap (7 accesses in 8 a fetch and a write-back), run until
// stopped. Stopped (SIGTERM, waited for) on destruction.
class BusyClients {
 public:
  ~BusyClients() { stop(); }
  // Starts n clients and waits until each has filled its heap (its worker creates the file
  // $LEGO_BENCH_READY names), at most 120 s. "" or what failed (a client that exited: its
  // status and last stderr line).
  std::string start(int n, const std::string& lego_run, const std::string& config,
                    const std::string& self);
  // "" while every client runs; else which one exited, and why.
  std::string check();
  // Stops them all; what check() said first (a client that died before its stop).
  std::string stop();

 private:
  struct Client {
    pid_t pid;
    int err;  // its stderr: an unlinked temp file
  };
  std::vector<Client> clients_;
};

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
                               const std::string& lego_run, Progress& progress);
void print_files(const FileOptions& fo, const std::vector<FileRow>& rows);

// ---- cluster.cc

struct ClusterOptions {
  int memory_nodes = 3;
  uint32_t replicas = 2;
  uint64_t cap = 64ull << 20;
  double fraction = 0.25;  // the random workload's local fraction
  long accesses = 200000;
  int runs = 3;  // replication's cost: runs of each, R=1 and R=R alternating
  std::vector<std::string> transports{"tcp", "shm"};
};

struct ClusterRow {
  std::string what;  // "replication" or "failover"
  std::string transport;
  int memory_nodes = 0;
  uint32_t replicas = 0;
  int run = 0;  // replication: which of --cluster-runs (1-based)
  Outcome o;
  // Failover, each from lego-bench's CLOCK_MONOTONIC time of the SIGKILL (-1: not seen):
  double detect_ms = -1;    // the runtime found the node lost (first_loss_ns)
  double failover_ms = -1;  // the first miss that met the lost node was done (first_failover_ns)
  double stall_ms = -1;     // the program's longest access that ended after the kill
  // Re-replication (the runtime's bytes_copied, and its first start and last end).
  double copied_mb = -1, copy_wall_ms = -1, copy_mb_s = -1;
  // The program's µs per access in the second before the kill, and while re-replication ran.
  double before_us = 0, during_us = 0;
};

// Replication's cost (each transport with 1 and with co.replicas copies), then, with 2 or
// more replicas, a run whose memory node is SIGKILLed mid-run.
std::vector<ClusterRow> run_cluster(const ClusterOptions& co, const std::string& self,
                                    const std::string& lego_run);
void print_cluster(const ClusterOptions& co, const std::vector<ClusterRow>& rows);
void write_cluster_csv(FILE* f, const ClusterOptions& co, const std::vector<ClusterRow>& rows);

// ---- programs.cc

struct ProgramOptions {
  std::vector<std::string> programs;  // empty: all
  std::vector<double> fractions{0.25, 0.5};
  std::vector<std::string> systems{"local", "zram_swap", "lego_tcp", "lego_shm"};
  // Each lego system once per policy ("lego_shm/fifo"); empty: once, lego-run's default.
  std::vector<std::string> policies;
  double size = 1.0;  // scales every program's input (--program-size)
  int oom_retries = 2;
  std::string corrupt;  // for tests: this system's runs get a perturbed input
  std::string csv;
  bool floors = true;  // print each lego run's floor (measure_program_floors) after the table
};
// The programs' names, for --programs.
extern const char* const kProgramNames[5];
// Runs the real programs under each system and prints their table (and writes
// opts.csv): 0, or 1 when a run failed or its output differed from local's.
int run_programs(const ProgramOptions& opts, const std::string& lego_run);

// ---- miss_floors.cc

// For each random or sequential row lego ran: the floor per access beside lego's figure
// and zram's, measured now.
void report_miss_floors(const std::vector<MemoryRow>& rows, uint64_t cap);

// What a real program's run under lego cannot cost less than on this host (--help: "Real
// programs"), measured now: per miss, the store miss a handler thread pinned to the
// faulting thread's CPU serves (the default delivery's cheapest hand-off: fault, read,
// UFFDIO_COPY, wake-up) plus the transport's one-line round trip; per eviction, a line's
// share of a 32-line zap.
struct ProgramFloors {
  Result<double> handler_miss_us = Status(ENODATA, "not measured");
  Result<double> zap_us = Status(ENODATA, "not measured");
  Result<double> tcp_rtt_us = Status(ENODATA, "not measured");
  Result<double> shm_rtt_us = Status(ENODATA, "not measured");
};
ProgramFloors measure_program_floors(bool tcp, bool shm);

// startup.cc: /bin/true alone, under lego-run's embedded default (tcp, shm) and with
// --config (tcp, shm) against a memory node already running; `runs` rounds side by side.
struct StartupRow {
  std::string system;  // local, lego_tcp, lego_shm, config_tcp, config_shm
  int runs = 0;        // successful runs (0: failed, see error)
  double median_ms = -1;
  std::vector<std::pair<std::string, double>> phases;  // median ms, LEGO_STARTUP_TRACE's
  std::string error;
};
std::vector<StartupRow> run_startup(const std::string& lego_run, int runs);
void print_startup(const std::vector<StartupRow>& rows);

}  // namespace lego::bench
