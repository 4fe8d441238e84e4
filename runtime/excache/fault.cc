// runtime/excache/fault.cc: the miss path, for both deliveries (SIGBUS in the faulting thread, or
// the handler thread reading the userfaultfd).
//
// Concurrency argument (read before changing this file or evict.cc)
// ------------------------------------------------------------------
// What can be held, in the only order it may be acquired:
//   1. line ownership: a line word in a busy kind (kFilling, kUnprotecting, kEvicting) is
//      owned by the thread whose CAS put it there; everyone else waits for the owner.
//   2. evict_lock: one evictor at a time. The miss path only try-locks it.
//   3. frame_lock: leaf, a few instructions around the free-frame stack.
// Why nothing deadlocks:
//   - A miss owns at most one line (kFilling or kUnprotecting) and, while owning it, waits
//     only for a frame. Frames come back from the evictor or from fills completing.
//     The handler thread's pipeline is the one owner of several lines: up to pipeline_max
//     fills whose fetches are in flight, each holding its frame, while it takes a frame
//     for the next or maps the oldest. It waits for nothing but frames and the backend,
//     never for a line of its own (serve_fault's kFilling case asks in_pipeline), and
//     pipeline_max <= capacity / 4 leaves the evictor most of the cache to take from.
//   - The evictor never waits for a line: it takes victims by CAS from kClean/kDirty only
//     and skips busy lines. Its own victims (kEvicting) complete without waiting on anyone
//     (ioctl, LineBackend::start_write_back, madvise). Victims left kEvicting while their
//     write-back is in flight are completed by whoever next holds evict_lock (an evictor
//     reaps first thing; a waiter try-locks it to reap), and finishing a write-back waits
//     only for the backend. So waits on kEvicting always end.
//   - Fills in flight each hold one frame and finish without waiting on a line, so a miss
//     waiting for a frame eventually gets one even when every frame is busy.
//   - discard() owns many lines (ascending addresses) but, before waiting for a busy line,
//     completes and releases all it owns; so it never waits while owning.
// Why the SIGBUS handler cannot deadlock on a lock its own thread holds:
//   - The handler runs with every signal blocked (sa_mask full), so no other handler runs
//     on top of it; the handler thread blocks all signals; discard() blocks signals
//     while it owns lines.
//   - While holding any of the above, our code touches region memory only through lines it
//     knows are present (write_back reads write-protected victims), so it cannot fault
//     into the region again. We take no lock program code can hold (no malloc, no stdio,
//     no std::mutex).
//   - A program thread interrupted in its own code holds none of our locks.
// Memory ordering: line words are published with release stores after the UFFDIO_COPY /
// ioctl that established the invariant for the new kind, and read with acquire loads.
//
// Stack: the handler runs on the faulting thread's stack (or its sigaltstack if it has one:
// SA_ONSTACK); we cannot give program threads an alternate stack of our own without hooking
// pthread_create, so the path is kept shallow: ~300 bytes of our frames plus the backend's
// (the 4 KiB fetch buffer comes from a preallocated pool, not the stack). Thread stacks must
// never live in the region (the interposer keeps MAP_STACK / MAP_GROWSDOWN out).
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "lego/retry.h"
#include "runtime/excache/excache_impl.h"
#include "runtime/excache/pcache_dev.h"

namespace lego {

using namespace excache_internal;

namespace {

// Source for zero-filled misses: UFFDIO_ZEROPAGE cannot map write-protected (it maps the
// shared zero page and a later store COWs it without telling us, losing the dirty bit),
// so we UFFDIO_COPY from these zeros instead.
alignas(kLine) const std::byte kZeroLine[kLine] = {};

// Backend calls on the miss path: this many tries in all (lego/retry.h), then abort.
constexpr int kBackendAttempts = kAttempts;

// Regions the SIGBUS handler serves. Slots are written in create()/destructor (program
// context, under g_install_mutex) and read lock-free by the handler.
constexpr size_t kMaxRegions = 16;
std::atomic<ExCache::Impl*> g_regions[kMaxRegions];
std::mutex g_install_mutex;   // never taken in a signal handler
bool g_installed = false;     // EXCLUSIVE: g_install_mutex
struct sigaction g_previous;  // written once, before the handler is installed

ExCache::Impl* find_region(uint64_t addr) {
  for (auto& slot : g_regions) {
    ExCache::Impl* impl = slot.load(std::memory_order_acquire);
    if (impl != nullptr && impl->contains(addr)) return impl;
  }
  return nullptr;
}

// "lego excache[PID]: WHAT (LABEL NUM) at 0xADDR\n" into buf; returns its length.
// Formatted by hand: snprintf is not async-signal-safe, and this runs in signal handlers.
size_t format_event(char* buf, size_t size, const char* what, const char* label, int num,
                    uint64_t addr) {
  size_t n = 0;
  auto put = [&](const char* s) {
    while (*s != '\0' && n < size - 1) buf[n++] = *s++;
  };
  auto put_num = [&](uint64_t v, unsigned radix) {
    char digits[24];
    size_t d = 0;
    do {
      digits[d++] = "0123456789abcdef"[v % radix];
      v /= radix;
    } while (v != 0);
    while (d > 0 && n < size - 1) buf[n++] = digits[--d];
  };
  put("lego excache[");
  put_num(static_cast<uint64_t>(getpid()), 10);
  put("]: ");
  put(what);
  put(" (");
  put(label);
  put(" ");
  put_num(static_cast<uint64_t>(num), 10);
  put(") at 0x");
  put_num(addr, 16);
  put("\n");
  return n;
}

// A SIGBUS that is not a miss in one of our regions: hand it to whoever had SIGBUS before.
void chain(int sig, siginfo_t* info, void* context) {
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction != nullptr) g_previous.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous.sa_handler == SIG_IGN && info->si_code <= 0) return;  // kill -BUS ignored
  if (g_previous.sa_handler == SIG_DFL || g_previous.sa_handler == SIG_IGN) {
    // Reinstate the default action. A fault then recurs on return and kills the process
    // with the right address and core; a signal sent by kill() is re-raised (it stays
    // pending until we return, as SIGBUS is blocked in here).
    // A fault that kills the program says so first: otherwise it dies of SIGBUS (exit 135)
    // with no word of where (a stray access beside a region would pass for a lost miss).
    if (info->si_code > 0) {
      char buf[160];
      const size_t n = format_event(buf, sizeof buf, "SIGBUS that is not a lego miss", "si_code",
                                    info->si_code, reinterpret_cast<uint64_t>(info->si_addr));
      (void)!write(STDERR_FILENO, buf, n);
    }
    struct sigaction dfl = {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, nullptr);
    if (info->si_code <= 0) raise(SIGBUS);
    return;
  }
  g_previous.sa_handler(sig);
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  const uint64_t addr = reinterpret_cast<uint64_t>(info->si_addr);
  // UFFD_FEATURE_SIGBUS raises BUS_ADRERR with the faulting address. Anything else
  // (kill(), hardware poison, a truncated file mapping) is not ours.
  ExCache::Impl* impl = info->si_code == BUS_ADRERR ? find_region(addr) : nullptr;
  if (impl != nullptr) {
    bool write = true;  // unknown: assume a store (maps the line dirty; costs a write-back)
#if defined(__x86_64__)
    // The x86 page-fault error code (bit 1: the access was a write) reaches the handler in
    // the signal frame. Knowing it maps a write miss writable at once, saving the second
    // (write-protect) fault a store would otherwise take.
    const auto* uc = static_cast<const ucontext_t*>(context);
    write = (uc->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#endif
    impl->serve_fault(addr & ~uint64_t{kLine - 1}, write);
  } else {
    chain(sig, info, context);
  }
  errno = saved_errno;
}

}  // namespace

void excache_internal::fatal(const char* what, int err, uint64_t addr) {
  char buf[256];
  const size_t n = format_event(buf, sizeof buf, what, "errno", err, addr);
  (void)!write(STDERR_FILENO, buf, n);
  if (auto hook = fatal_hook.load(std::memory_order_relaxed); hook != nullptr) {
    buf[n > 0 ? n - 1 : 0] = '\0';  // without the newline
    hook(buf);
  }
  abort();
}

std::atomic<void (*)(const char*)> excache_internal::fatal_hook{nullptr};

bool excache_internal::transient(int code) {
  return classify(code) == ErrorClass::kRetry;
}

Status excache_internal::register_region(ExCache::Impl* impl) {
  std::lock_guard<std::mutex> guard(g_install_mutex);
  if (!g_installed) {
    struct sigaction sa = {};
    sa.sa_sigaction = on_sigbus;
    // SA_ONSTACK: use the thread's alternate stack when it has one (runtimes and sanitizers
    // install them); otherwise we run on the faulting thread's stack. SA_RESTART: a miss
    // must not make the program's interrupted syscalls fail with EINTR. sa_mask full: no
    // other handler may run on top of ours while we hold a line or lock.
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigfillset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &g_previous) != 0) {
      return Status::from_errno(errno, "sigaction(SIGBUS)");
    }
    g_installed = true;
  }
  for (auto& slot : g_regions) {
    if (slot.load(std::memory_order_relaxed) == nullptr) {
      slot.store(impl, std::memory_order_release);
      return Status::ok();
    }
  }
  return Status(EBUSY, "more than " + std::to_string(kMaxRegions) + " ExCaches with kSigbus");
}

void excache_internal::unregister_region(ExCache::Impl* impl) {
  std::lock_guard<std::mutex> guard(g_install_mutex);
  for (auto& slot : g_regions) {
    if (slot.load(std::memory_order_relaxed) == impl)
      slot.store(nullptr, std::memory_order_release);
  }
  // The handler stays installed: uninstalling would race with other threads' faults and
  // with whoever installed a handler after us. It chains for addresses outside regions.
}

ExCache* ExCache::from_fault_address(const void* addr) {
  Impl* impl = find_region(reinterpret_cast<uint64_t>(addr));
  return impl != nullptr ? impl->owner : nullptr;
}

void ExCache::prefault(void* addr, size_t len, bool for_write) {
  if (len == 0) return;
  auto* p = static_cast<char*>(addr);
  char* const end = p + len;
  while (p < end) {
    // Touch a byte inside the caller's buffer (not the line's first byte, which may belong
    // to someone else and be poisoned under ASan).
    if (for_write) {
      __atomic_fetch_add(p, 0, __ATOMIC_RELAXED);  // a store fault, data unchanged
    } else {
      (void)*static_cast<volatile char*>(p);
    }
    p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) | (kLine - 1)) + 1);
  }
}

size_t ExCache::Impl::staging_acquire() {
  Backoff backoff;
  for (;;) {
    uint64_t busy = staging_busy.load(std::memory_order_relaxed);
    if (~busy != 0) {
      const int bit = __builtin_ctzll(~busy);
      if (staging_busy.compare_exchange_weak(busy, busy | (uint64_t{1} << bit),
                                             std::memory_order_acquire)) {
        return static_cast<size_t>(bit);
      }
      continue;
    }
    backoff.pause();  // more than 64 misses in flight: wait for one to finish
  }
}

void ExCache::Impl::staging_release(size_t buffer) {
  staging_busy.fetch_and(~(uint64_t{1} << buffer), std::memory_order_release);
}
static_assert(ExCache::Impl::kStagingBuffers == 64, "staging_busy is a 64-bit mask");

bool ExCache::Impl::serve_fault(uint64_t addr, bool write, Fill* pending) {
  const uint64_t start = now_ns();
  const uint64_t index = line_index(addr);
  std::atomic<uint64_t>& word = lines[index];
  bool waited = false;
  bool helped = false;  // completed a background prefetch
  Backoff backoff;
  for (;;) {
    uint64_t s = word.load(std::memory_order_acquire);
    switch (kind_of(s)) {
      case kAbsent:
        if (word.compare_exchange_weak(s, with_kind(s, kFilling), std::memory_order_acquire)) {
          if (pending == nullptr) {
            fill(index, s, write, start);
            return true;
          }
          pending->index = index;
          pending->state = s;
          pending->write = write;
          pending->start_ns = start;
          if (!begin_fill(*pending, /*pipelined=*/true) && !pending->started) {
            finish_fill(*pending);  // nothing in flight (a zero fill, a failed start)
          }
          return true;
        }
        continue;
      case kClean:
        // Resident: filled by another thread since our fault (a read: nothing to do), or the
        // first store to a clean line: un-protect it and remember it is dirty. The busy kind
        // keeps the evictor off the line between the ioctl and the new state, so no store
        // can slip in after an eviction copied the line out.
        // With MKCLEAN (pcache_mkclean) the line may be writable already: this store
        // faulted on the uffd-wp PTE before fill's MKCLEAN ran. The un-protect is then a
        // no-op that keeps the PTE's dirty bit, the store is retried and sets it, and
        // kDirty is true; either way EVICT reports the line dirty.
        if (!write) break;
        if (word.compare_exchange_weak(s, with_kind(s, kUnprotecting), std::memory_order_acquire)) {
          // Counted (and the policy told) before the ioctl wakes the faulting thread, so
          // that a thread reading the stats right after its own fault sees it.
          stats.add(Counter::write_faults);
          policy->on_refault(frames[frame_of(s)]);
          if (int err = write_protect(addr, kLine, false); err != 0) {
            fatal("UFFDIO_WRITEPROTECT (un-protect) failed", err, addr);
          }
          // An observed store: remember it for dirty prediction (see fill) and restart
          // the prediction count.
          word.store((with_kind(s, kDirty) & ~kPredictMask) | kWrittenHintBit,
                     std::memory_order_release);
          return true;
        }
        continue;
      case kDirty:
        break;  // served by someone else since our fault
      case kPrefetching:
        // A background prefetch holds the line: complete it (this is usually the stream
        // reaching its next window, so it starts the one after), then look again.
        if (complete_prefetch(static_cast<uint32_t>((s & kPrefetchSlotMask) >> kPrefetchSlotShift),
                              /*go_on=*/true)) {
          helped = true;
          continue;
        }
        [[fallthrough]];  // someone else is completing it: wait like for a fill
      case kFilling:
        // The handler thread's own fill in flight (its pipeline): it must not wait for
        // itself. That fill's UFFDIO_COPY wakes every thread waiting on the line.
        if (pending != nullptr && in_pipeline(index)) {
          stats.add(Counter::waits);
          return true;
        }
        [[fallthrough]];
      case kEvicting:
      case kUnprotecting:
        // Another thread owns the line: wait for it. For kEvicting this is the rule that
        // keeps writes safe: we re-fetch after the write-back completes. Its write-back
        // may be in flight with nobody evicting to reap it: then we reap it.
        if (kind_of(s) == kEvicting && try_reap_write_back()) continue;
        if (!waited) {
          waited = true;
          stats.add(Counter::waits);
        }
        backoff.pause();
        continue;
      default:
        fatal("corrupt line state", EPROTO, addr);
    }
    // (After helping a prefetch our line is mapped, but maybe by an earlier completion
    // than ours: report it served by someone else, so kHandlerThread wakes the thread.)
    if (!helped) stats.add(Counter::spurious);
    return false;
  }
}

DirtyChoice excache_internal::choose_dirty(uint64_t state, bool write, bool predict, Stats& stats) {
  if (write) return {true, kWrittenHintBit};  // observed store: restart the prediction count
  uint64_t persist = state & (kWrittenHintBit | kPredictMask);
  if ((persist & kWrittenHintBit) == 0) return {false, persist};
  const uint64_t predictions = (persist & kPredictMask) >> kPredictShift;
  if (predict && predictions < kMaxPredictions) {
    stats.add(Counter::dirty_predictions);
    return {true, kWrittenHintBit | ((predictions + 1) << kPredictShift)};
  }
  return {false, 0};  // map clean: a store now sets the hint again, else it is forgotten
}

void ExCache::Impl::map_lines(uint64_t index, const std::byte* src, size_t count, bool dirty,
                              bool dontwake) {
  uint64_t done = 0;  // bytes mapped
  const uint64_t len = count * kLine;
  while (done < len) {
    uffdio_copy copy = {};
    copy.dst = line_addr(index) + done;
    copy.src = reinterpret_cast<uint64_t>(src) + done;
    copy.len = len - done;
    copy.mode = (dirty ? 0 : UFFDIO_COPY_MODE_WP) | (dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0);
    if (ioctl(uffd, UFFDIO_COPY, &copy) == 0) break;
    const int err = errno;
    // A multi-line copy may have mapped a prefix before it stopped.
    if (copy.copy > 0) done += static_cast<uint64_t>(copy.copy);
    if (err == EAGAIN) {
      drain_events(uffd, -1);  // the mm is changing (a fork waits for its event): read it, retry
      continue;
    }
    if (err == EINTR) continue;
    if (err == EEXIST) {
      // Someone mapped the line behind our back (our states say no one can; a program
      // that writes region memory through another path). Keep the invariant of the kind
      // we publish: clean => write-protected, dirty => writable. Then go on after it.
      const uint64_t addr = line_addr(index) + (done & ~uint64_t{kLine - 1});
      if (int e = write_protect(addr, kLine, !dirty); e != 0) {
        fatal("UFFDIO_WRITEPROTECT after EEXIST failed", e, addr);
      }
      stats.add(Counter::spurious);
      done = (done & ~uint64_t{kLine - 1}) + kLine;
      continue;
    }
    fatal("UFFDIO_COPY failed", err, line_addr(index) + done);
  }
}

void ExCache::Impl::fill(uint64_t index, uint64_t state, bool write, uint64_t start_ns) {
  Fill f;
  f.index = index;
  f.state = state;
  f.write = write;
  f.start_ns = start_ns;
  if (!begin_fill(f, /*pipelined=*/false)) finish_fill(f);
}

bool ExCache::Impl::begin_fill(Fill& f, bool pipelined) {
  f.frame = kNoFrame;
  f.buffer = kStagingBuffers;
  f.started = false;
  if (prefetch_max > 0) {
    int64_t stride = 0;
    const size_t want = plan_prefetch(f.index, &stride);
    if (want > 0) {
      f.frame = acquire_frame();
      if (fill_with_prefetch(f.index, f.state, f.write, f.frame, want, stride, f.start_ns)) {
        return true;
      }
    }
  }
  if ((f.state & kBackedBit) == 0) return false;  // a zero fill: no round trip
  f.buffer = staging_acquire();
  // A miss that must evict first sends its fetch, so that the memory node answers it
  // while we evict (the round trip overlaps the batch's write-protects and zap); so does
  // every pipelined miss, whose fetch then stays in flight while the handler goes on.
  if (f.frame == kNoFrame && (pipelined || !pop_free(&f.frame))) {
    const uint64_t one[1] = {line_addr(f.index)};
    f.first_try = backend->start_fetch_batch(one, staging_line(f.buffer), &f.ticket);
    f.started = f.first_try.is_ok();
    if (!pop_free(&f.frame)) f.frame = acquire_frame();
  }
  return false;
}

void ExCache::Impl::finish_fill(Fill& f) {
  const uint64_t index = f.index, state = f.state, start_ns = f.start_ns;
  const bool write = f.write;
  const uint64_t addr = line_addr(index);
  const bool backed = (state & kBackedBit) != 0;
  uint32_t frame = f.frame;
  const size_t buffer = f.buffer;
  const std::byte* src = kZeroLine;
  if (backed) {
    std::byte* out = staging_line(buffer);
    const uint64_t one[1] = {addr};
    // Every backend call is a try: a start, failed or not, is the first.
    Status st = std::move(f.first_try);
    f.first_try = Status();
    if (f.started) {
      f.started = false;
      st = backend->finish_fetch_batch(&f.ticket);
    } else if (st.is_ok()) {
      st = backend->fetch_batch(one, out);
    }
    for (int attempt = 1; !st.is_ok(); ++attempt) {
      if (!transient(st.code()) || attempt == kBackendAttempts) {
        fatal("LineBackend::fetch_batch failed", st.code(), addr);
      }
      st = backend->fetch_batch(one, out);
    }
    src = out;
    stats.add(Counter::fetches);
    stats.add(Counter::bytes_fetched, kLine);
  } else {
    stats.add(Counter::zero_fills);  // the backend never saw this line: no round trip
  }
  if (frame == kNoFrame) frame = acquire_frame();

  // A store miss maps the line writable and dirty at once; a load miss maps it clean and
  // write-protected so that its first store tells us (serve_fault's kClean case), unless
  // the line's history predicts a store (ExCacheOptions::predict_dirty). With the module's
  // MKCLEAN a load miss is then made writable and clean: a store costs no fault and sets
  // the PTE's dirty bit, which eviction reads; predicting would only add write-backs.
  const DirtyChoice choice =
      choose_dirty(state, write, options.predict_dirty && !pcache_mkclean, stats);
  // MKCLEAN below must run before the faulting thread resumes, or its first store (a
  // read-modify-write: the common case) races it and takes the write-protect fault MKCLEAN
  // is there to save. The faulting thread sleeps in the kernel only with the handler
  // thread (with SIGBUS it is us): keep it asleep until MKCLEAN is done, then wake it.
  const bool mkclean = wants_mkclean(state, choice.dirty);
  const bool wake_after = mkclean && options.delivery != ExCacheOptions::Delivery::kSigbus;
  // Counted before UFFDIO_COPY wakes the faulting thread (see Counter::write_faults above).
  stats.add(Counter::misses);
  map_lines(index, src, 1, choice.dirty, /*dontwake=*/wake_after);
  if (buffer != kStagingBuffers) staging_release(buffer);

  // Before publishing kClean: while the line is kFilling no evictor can take it, and an
  // EVICT that kept it (write-protected by the module, not uffd-wp) must never be followed
  // by our making it writable again. A failure (e.g. the program mprotect()ed the range)
  // or a refused line leaves it uffd-write-protected with the dirty bit UFFDIO_COPY set:
  // still correct under the kClean invariant, it just costs a write-back.
  if (mkclean) {
    const uint64_t line = addr;
    (void)PcacheDevice::mkclean(pcache_fd, &line, 1, nullptr);
    stats.add(Counter::module_calls);
  }
  if (wake_after) {
    uffdio_range range = {.start = addr, .len = kLine};
    if (ioctl(uffd, UFFDIO_WAKE, &range) != 0)
      fatal("UFFDIO_WAKE after MKCLEAN failed", errno, addr);
  }

  lines[index].store(make_state(choice.dirty ? kDirty : kClean, backed, frame) | choice.persist |
                         (mkclean ? kMkcleanBit : 0),
                     std::memory_order_release);
  frames[frame].store(index + 1, std::memory_order_release);
  policy->on_fill(frames[frame], refault(state));
  stats.record_miss_ns(now_ns() - start_ns);
}

// --- Prefetch's fetch ----------------------------------------------------------------
//
// The backend call of a prefetch (prefetch.cc), here beside fill()'s own: every fetch of
// the miss path, and how it retries and gives up, is in this file.

void ExCache::Impl::fetch_claimed(PrefetchBuffer& pb) {
  // Backed lines (list_backed) come from the backend, into the tail of the buffer.
  const size_t n = pb.n, m = pb.m;
  if (m > 0) {
    bool fetched = false;
    int attempt = 0;  // tries so far: a fetch started in the background is the first
    if (pb.started) {
      attempt = 1;
      pb.started = false;
      Status st = backend->finish_fetch_batch(&pb.ticket);
      if (!st.is_ok() && !transient(st.code())) {
        fatal("LineBackend::finish_fetch_batch failed", st.code(), pb.fetch_addrs[0]);
      }
      fetched = st.is_ok();
    }
    // Not started in the background, or that failed transiently: fetch now.
    std::byte* const out = pb.data + (n - m) * kLine;
    while (!fetched) {
      ++attempt;
      Status st = backend->fetch_batch(std::span<const uint64_t>(pb.fetch_addrs, m), out);
      fetched = st.is_ok();
      if (!fetched && (!transient(st.code()) || attempt == kBackendAttempts)) {
        fatal("LineBackend::fetch_batch failed", st.code(), pb.fetch_addrs[0]);
      }
    }
    stats.add(Counter::fetches, m);
    stats.add(Counter::bytes_fetched, m * kLine);
  }
  // Spread to their slots (ascending: a slot is never after its source); zero the others.
  for (size_t k = 0, t = 0; k < n; ++k) {
    std::byte* const slot_data = pb.data + k * kLine;
    if (t < m && pb.fetch_slot[t] == k) {
      const std::byte* from = pb.data + (n - m + t) * kLine;
      if (from != slot_data) memmove(slot_data, from, kLine);
      ++t;
    } else {
      memset(slot_data, 0, kLine);
    }
  }
  stats.add(Counter::zero_fills, n - m);
}

// --- Delivery::kHandlerThread ---------------------------------------------------------

void ExCache::Impl::handle_event(const uffd_msg& msg) {
  switch (msg.event) {
    case UFFD_EVENT_PAGEFAULT: {
      const uint64_t addr = msg.arg.pagefault.address & ~uint64_t{kLine - 1};
      const uint64_t flags = msg.arg.pagefault.flags;
      const bool write = (flags & (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP)) != 0;
      // Faults of several threads: a spin for one's reply would hold up the others' faults,
      // still unread (await_reply_briefly). This also covers misses that overlap: a thread
      // waits in one fault at a time, so a second fill in flight is another thread's.
      // The same rule keeps the handler polling for faults between them (handler_loop).
      const uint32_t tid = msg.arg.pagefault.feat.ptid;
      if (tid != last_fault_tid) {
        if (last_fault_tid != 0) {
          reply_poll_off = kReplyPollOffAfterOtherThread;
          several_threads_faults = kSpinAfterOtherThread;
        }
        last_fault_tid = tid;
      } else if (several_threads_faults > 0) {
        --several_threads_faults;
      }
      Fill& next = pipeline[(pipeline_head + pipeline_count) % kMaxPipeline];
      next.started = false;
      next.reply_polled = false;
      const bool served = serve_fault(addr, write, &next);
      if (next.started) {
        // Its fetch is in flight: finish_oldest maps it.
        if (pipeline_count++ > 0) stats.add(Counter::overlapped);
      }
      if (!served) {
        // Already served by someone else: that UFFDIO_COPY or WRITEPROTECT may have run
        // before this thread went to sleep, so wake it explicitly.
        uffdio_range range = {.start = addr, .len = kLine};
        if (ioctl(uffd, UFFDIO_WAKE, &range) != 0) fatal("UFFDIO_WAKE failed", errno, addr);
      }
      return;
    }
    case UFFD_EVENT_FORK:
      // The parent waits in fork() until this is read. Our fills in flight are of lines
      // the child does not have (absent at the fork): they need not end first.
      handle_fork_event(static_cast<int>(msg.arg.fork.ufd), -1);
      return;
    default:
      // We enable no other event features; anything else means the kernel and we disagree.
      fatal("unexpected userfaultfd event", EPROTO, msg.event);
  }
}

bool ExCache::Impl::in_pipeline(uint64_t index) const {
  for (size_t i = 0; i < pipeline_count; ++i) {
    if (pipeline[(pipeline_head + i) % kMaxPipeline].index == index) return true;
  }
  return false;
}

void ExCache::Impl::finish_oldest() {
  if (reply_poll_off > 0) --reply_poll_off;
  Fill& f = pipeline[pipeline_head];
  // Out of the ring before it is mapped: a fault on the line read from now on finds it
  // resident (or, if evicted again, absent), never "in the pipeline".
  pipeline_head = (pipeline_head + 1) % kMaxPipeline;
  --pipeline_count;
  finish_fill(f);
}

namespace {

// The handler's pause between two empty polls. A yield, not a pause instruction: on a
// host with few CPUs the handler, the program's threads and a memory node's poller
// outnumber them, and a handler that spins keeps its CPU for a whole time slice. While its
// pipeline is empty the thread it shares the CPU with is usually the program thread it has
// just woken, which needs the CPU to reach its next access (and miss); while fetches are in
// flight it is often the memory node that must run to answer them, or another program
// thread. With nothing else runnable here, sched_yield returns at once, a syscall like the
// read() of the userfaultfd around it. Measured (docs/measurements.md, "Misses with the
// handler delivery"): random 25% under lego-run over shm and tcp on 2 loaded vCPUs, 4-7x
// fewer µs per access than pausing and 5-26x less of the program's kernel CPU per access
// (more with libfit's pollers yielding often too).
void yield_cpu() {
  sched_yield();
}

}  // namespace

// Waiting for a reply. The handler's loop between a fetch's start and its reply reads the
// userfaultfd (another thread's fault joins the fetches in flight) and yields (yield_cpu),
// two system calls a turn, so a reply waits for the turn to end before it is seen. With
// one thread faulting, nothing else can arrive meanwhile and the faulting thread's CPU --
// usually this one: the scheduler wakes the handler where the fault put its thread to
// sleep -- has nothing else to run, so polling the reply alone answers the miss sooner.
// Measured (docs/measurements.md, "Waiting for a reply"): random 25% over shm, ~1 µs less
// per access (handler/sigbus per run, median of twelve: 1.45x against 1.58x). It is bounded,
// and turned off for a while when it ran out twice in a row (a slow transport, or the
// memory node waiting for this very CPU: on a small host its poller may share it) or when
// several threads fault (a spin for one would hold up the others' faults and fetches).
bool ExCache::Impl::await_reply_briefly() {
  Fill& f = pipeline[pipeline_head];
  if (reply_poll_off > 0 || pipeline_count != 1 || f.reply_polled) return false;
  f.reply_polled = true;  // once per fetch: a reply that is late stays late
  stats.add(Counter::reply_polls);
  const uint64_t until = now_ns() + kReplyPollNs;
  do {
    cpu_relax();
    if (backend->fetch_ready(&f.ticket)) {
      reply_poll_timeouts_in_row = 0;
      return true;
    }
  } while (now_ns() < until);
  stats.add(Counter::reply_poll_timeouts);
  // One slow reply is the round trip's tail (over shm 1.6% of the polls ran out on a quiet
  // host); two in a row, the transport or the memory node's CPU.
  if (++reply_poll_timeouts_in_row >= 2) reply_poll_off = kReplyPollOffAfterTimeout;
  return false;
}

void ExCache::Impl::handler_loop() {
  if (options.on_thread_start != nullptr) options.on_thread_start();
  // Program signals must land on program threads, never here.
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  // An adopting child's (fork.cc): until the parent let go and the lines are adopted.
  gate_waiting.store(1, std::memory_order_release);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gate_waiting), FUTEX_WAKE_PRIVATE, 1, nullptr,
          nullptr, 0);
  while (start_gate.load(std::memory_order_acquire) != 0) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&start_gate), FUTEX_WAIT_PRIVATE, 1, nullptr,
            nullptr, 0);
  }

  const uint64_t spin_ns = uint64_t{options.handler_spin_us} * 1000;
  uffd_msg msgs[16];
  uint64_t last_event = now_ns();
  while (!stopping.load(std::memory_order_acquire)) {
    // Every pending fault the pipeline has room for: their fetches go out together.
    const size_t room = std::min(pipeline_max - pipeline_count, std::size(msgs));
    const ssize_t n = room > 0 ? read(uffd, msgs, room * sizeof(uffd_msg)) : 0;
    if (n > 0 || pipeline_count > 0) {
      for (size_t i = 0; n > 0 && i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) {
        handle_event(msgs[i]);
      }
      // Then the oldest fill once its reply is in (or the pipeline is full); until then,
      // read again: a fault that comes in meanwhile joins the ones in flight.
      if (pipeline_count > 0 && (pipeline_count == pipeline_max ||
                                 backend->fetch_ready(&pipeline[pipeline_head].ticket))) {
        finish_oldest();
      } else if (n <= 0) {
        // Fetches in flight, no new fault, no reply yet: wait for a lone fetch's reply
        // briefly, else let whatever else is runnable on this CPU have it (yield_cpu).
        if (await_reply_briefly()) {
          finish_oldest();
        } else {
          yield_cpu();
        }
      }
      last_event = now_ns();
      // Forked children are served between batches too: a parent whose threads fault
      // without pause must not starve them.
      if (nchildren.load(std::memory_order_relaxed) > 0) {
        poll_children();
        check_handovers();
        reclaim_children(false);  // at most every 100 ms
      }
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN) fatal("read(userfaultfd) failed", errno, 0);
    if (nchildren.load(std::memory_order_relaxed) > 0) {
      // Forked children's faults (fork.cc), then whether any of them is gone.
      poll_children();
      check_handovers();
      reclaim_children(false);
    }
    // While several threads fault, poll for a while after each event, yielding between
    // polls: another thread's fault is then served without waking the handler. With one
    // thread faulting, sleep at once until the next fault or the stop request. That
    // thread sleeps in the kernel while its fault is served, so the wake-up is on this CPU,
    // where it has just gone to sleep. A handler that polls on is runnable beside the thread
    // it has just woken, which makes the scheduler move one of them to the other CPU. Then
    // each fault and each fill wakes the other across CPUs.
    // Measured (docs/measurements.md, "Sleeping between one thread's faults"): random 25%,
    // one thread, medians of 8 alternating lego-bench runs: handler/sigbus over shm 1.36x
    // against 1.60x, over tcp 1.22x against 1.39x; python3 at 25% over shm 3.33 s against 3.85.
    if (several_threads_faults > 0 && now_ns() - last_event < spin_ns) {
      yield_cpu();
      continue;
    }
    stats.add(Counter::handler_sleeps);
    // The handover eventfd: a forked child asking to adopt (fork.cc).
    pollfd fds[3 + kMaxChildren] = {{.fd = uffd, .events = POLLIN, .revents = 0},
                                    {.fd = stop_fd, .events = POLLIN, .revents = 0},
                                    {.fd = handover_fd, .events = POLLIN, .revents = 0}};
    const int nfds = 3 + child_fds(fds + 3, kMaxChildren);
    // With children, wake up now and then to notice the ones that are gone.
    if (poll(fds, nfds, nfds > 3 ? 100 : -1) < 0 && errno != EINTR) {
      fatal("poll(userfaultfd) failed", errno, 0);
    }
    if (fds[2].revents & POLLIN) {
      uint64_t drained;
      (void)!read(handover_fd, &drained, sizeof drained);
      check_handovers();
    }
    last_event = now_ns();  // woken by a fault: spin again for the ones that follow
  }
  while (pipeline_count > 0) finish_oldest();  // no line is left kFilling
}

Status ExCache::Impl::start_handler_thread() {
  pipeline_max = std::clamp<size_t>(capacity / 4, 1, kMaxPipeline);
  stop_fd = eventfd(0, EFD_CLOEXEC);
  if (stop_fd < 0) return Status::from_errno(errno, "eventfd for the handler thread");
  if (handover != nullptr) {
    // Inherited by forked children, which write to it to ask for their userfaultfd.
    handover_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (handover_fd < 0) return Status::from_errno(errno, "eventfd for fork handovers");
  }
  int err = pthread_create(
      &handler, nullptr,
      [](void* self) -> void* {
        excache_service_thread_begin();
        static_cast<ExCache::Impl*>(self)->handler_loop();
        excache_service_thread_end();
        return nullptr;
      },
      this);
  if (err != 0) return Status::from_errno(err, "pthread_create(handler thread)");
  pthread_setname_np(handler, "lego-excache");
  handler_running = true;
  return Status::ok();
}

}  // namespace lego
