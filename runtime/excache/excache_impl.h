// ExCache internals shared by region.cc, fault.cc, prefetch.cc, evict*.cc, fork.cc and
// stats.cc. Not a public
// header: users include lego/excache.h.
//
// Data structures (all allocated in ExCache::create, none on the miss path):
//   lines[]   one atomic 64-bit word per 4 KiB line of the region, indexed by
//             (addr - base) / 4096: the line's state (LineKind), whether the backend holds a
//             copy (kBackedBit) and, while resident, its frame number. The array is
//             reserved MAP_NORESERVE: untouched parts cost nothing.
//   frames[]  one atomic word per frame (capacity_lines of them): the resident line's index
//             + 1 (0 = free or not yet published) and the policy's reference bit. Frames are
//             slots that bound residency; the kernel owns the physical pages.
//   free      a stack of free frame numbers under frame_lock.
//   staging   a pool of 4 KiB buffers a miss fetches into before UFFDIO_COPY.
#pragma once

#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "lego/excache.h"

// Debian 12 ships 6.1 uapi headers; newer feature bits are checked at run time.
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1ULL << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1ULL << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1ULL << 16)
#endif

namespace lego::excache_internal {

inline constexpr size_t kLine = kExCacheLineBytes;
inline constexpr int kLineShift = 12;
static_assert(size_t{1} << kLineShift == kLine);

// A line's state. Transitions (owner = the thread that CASed the word into a busy kind):
//   kAbsent  --miss--------> kFilling      --copied--> kClean (read miss) / kDirty (write)
//   kClean   --1st write---> kUnprotecting --ioctl---> kDirty
//   kClean/kDirty --victim or discard--> kEvicting --written back, zapped--> kAbsent
//   kAbsent  --discard-----> kEvicting     --------> kAbsent (backed bit cleared)
// Invariants: kDirty => the PTE is present and writable; kAbsent => no PTE.
// kClean => present, and
//   - without kMkcleanBit: uffd-write-protected, so never stored to since its fill: it may
//     be dropped without a write-back;
//   - with kMkcleanBit (the module's MKCLEAN ran after the fill): maybe writable; the PTE's
//     dirty bit says whether it was stored to (MKCLEAN cleared it after the fill; a line
//     MKCLEAN refused is still uffd-write-protected with the dirty bit UFFDIO_COPY set,
//     which only costs a needless write-back). So such a victim goes through the module's
//     dirty-reporting EVICT, or, in the userfaultfd fallback, is write-protected and
//     written back like a kDirty one.
// MKCLEAN saves the write-protect fault of a line's first store but costs an ioctl per
// fill, so fills use it only for lines with a store history (kWrittenHintBit).
// Only the owner leaves a busy kind (kFilling, kUnprotecting, kEvicting); others wait for it.
enum LineKind : uint64_t {
  kAbsent = 0,
  kFilling = 1,
  kClean = 2,
  kDirty = 3,
  kEvicting = 4,
  kUnprotecting = 5,
  // Claimed by a background prefetch (prefetch.cc) whose fetch is in flight: owned by its
  // prefetch buffer (kPrefetchSlotShift), not by a thread. Whoever needs the line first
  // completes that prefetch (waits for the reply, maps its lines), so no one waits for a
  // thread that may never come back.
  kPrefetching = 6,
};
inline constexpr uint64_t kKindMask = 7;
// The backend holds this line (written back at least once since the last discard): a miss
// must fetch it. Without it a miss zero-fills locally.
inline constexpr uint64_t kBackedBit = 8;
// Dirty prediction (ExCacheOptions::predict_dirty): the line was stored to in a residency we
// observed (a store miss or a write fault) ...
inline constexpr uint64_t kWrittenHintBit = 16;
// ... and this many later load misses have since mapped it dirty on that hint alone.
inline constexpr int kPredictShift = 5;
inline constexpr uint64_t kPredictMask = uint64_t{3} << kPredictShift;
// After this many predictions a load miss maps the line clean again to re-learn: a line
// that stopped being written costs at most this many needless write-backs.
inline constexpr uint64_t kMaxPredictions = 3;
// kClean only: made writable and clean by MKCLEAN (see the kClean invariant above).
inline constexpr uint64_t kMkcleanBit = 128;
// kPrefetching: which prefetch buffer owns the line.
inline constexpr int kPrefetchSlotShift = 8;
inline constexpr uint64_t kPrefetchSlotMask = uint64_t{15} << kPrefetchSlotShift;
// What survives a line's eviction (and is cleared by discard).
inline constexpr uint64_t kPersistMask = kBackedBit | kWrittenHintBit | kPredictMask;
// kAbsent (and kEvicting) lines: the clock hand's lap when the line was evicted (never 0;
// 0: not evicted since its last discard or ever). A miss on a line evicted less than two
// laps ago is a refault (Counter::refaults; the refault policy spares such lines once).
// Bits 12..31: free in every kind (the frame field starts at 32).
inline constexpr int kEvictLapShift = 12;
inline constexpr uint64_t kEvictLapField = (uint64_t{1} << 20) - 1;
inline constexpr uint64_t kEvictLapMask = kEvictLapField << kEvictLapShift;
inline constexpr int kFrameShift = 32;
// Frame field of a line discard() owns that had no frame (it was kAbsent).
inline constexpr uint32_t kNoFrame = 0xffffffff;

inline LineKind kind_of(uint64_t s) {
  return static_cast<LineKind>(s & kKindMask);
}
inline uint32_t frame_of(uint64_t s) {
  return static_cast<uint32_t>(s >> kFrameShift);
}
inline uint64_t with_kind(uint64_t s, LineKind k) {
  return (s & ~kKindMask) | k;
}
inline uint64_t make_state(LineKind k, bool backed, uint32_t frame) {
  return k | (backed ? kBackedBit : 0) | (uint64_t{frame} << kFrameShift);
}

// Frame word: line index + 1 in the low bits, the policy's reference bit on top.
inline constexpr uint64_t kFrameRefBit = uint64_t{1} << 63;
// kClock with the module: the accessed-bit sweep has seen this line once. The CPU sets the
// accessed bit on the access that filled the line; only an access after the first sweep
// is a re-reference (else every fresh line would look hot and CLOCK would become FIFO).
inline constexpr uint64_t kFrameSweptBit = uint64_t{1} << 62;
inline constexpr uint64_t kFrameLineMask = kFrameSweptBit - 1;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

// Spins politely: pause first, then yield the CPU, since the owner we wait for may be
// preempted (2 vCPUs, more threads). Async-signal-safe.
class Backoff {
 public:
  void pause() {
    if (++spins_ < 64) {
      cpu_relax();
    } else {
      sched_yield();
    }
  }

 private:
  uint32_t spins_ = 0;
};

// A test-and-test-and-set lock. Used instead of std::mutex because it is taken inside the
// SIGBUS handler; see the lock order in fault.cc for why that cannot deadlock.
class SpinLock {
 public:
  void lock() {
    Backoff backoff;
    while (held_.exchange(true, std::memory_order_acquire)) {
      while (held_.load(std::memory_order_relaxed)) backoff.pause();
    }
  }
  bool try_lock() {
    return !held_.load(std::memory_order_relaxed) &&
           !held_.exchange(true, std::memory_order_acquire);
  }
  void unlock() { held_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> held_{false};
};

// An eviction policy: how the clock hand treats a frame. Chosen once in evict.cc
// (policy_ops); implementations in evict_fifo.cc and evict_clock.cc.
struct PolicyOps {
  const char* name;
  // A line was just mapped into `frame`; `refault`: it was evicted less than ~2 laps ago.
  void (*on_fill)(std::atomic<uint64_t>& frame, bool refault);
  // The resident line in `frame` faulted again (write to a clean line, or a thread waited
  // for it): the only access signal user space gets.
  void (*on_refault)(std::atomic<uint64_t>& frame);
  // The hand reached `frame`: true to spare it this round (and age it), false to evict.
  bool (*spare)(std::atomic<uint64_t>& frame);
};
// Second chance, shared by clock and refault: a frame whose reference bit is set loses it
// and is spared this round.
bool spare_if_referenced(std::atomic<uint64_t>& frame);
extern const PolicyOps kFifoPolicyOps;
extern const PolicyOps kClockPolicyOps;
extern const PolicyOps kRefaultPolicyOps;
const PolicyOps* policy_ops(ExCacheOptions::Policy policy);

// Counters (LEGO_EXCACHE_COUNTERS in lego/excache.h), one set per stripe; a thread picks its
// stripe from its stack address (no TLS: dynamic TLS is not async-signal-safe), so threads
// rarely share a cache line.
enum class Counter : size_t {
#define LEGO_EXCACHE_ENUM(name, doc) name,
  LEGO_EXCACHE_COUNTERS(LEGO_EXCACHE_ENUM)
#undef LEGO_EXCACHE_ENUM
};
#define LEGO_EXCACHE_ONE(name, doc) +1
inline constexpr size_t kNumCounters = 0 LEGO_EXCACHE_COUNTERS(LEGO_EXCACHE_ONE);
#undef LEGO_EXCACHE_ONE

class Stats {
 public:
  void add(Counter c, uint64_t n = 1);
  void record_miss_ns(uint64_t ns);
  // Fills every field except the gauges.
  void snapshot(ExCacheStats* out) const;

 private:
  static constexpr size_t kStripes = 16;
  struct alignas(64) Stripe {
    std::atomic<uint64_t> counters[kNumCounters];
    std::atomic<uint64_t> latency[ExCacheStats::kLatencyBuckets];
  };
  Stripe& mine();
  Stripe stripes_[kStripes] = {};
};

uint64_t now_ns();

// Dirty prediction for a load miss (ExCacheOptions::predict_dirty): whether to map the line
// writable and dirty at once, and the history bits to keep. A store miss maps it dirty.
// (fault.cc; prefetch.cc maps its windows by it too.)
struct DirtyChoice {
  bool dirty;
  uint64_t persist;
};
DirtyChoice choose_dirty(uint64_t state, bool write, bool predict, Stats& stats);

// Writes "lego excache[pid]: <what> (errno N) at 0x<addr>" to stderr and aborts.
// Async-signal-safe.
[[noreturn]] void fatal(const char* what, int err, uint64_t addr);
// ExCacheOptions::on_fatal of the most recently created cache.
extern std::atomic<void (*)(const char*)> fatal_hook;

// Returns true for backend errors worth retrying on the miss path: lego/retry.h's kRetry.
bool transient(int code);

}  // namespace lego::excache_internal

namespace lego {
namespace excache_internal {
// fault.cc: the process-wide table of regions the SIGBUS handler serves. register_region
// installs the handler on first use; EBUSY when the table is full.
Status register_region(ExCache::Impl* impl);
void unregister_region(ExCache::Impl* impl);
}  // namespace excache_internal

}  // namespace lego

namespace lego {

struct ExCache::Impl {
  using Frames = std::atomic<uint64_t>;

  ExCacheOptions options;
  LineBackend* backend = nullptr;
  ExCache* owner = nullptr;

  // region.cc
  int uffd = -1;
  int pidfd = -1;  // for process_madvise batches; -1 falls back to madvise per run
  // /proc/self/task of the process that created the cache (owner_pid), to list its threads
  // (alone_in_process); -1 if it could not be opened: evictions then always fence.
  int task_dir = -1;
  pid_t owner_pid = 0;
  bool kernel_faults = false;
  std::byte* base = nullptr;
  size_t size = 0;
  size_t nlines = 0;
  std::atomic<uint64_t>* lines = nullptr;  // mmap'd, nlines words
  size_t lines_bytes = 0;

  // evict.cc
  size_t capacity = 0;  // frames
  size_t batch = 0;
  const excache_internal::PolicyOps* policy = nullptr;
  std::unique_ptr<Frames[]> frames;
  excache_internal::SpinLock evict_lock;  // one evictor at a time; guards hand
  size_t hand = 0;                        // EXCLUSIVE: evict_lock
  uint64_t hand_travel = 0;               // frames the hand has passed; EXCLUSIVE: evict_lock
  // Laps of the hand (kEvictLapMask): written by the evictor, read by fills.
  std::atomic<uint64_t> lap{1};
  // The stamp an eviction now leaves in the line word (kEvictLapMask).
  uint64_t evict_stamp() const {
    const uint64_t l = lap.load(std::memory_order_relaxed) & excache_internal::kEvictLapField;
    return (l == 0 ? 1 : l) << excache_internal::kEvictLapShift;
  }
  // Whether a line whose word was `old` before this miss was evicted less than two laps
  // ago (counted in Counter::refaults).
  bool refault(uint64_t old) {
    using namespace excache_internal;
    const uint64_t at = (old & kEvictLapMask) >> kEvictLapShift;
    if (at == 0) return false;
    const uint64_t now = lap.load(std::memory_order_relaxed) & kEvictLapField;
    if (((now - at) & kEvictLapField) > 1) return false;
    stats.add(Counter::refaults);
    return true;
  }
  uint64_t swept_at_travel = 0;           // hand_travel at the last sweep; EXCLUSIVE: evict_lock
  excache_internal::SpinLock frame_lock;  // guards free_stack, free_top
  std::unique_ptr<uint32_t[]> free_stack;
  size_t free_top = 0;
  std::atomic<uint64_t> resident{0};  // frames not on the free stack (gauge)
  // Eviction scratch, `batch` entries each, EXCLUSIVE: evict_lock. Preallocated so that an
  // eviction inside a SIGBUS handler uses no program stack for them.
  struct Victim {
    uint64_t index;
    uint32_t frame;
    bool dirty;
    bool mkcleaned;  // kClean with kMkcleanBit: stores show only in the PTE's dirty bit
  };
  static constexpr size_t kMaxBatch = 256;
  std::unique_ptr<Victim[]> victims;
  std::unique_ptr<LineBackend::WriteBack[]> write_backs;
  std::unique_ptr<iovec[]> zap_iov;
  // The last batch's write-back, in flight (LineBackend::start_write_back): its lines stay
  // kEvicting with no frame until reap_write_back_locked finishes it and publishes them
  // kAbsent, so none is fetched before it is stored. At most one is in flight. EXCLUSIVE:
  // evict_lock; wb_pending may be read without it, as a hint for threads waiting on a line.
  LineBackend::WriteBackTicket wb_ticket;
  std::unique_ptr<uint64_t[]> wb_lines;  // kMaxBatch line indices
  size_t wb_count = 0;
  std::atomic<bool> wb_pending{false};
  // lego_pcache.ko (pcache_dev.h), or -1. Its scratch: line addresses and result bitmaps
  // for one batch, and for kClock's accessed-bit sweep (kSweep lines). EXCLUSIVE: evict_lock.
  int pcache_fd = -1;
  uint32_t pcache_max_lines = 0;
  // The module has MKCLEAN: load misses are mapped writable and clean (fill), and the
  // kClean invariant is the second one above. Set once in open_kernel_module.
  bool pcache_mkclean = false;
  // Whether a fill maps the line clean and then MKCLEANs it: with the module's MKCLEAN, for
  // a clean fill of a line with a store history (see the kClean invariant).
  bool wants_mkclean(uint64_t state, bool dirty) const {
    return !dirty && pcache_mkclean && (state & excache_internal::kWrittenHintBit) != 0;
  }
  static constexpr size_t kSweep = 2 * kMaxBatch;
  std::unique_ptr<uint64_t[]> pc_lines;    // kSweep entries
  std::unique_ptr<uint32_t[]> pc_frames;   // kSweep entries: the frame of each swept line
  std::unique_ptr<uint64_t[]> pc_bits;     // 2 bitmaps of kSweep bits
  std::unique_ptr<uint32_t[]> pc_pending;  // victims still to write back and evict

  // fault.cc
  static constexpr size_t kStagingBuffers = 64;
  // Each buffer is a line with LineBackend::kFetchHeadroom before it (fetch_batch's reply
  // header lands there: the line arrives in place).
  static constexpr size_t kStagingStride = kExCacheLineBytes + LineBackend::kFetchHeadroom;
  std::byte* staging = nullptr;  // kStagingBuffers * kStagingStride, mmap'd
  std::byte* staging_line(size_t buffer) const {
    return staging + buffer * kStagingStride + LineBackend::kFetchHeadroom;
  }
  std::atomic<uint64_t> staging_busy{0};
  // One miss being filled: fill() runs one from start to end; the handler thread keeps up
  // to kMaxPipeline of them with their fetches in flight at once (the pipeline below).
  struct Fill {
    uint64_t index = 0;
    uint64_t state = 0;  // the line word when the miss claimed it (kFilling)
    bool write = false;
    uint64_t start_ns = 0;
    uint32_t frame = 0;         // kNoFrame until acquired
    size_t buffer = 0;          // staging buffer, kStagingBuffers if none
    bool started = false;       // the backend fetch was started: finish_fill finishes it
    bool reply_polled = false;  // the handler polled for its reply (await_reply_briefly)
    Status first_try;           // the start's result when it failed (the first try)
    LineBackend::FetchTicket ticket;
  };
  // Delivery::kHandlerThread: the handler thread's fills whose fetches are in flight, oldest
  // first (a ring). The handler reads every pending fault, starts each one's fetch, and maps
  // the oldest when its reply is in, then reads again: misses of different threads overlap
  // on the network with one thread and no extra wake-ups. At most pipeline_max, so that
  // (a) the frames they hold leave at least 3/4 of the cache to evict from, and (b) with
  // a write-back and the background prefetches they fit libfit's 16 calls per channel.
  // EXCLUSIVE: the handler thread.
  static constexpr size_t kMaxPipeline = 8;
  Fill pipeline[kMaxPipeline];
  size_t pipeline_head = 0;
  size_t pipeline_count = 0;
  size_t pipeline_max = 1;
  bool in_pipeline(uint64_t index) const;
  // Maps the oldest fill in flight (waits for its reply).
  void finish_oldest();
  // The handler's wait for a lone fetch's reply: polls it without system calls for up to
  // kReplyPollNs, true once it is in (fault.cc, "Waiting for a reply"). Off for the next
  // reply_poll_off fills after a second wait in a row that ran out (reply_poll_timeouts_in_row),
  // or a fault of another thread than the last fault's (last_fault_tid). EXCLUSIVE: the
  // handler thread.
  static constexpr uint64_t kReplyPollNs = 10'000;
  static constexpr uint32_t kReplyPollOffAfterTimeout = 64;
  static constexpr uint32_t kReplyPollOffAfterOtherThread = 256;
  uint32_t reply_poll_off = 0;
  uint32_t reply_poll_timeouts_in_row = 0;
  uint32_t last_fault_tid = 0;
  bool await_reply_briefly();
  // The handler's poll of the userfaultfd after an event (options.handler_spin_us) runs only
  // while several threads fault: for the next kSpinAfterOtherThread faults after one of
  // another thread than the last. With one thread faulting the handler sleeps as soon as it
  // has served it (fault.cc, handler_loop). EXCLUSIVE: the handler thread.
  static constexpr uint32_t kSpinAfterOtherThread = 256;
  uint32_t several_threads_faults = 0;
  pthread_t handler{};
  bool handler_running = false;
  std::atomic<bool> stopping{false};
  int stop_fd = -1;  // eventfd that wakes the handler thread out of poll() to stop

  // prefetch.cc (ExCacheOptions::prefetch_lines). Stream detectors are hints,
  // updated racily by design: a torn or stale read only makes a worse guess, because the
  // lines a prefetch maps are claimed by CAS like any miss's.
  struct Stream {
    std::atomic<uint64_t> last{kNoLine};  // the newest miss (or prefetched line) seen
    std::atomic<int64_t> stride{0};       // lines between misses; 0: not a stream yet
    std::atomic<uint64_t> next{kNoLine};  // where its next miss is expected
    std::atomic<uint32_t> window{0};      // lines its last prefetch asked for
  };
  static constexpr uint64_t kNoLine = ~uint64_t{0};
  static constexpr size_t kStreams = 8;
  Stream streams[kStreams];
  std::atomic<uint32_t> stream_clock{0};  // the slot a miss outside every stream takes
  size_t prefetch_max = 0;                // lines ahead per miss (options, clamped)
  // A prefetch's scratch: the lines it claimed and, after kFetchHeadroom bytes, room for
  // the missed line and kMaxPrefetch more. kPrefetchBuffers misses prefetch at once; a
  // miss finding none free just fetches its own line.
  static constexpr size_t kMaxPrefetch = LineBackend::kMaxFetchBatch - 1;
  static constexpr size_t kPrefetchBuffers = 4;
  struct PrefetchBuffer {
    // kIdle, or in use: a miss's own batch (kSync), a background fetch in flight (kAsync),
    // or one being completed (kCompleting). Only kAsync may be completed by anyone.
    enum Phase : uint32_t { kIdle, kSync, kAsync, kCompleting };
    std::atomic<uint32_t> phase;
    size_t n;        // lines claimed
    size_t m;        // of them fetched from the backend (the others are zero-filled)
    int64_t stride;  // the stream's
    bool write;      // a write stream: map its lines dirty
    bool started;    // kAsync: the backend fetch was started (else fetch at completion)
    LineBackend::FetchTicket ticket;
    uint64_t index[kMaxPrefetch + 1];
    uint64_t state[kMaxPrefetch + 1];
    uint32_t frame[kMaxPrefetch + 1];
    uint64_t fetch_addrs[kMaxPrefetch + 1];
    uint32_t fetch_slot[kMaxPrefetch + 1];
    alignas(64) std::byte headroom[LineBackend::kFetchHeadroom];
    alignas(4096) std::byte data[(kMaxPrefetch + 1) * excache_internal::kLine];
  };
  PrefetchBuffer* prefetch_buffers = nullptr;  // kPrefetchBuffers of them, mmap'd

  // Test only: LEGO_TEST_FORK_EVICT_LINE0=1 in the environment (read once, at setup) makes
  // every eviction batch taken while a fork is under way also evict line 0 if it is
  // resident, so that the fork snapshot gets the region's first line as the forking thread
  // has it then (under lego-run: jemalloc's base with the mutexes its prefork handler
  // locked). tests/lego_run uses it to check that a child sees its memory as of the clone.
  // Unset, it costs one test of this flag per eviction batch.
  bool test_fork_evict_line0 = false;
  // fork.cc: fork() support (UFFD_FEATURE_EVENT_FORK). While a fork is under way
  // (prepare_fork until the handler thread reads the fork event) evictions and discards
  // also write into / release in the snapshot the child will be served from.
  bool fork_events = false;                  // EVENT_FORK enabled on uffd
  std::atomic<int64_t> fork_snapshot{-1};    // snapshot id while a fork is under way
  std::atomic<uint64_t> fork_generation{0};  // bumped by each prepare_fork
  std::atomic<int64_t> last_fork_snapshot{-1};
  std::atomic<uint64_t> fork_events_seen{0};  // fork events read from uffd
  std::atomic<int> last_child_slot{-1};       // slot of the newest child of this process
  // Evictions (write_back_batch) and discard chunks under way that may write into or
  // release in a fork snapshot: counted from before they look for one (fork_snapshot, and
  // a discard's fork_generation) until their backend call has returned. The handler thread
  // lets no child adopt its snapshot while any is counted (check_handovers): a write or a
  // release landing after the adoption would overwrite or drop the child's own lines.
  std::atomic<uint32_t> snapshot_writers{0};
  // The handler thread left an adoption request unanswered because of snapshot_writers; the
  // last writer to end wakes it (handover_fd).
  std::atomic<bool> handover_deferred{false};
  void begin_snapshot_write() { snapshot_writers.fetch_add(1, std::memory_order_seq_cst); }
  void end_snapshot_write();
  // A forked process whose region the handler thread serves from a snapshot.
  struct Child {
    int uffd = -1;  // -1: slot free
    std::atomic<int> pidfd{-1};
    uint32_t snapshot = 0;
  };
  static constexpr size_t kMaxChildren = 64;
  Child children[kMaxChildren];  // EXCLUSIVE: the handler thread (pidfd: finish_fork)
  // Adoption (fork.cc): a page shared with every forked child (MAP_SHARED survives fork),
  // through which a child asks the handler thread to let go of its userfaultfd.
  enum HandoverState : uint32_t { kServing = 0, kRequested, kAdopted, kRefused };
  struct HandoverPage {
    std::atomic<uint32_t> requests;             // bumped by each request (the handler compares)
    std::atomic<uint32_t> state[kMaxChildren];  // a futex per child slot (shared)
  };
  HandoverPage* handover = nullptr;  // mmap'd when fork_events
  int handover_fd = -1;              // eventfd a child writes to wake the handler thread
  uint32_t handover_seen = 0;        // EXCLUSIVE: the handler thread
  // A duplicate of the newest child's userfaultfd for take_fork_uffd, and its slot.
  std::atomic<int> pending_fork_uffd{-1};
  std::atomic<int> pending_fork_slot{-1};
  void check_handovers();  // the handler thread
  // An adopting child's handler thread starts before the handover (its start may fault
  // on the region, which the parent serves until then) and waits at this gate, without
  // reading the userfaultfd, until adopt_fork opens it (0). `gate_waiting`: it got there.
  std::atomic<uint32_t> start_gate{0};
  std::atomic<uint32_t> gate_waiting{0};
  // Takes the resident lines of a forked child as this (adopting) cache's (fork.cc).
  Status adopt_lines(const ExCache::Impl& parent, std::span<const ExCache::Range> ranges);
  std::atomic<size_t> nchildren{0};  // gauge
  uint64_t last_reclaim_ns = 0;      // EXCLUSIVE: the handler thread
  void handle_fork_event(int child_uffd, int parent_slot);
  // On EAGAIN from an ioctl on `fd` (ours, or child `slot`'s): reads its fork event.
  void drain_events(int fd, int slot);
  void serve_child(size_t slot, const uffd_msg& msg);
  void poll_children();  // reads every child's uffd once
  void reclaim_children(bool force);
  void release_child(size_t slot);
  int child_fds(pollfd* out, size_t max);

  excache_internal::Stats stats;

  ~Impl();

  uint64_t line_index(uint64_t addr) const {
    return (addr - reinterpret_cast<uint64_t>(base)) >> excache_internal::kLineShift;
  }
  uint64_t line_addr(uint64_t index) const {
    return reinterpret_cast<uint64_t>(base) + (index << excache_internal::kLineShift);
  }
  bool contains(uint64_t addr) const { return addr - reinterpret_cast<uint64_t>(base) < size; }

  // region.cc. setup: options and every structure but the region's (create, adopt_fork).
  Status setup(const ExCacheOptions& opts, LineBackend* line_backend);
  Status init_region();
  // The buffers and descriptors of this process (staging, prefetch, pidfd, task_dir, the
  // handover page): after init_region, or in an adopting child.
  Status init_buffers();
  // Opens /dev/lego_pcache per ExCacheOptions::kernel_module.
  Status open_kernel_module();
  // Write-protects (wp = true) or un-protects [addr, addr + len); returns 0 or errno.
  int write_protect(uint64_t addr, uint64_t len, bool wp);

  // fault.cc. Serves one fault at line address `addr`; `write`: the access was a store.
  // Returns true when it mapped or un-protected the line (which wakes kernel waiters), false
  // when the fault was already served by someone else (kHandlerThread must then
  // UFFDIO_WAKE the faulting thread).
  // `pending` (the handler thread's pipeline only): a backend fetch may be left in flight
  // there (pending->started) for finish_fill; a fault on a line the pipeline is filling
  // returns true at once (that fill's UFFDIO_COPY wakes the thread).
  bool serve_fault(uint64_t addr, bool write, Fill* pending = nullptr);
  Status start_handler_thread();
  void handler_loop();

  // evict.cc. A free frame, evicting a batch first if none is free. Never fails (fatal on
  // backend errors).
  uint32_t acquire_frame();
  // Finishes the write-back in flight, if any, and publishes its lines kAbsent.
  void reap_write_back_locked();  // holding evict_lock
  // For a thread waiting on a kEvicting line: reaps if a write-back is in flight and
  // evict_lock is free (else its holder reaps). True if it reaped.
  bool try_reap_write_back();
  void free_frame(uint32_t frame);
  Status discard(uint64_t addr, uint64_t len);

 private:
  // Evicts up to `batch` lines; keeps one freed frame for the caller in *out and frees the
  // rest. False if no victim could be taken (all frames busy filling).
  // victims[i].dirty on return from steps 2-4: the line was written back.
  bool evict_batch_locked(uint32_t* out);
  // Steps 2-4 of evicting victims[0..n): through lego_pcache (false if the module refused
  // the batch before changing anything), or the userfaultfd way.
  bool evict_with_module(size_t n);
  bool evict_with_userfaultfd(size_t n);
  // True if the calling thread is the only one in the process besides registered service
  // threads (excache_service_thread_begin), and the process is the one that created the
  // cache (not a vfork child sharing its memory). Evicting threads only (uses task_dir).
  bool alone_in_process();
  // kClock with the module: sets the reference bit of frames ahead of the hand whose line
  // the CPU accessed since the last sweep (one AD ioctl).
  void sweep_accessed_bits();
  // Writes back write_backs[0..n), retrying transient errors (kAttempts tries in all,
  // `tried` of them made already: a start_write_back that failed); fatal otherwise. Also
  // into the snapshot of a fork under way.
  void write_back_batch(size_t n, int tried = 0);
  void handle_event(const uffd_msg& msg);
  void fill(uint64_t index, uint64_t state, bool write, uint64_t start_ns);
  // fill() in two halves. begin_fill claims a frame and starts the fetch (`pipelined`:
  // always start it, so that it can stay in flight); true when it already served the miss
  // (a prefetch window). finish_fill waits for the fetch, maps the line and publishes it.
  bool begin_fill(Fill& f, bool pipelined);
  void finish_fill(Fill& f);
  // prefetch.cc. How many lines ahead of a miss at `index` to fetch, and on which stride
  // (0: none); updates the stream detectors.
  size_t plan_prefetch(uint64_t index, int64_t* stride);
  // fill() with a prefetch window: claims what it can of `want` lines on `stride` after
  // the missed line, fetches them with it in one call and maps them. False (nothing done)
  // when no prefetch buffer or no line ahead could be had: the caller fills alone.
  bool fill_with_prefetch(uint64_t index, uint64_t state, bool write, uint32_t frame, size_t want,
                          int64_t stride, uint64_t start_ns);
  // Prefetch buffers: a free one (phase kSync), or none.
  PrefetchBuffer* acquire_prefetch_buffer();  // completes a stale background one if need be
  PrefetchBuffer* try_acquire_prefetch_buffer();
  void release_prefetch_buffer(PrefetchBuffer& pb);
  // Claims up to `want` absent lines on the stride after line `from` into pb (from pb.n
  // on), as `kind` (kFilling or kPrefetching), each with a frame had without waiting.
  void claim_ahead(PrefetchBuffer& pb, uint64_t from, size_t want, excache_internal::LineKind kind);
  // Lists pb's backed lines in pb.fetch_addrs / fetch_slot (pb.m of them): the ones to fetch.
  void list_backed(PrefetchBuffer& pb);
  // fault.cc. Fetches pb's listed lines (into the tail of pb.data) and spreads them to their
  // slots.
  void fetch_claimed(PrefetchBuffer& pb);
  // Maps pb's lines and publishes them; releases pb.
  void map_claimed(PrefetchBuffer& pb, uint64_t start_ns);
  // Claims the window after line `from` and starts fetching it in the background.
  void start_background_prefetch(uint64_t from, int64_t stride, size_t want, bool write);

 public:
  // prefetch.cc. Completes the background prefetch in buffer `slot` if it is still in flight (waits
  // for its reply and maps its lines); with `go_on`, starts the stream's next window. Any thread
  // may call it; false if the buffer held no background prefetch.
  bool complete_prefetch(uint32_t slot, bool go_on);
  // Completes every background prefetch (discard, fork, destruction).
  void complete_all_prefetches();

 private:
  // A free frame without waiting: pops one, or evicts a batch if no one else is evicting.
  bool try_acquire_frame(uint32_t* frame);
  // Maps `count` lines from `src` at line `index` on (UFFDIO_COPY; write-protected unless
  // `dirty`), coping with partial copies and lines someone mapped behind our back.
  // `dontwake`: leave the faulting thread asleep (kHandlerThread; the caller wakes it).
  void map_lines(uint64_t index, const std::byte* src, size_t count, bool dirty,
                 bool dontwake = false);
  size_t staging_acquire();
  void staging_release(size_t buffer);
  // MADV_DONTNEED of victims[0..n) (sorted; clean_only: of those neither dirty nor
  // MKCLEANed): one process_madvise, so one TLB flush, when the kernel allows it.
  // EXCLUSIVE: evict_lock.
  void zap_victims(size_t n, bool clean_only = false);
  bool pop_free(uint32_t* frame);
};

}  // namespace lego
