// runtime/excache/evict.cc: frames, victim selection, write-back, and discard().
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
//   2. write-protect the dirty victims (adjacent lines share one ioctl; skipped when no
//      other thread can store: "Evicting without a fence" below). After the ioctl
//      returns the TLBs are flushed: no store can reach the line any more; a racing store
//      faults and waits (step 1). Clean victims are write-protected already (kClean
//      invariant), so they need nothing. Stores that landed before are in the line.
//      (A kClean line MKCLEAN made writable may have been stored to: the module path below
//      asks its dirty bit; if the module refuses the batch, this path treats such a
//      victim as dirty.)
//   3. write back the dirty victims, straight from the (now read-only) lines: one
//      LineBackend::start_write_back call for the batch, which takes the data and returns
//      without waiting for the backend's answer (with the module, or while a fork is under
//      way: write_back, which waits).
//   4. mark them backed (a later miss fetches them) and zap every victim with one
//      MADV_DONTNEED batch (process_madvise: one TLB flush for the batch).
//   5. publish kAbsent and free the frames (one goes to the caller). Dirty victims whose
//      write-back is still in flight stay kEvicting without a frame until it is reaped:
//      by the next eviction (by then the answer has usually come), or by a thread that
//      finds one of them kEvicting (serve_fault, discard), or at fork and destruction.
// A faulting thread that waited on a victim re-fetches after step 5 (or the reap) and reads
// what step 3 stored. Cost per batch of b lines, d dirty: d write-protect ioctls (each
// flushes the TLB; ~0.9 µs single-threaded), one write_back, one zap (~0.6 µs per line).
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

#include <algorithm>

#include "lego/retry.h"
#include "runtime/excache/excache_impl.h"
#include "runtime/excache/pcache_dev.h"

namespace lego {

using namespace excache_internal;

const PolicyOps* excache_internal::policy_ops(ExCacheOptions::Policy policy) {
  switch (policy) {
    case ExCacheOptions::Policy::kFifo:
      return &kFifoPolicyOps;
    case ExCacheOptions::Policy::kClock:
      return &kClockPolicyOps;
    case ExCacheOptions::Policy::kRefault:
      return &kRefaultPolicyOps;
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

bool ExCache::Impl::try_acquire_frame(uint32_t* frame) {
  if (pop_free(frame)) return true;
  if (!evict_lock.try_lock()) return false;
  const bool got = pop_free(frame) || evict_batch_locked(frame);
  evict_lock.unlock();
  return got;
}

void ExCache::Impl::zap_victims(size_t n, bool clean_only) {
  size_t runs = 0;
  size_t lines_zapped = 0;
  for (size_t i = 0; i < n; ++i) {
    if (clean_only && (victims[i].dirty || victims[i].mkcleaned)) continue;
    ++lines_zapped;
    std::byte* line = base + (victims[i].index << kLineShift);
    if (runs > 0 &&
        static_cast<std::byte*>(zap_iov[runs - 1].iov_base) + zap_iov[runs - 1].iov_len == line) {
      zap_iov[runs - 1].iov_len += kLine;
    } else {
      zap_iov[runs++] = iovec{line, kLine};
    }
  }
  if (runs == 0) return;
  if (pidfd >= 0) {
    const long want = static_cast<long>(lines_zapped * kLine);
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

void ExCache::Impl::write_back_batch(size_t n, int tried) {
  std::span<const LineBackend::WriteBack> batch_span(write_backs.get(), n);
  Status st;
  for (int attempt = tried + 1;; ++attempt) {
    st = backend->write_back(batch_span);
    if (st.is_ok() || !transient(st.code()) || attempt >= kAttempts) break;
  }
  if (!st.is_ok()) fatal("LineBackend::write_back failed", st.code(), write_backs[0].addr);
  // A fork under way: the child may find these lines absent and read the snapshot
  // (fork.cc). An error only means the child is gone already. Counted in snapshot_writers
  // (excache_impl.h): the child must not adopt the snapshot before this write has landed.
  begin_snapshot_write();
  if (const int64_t snap = fork_snapshot.load(std::memory_order_seq_cst); snap >= 0) {
    (void)backend->write_back_snapshot(static_cast<uint32_t>(snap), batch_span);
  }
  end_snapshot_write();
  stats.add(Counter::write_backs, n);
  stats.add(Counter::bytes_written, n * kLine);
}

void ExCache::Impl::reap_write_back_locked() {
  if (!wb_pending.load(std::memory_order_relaxed)) return;
  if (Status st = backend->finish_write_back(&wb_ticket); !st.is_ok()) {
    fatal("LineBackend::finish_write_back failed", st.code(), line_addr(wb_lines[0]));
  }
  for (size_t i = 0; i < wb_count; ++i) {
    std::atomic<uint64_t>& word = lines[wb_lines[i]];
    const uint64_t s = word.load(std::memory_order_relaxed);
    word.store(make_state(kAbsent, true, 0) | (s & (kPersistMask | kEvictLapMask)),
               std::memory_order_release);
  }
  wb_count = 0;
  wb_pending.store(false, std::memory_order_release);
}

bool ExCache::Impl::try_reap_write_back() {
  if (!wb_pending.load(std::memory_order_acquire) || !evict_lock.try_lock()) return false;
  const bool reaped = wb_pending.load(std::memory_order_relaxed);
  reap_write_back_locked();
  evict_lock.unlock();
  return reaped;
}

// --- Evicting without a fence -----------------------------------------------------------
//
// Step 2's write-protect (~1.2 µs per scattered line: an ioctl and a TLB flush each, a third
// of a 32-line batch's cost) is there to stop other threads' stores between step 3's copy
// and step 4's zap. With SIGBUS delivery the evicting thread is a program thread inside its
// fault handler, with signals blocked: if the process has no other thread but the runtime's
// own (which never store to region memory), nothing can store to a victim until the zap,
// and the fence is skipped. The check lists /proc/self/task (one getdents64, ~2 µs) under
// evict_lock, at each batch: a program thread created after the listing can only have been
// created by a thread in it. Not covered, as without the check: writes that bypass threads
// (DMA into pinned pages), and another process writing through ptrace or process_vm_writev
// while the program is inside the handler (with the fence that write would fail; without it
// a write landing between copy and zap is lost), or sharing the memory through
// clone(CLONE_VM) without CLONE_THREAD while running concurrently (a vfork child is caught:
// the parent waits, and the child's pid differs from owner_pid).

namespace {

constexpr int kMaxServiceThreads = 16;
std::atomic<pid_t> g_service_threads[kMaxServiceThreads];

bool is_service_thread(pid_t tid) {
  for (const auto& slot : g_service_threads) {
    if (slot.load(std::memory_order_acquire) == tid) return true;
  }
  return false;
}

struct LinuxDirent64 {
  uint64_t d_ino;
  int64_t d_off;
  unsigned short d_reclen;
  unsigned char d_type;
  char d_name[1];
};

}  // namespace

void excache_service_thread_begin() {
  const pid_t me = gettid();
  for (auto& slot : g_service_threads) {
    pid_t free_slot = 0;
    if (slot.compare_exchange_strong(free_slot, me, std::memory_order_acq_rel)) return;
  }
}

void excache_service_thread_end() {
  const pid_t me = gettid();
  for (auto& slot : g_service_threads) {
    pid_t mine = me;
    if (slot.compare_exchange_strong(mine, 0, std::memory_order_acq_rel)) return;
  }
}

bool ExCache::Impl::alone_in_process() {
  if (task_dir < 0 || getpid() != owner_pid) return false;
  if (lseek(task_dir, 0, SEEK_SET) != 0) return false;
  const pid_t me = gettid();
  // The listing must show us: if the program closed task_dir and the number now names
  // another directory, it does not, and we fence.
  bool saw_me = false;
  alignas(8) char buf[1024];
  for (;;) {
    const long n = syscall(SYS_getdents64, task_dir, buf, sizeof buf);
    if (n <= 0) return n == 0 && saw_me;
    for (long off = 0; off < n;) {
      const auto* d = reinterpret_cast<const LinuxDirent64*>(buf + off);
      off += d->d_reclen;
      pid_t tid = 0;
      const char* c = d->d_name;
      for (; *c >= '0' && *c <= '9'; ++c) tid = tid * 10 + (*c - '0');
      if (*c != '\0' || tid == 0) continue;  // "." and ".."
      if (tid == me) {
        saw_me = true;
      } else if (!is_service_thread(tid)) {
        return false;
      }
    }
  }
}

// Steps 2-4 without the module. True if the write-back was only started (step 5 leaves the
// dirty victims to reap_write_back_locked).
bool ExCache::Impl::evict_with_userfaultfd(size_t n) {
  // MKCLEAN made some load misses writable: such a kClean victim may hold stores that only
  // its PTE's dirty bit knows of, which this path cannot read. Write those back too (reached
  // with the module only when it refused the batch, e.g. after the program mprotect()ed the
  // region).
  for (size_t i = 0; i < n; ++i) victims[i].dirty |= victims[i].mkcleaned;
  // 2. Write-protect dirty victims, one ioctl per run of adjacent dirty lines: unless no
  // other thread can store to them (see alone_in_process), when they go straight to step 3.
  size_t dirty = 0;
  bool any_dirty = false;
  for (size_t i = 0; i < n; ++i) any_dirty |= victims[i].dirty;
  const bool fence =
      !(any_dirty && options.delivery == ExCacheOptions::Delivery::kSigbus && alone_in_process());
  if (!fence) stats.add(Counter::unfenced_batches);
  for (size_t i = 0; i < n;) {
    if (!victims[i].dirty) {
      ++i;
      continue;
    }
    size_t j = i + 1;
    while (j < n && victims[j].dirty && victims[j].index == victims[j - 1].index + 1) ++j;
    const uint64_t addr = line_addr(victims[i].index);
    if (int err = fence ? write_protect(addr, (j - i) * kLine, true) : 0; err != 0) {
      fatal("UFFDIO_WRITEPROTECT of victims failed", err, addr);
    }
    for (size_t k = i; k < j; ++k) {
      write_backs[dirty++] = LineBackend::WriteBack{line_addr(victims[k].index),
                                                    base + (victims[k].index << kLineShift)};
    }
    i = j;
  }

  // 3. Write back, straight from the write-protected lines: started only, unless a fork is
  // under way (its snapshot must get the lines too: write_back_batch). The backend took
  // the data when start returns, so the zap may follow at once; the reply is collected by
  // the next eviction (or by a thread waiting for one of these lines), by when it has
  // usually come: the miss that evicts no longer waits a round trip, and the memory node
  // stores the batch while the program runs on.
  bool started = false;
  if (dirty > 0) {
    std::span<const LineBackend::WriteBack> batch_span(write_backs.get(), dirty);
    Status st;  // a start that failed is a try (it left nothing in flight: retry here)
    if (fork_snapshot.load(std::memory_order_acquire) < 0) {
      st = backend->start_write_back(batch_span, &wb_ticket);
      started = st.is_ok();
    }
    if (started) {
      stats.add(Counter::write_backs, dirty);
      stats.add(Counter::bytes_written, dirty * kLine);
    } else {
      write_back_batch(dirty, st.is_ok() ? 0 : 1);
    }
  }

  // 4. Zap the whole batch.
  zap_victims(n);
  return started;
}

// --- With lego_pcache.ko ---------------------------------------------------------------
//
// The module replaces steps 2-4 (see kmod/evict.c for why a store cannot be lost):
//   a. EVICT the dirty victims and the MKCLEANed clean ones (which may have been stored
//      to without a fault): the module zaps those whose PTE is clean and
//      leaves the others mapped, read-only and clean (not uffd-write-protected: a racing
//      store is handled by the kernel, which makes the line writable and dirty again).
//   b. write those back, straight from the lines; EVICT them again. A line stored to
//      meanwhile is reported dirty again: repeat (rarely needed). After kMaxRounds the
//      rest are fenced the userfaultfd way (write-protected: a store now waits for us),
//      written back a last time and evicted with DISCARD_DIRTY.
//   c. zap the other clean victims the way the userfaultfd path does (zap_victims): they
//      are uffd-write-protected (kClean invariant), so nothing was stored since their fill.
//      (Not with EVICT DISCARD_DIRTY: the module can zap only through zap_page_range, one
//      call and one TLB flush per run, like madvise; in the 6.1 guest, 32 scattered lines
//      cost 237 µs through EVICT and 209 µs through 32 madvise calls: pcache_test -b.)
// Two ioctls per batch for the dirty victims instead of one write-protect ioctl per run of
// them.
bool ExCache::Impl::evict_with_module(size_t n) {
  constexpr int kMaxRounds = 3;
  uint64_t* const evicted = pc_bits.get();
  uint64_t* const dirty_bits = pc_bits.get() + kSweep / 64;

  size_t nd = 0;
  for (size_t i = 0; i < n; ++i) {
    if (victims[i].dirty || victims[i].mkcleaned) {
      pc_lines[nd] = line_addr(victims[i].index);
      pc_pending[nd++] = static_cast<uint32_t>(i);
    }
  }
  bool first_call = true;
  for (int round = 0; nd > 0; ++round) {
    const bool last = round == kMaxRounds;
    if (last) {
      // Fence: from here a store faults into userfaultfd and waits (the line is kEvicting).
      for (size_t k = 0; k < nd; ++k) {
        if (int err = write_protect(pc_lines[k], kLine, true); err != 0) {
          fatal("UFFDIO_WRITEPROTECT of a re-dirtied victim failed", err, pc_lines[k]);
        }
      }
      for (size_t k = 0; k < nd; ++k) {
        write_backs[k] = LineBackend::WriteBack{
            pc_lines[k], base + (victims[pc_pending[k]].index << kLineShift)};
      }
      write_back_batch(nd);
    }
    const uint32_t flags = last ? LEGO_PCACHE_EVICT_DISCARD_DIRTY : 0;
    const int err = PcacheDevice::evict(pcache_fd, pc_lines.get(), static_cast<uint32_t>(nd), flags,
                                        evicted, dirty_bits);
    stats.add(Counter::module_calls);
    if (err != 0) {
      // Refused before it changed anything (a VMA we cannot evict from: the program
      // mprotect()ed or mlock()ed part of the region): the userfaultfd path can.
      if (first_call && (err == EINVAL || err == ENOMEM || err == E2BIG)) return false;
      fatal("LEGO_PCACHE_IOC_EVICT failed", err, pc_lines[0]);
    }
    first_call = false;
    if (last) break;
    // Keep the lines the module kept (dirty); the first round's clean ones were never
    // written: they are dropped like clean victims.
    size_t m = 0;
    for (size_t k = 0; k < nd; ++k) {
      const bool kept = PcacheDevice::bit(dirty_bits, k) && !PcacheDevice::bit(evicted, k);
      if (kept) {
        // (A kClean victim the module found stored to is written back as dirty.)
        victims[pc_pending[k]].dirty = true;
        pc_lines[m] = pc_lines[k];
        pc_pending[m++] = pc_pending[k];
      } else if (round == 0) {
        victims[pc_pending[k]].dirty = false;
      }
    }
    nd = m;
    if (nd == 0) break;
    if (round > 0) stats.add(Counter::redirtied, nd);
    for (size_t k = 0; k < nd; ++k) {
      write_backs[k] =
          LineBackend::WriteBack{pc_lines[k], base + (victims[pc_pending[k]].index << kLineShift)};
    }
    write_back_batch(nd);
  }

  // c. The clean victims that step a did not take (and dirty ones the module found clean:
  // already gone, a no-op), zapped as without the module.
  zap_victims(n, /*clean_only=*/true);
  return true;
}

void ExCache::Impl::sweep_accessed_bits() {
  const size_t want = std::min({kSweep, size_t{pcache_max_lines}, capacity});
  // The CPU's accessed bits add up between sweeps, so sweeping the window ahead of the hand
  // once per quarter window of travel loses nothing the hand will look at (a frame is still
  // swept about four times before the hand reaches it), at a quarter of the cost of a sweep
  // per batch (under emulation an AD call over 512 lines costs as much as a few misses).
  if (swept_at_travel != 0 && hand_travel - swept_at_travel < want / 4) return;
  swept_at_travel = hand_travel == 0 ? 1 : hand_travel;
  uint64_t* const accessed = pc_bits.get();
  uint64_t* const swept = pc_bits.get() + kSweep / 64;
  size_t m = 0;
  size_t f = hand;
  for (size_t k = 0; k < want; ++k) {
    const uint64_t word = frames[f].load(std::memory_order_acquire);
    const uint64_t id = word & kFrameLineMask;
    if (id != 0) {
      if (m % 64 == 0) swept[m / 64] = 0;
      if (word & kFrameSweptBit) swept[m / 64] |= uint64_t{1} << (m % 64);
      pc_lines[m] = line_addr(id - 1);
      pc_frames[m++] = static_cast<uint32_t>(f);
    }
    f = f + 1 == capacity ? 0 : f + 1;
  }
  if (m == 0) return;
  const int err = PcacheDevice::ad(pcache_fd, pc_lines.get(), static_cast<uint32_t>(m),
                                   LEGO_PCACHE_AD_CLEAR_ACCESSED, accessed, nullptr);
  stats.add(Counter::module_calls);
  if (err != 0) return;  // no signal this round: the hand treats the frames as FIFO would
  uint64_t used = 0;
  for (size_t k = 0; k < m; ++k) {
    // (A frame refilled since we read it gets a wrong hint at worst: one lap more or less.)
    if (!PcacheDevice::bit(swept, k)) {
      frames[pc_frames[k]].fetch_or(kFrameSweptBit, std::memory_order_relaxed);
    } else if (PcacheDevice::bit(accessed, k)) {
      frames[pc_frames[k]].fetch_or(kFrameRefBit, std::memory_order_relaxed);
      ++used;
    }
  }
  stats.add(Counter::accessed_spared, used);
}

bool ExCache::Impl::evict_batch_locked(uint32_t* out) {
  reap_write_back_locked();  // one write-back in flight at most; the last one is done by now
  if (pcache_fd >= 0 && policy == &kClockPolicyOps) sweep_accessed_bits();
  // 1. Take victims. Two laps at most: CLOCK may have to clear every reference bit first.
  // (Test only: a fork under way keeps a place for line 0, see test_fork_evict_line0.)
  const bool take_line0 =
      test_fork_evict_line0 && batch > 1 && fork_snapshot.load(std::memory_order_acquire) >= 0;
  const size_t want = take_line0 ? batch - 1 : batch;
  size_t n = 0;
  const size_t max_scan = 2 * capacity + batch;
  for (size_t scanned = 0; n < want && scanned < max_scan; ++scanned) {
    const uint32_t f = static_cast<uint32_t>(hand);
    hand = hand + 1 == capacity ? 0 : hand + 1;
    if (hand == 0) lap.fetch_add(1, std::memory_order_relaxed);
    ++hand_travel;
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
    victims[n++] = Victim{id - 1, f, kind == kDirty, kind == kClean && (s & kMkcleanBit) != 0};
  }
  if (take_line0) {
    // Taken like the hand takes a line (a busy one, or one already a victim, is left).
    std::atomic<uint64_t>& word = lines[0];
    uint64_t s = word.load(std::memory_order_acquire);
    const LineKind kind = kind_of(s);
    if ((kind == kClean || kind == kDirty) &&
        word.compare_exchange_strong(s, with_kind(s, kEvicting), std::memory_order_acquire)) {
      victims[n++] =
          Victim{0, frame_of(s), kind == kDirty, kind == kClean && (s & kMkcleanBit) != 0};
    }
  }
  if (n == 0) return false;

  // Sorted victims make adjacent lines share ioctls and madvise runs, and give the backend
  // ascending addresses.
  for (size_t i = 1; i < n; ++i) {
    for (size_t j = i; j > 0 && victims[j - 1].index > victims[j].index; --j) {
      std::swap(victims[j - 1], victims[j]);
    }
  }

  const bool in_flight = (pcache_fd < 0 || !evict_with_module(n)) && evict_with_userfaultfd(n);

  // 5. Publish kAbsent (victims written back are now backed) and free the frames; keep one.
  // Victims whose write-back is in flight stay kEvicting, frameless, until it is reaped.
  size_t dirty = 0;
  const uint64_t stamp = evict_stamp();
  for (size_t i = 0; i < n; ++i) {
    const Victim& v = victims[i];
    dirty += v.dirty;
    frames[v.frame].store(0, std::memory_order_relaxed);
    std::atomic<uint64_t>& word = lines[v.index];
    const uint64_t s = word.load(std::memory_order_relaxed);
    uint64_t persist = s & kPersistMask;
    if (v.mkcleaned) {
      // Its stores were seen only now, by the module: they are the store history that
      // decides whether its next fill gets MKCLEAN.
      persist = v.dirty ? persist | kWrittenHintBit : persist & ~kWrittenHintBit;
    }
    if (in_flight && v.dirty) {
      wb_lines[wb_count++] = v.index;
      word.store(make_state(kEvicting, true, kNoFrame) | persist | stamp,
                 std::memory_order_relaxed);
    } else {
      const bool backed = v.dirty || (s & kBackedBit) != 0;
      word.store(make_state(kAbsent, backed, 0) | persist | stamp, std::memory_order_release);
    }
    if (i == 0) {
      *out = v.frame;
    } else {
      free_frame(v.frame);
    }
  }
  if (wb_count > 0) wb_pending.store(true, std::memory_order_release);
  stats.add(Counter::evictions, n);
  stats.add(Counter::clean_drops, n - dirty);
  stats.add(Counter::eviction_batches);
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
    // Counted until this chunk's releases are done (a wait for a busy line included: it
    // only delays an adoption): it may release in a fork snapshot, which no child may adopt
    // before (fork.cc, "Adoption" d).
    begin_snapshot_write();
    const uint64_t generation = fork_generation.load(std::memory_order_seq_cst);
    bool any_resident = false, any_backed = false;
    Backoff backoff;
    while (i < end && i - first < kChunk) {
      std::atomic<uint64_t>& word = lines[i];
      uint64_t s = word.load(std::memory_order_acquire);
      const LineKind kind = kind_of(s);
      if (kind != kAbsent && kind != kClean && kind != kDirty) {
        if (i > first) break;  // finish what we own before waiting (never wait owning)
        // A background prefetch holds it: complete that (maps the line), else wait.
        // A write-back in flight holds it: reap that.
        if (kind == kEvicting
                ? !try_reap_write_back()
                : kind != kPrefetching ||
                      !complete_prefetch(
                          static_cast<uint32_t>((s & kPrefetchSlotMask) >> kPrefetchSlotShift),
                          /*go_on=*/false)) {
          backoff.pause();
        }
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
    if (i == first) {
      end_snapshot_write();
      continue;
    }

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
    end_snapshot_write();
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
    stats.add(Counter::discarded_lines, dropped);
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return result.with_context("ExCache::discard");
}

}  // namespace lego
