// runtime/evict.cc: frames, victim selection, write-back, and discard().
//
// Frames bound residency: a miss needs a frame before it maps its line; when none is free
// the missing thread (try-locking evict_lock) evicts a batch. Other missers meanwhile wait
// for the frames that batch frees instead of starting evictions of their own, so one
// eviction round serves several misses.
//
// Evicting a batch, in this order (the order is what makes it safe):
//   1. take victims: the clock hand walks the frames; the policy (ops table, chosen in
//      policy_ops below) may spare a frame; a line is taken by CAS kClean/kDirty ->
//      kEvicting. From here on, any fault on it waits until it is kAbsent again.
//   2. write-protect the dirty victims (adjacent lines share one ioctl). After the ioctl
//      returns the TLBs are flushed: no store can reach the line any more; a racing store
//      faults and waits (step 1). Clean victims are write-protected already (kClean
//      invariant), so they need nothing. Stores that landed before are in the line.
//   3. write back the dirty victims, straight from the (now read-only) lines: one
//      LineBackend::write_back call for the batch, no copy.
//   4. mark them backed (a later miss fetches them) and zap every victim with one
//      MADV_DONTNEED batch (process_madvise: one TLB flush for the batch).
//   5. publish kAbsent and free the frames (one goes to the caller).
// A faulting thread that waited on a victim re-fetches after step 5 and reads what step 3
// stored. Cost per batch of b lines, d dirty: d write-protect ioctls (each flushes the TLB;
// ~0.9 µs single-threaded), one write_back, one zap (~0.6 µs per line).
// Known cost: the d write-protect flushes are per line (victims are scattered, and
// UFFDIO_WRITEPROTECT takes one range). With one thread they are local (~0.9 µs); with
// program threads running on other CPUs each becomes a TLB-shootdown IPI, which is the
// likely reason 2 threads on 2 vCPUs cost ~2x more per access than 1 (excache_bench
// --threads=2). Dirty prediction keeps d high on purpose. Ways out: the kernel module
// (kmod/: clear PTE dirty bits under one flush), or UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN
// (dirty bits without write faults; but async WP no longer blocks racing stores, so
// step 2 would need another way to fence writers, e.g. UFFDIO_MOVE of the victim).
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdio>

#include <cerrno>

#include "runtime/excache_impl.h"

namespace lego {

using namespace excache_internal;

const PolicyOps* excache_internal::policy_ops(ExCacheOptions::Policy policy) {
  switch (policy) {
    case ExCacheOptions::Policy::kFifo:
      return &kFifoPolicyOps;
    case ExCacheOptions::Policy::kClock:
      return &kClockPolicyOps;
  }
  return nullptr;
}

bool ExCache::Impl::pop_free(uint32_t* frame) {
  frame_lock.lock();
  const bool got = free_top > 0;
  if (got) *frame = free_stack[--free_top];
  frame_lock.unlock();
  if (got) resident.fetch_add(1, std::memory_order_relaxed);
  return got;
}

void ExCache::Impl::free_frame(uint32_t frame) {
  frame_lock.lock();
  free_stack[free_top++] = frame;
  frame_lock.unlock();
  resident.fetch_sub(1, std::memory_order_relaxed);
}

uint32_t ExCache::Impl::acquire_frame() {
  Backoff backoff;
  for (;;) {
    uint32_t frame;
    if (pop_free(&frame)) return frame;
    if (evict_lock.try_lock()) {
      // Re-check under the lock: the previous evictor may just have freed frames.
      const bool got = pop_free(&frame) || evict_batch_locked(&frame);
      evict_lock.unlock();
      if (got) return frame;
    }
    backoff.pause();  // someone else is evicting, or every frame is busy filling
  }
}

void ExCache::Impl::zap_victims(size_t n) {
  size_t runs = 0;
  for (size_t i = 0; i < n; ++i) {
    std::byte* line = base + (victims[i].index << kLineShift);
    if (runs > 0 &&
        static_cast<std::byte*>(zap_iov[runs - 1].iov_base) + zap_iov[runs - 1].iov_len == line) {
      zap_iov[runs - 1].iov_len += kLine;
    } else {
      zap_iov[runs++] = iovec{line, kLine};
    }
  }
  if (pidfd >= 0) {
    const long want = static_cast<long>(n * kLine);
    if (syscall(SYS_process_madvise, pidfd, zap_iov.get(), runs, MADV_DONTNEED, 0) == want) return;
    // Partial or refused: MADV_DONTNEED is idempotent, so redo every run below.
  }
  for (size_t i = 0; i < runs; ++i) {
    if (madvise(zap_iov[i].iov_base, zap_iov[i].iov_len, MADV_DONTNEED) != 0) {
      fatal("madvise(MADV_DONTNEED) of victims failed", errno,
            reinterpret_cast<uint64_t>(zap_iov[i].iov_base));
    }
  }
}

bool ExCache::Impl::evict_batch_locked(uint32_t* out) {
  // 1. Take victims. Two laps at most: CLOCK may have to clear every reference bit first.
  size_t n = 0;
  const size_t max_scan = 2 * capacity + batch;
  for (size_t scanned = 0; n < batch && scanned < max_scan; ++scanned) {
    const uint32_t f = static_cast<uint32_t>(hand);
    hand = hand + 1 == capacity ? 0 : hand + 1;
    const uint64_t id = frames[f].load(std::memory_order_acquire) & kFrameLineMask;
    if (id == 0) continue;  // free, or its fill has not published yet
    if (policy->spare(frames[f])) continue;
    std::atomic<uint64_t>& word = lines[id - 1];
    uint64_t s = word.load(std::memory_order_acquire);
    const LineKind kind = kind_of(s);
    if (frame_of(s) != f || (kind != kClean && kind != kDirty)) continue;  // busy or moved
    if (!word.compare_exchange_strong(s, with_kind(s, kEvicting), std::memory_order_acquire)) {
      continue;  // became busy (a first store is un-protecting it): leave it
    }
    victims[n++] = Victim{id - 1, f, kind == kDirty};
  }
  if (n == 0) return false;

  // Sorted victims make adjacent lines share ioctls and madvise runs, and give the backend
  // ascending addresses.
  for (size_t i = 1; i < n; ++i) {
    for (size_t j = i; j > 0 && victims[j - 1].index > victims[j].index; --j) {
      std::swap(victims[j - 1], victims[j]);
    }
  }

  // 2. Write-protect dirty victims, one ioctl per run of adjacent dirty lines.
  size_t dirty = 0;
  for (size_t i = 0; i < n;) {
    if (!victims[i].dirty) {
      ++i;
      continue;
    }
    size_t j = i + 1;
    while (j < n && victims[j].dirty && victims[j].index == victims[j - 1].index + 1) ++j;
    const uint64_t addr = line_addr(victims[i].index);
    if (int err = write_protect(addr, (j - i) * kLine, true); err != 0) {
      fatal("UFFDIO_WRITEPROTECT of victims failed", err, addr);
    }
    for (size_t k = i; k < j; ++k) {
      write_backs[dirty++] = LineBackend::WriteBack{line_addr(victims[k].index),
                                                    base + (victims[k].index << kLineShift)};
    }
    i = j;
  }

  // 3. Write back, straight from the write-protected lines.
  if (dirty > 0) {
    std::span<const LineBackend::WriteBack> batch_span(write_backs.get(), dirty);
    Status st;
    for (int attempt = 1;; ++attempt) {
      st = backend->write_back(batch_span);
      if (st.is_ok() || !transient(st.code()) || attempt == 8) break;
    }
    if (!st.is_ok()) fatal("LineBackend::write_back failed", st.code(), write_backs[0].addr);
    // A fork under way: the child may find these lines absent and read the snapshot
    // (fork.cc). An error only means the child is gone already.
    if (const int64_t snap = fork_snapshot.load(std::memory_order_acquire); snap >= 0) {
      (void)backend->write_back_snapshot(static_cast<uint32_t>(snap), batch_span);
    }
    stats.add(kWriteBacks, dirty);
    stats.add(kBytesWritten, dirty * kLine);
  }

  // 4. Zap the whole batch.
  zap_victims(n);

  // 5. Publish kAbsent (dirty victims now backed) and free the frames; keep one.
  for (size_t i = 0; i < n; ++i) {
    const Victim& v = victims[i];
    frames[v.frame].store(0, std::memory_order_relaxed);
    std::atomic<uint64_t>& word = lines[v.index];
    const uint64_t s = word.load(std::memory_order_relaxed);
    const bool backed = v.dirty || (s & kBackedBit) != 0;
    word.store(make_state(kAbsent, backed, 0) | (s & kPersistMask), std::memory_order_release);
    if (i == 0) {
      *out = v.frame;
    } else {
      free_frame(v.frame);
    }
  }
  stats.add(kEvictions, n);
  stats.add(kCleanDrops, n - dirty);
  stats.add(kEvictionBatches);
  return true;
}

Status ExCache::Impl::discard(uint64_t addr, uint64_t len) {
  if (len == 0) return Status::ok();
  const uint64_t begin = reinterpret_cast<uint64_t>(base);
  len = (len + kLine - 1) & ~uint64_t{kLine - 1};
  if ((addr & (kLine - 1)) != 0 || addr < begin || addr - begin > size || len > size ||
      addr - begin + len > size) {
    char what[160];
    snprintf(what, sizeof what,
             "ExCache::discard: [%#lx, +%#lx) is outside the region [%#lx, +%#lx) or unaligned",
             static_cast<unsigned long>(addr), static_cast<unsigned long>(len),
             static_cast<unsigned long>(begin), static_cast<unsigned long>(size));
    return Status(EINVAL, what);
  }

  // We own lines below; a program signal handler touching them on this thread would wait
  // for us forever, so hold off signals (see fault.cc).
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);

  Status result;
  uint64_t i = line_index(addr);
  const uint64_t end = i + (len >> kLineShift);
  constexpr uint64_t kChunk = 512;  // lines owned at once: 2 MiB per madvise/release
  while (i < end) {
    const uint64_t first = i;
    const uint64_t generation = fork_generation.load(std::memory_order_seq_cst);
    bool any_resident = false, any_backed = false;
    Backoff backoff;
    while (i < end && i - first < kChunk) {
      std::atomic<uint64_t>& word = lines[i];
      uint64_t s = word.load(std::memory_order_acquire);
      const LineKind kind = kind_of(s);
      if (kind != kAbsent && kind != kClean && kind != kDirty) {
        if (i > first) break;  // finish what we own before waiting (never wait owning)
        backoff.pause();
        continue;
      }
      // A resident line keeps its frame number; an absent one is marked frameless.
      const uint64_t owned = kind == kAbsent
                                 ? make_state(kEvicting, false, kNoFrame) | (s & kBackedBit)
                                 : with_kind(s, kEvicting);
      if (!word.compare_exchange_weak(s, owned, std::memory_order_acquire)) continue;
      any_resident |= kind != kAbsent;
      any_backed |= (s & kBackedBit) != 0;
      ++i;
    }
    if (i == first) continue;

    const uint64_t chunk_addr = line_addr(first);
    const uint64_t chunk_len = (i - first) << kLineShift;
    if (any_resident &&
        madvise(reinterpret_cast<void*>(chunk_addr), chunk_len, MADV_DONTNEED) != 0) {
      fatal("madvise(MADV_DONTNEED) in discard failed", errno, chunk_addr);
    }
    // The backend must drop the range before any line of it can be written back again,
    // i.e. before we publish kAbsent below. Lines read as zeros afterwards even if the
    // backend fails: we clear their backed bit regardless.
    if (any_backed) {
      if (Status st = backend->release(chunk_addr, chunk_len); !st && result) result = st;
      // A fork under way, or one that happened since this chunk began: the child may find
      // these lines absent and read the snapshot, where they must be gone too (fork.cc).
      int64_t snap = fork_snapshot.load(std::memory_order_seq_cst);
      if (snap < 0 && fork_generation.load(std::memory_order_seq_cst) != generation) {
        snap = last_fork_snapshot.load(std::memory_order_relaxed);
      }
      if (snap >= 0)
        (void)backend->release_snapshot(static_cast<uint32_t>(snap), chunk_addr, chunk_len);
    }
    uint64_t dropped = 0;
    for (uint64_t j = first; j < i; ++j) {
      const uint32_t frame = frame_of(lines[j].load(std::memory_order_relaxed));
      if (frame != kNoFrame) frames[frame].store(0, std::memory_order_relaxed);
      lines[j].store(make_state(kAbsent, false, 0), std::memory_order_release);
      if (frame != kNoFrame) {
        free_frame(frame);
        ++dropped;
      }
    }
    stats.add(kDiscardedLines, dropped);
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return result.with_context("ExCache::discard");
}

}  // namespace lego
