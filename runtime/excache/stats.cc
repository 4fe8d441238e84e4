// runtime/excache/stats.cc: ExCache counters. Each thread adds to one of 16 cache-line-aligned
// stripes chosen from its stack address (thread_local would be simpler but a dynamic TLS
// access may allocate, which a SIGBUS handler must not); stats() sums the stripes.
// The miss-latency histogram is a fixed array of log2(ns) buckets: no allocation, one
// relaxed increment per miss.
#include <time.h>

#include "runtime/excache/excache_impl.h"

namespace lego {

using namespace excache_internal;

uint64_t excache_internal::now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // vDSO, async-signal-safe, ~20 ns
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

Stats::Stripe& Stats::mine() {
  // Thread stacks are megabytes apart: mix the address bits above 64 KiB.
  const auto sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  const uint64_t h = (static_cast<uint64_t>(sp) >> 16) * 0x9e3779b97f4a7c15ull;
  return stripes_[h >> 60];
}
static_assert(sizeof(uint64_t) * 8 - 60 == 4, "16 stripes");

void Stats::add(Counter c, uint64_t n) {
  mine().counters[static_cast<size_t>(c)].fetch_add(n, std::memory_order_relaxed);
}

void Stats::record_miss_ns(uint64_t ns) {
  size_t bucket = ns < 2 ? 0 : static_cast<size_t>(63 - __builtin_clzll(ns));
  if (bucket >= ExCacheStats::kLatencyBuckets) bucket = ExCacheStats::kLatencyBuckets - 1;
  mine().latency[bucket].fetch_add(1, std::memory_order_relaxed);
}

void Stats::snapshot(ExCacheStats* out) const {
  uint64_t sum[kNumCounters] = {};
  for (const Stripe& s : stripes_) {
    for (size_t c = 0; c < kNumCounters; ++c)
      sum[c] += s.counters[c].load(std::memory_order_relaxed);
    for (size_t b = 0; b < ExCacheStats::kLatencyBuckets; ++b) {
      out->miss_latency_log2_ns[b] += s.latency[b].load(std::memory_order_relaxed);
    }
  }
#define LEGO_EXCACHE_SUM(name, doc) out->name = sum[static_cast<size_t>(Counter::name)];
  LEGO_EXCACHE_COUNTERS(LEGO_EXCACHE_SUM)
#undef LEGO_EXCACHE_SUM

  uint64_t total = 0;
  for (uint64_t n : out->miss_latency_log2_ns) total += n;
  auto percentile = [&](uint64_t per_mille) -> uint64_t {
    if (total == 0) return 0;
    const uint64_t rank = (total * per_mille + 999) / 1000;  // 1-based rank of the sample
    uint64_t seen = 0;
    for (size_t b = 0; b < ExCacheStats::kLatencyBuckets; ++b) {
      seen += out->miss_latency_log2_ns[b];
      if (seen >= rank) return uint64_t{2} << b;  // the bucket's upper bound
    }
    return uint64_t{2} << (ExCacheStats::kLatencyBuckets - 1);
  };
  out->miss_p50_ns = percentile(500);
  out->miss_p99_ns = percentile(990);
}

ExCacheStats ExCache::stats() const {
  ExCacheStats out;
  impl_->stats.snapshot(&out);
  out.resident_lines = impl_->resident.load(std::memory_order_relaxed);
  out.capacity_lines = impl_->capacity;
  return out;
}

}  // namespace lego
