// lego-bench's workloads (runtime/bench/lego_bench.h): the code that runs under each
// system, in a child process (lego-bench --worker / --file-worker), so that every system
// runs the same instructions.
#include <fcntl.h>
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
  for (int i = 0; i < 1000 && kill_ns == 0; i++) {
    FILE* f = fopen(file, "r");
    if (f != nullptr) {
      if (fscanf(f, "%lu", &kill_ns) != 1) kill_ns = 0;
      fclose(f);
    }
    if (kill_ns == 0) usleep(10000);
  }
  if (kill_ns == 0) {
    printf("kill_ns none (no kill time in %s)\n", file);
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

}  // namespace

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
  // hotset: 90% of accesses to the first eighth of the heap (half the ExCache at 25% local),
  // the rest to any page: a hot set that fits, under a stream of cold misses.
  const size_t hot = workload == "hotset" ? std::max<size_t>(1, pages / 8) : 0;
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
  printf("us_per_access %.4f\n", us / done);
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
