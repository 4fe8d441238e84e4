// lego-bench's workloads (runtime/bench/lego_bench.h): the code that runs under each
// system, in a child process (lego-bench --worker / --file-worker), so that every system
// runs the same instructions.
#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iterator>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "runtime/bench/lego_bench.h"

namespace lego::bench {

using Clock = std::chrono::steady_clock;

namespace {

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

// Failover mode (LEGO_BENCH_FAILOVER=FILE, the random workload): lego-bench kills a memory
// node while this runs and then writes the kill's CLOCK_MONOTONIC time (ns) into FILE. Kept
// in static memory, not the heap: under lego-run the heap is on the memory nodes being
// measured. Stalls: accesses that took over kStallNs, each (start, end).
constexpr uint64_t kStallNs = 200 * 1000;
constexpr size_t kMaxStalls = 1 << 16;
struct Stall {
  uint64_t start, end;
};
Stall g_stalls[kMaxStalls];
size_t g_nstalls = 0;
// Accesses completed in each 10 ms since the loop began (10 minutes).
constexpr uint64_t kBucketNs = 10 * 1000 * 1000;
uint32_t g_buckets[60000];

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000 + uint64_t(ts.tv_nsec);
}

// After the loop, the program's own record for lego-bench (cluster.cc), which puts it beside
// the runtime's times (lego-run --stats: first_loss_ns, first_failover_ns, re-replication's
// start and end) and its own kill time: the kill time read back from the file, the loop's
// start, the longest access that ended after the kill (from the kill, or its start if later;
// within 10 s), and the accesses completed in each 10 ms of the loop.
void report_failover(const char* file, uint64_t loop_start, uint64_t loop_end) {
  uint64_t kill_ns = 0;
  int why = 0;
  for (int i = 0; i < 1000 && kill_ns == 0; i++) {
    FILE* f = fopen(file, "r");
    if (f != nullptr) {
      if (fscanf(f, "%lu", &kill_ns) != 1) kill_ns = 0;
      fclose(f);
    } else {
      why = errno;
    }
    if (kill_ns == 0) usleep(10000);
  }
  if (kill_ns == 0) {
    printf("kill_ns none (no kill time in %s: %s)\n", file,
           why ? strerror(why) : "no number in it");
    return;
  }
  uint64_t worst = 0;
  for (size_t i = 0; i < g_nstalls; i++) {
    const Stall& st = g_stalls[i];
    if (st.end < kill_ns || st.start > kill_ns + 10000000000ull) continue;
    worst = std::max(worst, st.end - std::max(st.start, kill_ns));
  }
  printf("kill_ns %lu\nloop_start_ns %lu\nloop_end_ns %lu\nstall_ms %.3f\nbuckets",
         static_cast<unsigned long>(kill_ns), static_cast<unsigned long>(loop_start),
         static_cast<unsigned long>(loop_end), double(worst) / 1e6);
  const uint64_t n =
      std::min<uint64_t>((loop_end - loop_start) / kBucketNs + 1, std::size(g_buckets));
  for (uint64_t b = 0; b < n; b++) printf(" %u", g_buckets[b]);
  printf("\n");
}

// CPU seconds (user, system) of process `pid` from /proc/PID/stat, or {-1, -1}.
std::pair<double, double> process_cpu(pid_t pid) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  FILE* f = fopen(path, "r");
  if (f == nullptr) return {-1, -1};
  char buf[1024] = {};
  const size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  const char* p = strrchr(buf, ')');  // comm may hold spaces; fields follow its ')'
  unsigned long long utime = 0, stime = 0;
  if (p == nullptr ||
      sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2) {
    return {-1, -1};
  }
  const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
  return {utime / tick, stime / tick};
}

// The private memory node lego-run started for this run: the lego-memd whose parent is
// ours (lego-run's), or 0 (not under lego-run).
pid_t find_memory_node() {
  const pid_t parent = getppid();
  DIR* d = opendir("/proc");
  if (d == nullptr) return 0;
  pid_t found = 0;
  while (dirent* e = readdir(d)) {
    const pid_t pid = static_cast<pid_t>(atoi(e->d_name));
    if (pid <= 0) continue;
    char path[64], comm[64] = {};
    snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
    FILE* f = fopen(path, "r");
    if (f == nullptr) continue;
    int ppid = 0;
    const bool ok = fscanf(f, "%*d (%63[^)]) %*c %d", comm, &ppid) == 2;
    fclose(f);
    if (ok && ppid == parent && strcmp(comm, "lego-memd") == 0) {
      found = pid;
      break;
    }
  }
  closedir(d);
  return found;
}

double seconds(const timeval& t) {
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
}

}  // namespace

int worker(const std::string& workload, size_t heap_bytes, long accesses, int threads) {
  size_t pages = heap_bytes / kPage;
  auto* heap = static_cast<uint64_t*>(malloc(pages * kPage));
  if (heap == nullptr) {
    fprintf(stderr, "worker: cannot allocate %zu bytes\n", heap_bytes);
    return 3;
  }
  // Incompressible fill.
  std::mt19937_64 fill(42);
  for (size_t i = 0; i < pages * kPage / 8; i++) heap[i] = fill();
  // A busy client (memd_busy.cc) tells lego-bench its heap is filled: its loop starts.
  if (const char* ready = getenv("LEGO_BENCH_READY")) {
    if (FILE* f = fopen(ready, "w")) fclose(f);
  }
  const size_t words_per_page = kPage / 8;
  std::unique_ptr<Zipf> zipf;
  if (workload == "zipf") zipf = std::make_unique<Zipf>(pages, 0.99);
  if (workload != "random_mt") threads = 1;
  // hotset: 90% of accesses to the first eighth of the heap (half the ExCache at 25% local),
  // the rest to any page: a hot set that fits, under a stream of cold misses.
  const size_t hot = workload == "hotset" ? std::max<size_t>(1, pages / 8) : 0;
  std::atomic<uint64_t> sink{0};
  // CPU of the timed part: this process's (its threads and the runtime's, in user mode and
  // in the kernel) and the memory node's.
  const pid_t memd = find_memory_node();
  const auto memd0 = memd > 0 ? process_cpu(memd) : std::pair<double, double>{-1, -1};
  rusage ru0{};
  getrusage(RUSAGE_SELF, &ru0);
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
  } else if (const char* failover = getenv("LEGO_BENCH_FAILOVER");
             failover != nullptr && workload == "random") {
    // Tells lego-bench the loop runs (it kills a memory node now), then times every access.
    if (FILE* f = fopen((std::string(failover) + ".running").c_str(), "w")) fclose(f);
    std::mt19937_64 rng(7);
    const uint64_t start = now_ns();
    uint64_t prev = start;
    for (long n = 0; n < accesses; n++) {
      size_t page = rng() % pages;
      heap[page * words_per_page + (n & 7)] += 1;
      const uint64_t t = now_ns();
      if (t - prev > kStallNs && g_nstalls < kMaxStalls) g_stalls[g_nstalls++] = {prev, t};
      const uint64_t b = (t - start) / kBucketNs;
      if (b < std::size(g_buckets)) g_buckets[b]++;
      prev = t;
    }
    done = accesses;
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    printf("us_per_access %.4f\n", us / double(done));
    report_failover(failover, start, prev);
    fflush(stdout);
    return 0;
  } else {
    auto run = [&](int t) {
      std::mt19937_64 rng(7 + t);
      for (long n = 0; n < accesses / threads; n++) {
        size_t page = zipf ? (*zipf)(rng) : rng() % pages;
        if (hot != 0 && rng() % 10 != 0) page = rng() % hot;
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
  rusage ru1{};
  getrusage(RUSAGE_SELF, &ru1);
  const auto memd1 = memd > 0 ? process_cpu(memd) : std::pair<double, double>{-1, -1};
  printf("us_per_access %.4f\n", us / done);
  // CPU µs per access: program user, program kernel, memory node (user + kernel; -1 if
  // there is none).
  const double per = 1e6 / static_cast<double>(done);
  const double memd_s = memd0.first >= 0 && memd1.first >= 0
                            ? (memd1.first + memd1.second) - (memd0.first + memd0.second)
                            : -1.0 / per;
  printf("cpu_us_per_access %.4f %.4f %.4f\n",
         (seconds(ru1.ru_utime) - seconds(ru0.ru_utime)) * per,
         (seconds(ru1.ru_stime) - seconds(ru0.ru_stime)) * per, memd_s * per);
  fflush(stdout);
  return sink == 1 ? 1 : 0;
}

namespace {

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

}  // namespace

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

}  // namespace lego::bench
