// runtime/stats_page.h: the live stats page of each process of a run.
#include "runtime/stats_page.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <thread>

#include "runtime/launch_contract.h"

namespace lego::launch {

namespace {

constexpr size_t kPageBytes = 4096;

uint64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

void copy_text(char* dst, size_t cap, const std::string& src) {
  const size_t n = std::min(cap - 1, src.size());
  memcpy(dst, src.data(), n);
  dst[n] = '\0';
}

// The text of a fixed NUL-terminated field that another process wrote (maybe unterminated).
std::string field_text(const char* s, size_t cap) {
  return std::string(s, strnlen(s, cap));
}

// One page's sample; false (with *problem set, or empty when the page is simply being
// written for the first time) when it cannot be used.
bool read_page(const std::string& path, StatsSample* out, std::string* problem) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno != ENOENT) *problem = path + ": " + strerror(errno);
    return false;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size != static_cast<off_t>(kPageBytes)) {
    close(fd);
    *problem = path + ": not a stats page (size)";
    return false;
  }
  void* m = mmap(nullptr, kPageBytes, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) {
    *problem = path + ": mmap: " + strerror(errno);
    return false;
  }
  const auto* page = static_cast<const StatsPage*>(m);
  bool ok = false;
  if (page->magic != kStatsPageMagic || page->version != kStatsPageVersion ||
      page->fields != kStatsPageFields || page->buckets != ExCacheStats::kLatencyBuckets ||
      page->fields_hash != stats_fields_hash()) {
    *problem = path + ": written by another version of lego (layout " +
               std::to_string(page->version) + "/" + std::to_string(page->fields) +
               " fields): not read";
  } else {
    StatsPage copy;
    for (int tries = 0; tries < 1000 && !ok; ++tries) {
      const uint64_t before = page->seq.load(std::memory_order_acquire);
      if (before & 1) {
        std::this_thread::yield();
        continue;
      }
      memcpy(reinterpret_cast<char*>(&copy.published_ns),
             reinterpret_cast<const char*>(&page->published_ns),
             sizeof(StatsPage) - offsetof(StatsPage, published_ns));
      std::atomic_thread_fence(std::memory_order_acquire);
      ok = page->seq.load(std::memory_order_relaxed) == before;
    }
    if (!ok) *problem = path + ": the writer kept it busy";
    if (ok) {
      out->path = path;
      out->pid = page->pid;
      out->start = page->start;
      out->program = field_text(page->program, sizeof page->program);
      out->memory_node = page->memory_node;
      out->memory_address = field_text(page->memory_address, sizeof page->memory_address);
      out->kernel_module = page->kernel_module != 0;
      out->published_ns = copy.published_ns;
      for (size_t i = 0; i < kStatsPageFields; ++i) {
        out->stats.*(kExCacheStatsFields[i].field) = copy.values[i];
      }
      for (size_t b = 0; b < ExCacheStats::kLatencyBuckets; ++b) {
        out->stats.miss_latency_log2_ns[b] = copy.latency[b];
      }
      out->stats.miss_p50_ns =
          latency_percentile_ns(copy.latency, ExCacheStats::kLatencyBuckets, 500);
      out->stats.miss_p99_ns =
          latency_percentile_ns(copy.latency, ExCacheStats::kLatencyBuckets, 990);
      ClusterSample& c = out->cluster;
      c.replicas = copy.replicas;
      c.node_count = copy.node_count;
      c.vregions_placed = copy.vregions_placed;
      c.vregions_degraded = copy.vregions_degraded;
      c.vregions_rereplicated = copy.vregions_rereplicated;
      c.bytes_copied = copy.bytes_copied;
      c.rereplication_start_ns = copy.rereplication_start_ns;
      const size_t n = std::min<size_t>(copy.node_count, kStatsPageNodes);
      for (size_t i = 0; i < n; ++i) {
        const StatsPageNode& pn = copy.nodes[i];
        c.nodes.push_back({pn.id, pn.lost != 0, pn.vregions, pn.copying,
                           field_text(pn.address, sizeof pn.address)});
      }
    }
  }
  munmap(m, kPageBytes);
  return ok;
}

}  // namespace

uint64_t stats_fields_hash() {
  uint64_t h = 0xcbf29ce484222325ull;
  for (const ExCacheStatsField& f : kExCacheStatsFields) {
    for (const char* p = f.name;; ++p) {
      h = (h ^ static_cast<unsigned char>(*p)) * 0x100000001b3ull;
      if (*p == '\0') break;
    }
  }
  return h;
}

std::string stats_file_name(pid_t pid, uint64_t start) {
  return std::string(kStatsFilePrefix) + std::to_string(pid) + "." + std::to_string(start);
}

bool parse_stats_file_name(const char* name, pid_t* pid, uint64_t* start) {
  const size_t p = strlen(kStatsFilePrefix);
  if (strncmp(name, kStatsFilePrefix, p) != 0) return false;
  unsigned long long a = 0, b = 0;
  int used = 0;
  if (sscanf(name + p, "%llu.%llu%n", &a, &b, &used) != 2 || name[p + used] != '\0' ||
      !isdigit(static_cast<unsigned char>(name[p])) || a == 0 || a > (1ull << 31)) {
    return false;
  }
  *pid = static_cast<pid_t>(a);
  *start = b;
  return true;
}

Result<std::unique_ptr<StatsPublisher>> StatsPublisher::create(const std::string& run_dir,
                                                               pid_t pid, uint64_t start,
                                                               const std::string& program,
                                                               uint32_t memory_node,
                                                               const std::string& memory_address) {
  const std::string name = stats_file_name(pid, start);
  const std::string path = run_dir + "/" + name, tmp = run_dir + "/." + name;
  int fd = open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return Status(errno, "cannot create the stats page " + tmp + ": " + strerror(errno));
  if (ftruncate(fd, kPageBytes) != 0) {
    const int err = errno;
    close(fd);
    unlink(tmp.c_str());
    return Status(err, "cannot size the stats page " + tmp + ": " + strerror(err));
  }
  void* m = mmap(nullptr, kPageBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);
  if (m == MAP_FAILED) {
    unlink(tmp.c_str());
    return Status(err, "cannot map the stats page " + tmp + ": " + strerror(err));
  }
  auto* page = new (m) StatsPage{};
  page->version = kStatsPageVersion;
  page->fields = kStatsPageFields;
  page->buckets = ExCacheStats::kLatencyBuckets;
  page->fields_hash = stats_fields_hash();
  page->pid = pid;
  page->memory_node = memory_node;
  page->start = start;
  copy_text(page->program, sizeof page->program, program);
  copy_text(page->memory_address, sizeof page->memory_address, memory_address);
  page->interval_ms = static_cast<uint32_t>(kPublishInterval.count());
  // The magic last: a reader that maps the page before it is whole refuses it.
  std::atomic_thread_fence(std::memory_order_release);
  page->magic = kStatsPageMagic;
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    munmap(m, kPageBytes);
    unlink(tmp.c_str());
    return Status(e, "cannot name the stats page " + path + ": " + strerror(e));
  }
  return std::unique_ptr<StatsPublisher>(new StatsPublisher(path, page));
}

StatsPublisher::~StatsPublisher() {
  munmap(page_, kPageBytes);
}

void StatsPublisher::publish(const ExCacheStats& stats, bool kernel_module,
                             const ClusterSample& cluster) {
  const uint64_t seq = page_->seq.load(std::memory_order_relaxed);
  page_->seq.store(seq + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  page_->kernel_module = kernel_module ? 1 : 0;
  page_->published_ns = monotonic_ns();
  for (size_t i = 0; i < kStatsPageFields; ++i) {
    page_->values[i] = stats.*(kExCacheStatsFields[i].field);
  }
  for (size_t b = 0; b < ExCacheStats::kLatencyBuckets; ++b) {
    page_->latency[b] = stats.miss_latency_log2_ns[b];
  }
  page_->replicas = cluster.replicas;
  page_->node_count = cluster.node_count;
  page_->vregions_placed = cluster.vregions_placed;
  page_->vregions_degraded = cluster.vregions_degraded;
  page_->vregions_rereplicated = cluster.vregions_rereplicated;
  page_->bytes_copied = cluster.bytes_copied;
  page_->rereplication_start_ns = cluster.rereplication_start_ns;
  const size_t n = std::min(cluster.nodes.size(), kStatsPageNodes);
  for (size_t i = 0; i < n; ++i) {
    const ClusterSample::Node& cn = cluster.nodes[i];
    StatsPageNode& pn = page_->nodes[i];
    pn.id = cn.id;
    pn.lost = cn.lost ? 1 : 0;
    pn.vregions = cn.vregions;
    pn.copying = cn.copying;
    copy_text(pn.address, sizeof pn.address, cn.address);
  }
  page_->seq.store(seq + 2, std::memory_order_release);
}

void StatsPublisher::remove() {
  unlink(path_.c_str());
}

uint64_t latency_percentile_ns(const uint64_t* buckets, size_t n, uint64_t per_mille) {
  uint64_t total = 0;
  for (size_t b = 0; b < n; ++b) total += buckets[b];
  if (total == 0) return 0;
  const uint64_t rank = (total * per_mille + 999) / 1000;
  uint64_t seen = 0;
  for (size_t b = 0; b < n; ++b) {
    seen += buckets[b];
    if (seen >= rank) return uint64_t{2} << b;
  }
  return uint64_t{2} << (n - 1);
}

std::vector<StatsSample> read_stats_pages(std::vector<std::string>* problems,
                                          const std::string& tmp_dir, const std::string& run_dir) {
  std::vector<StatsSample> out;
  const char* run_base = strrchr(kRunDirPrefix, '/') + 1;  // "lego-run-"
  DIR* d = opendir(tmp_dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    if (strncmp(e->d_name, run_base, strlen(run_base)) != 0) continue;
    const std::string dir = tmp_dir + "/" + e->d_name;
    if (!run_dir.empty() && dir != run_dir) continue;
    DIR* r = opendir(dir.c_str());
    if (r == nullptr) continue;  // not ours to read, or a log file
    while (dirent* f = readdir(r)) {
      pid_t pid = 0;
      uint64_t start = 0;
      if (!parse_stats_file_name(f->d_name, &pid, &start)) continue;
      const std::string path = dir + "/" + f->d_name;
      if (process_gone(pid, start)) {
        unlink(path.c_str());  // stale: its process was killed before it could remove it
        continue;
      }
      StatsSample s;
      std::string problem;
      if (read_page(path, &s, &problem)) {
        if (s.pid == pid && s.start == start) out.push_back(std::move(s));
      } else if (!problem.empty() && problems != nullptr) {
        problems->push_back(problem);
      }
    }
    closedir(r);
  }
  closedir(d);
  std::sort(out.begin(), out.end(),
            [](const StatsSample& a, const StatsSample& b) { return a.pid < b.pid; });
  return out;
}

}  // namespace lego::launch
