// excache_bench: µs per random 4 KiB access over a region `--ratio` times the ExCache,
// against the in-process MapBackend (no network: this measures the fault, eviction and
// userfaultfd costs alone), for each delivery, beside the same loop on plain memory.
//
//   bazel run //tests/runtime:excache_bench -- [--capacity-mb=64] [--ratio=4]
//       [--accesses=200000] [--delivery=both|sigbus|thread] [--policy=fifo|clock]
//       [--op=rmw|read] [--write-pct=N] [--pattern=uniform|zipf|hotset] [--threads=1]
//       [--predict-dirty=1] [--pcache=auto|on|off|both] [--csv]
//
// --write-pct: percent of accesses that store (overrides --op: rmw = 100, read = 0).
// --pattern=zipf: Zipf(0.99) over the lines, hot lines scattered across the region.
// --pattern=hotset: 90% of accesses to a hot set of half the ExCache's lines (scattered),
// 10% to any line: a working set that fits, under a stream of cold misses that evict. What
// stays resident depends on the policy knowing which lines were used: FIFO evicts hot
// lines as readily as cold ones; CLOCK with lego_pcache's accessed bits keeps them.
// --pcache: whether the ExCache uses lego_pcache.ko (kmod/); "both" runs each setup without
// and with it and prints the ratio (the module must be loaded: run it in the qemu guest).
//
// The region is first filled with incompressible data (every line written, so every miss
// afterwards is a real fetch, not a zero-fill); then each thread does `accesses` accesses to
// uniformly random lines: rmw = load + store of one word (dirty evictions), read = load only
// (clean drops). Miss percentiles come from ExCache's log2 histogram (bucket upper bounds).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lego/excache.h"
#include "lego/flags.h"
#include "tests/runtime/map_backend.h"

namespace {

using lego::ExCache;
using lego::ExCacheOptions;
using lego::ExCacheStats;

constexpr size_t kLine = lego::kExCacheLineBytes;

struct Flags {
  size_t capacity_mb = 64;
  size_t ratio = 4;
  size_t accesses = 200000;
  std::string delivery = "both";
  std::string policy = "fifo";
  std::string op = "rmw";
  size_t threads = 1;
  bool predict_dirty = true;
  int write_pct = -1;  // -1: from op
  std::string pattern = "uniform";
  std::string pcache = "auto";
  bool csv = false;
};

const char* kUsage = R"(usage: excache_bench [--capacity-mb=64] [--ratio=4] [--accesses=200000]
           [--delivery=both|sigbus|thread] [--policy=fifo|clock|refault] [--op=rmw|read]
           [--write-pct=N] [--pattern=uniform|zipf|hotset] [--threads=1]
           [--predict-dirty=1] [--pcache=auto|on|off|both] [--csv]

µs per random 4 KiB access over a region --ratio times the ExCache (--capacity-mb),
against an in-process backend, for each delivery, beside the same loop on plain memory.
--write-pct: percent of accesses that store (overrides --op: rmw = 100, read = 0).
--pattern: uniform, zipf (Zipf 0.99 over scattered lines) or hotset (90% of accesses to
half the ExCache's lines, 10% to any). --pcache: use lego_pcache.ko; both: without and
with it, and their ratio. --csv: rows instead of a table.
)";

constexpr const char* kDeliveries[] = {"both", "sigbus", "thread"};
constexpr const char* kPolicies[] = {"fifo", "clock", "refault"};
constexpr const char* kOps[] = {"rmw", "read"};
constexpr const char* kPatterns[] = {"uniform", "zipf", "hotset"};
constexpr const char* kPcache[] = {"auto", "on", "off", "both"};

Flags parse(int argc, char** argv) {
  namespace flags = lego::flags;
  Flags f;
  auto count = [](const char* flag, const char* a, long hi) {
    return static_cast<size_t>(flags::number(flag, a, 1, hi));
  };
  const std::vector<flags::Flag> table = {
      {"capacity-mb", true,
       [&](const char* a) { f.capacity_mb = count("--capacity-mb", a, 1 << 20); }},
      {"ratio", true, [&](const char* a) { f.ratio = count("--ratio", a, 1024); }},
      {"accesses", true,
       [&](const char* a) { f.accesses = count("--accesses", a, 1000000000000); }},
      {"delivery", true,
       [&](const char* a) { f.delivery = flags::choice("--delivery", a, kDeliveries); }},
      {"policy", true, [&](const char* a) { f.policy = flags::choice("--policy", a, kPolicies); }},
      {"op", true, [&](const char* a) { f.op = flags::choice("--op", a, kOps); }},
      {"threads", true, [&](const char* a) { f.threads = count("--threads", a, 1024); }},
      {"predict-dirty", true,
       [&](const char* a) { f.predict_dirty = flags::number("--predict-dirty", a, 0, 1) != 0; }},
      {"write-pct", true,
       [&](const char* a) {
         f.write_pct = static_cast<int>(flags::number("--write-pct", a, 0, 100));
       }},
      {"pattern", true,
       [&](const char* a) { f.pattern = flags::choice("--pattern", a, kPatterns); }},
      {"pcache", true, [&](const char* a) { f.pcache = flags::choice("--pcache", a, kPcache); }},
      {"csv", false, [&](const char*) { f.csv = true; }},
  };
  const int first = flags::parse(argc, argv, {"excache_bench", kUsage, 2, false}, table);
  if (first < argc) flags::usage_error(std::string("unexpected argument '") + argv[first] + "'");
  if (f.write_pct < 0) f.write_pct = f.op == "read" ? 0 : 100;
  return f;
}

// Line indexes drawn from Zipf(0.99) by inverse CDF; rank r maps to a scattered line.
class ZipfLines {
 public:
  explicit ZipfLines(size_t lines) : cdf_(lines) {
    double sum = 0;
    for (size_t r = 0; r < lines; ++r) sum += 1.0 / std::pow(static_cast<double>(r + 1), 0.99);
    double acc = 0;
    for (size_t r = 0; r < lines; ++r) {
      acc += 1.0 / std::pow(static_cast<double>(r + 1), 0.99) / sum;
      cdf_[r] = acc;
    }
  }
  size_t operator()(std::mt19937_64& rng) const {
    const double u = std::uniform_real_distribution<double>(0, 1)(rng);
    const size_t rank =
        static_cast<size_t>(std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin());
    return scatter(std::min(rank, cdf_.size() - 1), cdf_.size());
  }
  // An odd multiplier permutes [0, 2^k); lines is a power of two times 256 in practice,
  // otherwise fold with a modulo (still scattered, slightly non-uniform).
  static size_t scatter(size_t k, size_t lines) { return (k * 0x9E3779B97F4A7C15ull) % lines; }

 private:
  std::vector<double> cdf_;
};

void fill_incompressible(char* base, size_t bytes) {
  uint64_t x = 0x243f6a8885a308d3ull;
  auto* w = reinterpret_cast<uint64_t*>(base);
  for (size_t i = 0; i < bytes / 8; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    w[i] = x;
  }
}

// Returns seconds for `threads` x `accesses` random accesses over [base, base + bytes).
double run_loop(char* base, size_t bytes, const Flags& f) {
  const size_t lines = bytes / kLine;
  std::unique_ptr<ZipfLines> zipf;
  if (f.pattern == "zipf") zipf = std::make_unique<ZipfLines>(lines);
  const size_t hot_lines =
      f.pattern == "hotset" ? std::max<size_t>(1, (f.capacity_mb << 20) / kLine / 2) : 0;
  std::vector<std::thread> threads;
  auto start = std::chrono::steady_clock::now();
  for (size_t t = 0; t < f.threads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(42 + t);
      uint64_t sink = 0;
      for (size_t i = 0; i < f.accesses; ++i) {
        size_t line;
        if (zipf) {
          line = (*zipf)(rng);
        } else if (hot_lines > 0 && rng() % 10 != 0) {
          line = ZipfLines::scatter(rng() % hot_lines, lines);
        } else {
          line = rng() % lines;
        }
        auto* word = reinterpret_cast<volatile uint64_t*>(base + line * kLine) + (i % 512);
        const uint64_t v = *word;
        if (static_cast<int>(rng() % 100) < f.write_pct) *word = v + 1;
        sink += v;
      }
      if (sink == 42) fprintf(stderr, " ");  // keep the loads
    });
  }
  for (auto& th : threads) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

uint64_t percentile(const ExCacheStats& a, const ExCacheStats& b, double q) {
  uint64_t total = 0;
  for (size_t i = 0; i < ExCacheStats::kLatencyBuckets; ++i) {
    total += b.miss_latency_log2_ns[i] - a.miss_latency_log2_ns[i];
  }
  if (total == 0) return 0;
  const auto rank = static_cast<uint64_t>(q * static_cast<double>(total) + 0.999);
  uint64_t seen = 0;
  for (size_t i = 0; i < ExCacheStats::kLatencyBuckets; ++i) {
    seen += b.miss_latency_log2_ns[i] - a.miss_latency_log2_ns[i];
    if (seen >= rank) return uint64_t{2} << i;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Flags f = parse(argc, argv);
  const size_t capacity = f.capacity_mb << 20;
  const size_t bytes = capacity * f.ratio;
  const size_t total_accesses = f.accesses * f.threads;

  if (f.csv) {
    printf(
        "setup,op,threads,capacity_mb,ratio,us_per_access,misses_per_access,"
        "miss_p50_us,miss_p99_us,write_backs,clean_drops,ratio_to_native\n");
  }

  // The floor: the same loop on plain memory that fits.
  double native_us;
  {
    std::unique_ptr<char[]> plain(new char[bytes]);
    fill_incompressible(plain.get(), bytes);
    native_us = run_loop(plain.get(), bytes, f) * 1e6 / static_cast<double>(total_accesses);
    if (f.csv) {
      printf("native,%s,%zu,%zu,%zu,%.3f,0,0,0,0,0,1\n", f.op.c_str(), f.threads, f.capacity_mb,
             f.ratio, native_us);
    } else {
      printf("%-22s %8.3f us/access\n", "native (no cap)", native_us);
    }
  }

  // One run of the workload under an ExCache; returns µs per access, or < 0 on error.
  auto run_excache = [&](const char* name, const std::string& pcache) -> double {
    lego::testing::MapBackend backend(bytes / kLine + 64);
    ExCacheOptions options;
    options.capacity_bytes = capacity;
    options.region_bytes = bytes;
    options.delivery = std::string(name) == "sigbus" ? ExCacheOptions::Delivery::kSigbus
                                                     : ExCacheOptions::Delivery::kHandlerThread;
    options.predict_dirty = f.predict_dirty;
    options.policy = f.policy == "clock"     ? ExCacheOptions::Policy::kClock
                     : f.policy == "refault" ? ExCacheOptions::Policy::kRefault
                                             : ExCacheOptions::Policy::kFifo;
    options.kernel_module = pcache == "on"    ? ExCacheOptions::KernelModule::kRequire
                            : pcache == "off" ? ExCacheOptions::KernelModule::kOff
                                              : ExCacheOptions::KernelModule::kAuto;
    auto created = ExCache::create(options, &backend);
    if (!created.is_ok()) {
      fprintf(stderr, "ExCache::create: %s\n", created.status().to_string().c_str());
      return -1;
    }
    std::unique_ptr<ExCache> cache = std::move(created.value());
    char* base = static_cast<char*>(cache->region_base());
    fill_incompressible(base, bytes);

    const ExCacheStats before = cache->stats();
    const double secs = run_loop(base, bytes, f);
    const ExCacheStats after = cache->stats();
    const double us = secs * 1e6 / static_cast<double>(total_accesses);
    const double misses =
        static_cast<double>(after.misses - before.misses) / static_cast<double>(total_accesses);
    const double p50 = static_cast<double>(percentile(before, after, 0.50)) / 1000.0;
    const double p99 = static_cast<double>(percentile(before, after, 0.99)) / 1000.0;
    const uint64_t wb = after.write_backs - before.write_backs;
    const uint64_t drops = after.clean_drops - before.clean_drops;
    const std::string setup = std::string("excache-") + name + "-" + f.policy +
                              (cache->uses_kernel_module() ? "-pcache" : "");
    if (f.csv) {
      printf("%s,%s,%zu,%zu,%zu,%.3f,%.3f,%.1f,%.1f,%llu,%llu,%.1f\n", setup.c_str(), f.op.c_str(),
             f.threads, f.capacity_mb, f.ratio, us, misses, p50, p99,
             static_cast<unsigned long long>(wb), static_cast<unsigned long long>(drops),
             us / native_us);
    } else {
      printf(
          "%-28s %8.3f us/access  %.3f misses/access  miss p50<=%.1f us p99<=%.1f us  "
          "write_backs=%llu clean_drops=%llu module_calls=%llu  %.0fx native\n",
          setup.c_str(), us, misses, p50, p99, static_cast<unsigned long long>(wb),
          static_cast<unsigned long long>(drops),
          static_cast<unsigned long long>(after.module_calls - before.module_calls),
          us / native_us);
    }
    fflush(stdout);
    return us;
  };

  for (const char* name : {"sigbus", "thread"}) {
    if (f.delivery != "both" && f.delivery != name) continue;
    if (f.pcache != "both") {
      if (run_excache(name, f.pcache) < 0) return 1;
      continue;
    }
    const double without = run_excache(name, "off");
    const double with = run_excache(name, "on");
    if (without < 0 || with < 0) return 1;
    printf("pcache ratio %s/%s: without %.3f us, with %.3f us per access: %.2fx\n", name,
           f.policy.c_str(), without, with, without / with);
  }
  return 0;
}
