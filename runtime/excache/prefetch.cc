// runtime/excache/prefetch.cc: prefetch (ExCacheOptions::prefetch_lines), the miss path's
// policy for streams.
//
// A stream is a run of misses at a steady stride (LegoOS and Leap detect the same trend
// in the fault history). The third miss on a stride starts prefetching: the miss fetches
// `window` lines ahead on the stride together with its own (one backend call; for stride
// +1 one UFFDIO_COPY maps them all), and the stream expects its next miss just past them.
// A miss there, or a little further (lines in between were resident), doubles the window.
// Lines ahead are claimed by CAS kAbsent -> kFilling like any miss's and take frames only
// without waiting (try_acquire_frame): a prefetch stops short rather than wait while it
// owns lines, so the deadlock argument at the top of fault.cc is unchanged (the extra
// lines it owns complete without waiting for anything but the backend).
//
// A window is fetched either with the miss that asked for it (fill_with_prefetch) or in
// the background (start_background_prefetch): its lines are kPrefetching, owned by a
// prefetch buffer rather than a thread, and whoever touches one first completes it
// (complete_prefetch). The backend call itself, with its retries, is fault.cc's
// fetch_claimed.
#include <algorithm>
#include <cstring>

#include "runtime/excache/excache_impl.h"
#include "runtime/excache/pcache_dev.h"

namespace lego {

using namespace excache_internal;

size_t ExCache::Impl::plan_prefetch(uint64_t index, int64_t* stride_out) {
  constexpr int64_t kMaxStride = 16;
  constexpr uint32_t kFirstWindow = 4;
  for (Stream& s : streams) {
    const int64_t stride = s.stride.load(std::memory_order_relaxed);
    const uint64_t next = s.next.load(std::memory_order_relaxed);
    if (stride == 0 || next == kNoLine) continue;
    const int64_t d = static_cast<int64_t>(index - next);
    const uint32_t window = s.window.load(std::memory_order_relaxed);
    if (d % stride != 0 || d / stride < 0 || d / stride > int64_t{window} + 1) continue;
    // The stream goes on: prefetch, with a window twice the last one.
    const size_t grown =
        std::min<size_t>(window == 0 ? kFirstWindow : size_t{window} * 2, prefetch_max);
    s.window.store(static_cast<uint32_t>(grown), std::memory_order_relaxed);
    s.last.store(index, std::memory_order_relaxed);
    s.next.store(index + static_cast<uint64_t>(stride), std::memory_order_relaxed);
    *stride_out = stride;
    return grown;
  }
  for (Stream& s : streams) {
    // A second miss near an earlier one: a stream candidate, confirmed by a third miss one
    // stride on (above). Two misses alone prefetch nothing: random misses rarely land one
    // stride apart twice in a row.
    const uint64_t last = s.last.load(std::memory_order_relaxed);
    if (last == kNoLine) continue;
    const int64_t d = static_cast<int64_t>(index - last);
    if (d == 0 || d < -kMaxStride || d > kMaxStride) continue;
    s.stride.store(d, std::memory_order_relaxed);
    s.window.store(0, std::memory_order_relaxed);
    s.last.store(index, std::memory_order_relaxed);
    s.next.store(index + static_cast<uint64_t>(d), std::memory_order_relaxed);
    return 0;
  }
  Stream& s = streams[stream_clock.fetch_add(1, std::memory_order_relaxed) % kStreams];
  s.stride.store(0, std::memory_order_relaxed);
  s.next.store(kNoLine, std::memory_order_relaxed);
  s.window.store(0, std::memory_order_relaxed);
  s.last.store(index, std::memory_order_relaxed);
  return 0;
}

ExCache::Impl::PrefetchBuffer* ExCache::Impl::acquire_prefetch_buffer() {
  for (int round = 0; round < 2; ++round) {
    if (PrefetchBuffer* pb = try_acquire_prefetch_buffer(); pb != nullptr) return pb;
    // Every buffer busy: background windows nobody came for (a stream that stopped, or
    // jumped). Complete one -- it maps lines the program may still want -- and retry.
    for (uint32_t b = 0; b < kPrefetchBuffers; ++b) {
      if (complete_prefetch(b, /*go_on=*/false)) break;
    }
  }
  return nullptr;
}

ExCache::Impl::PrefetchBuffer* ExCache::Impl::try_acquire_prefetch_buffer() {
  for (uint32_t b = 0; b < kPrefetchBuffers; ++b) {
    uint32_t idle = PrefetchBuffer::kIdle;
    if (prefetch_buffers[b].phase.compare_exchange_strong(idle, PrefetchBuffer::kSync,
                                                          std::memory_order_acquire)) {
      PrefetchBuffer& pb = prefetch_buffers[b];
      pb.n = 0;
      pb.m = 0;
      pb.started = false;
      return &pb;
    }
  }
  return nullptr;
}

void ExCache::Impl::release_prefetch_buffer(PrefetchBuffer& pb) {
  pb.phase.store(PrefetchBuffer::kIdle, std::memory_order_release);
}

void ExCache::Impl::claim_ahead(PrefetchBuffer& pb, uint64_t from, size_t want, LineKind kind) {
  const uint64_t slot_bits = static_cast<uint64_t>(&pb - prefetch_buffers) << kPrefetchSlotShift;
  for (size_t k = 1; k <= want && pb.n <= kMaxPrefetch; ++k) {
    const uint64_t j = from + static_cast<uint64_t>(pb.stride * static_cast<int64_t>(k));
    if (j >= nlines) break;  // past either end of the region (unsigned wrap included)
    uint64_t s = lines[j].load(std::memory_order_acquire);
    if (kind_of(s) != kAbsent ||
        !lines[j].compare_exchange_strong(s, with_kind(s, kFilling), std::memory_order_acquire)) {
      break;
    }
    uint32_t f;
    if (!try_acquire_frame(&f)) {
      lines[j].store(s, std::memory_order_release);  // we owned it: give it back untouched
      break;
    }
    if (kind == kPrefetching) {
      // Published with its owner and frame: from here anyone may complete the prefetch.
      lines[j].store((with_kind(s, kPrefetching) & ~kPrefetchSlotMask) | slot_bits,
                     std::memory_order_release);
    }
    pb.index[pb.n] = j;
    pb.state[pb.n] = s;
    pb.frame[pb.n] = f;
    ++pb.n;
  }
}

void ExCache::Impl::list_backed(PrefetchBuffer& pb) {
  pb.m = 0;
  for (size_t k = 0; k < pb.n; ++k) {
    if (pb.state[k] & kBackedBit) {
      pb.fetch_addrs[pb.m] = line_addr(pb.index[k]);
      pb.fetch_slot[pb.m++] = static_cast<uint32_t>(k);
    }
  }
}

void ExCache::Impl::map_claimed(PrefetchBuffer& pb, uint64_t start_ns) {
  // A line's mode: dirty in a write stream (pb.write: the missed line was stored to);
  // otherwise its own (a load miss, or history that predicts a store).
  DirtyChoice choice[kMaxPrefetch + 1];
  const size_t n = pb.n;
  for (size_t k = 0; k < n; ++k) {
    if (pb.write && (k > 0 || pb.phase.load(std::memory_order_relaxed) != PrefetchBuffer::kSync)) {
      choice[k] = {true, pb.state[k] & (kWrittenHintBit | kPredictMask)};
    } else {
      choice[k] =
          choose_dirty(pb.state[k], pb.write, options.predict_dirty && !pcache_mkclean, stats);
    }
  }
  for (size_t k = 0; k < n;) {
    size_t run = 1;
    if (pb.stride == 1) {
      while (k + run < n && choice[k + run].dirty == choice[k].dirty) ++run;
    }
    map_lines(pb.index[k], pb.data + k * kLine, run, choice[k].dirty);
    k += run;
  }
  // The clean ones with a store history become writable and clean in one MKCLEAN (see
  // fill), before they are published; fetch_addrs is free to reuse now.
  bool mkclean[kMaxPrefetch + 1];
  for (size_t k = 0; k < n; ++k) {
    mkclean[k] = wants_mkclean(pb.state[k], choice[k].dirty);
  }
  if (pcache_mkclean) {
    uint32_t nc = 0;
    for (size_t k = 0; k < n; ++k) {
      if (mkclean[k]) pb.fetch_addrs[nc++] = line_addr(pb.index[k]);
    }
    if (nc > 0) {
      (void)PcacheDevice::mkclean(pcache_fd, pb.fetch_addrs, nc, nullptr);
      stats.add(Counter::module_calls);
    }
  }
  for (size_t k = 0; k < n; ++k) {
    const bool backed = (pb.state[k] & kBackedBit) != 0;
    lines[pb.index[k]].store(make_state(choice[k].dirty ? kDirty : kClean, backed, pb.frame[k]) |
                                 choice[k].persist | (mkclean[k] ? kMkcleanBit : 0),
                             std::memory_order_release);
    frames[pb.frame[k]].store(pb.index[k] + 1, std::memory_order_release);
    policy->on_fill(frames[pb.frame[k]], refault(pb.state[k]));
  }
  if (start_ns != 0) stats.record_miss_ns(now_ns() - start_ns);
  release_prefetch_buffer(pb);
}

bool ExCache::Impl::fill_with_prefetch(uint64_t index, uint64_t state, bool write, uint32_t frame,
                                       size_t want, int64_t stride, uint64_t start_ns) {
  PrefetchBuffer* pbp = acquire_prefetch_buffer();
  if (pbp == nullptr) return false;
  PrefetchBuffer& pb = *pbp;
  pb.stride = stride;
  pb.write = write;
  pb.index[0] = index;
  pb.state[0] = state;
  pb.frame[0] = frame;
  pb.n = 1;
  claim_ahead(pb, index, want, kFilling);
  if (pb.n == 1) {
    release_prefetch_buffer(pb);
    return false;
  }
  const uint64_t last = pb.index[pb.n - 1];
  const size_t got = pb.n - 1;
  stats.add(Counter::misses);
  stats.add(Counter::prefetches);
  stats.add(Counter::prefetched_lines, got);
  list_backed(pb);
  fetch_claimed(pb);
  // The next window is fetched in the background while the program works through this one.
  start_background_prefetch(last, stride, want, write);
  map_claimed(pb, start_ns);
  // The stream's next miss is expected past both windows.
  for (Stream& st : streams) {
    if (st.last.load(std::memory_order_relaxed) == index) {
      st.last.store(last, std::memory_order_relaxed);
      st.next.store(last + static_cast<uint64_t>(stride), std::memory_order_relaxed);
      break;
    }
  }
  return true;
}

void ExCache::Impl::start_background_prefetch(uint64_t from, int64_t stride, size_t want,
                                              bool write) {
  PrefetchBuffer* pbp = acquire_prefetch_buffer();
  if (pbp == nullptr) return;
  PrefetchBuffer& pb = *pbp;
  pb.stride = stride;
  pb.write = write;
  claim_ahead(pb, from, want, kPrefetching);
  if (pb.n == 0) {
    release_prefetch_buffer(pb);
    return;
  }
  list_backed(pb);
  if (pb.m > 0) {
    // A failure to start is not fatal: completion fetches synchronously then.
    pb.started = backend
                     ->start_fetch_batch(std::span<const uint64_t>(pb.fetch_addrs, pb.m),
                                         pb.data + (pb.n - pb.m) * kLine, &pb.ticket)
                     .is_ok();
  }
  stats.add(Counter::prefetches);
  stats.add(Counter::prefetched_lines, pb.n);
  pb.phase.store(PrefetchBuffer::kAsync, std::memory_order_release);
}

bool ExCache::Impl::complete_prefetch(uint32_t slot, bool go_on) {
  PrefetchBuffer& pb = prefetch_buffers[slot];
  uint32_t async = PrefetchBuffer::kAsync;
  if (!pb.phase.compare_exchange_strong(async, PrefetchBuffer::kCompleting,
                                        std::memory_order_acquire)) {
    return false;
  }
  // The lines stay kPrefetching (owned by the buffer, now by us) until map_claimed
  // publishes them: claim_ahead took them from kAbsent, so a fill that has to wait for
  // them waits like for kFilling.
  fetch_claimed(pb);
  const uint64_t last = pb.index[pb.n - 1];
  const int64_t stride = pb.stride;
  const size_t want = pb.n;
  const bool write = pb.write;
  if (go_on) {
    // The program reached this window: fetch the next one while it works through it.
    const size_t grown = std::min<size_t>(std::max<size_t>(want * 2, 4), prefetch_max);
    start_background_prefetch(last, stride, grown, write);
  }
  map_claimed(pb, 0);
  return true;
}

void ExCache::Impl::complete_all_prefetches() {
  if (prefetch_buffers == nullptr) return;
  for (uint32_t b = 0; b < kPrefetchBuffers; ++b) {
    Backoff backoff;
    // One being completed by someone else: wait for it to finish.
    while (!complete_prefetch(b, false) &&
           prefetch_buffers[b].phase.load(std::memory_order_acquire) ==
               PrefetchBuffer::kCompleting) {
      backoff.pause();
    }
  }
}

}  // namespace lego
