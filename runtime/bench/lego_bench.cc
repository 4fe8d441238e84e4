// lego-bench: the ExCache against its peers, side by side in one run.
//
// Each workload runs, with the same heap and the same local-memory cap, under:
//   local      all-local memory, no cap;
//   zram_swap  Linux swap on a fresh zram device, the workload alone in a memory cgroup
//              capped at the ExCache size (NOTES.md's recipe; set up and torn down here);
//   lego_tcp   lego-run, private memory node in another network namespace over tcp;
//   lego_shm   lego-run, private memory node over shm on this host.
// Heaps are filled with incompressible data (zeros flatter zram). A run the kernel
// OOM-kills is reported as such, never averaged in; the zram peer is then run again, up to
// --oom-retries times, and its row says how many of its runs were killed. Prints µs per
// access and ratios to
// local and to zram_swap; --csv writes workload,local_fraction,threads,system,us_per_access.
// Then the miss floors: what random and sequential misses cannot cost less than here with
// userfaultfd and the transport alone (fault_floor.h, libfit/bench/floors.h; --help).
//
// File workloads (sequential write, sequential read, random 4 KiB reads of one large
// file) run under:
//   local      a temp directory on this host's file system (fsync after writes, page
//              cache dropped before reads);
//   lego       lego-run --export: a private lego-stord in its own network namespace over
//              tcp, mounted at /lego by lego-fs; this program itself, in its --file-worker
//              mode, does the I/O there, the same code as for local;
//   tcp_floor  the transport alone: a busy-polled TCP stream of the same bytes between
//              two network namespaces (MB/s), and a 4 KiB request/response round trip.
// --csv appends rows file_workload,system,mb_per_s_or_us.
#include <fcntl.h>
#include <getopt.h>
#include <sched.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lego/units.h"
#include "libfit/bench/floors.h"
#include "runtime/bench/fault_floor.h"
#include "tests/netns/netns.h"

using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kPage = 4096;

const char* kUsage = R"(usage: lego-bench [options]

Memory workloads: each runs under all-local memory, Linux swap on zram capped to the
ExCache size, and lego-run over tcp and shm; µs per access and ratios.
File workloads: each runs on local disk, through the lego mount, and as the bare TCP
transport floor; MB/s or µs per read, and the ratios lego/local and lego/floor.

options:
  --only KIND          memory or files: run only that kind (default: both)
  --cap SIZE           local memory: ExCache size and cgroup cap (default 64M)
  --fractions LIST     local fraction(s) of the heap (default 0.25,0.5: heap 4x and 2x cap)
  --workloads LIST     memory workloads: random,sequential,zipf,random_mt (default: all)
  --systems LIST       for memory: local,zram_swap,lego_tcp,lego_shm (default: all)
  --accesses N         accesses per memory run (default 200000)
  --oom-retries N      run the zram peer again, up to N times, when the kernel OOM-kills
                       it (default 2); the table says how many of its runs were killed
  --no-floors          skip the miss floors printed after the memory table (below)
  --file-workloads LIST  seq_write,seq_read,rand_read_4k (default: all)
  --file-systems LIST  local,lego,tcp_floor (default: all)
  --file-size SIZE     the file's size (default 1G; e.g. 256M)
  --rand-reads N       4 KiB reads at random aligned offsets (default 20000)
  --file-dir DIR       where the temp directories for local and for the storage node's
                       export are made (default /var/tmp: this host's disk)
  --csv FILE           rows: workload,local_fraction,threads,system,us_per_access; then
                       file_workload,system,mb_per_s_or_us
  --help               this text

What the file workloads measure. One file of --file-size, written and read in 1 MiB
write()/read() calls from a static buffer; rand_read_4k is pread() of 4 KiB at random
aligned offsets with POSIX_FADV_RANDOM (µs per read). seq_write's time includes the
final fsync (data on the disk). Before each read workload the page cache is dropped
(sync; echo 3 > /proc/sys/vm/drop_caches: all of this host's clean cache, the lego
mount's and the storage node's included), so reads come from the disk in both cases.
local: a temp directory under --file-dir. lego: lego-run --export (a private lego-stord
in its own network namespace over tcp, serving another temp directory under --file-dir
on the same disk) runs `lego-bench --file-worker` on /lego: the same code as local.
tcp_floor: a busy-polled TCP stream of --file-size bytes between two network namespaces
(1 MiB sends; client->server for seq_write, server->client for seq_read), and a 4 KiB
request/response round trip (both sides busy-polling) for rand_read_4k: no disk, no FUSE.

Miss floors. When the random or sequential workload runs under lego, the table is
followed by what its misses cannot cost less than on this host with userfaultfd,
measured in the same run (no memory node work, no copies of lego's own):
  random: one store miss (fault, SIGBUS, a handler mapping 4 KiB with UFFDIO_COPY,
  sigreturn), a line's share of a 32-line process_madvise(MADV_DONTNEED) zap, and one
  round trip: for tcp a busy-polled socket exchanging a fetch's 72-byte request and
  4128-byte reply over a veth pair into another namespace (as lego-run's link), for shm
  libfabric's fi_pingpong -p shm with 4096 bytes each way. An access misses with
  probability 1 - local fraction: the floor per access is that times the sum.
  sequential: every access misses; per line, its share of a fault whose handler maps a
  32-line window with one UFFDIO_COPY, of one madvise zapping a window, and 1.5 times
  its share of moving a window (in for both passes, out for the written half): tcp a
  32-line fetch's round trip, shm half of fi_pingpong's 128 KiB round trip.
"vs zram" is the floor's ratio to swap on zram, "lego/floor" lego's to the floor.

Needs root (zram, cgroups, network namespaces). lego-run is looked up beside this
program (bazel-bin/runtime/lego-run) or through $LEGO_RUN.
)";

[[noreturn]] void die(const std::string& m) {
  fprintf(stderr, "lego-bench: %s\n", m.c_str());
  exit(2);
}

// ---------------------------------------------------------------- the worker

// Zipf(s) over n items by inverting a precomputed CDF (n is at most a few 100k pages).
class Zipf {
 public:
  Zipf(size_t n, double s) : cdf_(n) {
    double sum = 0;
    for (size_t i = 0; i < n; i++) cdf_[i] = (sum += 1.0 / std::pow(double(i + 1), s));
    for (auto& c : cdf_) c /= sum;
  }
  size_t operator()(std::mt19937_64& rng) const {
    double u = std::uniform_real_distribution<double>(0, 1)(rng);
    return std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin();
  }

 private:
  std::vector<double> cdf_;
};

// Runs one workload in this process and prints "us_per_access <x>".
int worker(const std::string& workload, size_t heap_bytes, long accesses) {
  size_t pages = heap_bytes / kPage;
  auto* heap = static_cast<uint64_t*>(malloc(pages * kPage));
  if (heap == nullptr) {
    fprintf(stderr, "worker: cannot allocate %zu bytes\n", heap_bytes);
    return 3;
  }
  // Incompressible fill.
  std::mt19937_64 fill(42);
  for (size_t i = 0; i < pages * kPage / 8; i++) heap[i] = fill();
  const size_t words_per_page = kPage / 8;
  std::unique_ptr<Zipf> zipf;
  if (workload == "zipf") zipf = std::make_unique<Zipf>(pages, 0.99);
  int threads = workload == "random_mt" ? 2 : 1;
  std::atomic<uint64_t> sink{0};
  auto t0 = Clock::now();
  long done = 0;
  if (workload == "sequential") {
    uint64_t acc = 0;
    long passes = std::max(1L, accesses / long(2 * pages));
    for (long p = 0; p < passes; p++) {
      for (size_t i = 0; i < pages; i++) acc += heap[i * words_per_page];
      for (size_t i = 0; i < pages; i++) heap[i * words_per_page] += 1;
      done += 2 * pages;
    }
    sink += acc;
  } else {
    auto run = [&](int t) {
      std::mt19937_64 rng(7 + t);
      for (long n = 0; n < accesses / threads; n++) {
        size_t page = zipf ? (*zipf)(rng) : rng() % pages;
        heap[page * words_per_page + (n & 7)] += 1;  // read-modify-write
      }
    };
    // One thread is the process's own: a single-threaded workload is a single-threaded
    // process, as a real one would be (and as the ExCache sees it: see runtime/excache/evict.cc).
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; t++) pool.emplace_back(run, t);
    run(0);
    for (auto& th : pool) th.join();
    done = accesses / threads * threads;
  }
  double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  printf("us_per_access %.4f\n", us / done);
  fflush(stdout);
  return sink == 1 ? 1 : 0;
}

// ---------------------------------------------------------------- the file worker

constexpr size_t kFileChunk = 1 << 20;
// Static, not heap: under lego-run the heap lives on the memory node, and the file
// workloads should measure the files alone.
alignas(4096) char file_buf[kFileChunk];

// sync, then drop this host's clean page cache (the lego mount's and the storage node's
// included), so reads come from the disk.
bool drop_caches() {
  sync();
  int fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = write(fd, "3", 1) == 1;
  close(fd);
  return ok;
}

// Writes `size` bytes of incompressible data to path in 1 MiB writes, then fsyncs.
// Returns MB/s, or a negative number after printing what failed.
double write_file_data(const std::string& path, uint64_t size) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    fprintf(stderr, "file-worker: open %s: %s\n", path.c_str(), strerror(errno));
    return -1;
  }
  std::mt19937_64 fill(42);
  auto* words = reinterpret_cast<uint64_t*>(file_buf);
  for (size_t i = 0; i < kFileChunk / 8; i++) words[i] = fill();
  auto t0 = Clock::now();
  for (uint64_t done = 0; done < size;) {
    words[0] = done;  // every chunk differs
    size_t n = static_cast<size_t>(std::min<uint64_t>(kFileChunk, size - done));
    ssize_t w = write(fd, file_buf, n);
    if (w <= 0) {
      fprintf(stderr, "file-worker: write %s: %s\n", path.c_str(), strerror(errno));
      close(fd);
      return -1;
    }
    done += static_cast<uint64_t>(w);
  }
  if (fsync(fd) != 0) {
    fprintf(stderr, "file-worker: fsync %s: %s\n", path.c_str(), strerror(errno));
    close(fd);
    return -1;
  }
  double s = std::chrono::duration<double>(Clock::now() - t0).count();
  close(fd);
  return static_cast<double>(size) / 1e6 / s;
}

// Runs the file workloads in order on DIR/lego-bench.dat and prints "<workload> <figure>"
// per workload: MB/s for seq_*, µs per read for rand_read_4k. The same code runs on local
// disk and, under lego-run, on /lego.
int file_worker(const std::string& dir, uint64_t size, long rand_reads,
                const std::vector<std::string>& workloads) {
  std::string path = dir + "/lego-bench.dat";
  bool written = false;
  for (auto& w : workloads) {
    double figure = 0;
    if (w == "seq_write") {
      figure = write_file_data(path, size);
      if (figure < 0) return 3;
      written = true;
    } else if (w == "seq_read" || w == "rand_read_4k") {
      struct stat st;
      if (!written && (stat(path.c_str(), &st) != 0 || static_cast<uint64_t>(st.st_size) != size)) {
        if (write_file_data(path, size) < 0) return 3;  // untimed: the file to read
        written = true;
      }
      if (!drop_caches()) {
        fprintf(stderr, "file-worker: cannot drop the page cache (root?): %s\n", strerror(errno));
        return 3;
      }
      int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        fprintf(stderr, "file-worker: open %s: %s\n", path.c_str(), strerror(errno));
        return 3;
      }
      uint64_t sum = 0;
      auto t0 = Clock::now();
      if (w == "seq_read") {
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        uint64_t done = 0;
        for (ssize_t r; (r = read(fd, file_buf, kFileChunk)) != 0;
             done += static_cast<uint64_t>(r)) {
          if (r < 0) {
            fprintf(stderr, "file-worker: read %s: %s\n", path.c_str(), strerror(errno));
            close(fd);
            return 3;
          }
          sum += static_cast<unsigned char>(file_buf[0]);
        }
        double s = std::chrono::duration<double>(Clock::now() - t0).count();
        if (done != size) {
          fprintf(stderr, "file-worker: read %llu of %llu bytes\n",
                  static_cast<unsigned long long>(done), static_cast<unsigned long long>(size));
          close(fd);
          return 3;
        }
        figure = static_cast<double>(size) / 1e6 / s;
      } else {
        posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
        std::mt19937_64 rng(11);
        uint64_t pages = std::max<uint64_t>(1, size / kPage);
        for (long i = 0; i < rand_reads; i++) {
          off_t off = static_cast<off_t>(rng() % pages * kPage);
          if (pread(fd, file_buf, kPage, off) != static_cast<ssize_t>(kPage)) {
            fprintf(stderr, "file-worker: pread %s at %lld failed\n", path.c_str(),
                    static_cast<long long>(off));
            close(fd);
            return 3;
          }
          sum += static_cast<unsigned char>(file_buf[0]);
        }
        figure = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() /
                 static_cast<double>(std::max(1L, rand_reads));
      }
      close(fd);
      if (sum == 1) fprintf(stderr, " ");  // keep the reads
    } else {
      fprintf(stderr, "file-worker: unknown file workload '%s'\n", w.c_str());
      return 2;
    }
    printf("%s %.4f\n", w.c_str(), figure);
    fflush(stdout);
  }
  unlink(path.c_str());
  return 0;
}

// ---------------------------------------------------------------- the driver

struct Outcome {
  bool ok = false;
  bool oom = false;
  double us = 0;
  std::string error;
  std::string text;   // the program's stdout
  int oom_kills = 0;  // the zram peer's runs the kernel OOM-killed (all of them if oom)
};

std::string self_path() {
  char b[4096] = {};
  ssize_t n = readlink("/proc/self/exe", b, sizeof(b) - 1);
  return n > 0 ? std::string(b, n) : "lego-bench";
}

bool write_file(const std::string& path, const std::string& text) {
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  close(fd);
  return ok;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Runs argv, optionally first joining a memory cgroup; parses "us_per_access" unless
// `key` is null (then the caller parses o.text).
Outcome run(const std::vector<std::string>& argv, const std::string& cgroup_tasks,
            const char* key = "us_per_access ") {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return {false, false, 0, "pipe", ""};
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    if (!cgroup_tasks.empty()) {
      std::string me = std::to_string(getpid());
      if (!write_file(cgroup_tasks, me)) _exit(120);
    }
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execv(a[0], a.data());
    _exit(127);
  }
  close(out[1]);
  std::string text;
  char buf[512];
  ssize_t n;
  while ((n = read(out[0], buf, sizeof(buf))) > 0) text.append(buf, n);
  close(out[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  Outcome o;
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
    o.oom = true;
    o.error = "killed (OOM)";
    return o;
  }
  o.text = text;
  size_t at = key ? text.find(key) : 0;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || at == std::string::npos) {
    o.error = "exit status " +
              std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return o;
  }
  o.ok = true;
  if (key) o.us = strtod(text.c_str() + at + strlen(key), nullptr);
  return o;
}

// A fresh zram swap device and a memory cgroup capped at `cap`, removed on destruction.
class ZramSwap {
 public:
  ~ZramSwap() { teardown(); }
  std::string setup(uint64_t cap) {
    std::string n = read_file("/sys/class/zram-control/hot_add");
    if (n.empty()) return "no zram (modprobe zram?)";
    dev_ = std::stoi(n);
    std::string d = "/dev/zram" + std::to_string(dev_);
    if (!write_file("/sys/block/zram" + std::to_string(dev_) + "/disksize", "4G")) {
      return "cannot size " + d;
    }
    if (system(("mkswap " + d + " >/dev/null && swapon " + d).c_str()) != 0) {
      return "mkswap/swapon " + d + " failed";
    }
    swapped_ = true;
    cg_ = "/sys/fs/cgroup/memory/lego-bench-" + std::to_string(getpid());
    if (mkdir(cg_.c_str(), 0755) != 0) return "cannot create " + cg_;
    if (!write_file(cg_ + "/memory.limit_in_bytes", std::to_string(cap))) {
      return "cannot cap " + cg_;
    }
    return "";
  }
  std::string tasks() const { return cg_ + "/tasks"; }
  void teardown() {
    if (!cg_.empty()) rmdir(cg_.c_str());
    cg_.clear();
    if (swapped_) {
      std::string d = "/dev/zram" + std::to_string(dev_);
      (void)!system(("swapoff " + d).c_str());
      swapped_ = false;
    }
    if (dev_ >= 0) write_file("/sys/class/zram-control/hot_remove", std::to_string(dev_));
    dev_ = -1;
  }

 private:
  int dev_ = -1;
  bool swapped_ = false;
  std::string cg_;
};

// ---------------------------------------------------------------- file workloads

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

bool is_throughput(const std::string& workload) {
  return workload.rfind("seq_", 0) == 0;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : ",") + s;
  return out;
}

// The worker's "<workload> <figure>" lines, as rows of `system`.
void add_worker_rows(const FileOptions& fo, const std::string& system, const Outcome& o,
                     std::vector<FileRow>& rows) {
  std::map<std::string, double> got;
  std::istringstream in(o.text);
  std::string name;
  double v;
  while (in >> name >> v) got[name] = v;
  for (auto& w : fo.workloads) {
    FileRow r{w, system, false, 0, ""};
    if (got.count(w)) {
      r.ok = true;
      r.figure = got[w];
    } else {
      r.error = o.ok ? "no figure" : o.error;
    }
    rows.push_back(r);
  }
}

void run_file_worker(const FileOptions& fo, const std::string& system,
                     const std::vector<std::string>& prefix, const std::string& io_dir,
                     std::vector<FileRow>& rows) {
  std::vector<std::string> a = prefix;
  for (const std::string& x : {std::string("--file-worker"), io_dir, std::to_string(fo.size),
                               std::to_string(fo.rand_reads), join(fo.workloads)}) {
    a.push_back(x);
  }
  add_worker_rows(fo, system, run(a, "", nullptr), rows);
}

// The transport alone, between two network namespaces (host 0 plays the processor).
void run_tcp_floor(const FileOptions& fo, std::vector<FileRow>& rows) {
  auto topo = lego::testing::Topology::create(2, "lgbf");
  if (!topo) {
    for (auto& w : fo.workloads)
      rows.push_back({w, "tcp_floor", false, 0, topo.status().message()});
    return;
  }
  auto& t = *topo.value();
  uint16_t port = static_cast<uint16_t>(20000 + getpid() % 10000);
  std::thread th([&] {  // setns affects this thread only
    lego::Status st = t.enter(0);
    for (auto& w : fo.workloads) {
      FileRow r{w, "tcp_floor", false, 0, ""};
      lego::Result<double> v = st;
      if (!st) {
      } else if (w == "seq_write" || w == "seq_read") {
        v = lego::bench::tcp_busypoll_stream_mb_s(t.name(1), t.address(1), port++, fo.size,
                                                  kFileChunk, w == "seq_read");
      } else {
        v = lego::bench::tcp_busypoll_rtt_us(t.name(1), t.address(1), port++, kPage,
                                             static_cast<int>(fo.rand_reads));
      }
      if (v) {
        r.ok = true;
        r.figure = v.value();
      } else {
        r.error = v.status().message();
      }
      rows.push_back(r);
    }
  });
  th.join();
}

std::vector<FileRow> run_files(const FileOptions& fo, const std::string& self,
                               const std::string& lego_run) {
  std::vector<FileRow> rows;
  for (auto& s : fo.systems) {
    fprintf(stderr, "lego-bench: files (%s), %s...\n", join(fo.workloads).c_str(), s.c_str());
    if (s == "local" || s == "lego") {
      std::string tmpl = fo.dir + "/lego-bench-" + s + ".XXXXXX";
      if (mkdtemp(tmpl.data()) == nullptr) die("cannot create a directory under " + fo.dir);
      if (s == "local") {
        run_file_worker(fo, s, {self}, tmpl, rows);
      } else {
        run_file_worker(fo, s, {lego_run, "--export", tmpl, "--mount", "/lego", "--", self},
                        "/lego", rows);
      }
      unlink((tmpl + "/lego-bench.dat").c_str());
      rmdir(tmpl.c_str());
    } else if (s == "tcp_floor") {
      run_tcp_floor(fo, rows);
    } else {
      die("unknown file system '" + s + "' (local, lego, tcp_floor)");
    }
  }
  return rows;
}

void print_files(const FileOptions& fo, const std::vector<FileRow>& rows) {
  printf(
      "\nlego-bench: files, %s file, %ld random 4 KiB reads (seq_*: MB/s, higher is "
      "better; rand_read_4k: µs per read, lower is better)\n",
      lego::format_size(fo.size).c_str(), fo.rand_reads);
  printf("%-13s %-10s %12s %-5s %11s %11s\n", "file_workload", "system", "figure", "unit",
         "lego/local", "lego/floor");
  for (auto& r : rows) {
    if (!r.ok) {
      printf("%-13s %-10s %12s  (%s)\n", r.workload.c_str(), r.system.c_str(), "failed",
             r.error.c_str());
      continue;
    }
    double local = 0, floor = 0;
    for (auto& q : rows) {
      if (q.workload != r.workload || !q.ok) continue;
      if (q.system == "local") local = q.figure;
      if (q.system == "tcp_floor") floor = q.figure;
    }
    char vl[32] = "", vf[32] = "";
    if (r.system == "lego" && local > 0) snprintf(vl, sizeof vl, "%.2fx", r.figure / local);
    if (r.system == "lego" && floor > 0) snprintf(vf, sizeof vf, "%.2fx", r.figure / floor);
    printf("%-13s %-10s %12.1f %-5s %11s %11s\n", r.workload.c_str(), r.system.c_str(), r.figure,
           is_throughput(r.workload) ? "MB/s" : "us", vl, vf);
  }
}

// ---------------------------------------------------------------- miss floors

// A fetch on the wire (libfit frame header + FetchRequest + one address; frame header +
// the bare line), for the tcp floor's exchange; and a prefetch window's (32 addresses;
// frame header + FetchReply + 32 lines).
constexpr size_t kFetchRequestBytes = 72;
constexpr size_t kFetchReplyBytes = 32 + kPage;
constexpr size_t kWindowLines = 32;
constexpr size_t kWindowRequestBytes = 32 + 32 + 8 * kWindowLines;
constexpr size_t kWindowReplyBytes = 32 + 8 + kWindowLines * kPage;

// A network namespace joined to this one by a veth pair with 64 KiB frames: the link
// lego-run gives its memory node. Removed on destruction.
class DirectLink {
 public:
  ~DirectLink() {
    if (!ns_.empty()) (void)lego::testing::run_command({"ip", "netns", "del", ns_});
  }
  lego::Status setup() {
    const unsigned me = static_cast<unsigned>(getpid());
    const std::string name = "lego-bench-floor-" + std::to_string(me);
    const std::string subnet = "10.63." + std::to_string(me % 250) + ".";
    const std::string a = "lgbf" + std::to_string(me) + "a", b = "lgbf" + std::to_string(me) + "b";
    const std::string local = subnet + "1";
    remote_ = subnet + "2";
    std::vector<std::vector<std::string>> steps = {
        {"ip", "netns", "add", name},
        {"ip", "link", "add", a, "mtu", "65535", "type", "veth", "peer", "name", b, "mtu", "65535"},
        {"ip", "link", "set", b, "netns", name},
        {"ip", "addr", "add", local + "/30", "dev", a},
        {"ip", "link", "set", a, "up"},
        {"ip", "-n", name, "addr", "add", remote_ + "/30", "dev", b},
        {"ip", "-n", name, "link", "set", b, "up"},
        {"ip", "-n", name, "link", "set", "lo", "up"}};
    for (size_t i = 0; i < steps.size(); i++) {
      auto r = lego::testing::run_command(steps[i]);
      if (i == 0 && r) ns_ = name;  // deleting the namespace takes the veth pair with it
      if (!r) {
        if (ns_.empty()) return r.status();
        // The pair, if made and not moved yet, is not in the namespace: remove it too.
        (void)lego::testing::run_command({"ip", "link", "del", a});
        return r.status();
      }
    }
    return lego::Status::ok();
  }
  const std::string& ns() const { return ns_; }
  const std::string& remote() const { return remote_; }

 private:
  std::string ns_, remote_;
};

struct MissFloors {
  lego::Result<lego::bench::FaultFloor> fault = lego::Status(ENODATA, "not measured");
  lego::Result<double> tcp_rtt = lego::Status(ENODATA, "not measured");
  lego::Result<double> shm_rtt = lego::Status(ENODATA, "not measured");
  // A line's share of moving a 32-line window (round trip of a window fetch / 32).
  lego::Result<double> tcp_window_line = lego::Status(ENODATA, "not measured");
  lego::Result<double> shm_window_line = lego::Status(ENODATA, "not measured");
};

lego::Result<double> per_window_line(lego::Result<double> rtt) {
  if (!rtt) return rtt;
  return rtt.value() / kWindowLines;
}

MissFloors measure_miss_floors(uint64_t cap, bool tcp, bool shm) {
  MissFloors f;
  fprintf(stderr, "lego-bench: miss floors: userfaultfd fault...\n");
  f.fault = lego::bench::measure_fault_floor(cap / kPage, 5);
  const uint16_t port = static_cast<uint16_t>(20000 + getpid() % 10000);
  if (tcp) {
    fprintf(stderr, "lego-bench: miss floors: tcp round trip...\n");
    DirectLink link;
    lego::Status st = link.setup();
    if (st) {
      f.tcp_rtt = lego::bench::tcp_busypoll_rtt_us(link.ns(), link.remote(), port,
                                                   kFetchRequestBytes, kFetchReplyBytes, 20000);
      f.tcp_window_line = per_window_line(lego::bench::tcp_busypoll_rtt_us(
          link.ns(), link.remote(), static_cast<uint16_t>(port + 2), kWindowRequestBytes,
          kWindowReplyBytes, 2000));
    } else {
      f.tcp_rtt = f.tcp_window_line = st;
    }
  }
  if (shm) {
    fprintf(stderr, "lego-bench: miss floors: shm round trip...\n");
    f.shm_rtt = lego::bench::fi_pingpong_rtt_us("shm", "rdm", kPage, 20000, "", "127.0.0.1",
                                                static_cast<uint16_t>(port + 1));
    // fi_pingpong sends the same size both ways: half its round trip is one window's way.
    auto window = lego::bench::fi_pingpong_rtt_us("shm", "rdm", kWindowLines * kPage, 2000, "",
                                                  "127.0.0.1", static_cast<uint16_t>(port + 3));
    f.shm_window_line = window ? lego::Result<double>(window.value() / 2 / kWindowLines) : window;
  }
  return f;
}

// One memory workload under one system.
struct MemoryRow {
  std::string workload, system;
  double fraction;
  int threads;
  Outcome o;
};

// µs per access of `system` on r's workload and fraction, or 0 when it did not run or failed.
double peer_us(const std::vector<MemoryRow>& rows, const MemoryRow& r, const char* system) {
  for (auto& q : rows) {
    if (q.workload == r.workload && q.fraction == r.fraction && q.system == system && q.o.ok) {
      return q.o.us;
    }
  }
  return 0;
}

// A row's floor per access, from the parts it needs:
//   random: an access misses with probability 1 - local fraction; a miss costs a fault,
//     its zap share and a round trip;
//   sequential: every access misses (the scan is larger than the cache); a line costs its
//     share of a window's fault and zap and of fetching the window, and half a window
//     line's transfer again to write it back (the write pass dirties every line).
lego::Result<double> floor_per_access(const MemoryRow& r, const MissFloors& f) {
  if (!f.fault) return f.fault.status();
  const bool tcp = r.system == "lego_tcp";
  if (r.workload == "random") {
    const lego::Result<double>& rtt = tcp ? f.tcp_rtt : f.shm_rtt;
    if (!rtt) return rtt;
    return (1 - r.fraction) * (f.fault->fault_us + f.fault->zap_us + rtt.value());
  }
  const lego::Result<double>& moved = tcp ? f.tcp_window_line : f.shm_window_line;
  if (!moved) return moved;
  return f.fault->window_fault_us + f.fault->window_zap_us + 1.5 * moved.value();
}

bool has_floor(const MemoryRow& r) {
  return (r.workload == "random" || r.workload == "sequential") && r.o.ok &&
         (r.system == "lego_tcp" || r.system == "lego_shm");
}

// For each random or sequential row lego ran: the floor per access beside lego's figure
// and zram's.
void report_miss_floors(const std::vector<MemoryRow>& rows, uint64_t cap) {
  bool tcp = false, shm = false;
  for (auto& r : rows) {
    if (!has_floor(r)) continue;
    tcp |= r.system == "lego_tcp";
    shm |= r.system == "lego_shm";
  }
  if (!tcp && !shm) return;
  const MissFloors f = measure_miss_floors(cap, tcp, shm);
  printf("\nMiss floors on this host (see --help):\n");
  auto line = [](const char* what, const lego::Result<double>& v) {
    if (v) {
      printf("  %-62s %7.2f us\n", what, v.value());
    } else {
      printf("  %-62s %s\n", what, v.status().message().c_str());
    }
  };
  auto part = [&f](double lego::bench::FaultFloor::*field) -> lego::Result<double> {
    if (!f.fault) return f.fault.status();
    return f.fault.value().*field;
  };
  using lego::bench::FaultFloor;
  line("userfaultfd store miss (fault, SIGBUS, UFFDIO_COPY, return)", part(&FaultFloor::fault_us));
  line("a line's share of a 32-line MADV_DONTNEED zap", part(&FaultFloor::zap_us));
  line("a line's share of a fault mapping a 32-line window", part(&FaultFloor::window_fault_us));
  line("a line's share of one madvise zapping a 32-line window", part(&FaultFloor::window_zap_us));
  if (tcp) {
    line("tcp round trip, 72 B / 4128 B, busy-polled, veth", f.tcp_rtt);
    line("tcp, a line's share of a 32-line window's round trip", f.tcp_window_line);
  }
  if (shm) {
    line("shm round trip, fi_pingpong -p shm, 4096 B each way", f.shm_rtt);
    line("shm, a line's share of fi_pingpong's 128 KiB one way", f.shm_window_line);
  }
  printf("%-11s %6s %-10s %16s %10s %11s\n", "workload", "local", "system", "floor us/access",
         "vs zram", "lego/floor");
  for (auto& r : rows) {
    if (!has_floor(r)) continue;
    const lego::Result<double> floor = floor_per_access(r, f);
    if (!floor) continue;
    const double zram = peer_us(rows, r, "zram_swap");
    char vz[32] = "-";
    if (zram > 0) snprintf(vz, sizeof vz, "%.2fx", floor.value() / zram);
    printf("%-11s %5.0f%% %-10s %16.3f %10s %10.2fx\n", r.workload.c_str(), r.fraction * 100,
           r.system.c_str(), floor.value(), vz, r.o.us / floor.value());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && strcmp(argv[1], "--worker") == 0) {
    if (argc != 5) die("--worker WORKLOAD HEAP_BYTES ACCESSES");
    return worker(argv[2], strtoull(argv[3], nullptr, 10), atol(argv[4]));
  }
  if (argc >= 2 && strcmp(argv[1], "--file-worker") == 0) {
    if (argc != 6) die("--file-worker DIR SIZE_BYTES RAND_READS WORKLOADS");
    return file_worker(argv[2], strtoull(argv[3], nullptr, 10), atol(argv[4]),
                       lego::split_list(argv[5]));
  }
  uint64_t cap = 64ull << 20;
  std::vector<double> fractions{0.25, 0.5};
  std::vector<std::string> workloads{"random", "sequential", "zipf", "random_mt"};
  std::vector<std::string> systems{"local", "zram_swap", "lego_tcp", "lego_shm"};
  long accesses = 200000;
  int oom_retries = 2;
  bool floors = true;
  std::string csv, only;
  FileOptions fo;
  enum {
    kCap = 1,
    kFrac,
    kWork,
    kSys,
    kAcc,
    kCsv,
    kOnly,
    kFileWork,
    kFileSys,
    kFileSize,
    kRandReads,
    kFileDir,
    kOomRetries,
    kNoFloors,
    kHelp
  };
  static const option opts[] = {{"cap", required_argument, nullptr, kCap},
                                {"fractions", required_argument, nullptr, kFrac},
                                {"workloads", required_argument, nullptr, kWork},
                                {"systems", required_argument, nullptr, kSys},
                                {"accesses", required_argument, nullptr, kAcc},
                                {"csv", required_argument, nullptr, kCsv},
                                {"only", required_argument, nullptr, kOnly},
                                {"file-workloads", required_argument, nullptr, kFileWork},
                                {"file-systems", required_argument, nullptr, kFileSys},
                                {"file-size", required_argument, nullptr, kFileSize},
                                {"rand-reads", required_argument, nullptr, kRandReads},
                                {"file-dir", required_argument, nullptr, kFileDir},
                                {"oom-retries", required_argument, nullptr, kOomRetries},
                                {"no-floors", no_argument, nullptr, kNoFloors},
                                {"help", no_argument, nullptr, kHelp},
                                {nullptr, 0, nullptr, 0}};
  int c;
  while ((c = getopt_long(argc, argv, "h", opts, nullptr)) != -1) {
    switch (c) {
      case kCap: {
        auto v = lego::parse_size(optarg, "--cap");
        if (!v) die(v.status().message());
        cap = v.value();
        break;
      }
      case kFrac:
        fractions.clear();
        for (auto& f : lego::split_list(optarg)) {
          double v = strtod(f.c_str(), nullptr);
          if (!(v > 0 && v <= 1)) die("--fractions: '" + f + "' is not in (0, 1]");
          fractions.push_back(v);
        }
        break;
      case kWork:
        workloads = lego::split_list(optarg);
        break;
      case kSys:
        systems = lego::split_list(optarg);
        break;
      case kAcc:
        accesses = atol(optarg);
        break;
      case kCsv:
        csv = optarg;
        break;
      case kOomRetries: {
        char* end = nullptr;
        const long v = strtol(optarg, &end, 10);
        if (end == optarg || *end != '\0' || v < 0 || v > 100) {
          die("--oom-retries: '" + std::string(optarg) + "' is not a number from 0 to 100");
        }
        oom_retries = static_cast<int>(v);
        break;
      }
      case kNoFloors:
        floors = false;
        break;
      case kOnly:
        only = optarg;
        if (only != "memory" && only != "files") die("--only: memory or files");
        break;
      case kFileWork:
        fo.workloads = lego::split_list(optarg);
        for (auto& w : fo.workloads) {
          if (w != "seq_write" && w != "seq_read" && w != "rand_read_4k") {
            die("--file-workloads: unknown '" + w + "' (seq_write, seq_read, rand_read_4k)");
          }
        }
        break;
      case kFileSys:
        fo.systems = lego::split_list(optarg);
        for (auto& w : fo.systems) {
          if (w != "local" && w != "lego" && w != "tcp_floor") {
            die("--file-systems: unknown '" + w + "' (local, lego, tcp_floor)");
          }
        }
        break;
      case kFileSize: {
        auto v = lego::parse_size(optarg, "--file-size");
        if (!v) die(v.status().message());
        if (v.value() < kPage) die("--file-size: at least 4K");
        fo.size = v.value() & ~uint64_t{kPage - 1};
        break;
      }
      case kRandReads: {
        auto v = lego::parse_int(optarg, "--rand-reads", 1, 100000000);
        if (!v) die(v.status().message());
        fo.rand_reads = v.value();
        break;
      }
      case kFileDir:
        fo.dir = optarg;
        break;
      case 'h':
      case kHelp:
        fputs(kUsage, stdout);
        return 0;
      default:
        fputs(kUsage, stderr);
        return 2;
    }
  }
  if (geteuid() != 0) die("needs root (zram, cgroups, network namespaces)");
  std::string self = self_path();
  std::string lego_run =
      getenv("LEGO_RUN") ? getenv("LEGO_RUN") : self.substr(0, self.rfind('/')) + "/../lego-run";
  if (access(lego_run.c_str(), X_OK) != 0)
    die("cannot find lego-run at " + lego_run + " (set LEGO_RUN)");

  std::vector<MemoryRow> rows;
  if (only == "files") fractions.clear();
  for (double f : fractions) {
    uint64_t heap = static_cast<uint64_t>(cap / f) & ~uint64_t{kPage - 1};
    for (auto& w : workloads) {
      std::vector<std::string> worker{self, "--worker", w, std::to_string(heap),
                                      std::to_string(accesses)};
      for (auto& s : systems) {
        fprintf(stderr, "lego-bench: %s, %.0f%% local, %s...\n", w.c_str(), f * 100, s.c_str());
        Outcome o;
        if (s == "local") {
          o = run(worker, "");
        } else if (s == "zram_swap") {
          // An OOM kill is the kernel's verdict on that run, not a figure: say so, and try
          // again (a fresh zram device and cgroup each time) so that the row can still
          // compare.
          for (int kills = 0;; ++kills) {
            ZramSwap z;
            std::string err = z.setup(cap);
            if (!err.empty()) {
              o = Outcome();
              o.error = err;
            } else {
              o = run(worker, z.tasks());
            }
            o.oom_kills = kills;
            if (!o.oom || kills == oom_retries) break;
            fprintf(stderr, "lego-bench: %s, %.0f%% local, zram_swap: OOM-killed, running again\n",
                    w.c_str(), f * 100);
          }
          if (o.oom) o.oom_kills += 1;
        } else if (s == "lego_tcp" || s == "lego_shm") {
          std::vector<std::string> a{lego_run,
                                     "--excache",
                                     std::to_string(cap),
                                     "--delivery",
                                     "sigbus",
                                     "--transport",
                                     s == "lego_tcp" ? "tcp" : "shm",
                                     "--memory-capacity",
                                     std::to_string(heap * 2 + (256 << 20)),
                                     "--"};
          a.insert(a.end(), worker.begin(), worker.end());
          o = run(a, "");
        } else {
          die("unknown system '" + s + "'");
        }
        rows.push_back({w, s, f, w == "random_mt" ? 2 : 1, o});
      }
    }
  }
  std::vector<FileRow> file_rows;
  if (only != "memory") file_rows = run_files(fo, self, lego_run);
  if (only != "files") {
    printf("\nlego-bench: µs per access, cap %s (ExCache = cgroup limit), %ld accesses per run\n",
           lego::format_size(cap).c_str(), accesses);
    printf("%-11s %6s %-10s %12s %10s %10s\n", "workload", "local", "system", "us/access",
           "vs local", "vs zram");
    for (auto& r : rows) {
      const double local = peer_us(rows, r, "local"), zram = peer_us(rows, r, "zram_swap");
      if (!r.o.ok) {
        printf("%-11s %5.0f%% %-10s %12s  (%s", r.workload.c_str(), r.fraction * 100,
               r.system.c_str(), r.o.oom ? "OOM-killed" : "failed", r.o.error.c_str());
        if (r.o.oom_kills > 1) printf("; all %d runs OOM-killed", r.o.oom_kills);
        printf(")\n");
        continue;
      }
      char vl[32] = "-", vz[32] = "-";
      if (local > 0) snprintf(vl, sizeof vl, "%.1fx", r.o.us / local);
      if (zram > 0) snprintf(vz, sizeof vz, "%.2fx", r.o.us / zram);
      printf("%-11s %5.0f%% %-10s %12.3f %10s %10s", r.workload.c_str(), r.fraction * 100,
             r.system.c_str(), r.o.us, vl, vz);
      if (r.o.oom_kills > 0) {
        printf("  (after %d OOM-killed run%s)", r.o.oom_kills, r.o.oom_kills > 1 ? "s" : "");
      }
      printf("\n");
    }
  }
  if (only != "files" && floors) report_miss_floors(rows, cap);
  if (only != "memory") print_files(fo, file_rows);
  if (!csv.empty()) {
    FILE* f = fopen(csv.c_str(), "w");
    if (f == nullptr) die("cannot write " + csv);
    if (only != "files") fprintf(f, "workload,local_fraction,threads,system,us_per_access\n");
    for (auto& r : rows) {
      if (r.o.ok) {
        fprintf(f, "%s,%.2f,%d,%s,%.4f\n", r.workload.c_str(), r.fraction, r.threads,
                r.system.c_str(), r.o.us);
      } else {
        fprintf(f, "%s,%.2f,%d,%s,%s\n", r.workload.c_str(), r.fraction, r.threads,
                r.system.c_str(), r.o.oom ? "oom" : "failed");
      }
    }
    if (only != "memory") {
      if (only != "files") fprintf(f, "\n");  // a second table follows
      fprintf(f, "file_workload,system,mb_per_s_or_us\n");
      for (auto& r : file_rows) {
        if (r.ok) {
          fprintf(f, "%s,%s,%.4f\n", r.workload.c_str(), r.system.c_str(), r.figure);
        } else {
          fprintf(f, "%s,%s,failed\n", r.workload.c_str(), r.system.c_str());
        }
      }
    }
    fclose(f);
    printf("wrote %s\n", csv.c_str());
  }
  return 0;
}
