// ExCache: the processor node's cache of remote memory (LegoOS's "pcache"), on stock Linux.
//
// An ExCache reserves a large virtual range, "the disaggregated region", whose contents live
// in a LineBackend (the memory node; in tests an in-process store). At most
// `capacity_bytes / 4096` lines of 4 KiB are resident locally at any time. Program threads
// load and store into the region with ordinary instructions; a touch of a non-resident line
// is a miss that userfaultfd delivers to us: we pick a frame (evicting a batch of lines when
// the cache is full: dirty ones are written back, clean ones dropped), fetch the line (or
// zero-fill it locally when the backend never received it) and map it in place.
//
// Two deliveries (ExCacheOptions::Delivery):
//   kSigbus         the faulting thread serves its own miss inside a SIGBUS handler: fastest
//                   (~5 µs per miss on our VMs, no cross-CPU wake-up). Limitation: a fault
//                   taken in kernel mode (a syscall such as read(fd, buf, n) whose buf is a
//                   non-resident or write-protected line) is NOT served: the syscall fails
//                   with EFAULT. Callers that pass region memory to the kernel must
//                   ExCache::prefault() it first and retry on EFAULT (the LD_PRELOAD
//                   interposer does this).
//   kHandlerThread  one thread per ExCache polls the userfaultfd and serves misses while the
//                   faulting thread sleeps in the kernel: slower (a cross-CPU hand-off per
//                   miss). It is pipelined: it starts the fetches of every pending fault
//                   (LineBackend::start_fetch_batch, up to 8 in flight) before it waits for
//                   the oldest, so misses of different threads overlap in the backend.
//                   Kernel-mode faults work when the process may register them
//                   (root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1; see
//                   ExCache::serves_kernel_faults()).
//
// Thread-safety: an ExCache is safe to use from any number of threads; region memory may be
// accessed by all threads concurrently. create() and the destructor must not race with
// accesses to the region (destroy only after every thread has stopped touching it).
// Hot paths (the miss, the eviction) allocate nothing and take no lock that program code
// could hold: see the lock order at the top of runtime/excache/fault.cc.
//
// Errors: create() and discard() return a lego::Status/Result with an errno code
// (EINVAL bad options or range, ENOSYS/EPERM userfaultfd unavailable or forbidden,
// EOPNOTSUPP a needed userfaultfd feature missing, ENOMEM, EBUSY too many ExCaches).
// A backend error on the miss path cannot be returned to a load or store: an error that
// lego/retry.h classifies kRetry (ETIMEDOUT, ECONNRESET, EPIPE, EAGAIN, EINTR) is retried,
// kAttempts tries in all; then, or at once for any other error, the process is aborted
// with a message naming the address (ExCacheOptions::on_fatal is told first), as the
// kernel kills a process whose swap device fails.
//
// fork(): supported with kHandlerThread when the process may register kernel-mode faults
// (then UFFD_FEATURE_EVENT_FORK is on) and the backend has snapshots: call prepare_fork()
// just before fork() and finish_fork() in the parent after it (lego-run's interposer does).
// The child's region is then served by the PARENT's handler thread from a snapshot taken at
// the fork, and lines it touches are never evicted, until the child adopts: adopt_fork()
// gives it an ExCache of its own over the same region, with the snapshot as its memory
// (runtime/excache/fork.cc). The child must not call the inherited ExCache. Otherwise the
// region is MADV_DONTFORK: a forked child that touches it gets SIGSEGV.
// Unsupported:
// munmap/mremap/madvise of region memory other than through discard() (the interposer
// routes them here); hugepages (the region is MADV_NOHUGEPAGE: lines are 4 KiB).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include <sys/types.h>

#include "lego/status.h"

namespace lego {

inline constexpr size_t kExCacheLineBytes = 4096;
// The smallest ExCache: ExCacheOptions::capacity_bytes of fewer lines is refused.
inline constexpr size_t kExCacheMinLines = 16;

// The backend writers' API: where lines live when they are not resident.
//
// Calling context (read before implementing): every method may be called concurrently from
// several threads, and with Delivery::kSigbus from inside a SIGBUS handler on whatever
// program thread missed. That thread may have been interrupted while holding any lock of
// the program or of libc (malloc's arena lock, stdio's lock, ...). Hence implementations
// must not call malloc/free/new/delete, stdio, or take any lock that program code can hold;
// spin on their own atomics instead, and use preallocated buffers. Only async-signal-safe
// syscalls (read, write, sendmsg, recvmsg, poll, clock_gettime, ...) are allowed. Stack use
// should stay below a few KiB: the handler runs on the faulting thread's stack.
// An ok Status allocates nothing; an error Status may allocate (its message), which is
// acceptable only because the miss path treats it as fatal after retries.
class LineBackend {
 public:
  // One dirty line to store: `data` points at kExCacheLineBytes bytes, valid only for the
  // duration of the write_back call (it is the line itself, write-protected meanwhile).
  struct WriteBack {
    uint64_t addr;
    const std::byte* data;
  };

  virtual ~LineBackend() = default;

  // Copies the line at `line_addr` (4 KiB aligned, inside the region) into `out`. A line
  // never written back (or released since) reads as zeros; ExCache avoids asking for
  // those, but a backend must answer them correctly anyway.
  virtual Status fetch(uint64_t line_addr, std::span<std::byte, kExCacheLineBytes> out) = 0;

  // Stores every line in `lines` (1..batch lines, distinct addresses, sorted ascending).
  // All-or-nothing is not required, but an error means ExCache assumes none were stored.
  virtual Status write_back(std::span<const WriteBack> lines) = 0;

  // Prefetch: fetches several lines in one call. Line i of `line_addrs` (4 KiB aligned,
  // distinct, at most kMaxFetchBatch of them) goes to out + i * kExCacheLineBytes. Same
  // calling context and rules as fetch(). The kFetchHeadroom bytes just before `out` are
  // scratch the backend may overwrite (a reply header received in place saves a copy).
  // The default calls fetch() once per line; a remote backend sends one request.
  static constexpr size_t kMaxFetchBatch = 32;
  static constexpr size_t kFetchHeadroom = 64;
  virtual Status fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out) {
    for (size_t i = 0; i < line_addrs.size(); ++i) {
      Status st = fetch(line_addrs[i], std::span<std::byte, kExCacheLineBytes>(
                                           out + i * kExCacheLineBytes, kExCacheLineBytes));
      if (!st) return st;
    }
    return Status::ok();
  }
  // fetch_batch in two halves, so that the fetch runs while the program works: start sends
  // the request and returns, finish waits for the reply and leaves `out` as fetch_batch
  // would. `ticket` is the caller's storage for the fetch in between. Every started fetch
  // must be finished, from any thread; same calling context as fetch(). One thread may
  // have several started at once (the handler thread's pipeline: up to 8, finished oldest
  // first, with write-backs started and finished in between): a backend must let them be
  // in flight together, not serialise them behind a lock held until finish. The default
  // fetches everything in start.
  struct FetchTicket {
    alignas(16) unsigned char opaque[64];
    size_t count;
    std::byte* out;
  };
  virtual Status start_fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out,
                                   FetchTicket* ticket) {
    ticket->count = line_addrs.size();
    ticket->out = out;
    return fetch_batch(line_addrs, out);
  }
  virtual Status finish_fetch_batch(FetchTicket* ticket) {
    (void)ticket;
    return Status::ok();
  }
  // Whether finish_fetch_batch would return at once (the reply, or an error, is in).
  // Polls without waiting; same calling context as fetch(). The handler thread asks it
  // between reads of new faults, so that it starts their fetches while the oldest is on
  // its way. The default (true) makes the handler wait for each oldest fetch in turn.
  virtual bool fetch_ready(FetchTicket* ticket) {
    (void)ticket;
    return true;
  }
  // write_back in two halves, so that an eviction need not wait for the backend's answer:
  // start takes the lines (when it returns their memory may change or be unmapped: it was
  // sent or copied) and returns; finish waits until they are stored, and is where an error
  // is reported (after retrying, if the backend can: it keeps what it sent). ExCache
  // finishes a write-back before any of its lines can be fetched again, so a backend need
  // not order one against later fetches. `ticket` is the caller's storage in between; every
  // started write-back must be finished, from any thread; an error from start means nothing
  // is in flight. Same calling context as write_back(). The default stores in start.
  struct WriteBackTicket {
    alignas(16) unsigned char opaque[64];
    void* buffer = nullptr;  // the backend's
    size_t length = 0;
  };
  virtual Status start_write_back(std::span<const WriteBack> lines, WriteBackTicket* ticket) {
    ticket->buffer = nullptr;
    return write_back(lines);
  }
  virtual Status finish_write_back(WriteBackTicket* ticket) {
    (void)ticket;
    return Status::ok();
  }
  // The range [addr, addr + length) (4 KiB aligned) was freed by the program: the backend
  // may drop it; later fetches of it must return zeros or are not made at all. Called from
  // ExCache::discard (program context, not a signal handler).
  virtual Status release(uint64_t addr, uint64_t length) {
    (void)addr;
    (void)length;
    return Status::ok();
  }

  // Snapshots, for fork() (ExCache::prepare_fork). A snapshot is a copy of everything the
  // backend holds now, named by a small id; a forked child's misses are served from it.
  // Called from program context (never a signal handler) while no write_back or release
  // is in flight. EOPNOTSUPP (the default) makes fork() fail with ENOSYS.
  virtual Result<uint32_t> snapshot() { return Status(EOPNOTSUPP, "backend has no snapshots"); }
  // fetch() from snapshot `id`. Same calling context as fetch (the handler thread).
  virtual Status fetch_snapshot(uint32_t id, uint64_t line_addr,
                                std::span<std::byte, kExCacheLineBytes> out) {
    (void)id;
    (void)line_addr;
    (void)out;
    return Status(EOPNOTSUPP, "backend has no snapshots");
  }
  // write_back() into snapshot `id` as well: lines evicted while a fork is under way.
  virtual Status write_back_snapshot(uint32_t id, std::span<const WriteBack> lines) {
    (void)id;
    (void)lines;
    return Status(EOPNOTSUPP, "backend has no snapshots");
  }
  // release() in snapshot `id` as well: a range discarded while a fork is under way.
  virtual Status release_snapshot(uint32_t id, uint64_t addr, uint64_t length) {
    (void)id;
    (void)addr;
    (void)length;
    return Status(EOPNOTSUPP, "backend has no snapshots");
  }
  // The snapshot is no longer needed (its children are gone). Program or handler context.
  virtual void drop_snapshot(uint32_t id) { (void)id; }
  // The forked child that was served from snapshot `id` adopted it as its own memory
  // (ExCache::adopt_fork): forget it here without freeing it. Handler context. The default
  // does nothing (a backend whose snapshots a child cannot reach never sees an adoption).
  // No write_back_snapshot or release_snapshot of `id` is in flight then, and none starts
  // after (the id may be handed out again by a later snapshot()).
  virtual void disown_snapshot(uint32_t id) { (void)id; }
};

struct ExCacheOptions {
  enum class Delivery : uint8_t {
    kSigbus,         // faulting thread serves itself in a SIGBUS handler (fast; no EFAULT-free
                     // kernel-mode faults, see the header comment)
    kHandlerThread,  // a per-cache thread serves faults (slower; kernel-mode faults work)
  };
  enum class Policy : uint8_t {
    kFifo,     // evict in fill order: no per-access signal needed, predictable
    kClock,    // second chance for lines that faulted again after their fill (a write to a
               // clean line, or a second thread waiting on the fill). Without a kernel module
               // the accessed bit is invisible to us, so this is only an LRU approximation
               // for write-after-read and shared lines; see runtime/excache/evict_clock.cc.
    kRefault,  // second chance for lines missed again soon after their eviction (within
               // about a lap of the clock hand): a line that comes back that soon is hot.
               // Needs no access signal; fewer misses under skew (Zipf 0.99 at 25% local:
               // -7%, a hot set -15%), the same under uniform access (docs/measurements.md,
               // "Access information"). See runtime/excache/evict_refault.cc.
  };

  // Local memory: at most this many bytes (rounded down to 4 KiB, at least 16 lines) of the
  // region are resident. Default 64 MiB. Trade-off: more local memory, fewer misses.
  size_t capacity_bytes = size_t{64} << 20;
  // Default kSigbus: ~3x cheaper per miss than a handler thread on our VMs
  // (docs/measurements.md).
  Delivery delivery = Delivery::kSigbus;
  // Default kFifo: cheapest bookkeeping; kClock helps workloads that re-write hot lines.
  Policy policy = Policy::kFifo;
  // Size of the reserved virtual range (rounded up to 4 KiB). Default 16 GiB. Costs no
  // memory up front; per-line metadata is 8 bytes, reserved (not committed) with it.
  size_t region_bytes = size_t{16} << 30;
  // Lines evicted together: they share one write_back call and one TLB-flushing
  // madvise. Default 32; clamped to [1, capacity/8]. Larger batches amortise more but
  // evict more lines than one miss needs.
  size_t evict_batch_lines = 32;
  // kHandlerThread only: while several threads fault, how long the handler polls the
  // userfaultfd after the last event before sleeping in poll(). Default 50 µs (another
  // thread's fault is then served without a wake-up; the handler yields between polls, so
  // a thread that needs this CPU gets it); 0 = always sleep. With one thread faulting the
  // handler sleeps at once: its polling would only compete with that thread (fault.cc).
  uint32_t handler_spin_us = 50;
  // Dirty prediction. Learning that a line is dirty costs a write-protect fault (~5 µs) on
  // its first store after a load miss: in a read-modify-write workload that doubles the
  // cost of every miss. With prediction on, a load miss of a line that was stored to in an
  // earlier residency is mapped writable and counted dirty at once (no write fault); every
  // 4th such miss maps it clean again to re-learn. Default true. Trade-off: a line that
  // stops being written is written back needlessly up to 3 more times; turn off for
  // read-mostly data where clean drops matter more than write faults. Ignored when the
  // kernel module tracks dirtiness (below): stores then take no fault to save.
  bool predict_dirty = true;
  // Prefetch. A miss that continues a stream -- the third or later miss at a steady stride
  // (+1 line for a sequential scan, up to +-16 lines) -- also fetches lines ahead of it on
  // the stride in the same backend call (one request, one UFFDIO_COPY for a sequential
  // run) and maps them. The window starts at 4 lines and doubles while the stream goes on,
  // up to this many. Random misses rarely form a stream, so they fetch only what they
  // miss. Default 31 (with the missed line: one 128 KiB request); 0 turns prefetch off.
  // Clamped to capacity/8 lines. Trade-off: a stream that stops wastes up to one window.
  uint32_t prefetch_lines = 31;
  // The kernel module lego_pcache.ko (kmod/), used when /dev/lego_pcache exists:
  // evictions become batched ioctls (one mmap-locked pass and one TLB flush for many lines,
  // instead of a write-protect ioctl per dirty run plus a madvise per run on kernels before
  // 6.13), kClock reads the hardware accessed bits instead of guessing from faults, and
  // (module ABI 1.1, MKCLEAN) load misses are mapped writable and clean: the first store to
  // a line takes no write-protect fault, and eviction asks the PTE's dirty bit instead.
  // kAuto (default): use it if loaded; kOff: never; kRequire: create() fails without it.
  enum class KernelModule : uint8_t { kAuto, kOff, kRequire };
  KernelModule kernel_module = KernelModule::kAuto;
  // Called first thing on every thread the ExCache starts (the kHandlerThread handler), so
  // an embedder can set it up (lego-run pins it to a local jemalloc arena). Default none.
  void (*on_thread_start)() = nullptr;
  // Called with a one-line message when a miss cannot be served (the backend failed after
  // retries, or the kernel refused an operation), just before the process aborts. Must be
  // async-signal-safe. lego-run reports a lost memory node through it. Default none.
  void (*on_fatal)(const char* message) = nullptr;
};

// Every ExCache counter, once: X(name, "what it counts"). This list makes the counter
// fields of ExCacheStats, the runtime's per-thread counters, the "stats" report each
// process of a run sends lego-run, and lego-run --stats (in this order). Each counts
// events since create().
#define LEGO_EXCACHE_COUNTERS(X)                                                           \
  X(misses, "faults on a non-resident line that we served (fetch + zero)")                 \
  X(fetches, "misses served by LineBackend::fetch")                                        \
  X(zero_fills, "misses served locally: line never written back (no round trip)")          \
  X(write_faults, "first writes to a clean resident line (it becomes dirty)")              \
  X(evictions, "lines evicted (write_backs + clean_drops)")                                \
  X(write_backs, "dirty lines written back to the backend")                                \
  X(clean_drops, "clean lines dropped without a backend call")                             \
  X(discarded_lines, "resident lines dropped by discard()")                                \
  X(bytes_fetched, "bytes received from LineBackend::fetch")                               \
  X(bytes_written, "bytes passed to LineBackend::write_back")                              \
  X(module_calls, "lego_pcache ioctls (evictions, accessed-bit sweeps, MKCLEAN)")          \
  X(accessed_spared, "kClock with the module: victims spared for their accessed bit")      \
  X(redirtied, "module: lines stored to while being written back (written again)")         \
  X(prefetches, "misses that also fetched lines ahead of a stream")                        \
  X(prefetched_lines, "lines mapped ahead of a stream (not counted in misses)")            \
  X(dirty_predictions, "load misses mapped dirty on the line's store history")             \
  X(unfenced_batches, "eviction rounds that skipped write-protecting: no thread to store") \
  X(eviction_batches, "eviction rounds (each one TLB-flushing zap)")                       \
  X(waits, "faults that waited for a line another thread was filling or evicting")         \
  X(overlapped, "handler thread: misses whose fetch went out while another was in flight") \
  X(reply_polls, "handler thread: waits for a lone fetch's reply without system calls")    \
  X(reply_poll_timeouts, "reply_polls that ran out (two in a row: none for 64 misses)")    \
  X(handler_sleeps, "handler thread: sleeps in poll() for the next fault")                 \
  X(spurious, "faults that found the line already served (raced a fill)")                  \
  X(refaults, "misses on a line evicted less than ~1-2 laps of the clock hand before")
// The gauges: what holds now, not events.
#define LEGO_EXCACHE_GAUGES(X)                            \
  X(resident_lines, "lines resident or being filled now") \
  X(capacity_lines, "the cap on resident_lines")

// Counters since create() (LEGO_EXCACHE_COUNTERS), the gauges, and miss latencies.
struct ExCacheStats {
  static constexpr size_t kLatencyBuckets = 40;

#define LEGO_EXCACHE_FIELD(name, doc) uint64_t name = 0;
  LEGO_EXCACHE_COUNTERS(LEGO_EXCACHE_FIELD)
  LEGO_EXCACHE_GAUGES(LEGO_EXCACHE_FIELD)
#undef LEGO_EXCACHE_FIELD
  // Miss service time (fault entry to line mapped, including any eviction the miss ran),
  // log2 histogram: bucket i counts misses taking [2^i, 2^(i+1)) ns (bucket 0: < 2 ns).
  std::array<uint64_t, kLatencyBuckets> miss_latency_log2_ns{};
  // Upper bounds of the buckets holding the 50th / 99th percentile miss (0 if no misses).
  uint64_t miss_p50_ns = 0;
  uint64_t miss_p99_ns = 0;
};

// The counters and gauges by name, in the list's order, for whoever prints them.
struct ExCacheStatsField {
  const char* name;
  uint64_t ExCacheStats::*field;
  const char* doc;
  bool gauge;
};
inline constexpr ExCacheStatsField kExCacheStatsFields[] = {
#define LEGO_EXCACHE_COUNTER_FIELD(name, doc) {#name, &ExCacheStats::name, doc, false},
#define LEGO_EXCACHE_GAUGE_FIELD(name, doc) {#name, &ExCacheStats::name, doc, true},
    LEGO_EXCACHE_COUNTERS(LEGO_EXCACHE_COUNTER_FIELD) LEGO_EXCACHE_GAUGES(LEGO_EXCACHE_GAUGE_FIELD)
#undef LEGO_EXCACHE_COUNTER_FIELD
#undef LEGO_EXCACHE_GAUGE_FIELD
};

class ExCache {
 public:
  // Reserves the region, opens and registers a userfaultfd, preallocates every structure
  // the miss path needs and, for kSigbus, installs the process-wide SIGBUS handler (once;
  // it chains to the previous handler for faults outside every region). `backend` is
  // borrowed: it must outlive the ExCache. Costs a few syscalls and ~capacity/256 bytes.
  static Result<std::unique_ptr<ExCache>> create(const ExCacheOptions& options,
                                                 LineBackend* backend);

  // Stops the handler thread, unregisters and unmaps the region. Resident dirty lines are
  // NOT written back: the region's contents die with it (as with munmap).
  ~ExCache();
  ExCache(const ExCache&) = delete;
  ExCache& operator=(const ExCache&) = delete;

  void* region_base() const;
  size_t region_size() const;
  size_t capacity_lines() const;
  const ExCacheOptions& options() const;

  // False when kernel-mode faults in the region fail with EFAULT: always for kSigbus; for
  // kHandlerThread when the process may only register user-mode faults.
  bool serves_kernel_faults() const;

  // True when evictions and kClock use lego_pcache.ko (ExCacheOptions::kernel_module), and
  // with it dirty tracking: load misses are mapped writable and clean, so stores take no
  // write fault and dirty prediction is off (kmod/README.md).
  bool uses_kernel_module() const;

  // Like madvise(MADV_DONTNEED): the range [addr, addr + len) (addr 4 KiB aligned, len
  // rounded up, inside the region) reads as zeros afterwards; resident lines are dropped
  // without write-back and the backend is told to release the range. Must not race with
  // accesses to the same range (as with munmap). Returns EINVAL for a bad range, or the
  // backend's release error (the range is discarded locally even then).
  Status discard(void* addr, size_t len);

  // Snapshot of the counters (sums per-thread stripes; cheap, lock-free, not atomic across
  // counters).
  ExCacheStats stats() const;
  // True when fork() can be supported (see the header comment).
  bool supports_fork() const;
  // Call right before fork(): takes a backend snapshot that the child will be served from;
  // evictions and discards until the fork also write into / release in it (discards are
  // not stopped: see runtime/excache/fork.cc). ENOSYS when !supports_fork(), or the
  // backend's error (ENOMEM: no room for the copy). On success finish_fork() must follow,
  // in the parent, whatever fork() returned.
  Status prepare_fork();
  // In the parent after fork(): `child` is fork()'s result (-1 if it failed). Returns once
  // the handler thread has taken the child's userfaultfd.
  void finish_fork(pid_t child);
  // Children whose regions this cache still serves (gauge, for tests and stats).
  size_t forked_children() const;

  // Adoption: a forked child becomes a process of its own (runtime/excache/fork.cc).
  // In the parent, after finish_fork(): a duplicate of the newest child's userfaultfd (the
  // caller sends it to the child and closes it), its slot and its snapshot id; -1 when
  // there is none (no fork event was filed). Each child's is taken once.
  int take_fork_uffd(int* slot, uint32_t* snapshot);
  // In the forked child, with `inherited` the child's copy of its parent's ExCache (never
  // used or destroyed afterwards: its thread and descriptors are the parent's): builds
  // this process's own ExCache over the same region, served by its own handler thread
  // from `backend` (the child's own, holding the snapshot as its memory), with
  // inherited.options() (so the same capacity: --excache is per process). `uffd`: the
  // child's userfaultfd received from the parent (take_fork_uffd), owned from now on;
  // `slot`: its slot there. Asks the parent's handler thread to stop serving it, then
  // takes the lines the child has resident (mincore over `ranges`, every range of the
  // region that may hold a line) as its own, evicting any beyond capacity. Must be called
  // by the child's only thread, which must not touch the region meanwhile unless the line
  // is resident (the parent serves the region until it lets go, the new handler thread
  // only once this returns: allocate from memory outside the region). Costs a handler
  // thread, a few syscalls per range and ~capacity/256 bytes. EBUSY: the parent refused
  // (the snapshot is shared with another child), EINVAL: nothing to adopt; then, and for
  // other errors but ENOTRECOVERABLE, the child stays served by its parent. With
  // ENOTRECOVERABLE the parent has let go and the child cannot go on.
  struct Range {
    uint64_t start;
    uint64_t length;
  };
  static Result<std::unique_ptr<ExCache>> adopt_fork(ExCache& inherited, int uffd, int slot,
                                                     LineBackend* backend,
                                                     std::span<const Range> ranges);

  // The ExCache whose region contains `addr`, or nullptr. Async-signal-safe: for a SIGBUS
  // dispatcher that is not ours (e.g. a runtime that owns SIGBUS and forwards to us).
  static ExCache* from_fault_address(const void* addr);

  // Makes [addr, addr + len) resident (and writable when `for_write`) by touching each line
  // from user mode, so that a syscall about to read (for_write = false) or fill
  // (for_write = true) that buffer does not take a kernel-mode fault. Works on any memory;
  // a no-op cost of one access per 4 KiB outside regions. Best effort: a line can be
  // evicted again before the syscall runs, so callers retry on EFAULT. for_write touches
  // with an atomic add of zero: it never changes the data, even under concurrent writers.
  static void prefault(void* addr, size_t len, bool for_write);

  struct Impl;  // runtime/excache/excache_impl.h

 private:
  explicit ExCache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The runtime's own threads in a program's process (the backend's heartbeat, the fault
// handler thread) call these from the thread itself, first thing and last thing. Such
// threads never store to region memory, so an eviction that finds no thread in the process
// but itself and these may skip fencing stores (runtime/excache/evict.cc). A runtime thread that
// does not register only costs that saving. At most 16 at once; more are not recorded.
void excache_service_thread_begin();
void excache_service_thread_end();

}  // namespace lego
