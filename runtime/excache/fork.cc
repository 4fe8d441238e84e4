// runtime/excache/fork.cc: fork() of a process whose memory lives in an ExCache.
//
// A forked child is a lego process of its own, as LegoOS's fork gives each process its own
// pcache: its memory (what it inherited and what it allocates) lives on the memory nodes
// behind an ExCache of its own (the same capacity: --excache is per process), served by its
// own handler thread, evicted by it, and counted in its own counters. It gets there in two
// phases.
//
// Phase 1, served by the parent (from fork() until the child adopts; for good with
// lego-run --fork-children parent). With UFFD_FEATURE_EVENT_FORK the child keeps the region
// registered, with a userfaultfd of its own that the kernel hands to our handler thread
// (fork() blocks until the thread has read the event). The child's resident lines are the
// copies fork() made; its other lines must read as the parent's did at the fork, so:
//   1. prepare_fork (parent, just before fork()): holding evict_lock, so that no eviction is
//      half done, take a backend snapshot (the memory node copies the space) and publish
//      its id in fork_snapshot.
//   2. Until the fork event is read, every eviction also writes its dirty victims into the
//      snapshot, and every discard releases its range there too: a line zapped before
//      fork() copied the page tables is absent in the child, which then reads the snapshot.
//      (Evictions and discards whose zap comes after the copy leave the child a present
//      page, so writing the snapshot for them is harmless.) A discard checks the fork
//      generation after its release, because it does not hold evict_lock: a chunk that
//      began before prepare_fork also releases in the snapshot, even after step 3.
//   3. The handler thread reads the fork event: it takes the child's userfaultfd into its
//      table with the snapshot, and clears fork_snapshot.
//   4. From then on it serves the child's misses from the snapshot with UFFDIO_COPY on the
//      child's userfaultfd, and un-protects on its write-protect faults. It never evicts a
//      child's line (it cannot zap another process's pages). A child's own forks
//      (grandchildren) arrive on the child's userfaultfd and share its snapshot.
//   5. A child is gone when its pidfd says it exited or its userfaultfd answers ESRCH (it
//      exec'd or exited); its slot is freed and the snapshot dropped with its last user.
//
// Phase 2, adoption (the child's own ExCache::adopt_fork, run by lego-run's interposer in
// the child right after fork() returns there, in its only thread):
//   a. The parent sends the child a duplicate of its userfaultfd (take_fork_uffd) over a
//      socket pair made for the fork, with its slot and the snapshot id.
//   b. The child opens fresh libfit channels (nothing of libfabric's may be shared across
//      fork) and takes the snapshot's spaces as its own memory (ClusterBackend::
//      adopt_snapshot: they are full spaces, with the parent's placements, each with its
//      own lease, which the child's heartbeats keep from now on); they are registered in
//      the run directory under the child's pid, the parent's registration of them removed.
//   c. Its handler thread starts and waits at a gate without reading the userfaultfd (its
//      start touches the region: jemalloc sets the thread up; the parent serves that).
//   d. It asks the parent's handler thread to let go: a handover page shared by fork
//      (MAP_SHARED), one state word per child slot, and an eventfd that wakes the handler.
//      The handler, between two of its own faults (so no fault of the child is being
//      served by it), closes its copy of the child's userfaultfd and forgets the snapshot
//      without freeing it (LineBackend::disown_snapshot); faults it had not read stay
//      queued for the child. It refuses while the snapshot is shared (a grandchild forked
//      before the child adopted): the child then stays in phase 1. It does not answer yet
//      while an eviction or a discard chunk that may still write into or release in the
//      snapshot (step 2) is under way (snapshot_writers in excache_impl.h): the backend
//      checks that a snapshot is alive before it sends, so a disown between the two would
//      let the request land in what is by then the child's memory, overwriting or
//      dropping the lines the child wrote back since (a discard's release from a thread
//      descheduled there did drop them: tests/lego_run, LEGO_TEST_SNAPSHOT_RELEASE_DELAY_MS).
//      No lock is taken for this (the writers may fault and need this thread): it only
//      defers, and never waits on them.
//   e. The child takes the lines its page tables hold as its own (adopt_lines: mincore over
//      every vRegion with allocated bytes; the inherited line words are only a hint, since
//      fork() copied them while the parent's threads were changing them), evicts those
//      beyond its capacity, and opens the gate: its handler thread serves it from then on.
// The child's counters start at zero; lego-run --stats prints each process's, and their
// sum. Its spaces are freed when it ends (lego-run's registry) or when it execs (the new
// image closes its earlier image's). The cost is the child's: fresh channels (a connection
// per memory node), three backend threads and a handler thread, ~1.5 ms at best and ~6 ms
// of CPU per fork+exec on a loaded VM (docs/measurements.md); a child that execs at once
// pays it for nothing, which --fork-children parent avoids.
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <vector>

#include "lego/retry.h"
#include "runtime/excache/excache_impl.h"

namespace lego {

using namespace excache_internal;

bool ExCache::supports_fork() const {
  return impl_->fork_events && impl_->handler_running;
}

size_t ExCache::forked_children() const {
  return impl_->nchildren.load(std::memory_order_relaxed);
}

Status ExCache::prepare_fork() {
  Impl& m = *impl_;
  if (!supports_fork()) {
    return Status(ENOSYS,
                  "fork() of a disaggregated process needs the handler-thread delivery and the "
                  "privilege to register kernel-mode faults (root or CAP_SYS_PTRACE)");
  }
  m.evict_lock.lock();
  m.reap_write_back_locked();  // the snapshot must hold the lines in flight
  auto snap = m.backend->snapshot();
  if (snap.is_ok()) {
    m.last_fork_snapshot.store(snap.value(), std::memory_order_relaxed);
    m.fork_snapshot.store(snap.value(), std::memory_order_seq_cst);
    m.fork_generation.fetch_add(1, std::memory_order_seq_cst);
  }
  m.evict_lock.unlock();
  if (!snap.is_ok()) return snap.status().with_context("snapshot of the heap for fork()");
  return Status::ok();
}

void ExCache::finish_fork(pid_t child) {
  Impl& m = *impl_;
  if (child <= 0) {
    // No child (fork failed): no event will come. Drop the snapshot unless an event raced.
    const int64_t snap = m.fork_snapshot.exchange(-1);
    if (snap >= 0) m.backend->drop_snapshot(static_cast<uint32_t>(snap));
    return;
  }
  // fork() returned after the kernel handed the event over; the handler thread may still be
  // filing it.
  Backoff backoff;
  while (m.fork_snapshot.load(std::memory_order_acquire) >= 0) backoff.pause();
  const int slot = m.last_child_slot.load(std::memory_order_acquire);
  if (slot >= 0) {
    const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, child, 0));
    if (pidfd >= 0) {
      int expected = -1;
      if (!m.children[slot].pidfd.compare_exchange_strong(expected, pidfd)) close(pidfd);
    }
  }
}

// The handler thread read UFFD_EVENT_FORK: from our own userfaultfd (parent_slot -1) or a
// child's (a grandchild, parent_slot its slot).
void ExCache::Impl::handle_fork_event(int child_uffd, int parent_slot) {
  uint32_t snapshot;
  if (parent_slot >= 0) {
    snapshot = children[parent_slot].snapshot;
  } else {
    int64_t snap = fork_snapshot.load(std::memory_order_acquire);
    if (snap < 0) {
      // A fork nobody announced (a raw clone() or _Fork(): no prepare_fork). Snapshot now;
      // exact when the forking thread is the only one (it is blocked in fork()).
      evict_lock.lock();
      reap_write_back_locked();
      auto s = backend->snapshot();
      evict_lock.unlock();
      if (!s.is_ok()) {
        // The child cannot be served: closing its userfaultfd makes its misses SIGBUS.
        close(child_uffd);
        fork_events_seen.fetch_add(1, std::memory_order_release);
        return;
      }
      snap = s.value();
    }
    snapshot = static_cast<uint32_t>(snap);
  }
  size_t slot = kMaxChildren;
  for (size_t i = 0; i < kMaxChildren; ++i) {
    if (children[i].uffd < 0) {
      slot = i;
      break;
    }
  }
  if (slot == kMaxChildren) {
    reclaim_children(true);
    for (size_t i = 0; i < kMaxChildren; ++i) {
      if (children[i].uffd < 0) {
        slot = i;
        break;
      }
    }
  }
  if (slot == kMaxChildren) {
    static const char msg[] =
        "lego excache: more than 64 forked children alive; a new child's heap cannot be "
        "served (it gets SIGBUS on a miss)\n";
    (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
    close(child_uffd);
    if (parent_slot < 0) {
      last_child_slot.store(-1, std::memory_order_release);
      if (fork_snapshot.exchange(-1) < 0) backend->drop_snapshot(snapshot);
    }
    return;
  }
  children[slot].uffd = child_uffd;
  children[slot].pidfd.store(-1, std::memory_order_relaxed);
  children[slot].snapshot = snapshot;
  nchildren.fetch_add(1, std::memory_order_relaxed);
  if (parent_slot < 0 && handover != nullptr) {
    // The child may adopt: take_fork_uffd hands it this duplicate (a grandchild of an
    // un-adopted child is not offered one: it shares that child's snapshot).
    handover->state[slot].store(kServing, std::memory_order_release);
    pending_fork_slot.store(static_cast<int>(slot), std::memory_order_relaxed);
    const int dup = fcntl(child_uffd, F_DUPFD_CLOEXEC, 0);
    if (int old = pending_fork_uffd.exchange(dup, std::memory_order_acq_rel); old >= 0) close(old);
  }
  if (parent_slot < 0) {
    last_child_slot.store(static_cast<int>(slot), std::memory_order_release);
    // Evictions and discards stop writing into it. seq_cst: check_handovers relies on it
    // (snapshot_writers).
    fork_snapshot.store(-1, std::memory_order_seq_cst);
    fork_events_seen.fetch_add(1, std::memory_order_release);
  }
}

// UFFDIO_COPY and UFFDIO_WRITEPROTECT fail with EAGAIN while a fork waits for its event
// to be read (the kernel marks the mm as changing until then). The handler thread is the
// only reader, so when it gets EAGAIN it must read the event itself: fork events are
// handled; page faults read meanwhile are woken instead, so their threads fault again and
// come back through the normal path.
void ExCache::Impl::drain_events(int fd, int slot) {
  if (!fork_events || !handler_running || !pthread_equal(pthread_self(), handler)) {
    cpu_relax();
    return;
  }
  uffd_msg msgs[16];
  const ssize_t n = read(fd, msgs, sizeof msgs);
  if (n <= 0) {
    cpu_relax();
    return;
  }
  for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) {
    if (msgs[i].event == UFFD_EVENT_FORK) {
      handle_fork_event(static_cast<int>(msgs[i].arg.fork.ufd), slot);
    } else if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
      uffdio_range range{.start = msgs[i].arg.pagefault.address & ~uint64_t{kLine - 1},
                         .len = kLine};
      (void)ioctl(fd, UFFDIO_WAKE, &range);
    }
  }
}

void ExCache::Impl::release_child(size_t slot) {
  Child& c = children[slot];
  close(c.uffd);
  c.uffd = -1;
  const int pidfd = c.pidfd.exchange(-1);
  if (pidfd >= 0) close(pidfd);
  nchildren.fetch_sub(1, std::memory_order_relaxed);
  bool shared = false;
  for (size_t i = 0; i < kMaxChildren; ++i) {
    shared |= children[i].uffd >= 0 && children[i].snapshot == c.snapshot;
  }
  if (!shared && fork_snapshot.load() != static_cast<int64_t>(c.snapshot)) {
    backend->drop_snapshot(c.snapshot);
  }
}

void ExCache::Impl::serve_child(size_t slot, const uffd_msg& msg) {
  Child& c = children[slot];
  if (msg.event == UFFD_EVENT_FORK) {
    handle_fork_event(static_cast<int>(msg.arg.fork.ufd), static_cast<int>(slot));
    return;
  }
  if (msg.event != UFFD_EVENT_PAGEFAULT) return;
  const uint64_t addr = msg.arg.pagefault.address & ~uint64_t{kLine - 1};
  int err = 0;
  if (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) {
    // A store to a line that was clean in the parent: the child does not track dirtiness.
    uffdio_writeprotect w{};
    w.range = {.start = addr, .len = kLine};
    w.mode = 0;
    while (ioctl(c.uffd, UFFDIO_WRITEPROTECT, &w) != 0) {
      if (errno == EAGAIN) {
        drain_events(c.uffd, static_cast<int>(slot));  // the child is forking
      } else if (errno != EINTR) {
        err = errno;
        break;
      }
    }
  } else {
    const size_t buffer = staging_acquire();
    std::span<std::byte, kLine> out(staging_line(buffer), kLine);
    Status st;
    for (int attempt = 1;; ++attempt) {
      st = backend->fetch_snapshot(c.snapshot, addr, out);
      if (st.is_ok() || !transient(st.code()) || attempt == kAttempts) break;
    }
    if (!st.is_ok()) {
      staging_release(buffer);
      // The child cannot be served: dropping its userfaultfd makes its misses SIGBUS
      // rather than silently zero.
      char what[128];
      snprintf(what, sizeof what, "lego excache: a forked child's miss at %#lx failed: ",
               static_cast<unsigned long>(addr));
      (void)!write(STDERR_FILENO, what, strlen(what));
      (void)!write(STDERR_FILENO, st.message().data(), st.message().size());
      (void)!write(STDERR_FILENO, "\n", 1);
      release_child(slot);
      return;
    }
    uffdio_copy copy{};
    copy.dst = addr;
    copy.src = reinterpret_cast<uint64_t>(out.data());
    copy.len = kLine;
    copy.mode = 0;
    for (;;) {
      copy.copy = 0;
      if (ioctl(c.uffd, UFFDIO_COPY, &copy) == 0) break;
      if (errno == EAGAIN) {
        drain_events(c.uffd, static_cast<int>(slot));  // the child is forking
        continue;
      }
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    staging_release(buffer);
  }
  if (err == EEXIST || err == ENOENT) {
    uffdio_range range{.start = addr, .len = kLine};
    (void)ioctl(c.uffd, UFFDIO_WAKE, &range);
  } else if (err == ESRCH) {
    release_child(slot);  // exec'd or exited under us
  } else if (err != 0) {
    fatal("serving a forked child's fault failed", err, addr);
  }
}

void ExCache::Impl::poll_children() {
  uffd_msg msgs[8];
  for (size_t i = 0; i < kMaxChildren; ++i) {
    if (children[i].uffd < 0) continue;
    const ssize_t n = read(children[i].uffd, msgs, sizeof msgs);
    if (n <= 0) continue;
    for (size_t k = 0; k < static_cast<size_t>(n) / sizeof(uffd_msg); ++k) {
      if (children[i].uffd < 0) break;  // released while serving
      serve_child(i, msgs[k]);
    }
  }
}

int ExCache::Impl::child_fds(pollfd* out, size_t max) {
  int n = 0;
  for (size_t i = 0; i < kMaxChildren && static_cast<size_t>(n) < max; ++i) {
    if (children[i].uffd >= 0)
      out[n++] = pollfd{.fd = children[i].uffd, .events = POLLIN, .revents = 0};
  }
  return n;
}

// Frees the slots of children that are gone. At most every 100 ms unless forced.
void ExCache::Impl::reclaim_children(bool force) {
  if (nchildren.load(std::memory_order_relaxed) == 0) return;
  const uint64_t now = now_ns();
  if (!force && now - last_reclaim_ns < 100'000'000) return;
  last_reclaim_ns = now;
  for (size_t i = 0; i < kMaxChildren; ++i) {
    if (children[i].uffd < 0) continue;
    bool gone = false;
    if (int pidfd = children[i].pidfd.load(); pidfd >= 0) {
      pollfd p{.fd = pidfd, .events = POLLIN, .revents = 0};
      gone = poll(&p, 1, 0) > 0;
    }
    if (!gone) {
      // ESRCH: the child's address space is gone (it exec'd or exited). The address is
      // below any mapping a program has (mmap_min_addr is 64 KiB): otherwise ENOENT.
      uffdio_copy probe{};
      probe.dst = 0x10000;
      probe.src = reinterpret_cast<uint64_t>(staging_line(0));
      probe.len = kLine;
      probe.mode = 0;
      gone = ioctl(children[i].uffd, UFFDIO_COPY, &probe) != 0 && errno == ESRCH;
    }
    if (gone) release_child(i);
  }
}

int ExCache::take_fork_uffd(int* slot, uint32_t* snapshot) {
  Impl& m = *impl_;
  const int fd = m.pending_fork_uffd.exchange(-1, std::memory_order_acq_rel);
  if (fd < 0) return -1;
  *slot = m.pending_fork_slot.load(std::memory_order_relaxed);
  const int64_t snap = m.last_fork_snapshot.load(std::memory_order_relaxed);
  *snapshot = snap < 0 ? 0 : static_cast<uint32_t>(snap);
  return fd;
}

// An eviction or a discard chunk counted in snapshot_writers is done; the last one wakes
// the handler thread if it deferred an adoption. Async-signal-safe (write(2)): evictions
// may run in a SIGBUS handler.
void ExCache::Impl::end_snapshot_write() {
  if (snapshot_writers.fetch_sub(1, std::memory_order_seq_cst) == 1 &&
      handover_deferred.load(std::memory_order_seq_cst) && handover_fd >= 0) {
    const uint64_t one = 1;
    (void)!write(handover_fd, &one, sizeof one);  // check_handovers deferred an answer
  }
}

// The handler thread: children that asked to adopt (see "Adoption" above). Cheap when none
// did: one load of the shared page.
void ExCache::Impl::check_handovers() {
  if (handover == nullptr) return;
  const uint32_t requests = handover->requests.load(std::memory_order_acquire);
  if (requests == handover_seen && !handover_deferred.load(std::memory_order_relaxed)) return;
  handover_seen = requests;
  bool deferred = false;
  for (size_t i = 0; i < kMaxChildren; ++i) {
    std::atomic<uint32_t>& state = handover->state[i];
    if (state.load(std::memory_order_acquire) != kRequested) continue;
    Child& c = children[i];
    // A snapshot still shared (a grandchild of this child forked before it adopted, or a
    // fork under way) must stay as it is: the child would write into it.
    bool shared = c.uffd < 0 || fork_snapshot.load() == static_cast<int64_t>(c.snapshot);
    for (size_t j = 0; j < kMaxChildren; ++j) {
      shared |= j != i && children[j].uffd >= 0 && children[j].snapshot == c.snapshot;
    }
    if (shared) {
      state.store(kRefused, std::memory_order_release);
    } else {
      // An eviction or a discard chunk that found this snapshot (fork_snapshot, or a
      // discard's fork_generation) before we read the fork event may not have written
      // into or released in it yet (in ClusterBackend, between its check that the snapshot
      // is alive and its request reaching the memory node): landing after the adoption, it
      // would overwrite or drop the child's own lines. Answer once none is under way; the
      // last one to end wakes us (end_snapshot_write). One counted after this load finds
      // fork_snapshot cleared (handle_fork_event) and the generation of this fork
      // (prepare_fork bumped it before the event): it never picks this snapshot (both
      // sides are seq_cst), only a later fork's (which may reuse the id once it is free).
      handover_deferred.store(true, std::memory_order_seq_cst);
      if (snapshot_writers.load(std::memory_order_seq_cst) != 0) {
        deferred = true;
        continue;  // still kRequested: the child waits
      }
      // No fault of the child is being served here now (this thread serves them), and the
      // ones it has not read stay queued for the child's own handler thread.
      close(c.uffd);
      c.uffd = -1;
      if (const int pidfd = c.pidfd.exchange(-1); pidfd >= 0) close(pidfd);
      nchildren.fetch_sub(1, std::memory_order_relaxed);
      backend->disown_snapshot(c.snapshot);
      state.store(kAdopted, std::memory_order_release);
    }
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&state), FUTEX_WAKE, INT_MAX, nullptr, nullptr,
            0);
  }
  handover_deferred.store(deferred, std::memory_order_seq_cst);
}

namespace {

bool stable_clean(uint64_t state) {
  return kind_of(state) == kClean && (state & kMkcleanBit) == 0;
}

// A /proc/self/pagemap entry's bit for a PTE that is uffd write-protected (PM_UFFD_WP).
constexpr uint64_t kPagemapUffdWp = uint64_t{1} << 57;

// The pagemap entries of the n lines from addr into `entries`; all zero (no page reads as
// write-protected, so each is taken as dirty: a write-back too many, never a store lost)
// where pagemap cannot be read.
void read_pagemap(uint64_t addr, size_t n, std::vector<uint64_t>& entries) {
  entries.assign(n, 0);
  const int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  const size_t bytes = n * sizeof(uint64_t);
  const off_t at = static_cast<off_t>((addr >> kLineShift) * sizeof(uint64_t));
  if (pread(fd, entries.data(), bytes, at) != static_cast<ssize_t>(bytes)) entries.assign(n, 0);
  close(fd);
}

}  // namespace

// In the adopting child, before its handler thread starts (nothing else runs here that
// could fault on the region, and the parent no longer serves it): which lines are resident
// is what the page tables say, not what the inherited line words say (fork() copied those
// words while the parent's threads were changing them, and the parent served the child
// some lines since). mincore() over the ranges tells. A resident line stays clean only
// when its inherited word says a settled kClean and its PTE is still write-protected
// (/proc/self/pagemap's uffd-wp bit: fork keeps uffd-wp bits where EVENT_FORK is on, and
// then its contents are the snapshot's). The word alone is not enough: between fork() and
// adoption the parent's handler served the child's stores to such lines by un-protecting
// them (serve_child), which the child's copy of the word never saw -- jemalloc's
// postfork_child re-initialising its mutexes is such a store. Taken as clean, those lines
// were later dropped without a write-back and read back from the snapshot, where a mutex
// could be locked (the snapshot takes evictions until the fork: jemalloc's prefork had
// locked them): the child's next fork() hung in jemalloc's prefork. Every other resident
// line is taken as dirty and un-protected (it may differ from the snapshot). A line the
// word calls resident or busy that is not resident reads the snapshot (its backed bit is
// set: a line being evicted at the fork was written into it).
Status ExCache::Impl::adopt_lines(const ExCache::Impl& parent,
                                  std::span<const ExCache::Range> ranges) {
  // Lines the parent had frames for outside every range are not in use: forget them.
  for (size_t f = 0; f < parent.capacity; ++f) {
    const uint64_t w = parent.frames[f].load(std::memory_order_relaxed) & kFrameLineMask;
    if (w == 0 || w - 1 >= nlines) continue;
    const uint64_t addr = line_addr(w - 1);
    bool inside = false;
    for (const ExCache::Range& r : ranges) inside |= addr - r.start < r.length;
    if (inside) continue;
    const uint64_t old = lines[w - 1].load(std::memory_order_relaxed);
    if (kind_of(old) != kAbsent) lines[w - 1].store((old & kPersistMask) | kBackedBit);
  }
  std::vector<unsigned char> present;
  std::vector<uint64_t> pte;   // /proc/self/pagemap entries of the range's lines
  std::vector<uint64_t> over;  // resident lines beyond capacity
  size_t used = 0;
  for (const ExCache::Range& r : ranges) {
    if (!contains(r.start) || r.length == 0 || !contains(r.start + r.length - 1)) {
      return Status(EINVAL, "adopting a range outside the region");
    }
    const size_t n = r.length >> kLineShift;
    present.assign(n, 0);
    if (mincore(reinterpret_cast<void*>(r.start), n << kLineShift, present.data()) != 0) {
      return Status::from_errno(errno, "mincore of the region");
    }
    read_pagemap(r.start, n, pte);
    for (size_t i = 0; i < n; ++i) {
      const uint64_t index = line_index(r.start) + i;
      const uint64_t old = lines[index].load(std::memory_order_relaxed);
      const uint64_t persist = old & kPersistMask;
      if ((present[i] & 1) == 0) {
        if (kind_of(old) != kAbsent) lines[index].store(persist | kBackedBit);
        continue;
      }
      if (used == capacity) {
        over.push_back(index);
        continue;
      }
      const bool clean = stable_clean(old) && (pte[i] & kPagemapUffdWp) != 0;
      if (!clean && kind_of(old) != kDirty) {
        if (int err = write_protect(line_addr(index), kLine, false); err != 0 && err != ENOENT) {
          return Status::from_errno(err, "un-protecting an adopted line");
        }
      }
      const uint32_t frame = static_cast<uint32_t>(used++);
      frames[frame].store(index + 1, std::memory_order_relaxed);
      lines[index].store(make_state(clean ? kClean : kDirty, false, frame) | persist,
                         std::memory_order_relaxed);
    }
  }
  // Frames [used, capacity) stay free; the free stack pops the lowest first.
  free_top = 0;
  for (size_t i = capacity; i > used; --i) free_stack[free_top++] = static_cast<uint32_t>(i - 1);
  resident.store(used, std::memory_order_relaxed);
  // Beyond capacity (the parent's resident lines plus the ones it served the child since):
  // written back (dirty ones, to the snapshot that is ours now) and dropped.
  for (size_t k = 0; k < over.size();) {
    size_t n = 0, nz = 0;
    for (; k < over.size() && n < batch; ++k) {
      const uint64_t index = over[k];
      const uint64_t old = lines[index].load(std::memory_order_relaxed);
      if (!stable_clean(old)) write_backs[n++] = {line_addr(index), base + (index << kLineShift)};
      zap_iov[nz++] = iovec{base + (index << kLineShift), kLine};
      lines[index].store((old & kPersistMask) | (stable_clean(old) ? 0 : kBackedBit));
    }
    if (n > 0) {
      Status st;
      for (int attempt = 1;; ++attempt) {
        st = backend->write_back({write_backs.get(), n});
        if (st.is_ok() || !transient(st.code()) || attempt >= kAttempts) break;
      }
      if (!st.is_ok()) return st.with_context("writing back an adopted line");
      stats.add(Counter::write_backs, n);
      stats.add(Counter::bytes_written, n * kLine);
    }
    for (size_t i = 0; i < nz; ++i) {
      if (madvise(zap_iov[i].iov_base, kLine, MADV_DONTNEED) != 0) {
        return Status::from_errno(errno, "dropping an adopted line");
      }
    }
    stats.add(Counter::evictions, nz);
    stats.add(Counter::clean_drops, nz - n);
  }
  return Status::ok();
}

Result<std::unique_ptr<ExCache>> ExCache::adopt_fork(ExCache& inherited, int uffd, int slot,
                                                     LineBackend* backend,
                                                     std::span<const Range> ranges) {
  const Impl& p = *inherited.impl_;
  if (p.handover == nullptr || slot < 0 || static_cast<size_t>(slot) >= Impl::kMaxChildren) {
    close(uffd);
    return Status(EINVAL, "nothing to adopt: the parent's cache has no fork handover");
  }
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  // Until the parent lets go, a failure leaves the region, its line words and the
  // userfaultfd as they are (the parent keeps serving the child).
  auto keep_region = [&m] {
    m.base = nullptr;
    m.lines = nullptr;
    m.uffd = -1;
  };
  if (Status st = m.setup(p.options, backend); !st) {
    close(uffd);
    return st;
  }
  m.base = p.base;
  m.size = p.size;
  m.nlines = p.nlines;
  m.lines = p.lines;  // the child's copy; fixed up by adopt_lines
  m.lines_bytes = p.lines_bytes;
  m.uffd = uffd;
  m.kernel_faults = p.kernel_faults;
  m.fork_events = p.fork_events;
  if (Status st = m.init_buffers(); !st) {
    keep_region();
    close(uffd);
    return st.with_context("adopting the forked child's cache");
  }
  if (Status st = m.open_kernel_module(); !st) {
    keep_region();
    close(uffd);
    return st.with_context("adopting the forked child's cache");
  }

  // Our handler thread starts now and waits at its gate: its start may touch the region
  // (jemalloc's per-thread set-up), which the parent still serves.
  if (p.options.on_fatal != nullptr) excache_internal::fatal_hook.store(p.options.on_fatal);
  m.start_gate.store(1);
  Impl* raw = impl.get();
  std::unique_ptr<ExCache> cache(new ExCache(std::move(impl)));
  raw->owner = cache.get();
  auto open_gate = [raw] {
    raw->start_gate.store(0, std::memory_order_release);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&raw->start_gate), FUTEX_WAKE_PRIVATE, 1,
            nullptr, nullptr, 0);
  };
  auto keep = [&] {
    // The thread goes (it never read the userfaultfd); the region stays the parent's to serve.
    raw->stopping.store(true);
    open_gate();
    raw->base = nullptr;
    raw->lines = nullptr;
    raw->uffd = -1;
    close(uffd);
  };
  if (Status st = raw->start_handler_thread(); !st) {
    raw->handler_running = false;
    raw->base = nullptr;
    raw->lines = nullptr;
    raw->uffd = -1;
    close(uffd);
    return st.with_context("adopting the forked child's cache");
  }
  while (raw->gate_waiting.load(std::memory_order_acquire) == 0) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&raw->gate_waiting), FUTEX_WAIT_PRIVATE, 0,
            nullptr, nullptr, 0);
  }

  // Ask the parent's handler thread to let go of our userfaultfd.
  std::atomic<uint32_t>& state = p.handover->state[slot];
  uint32_t expected = Impl::kServing;
  if (!state.compare_exchange_strong(expected, Impl::kRequested)) {
    keep();
    return Status(EINVAL, "fork handover slot " + std::to_string(slot) + " is not ours");
  }
  // The process whose handler thread holds our userfaultfd is the one that forked us (the
  // cache's owner). If it has ended (a daemon's parent exits at once; a zombie counts) it
  // serves no one any more, and the region is ours without an answer.
  int owner = -1;
  if (getppid() == p.owner_pid) {
    owner = static_cast<int>(syscall(SYS_pidfd_open, p.owner_pid, 0));
    if (getppid() != p.owner_pid && owner >= 0) {  // it ended while we opened it
      close(owner);
      owner = -1;
    }
  }
  p.handover->requests.fetch_add(1, std::memory_order_release);
  const uint64_t one = 1;
  (void)!write(p.handover_fd, &one, sizeof one);
  for (;;) {
    const uint32_t now = state.load(std::memory_order_acquire);
    if (now == Impl::kAdopted) break;
    if (now == Impl::kRefused) {
      if (owner >= 0) close(owner);
      keep();
      return Status(EBUSY, "the parent still shares the fork snapshot");
    }
    if (owner < 0) break;
    pollfd gone{.fd = owner, .events = POLLIN, .revents = 0};
    if (poll(&gone, 1, 0) > 0) break;
    const timespec tick{0, 20 * 1000 * 1000};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&state), FUTEX_WAIT, Impl::kRequested, &tick,
            nullptr, 0);
  }
  if (owner >= 0) close(owner);

  // Point of no return: nobody else serves this region now.
  if (Status st = raw->adopt_lines(p, ranges); !st) {
    return Status(ENOTRECOVERABLE, "adopting the forked child's lines: " + st.message());
  }
  open_gate();
  // The parent's descriptors this process inherited (its userfaultfd, its other children's,
  // its threads' eventfds): nothing here uses them, and holding them would keep them alive.
  for (int fd : {p.uffd, p.stop_fd, p.handover_fd, p.pidfd, p.task_dir, p.pcache_fd}) {
    if (fd >= 0) close(fd);
  }
  for (const Impl::Child& c : p.children) {
    if (c.uffd >= 0) close(c.uffd);
    if (const int pidfd = c.pidfd.load(); pidfd >= 0) close(pidfd);
  }
  return cache;
}

}  // namespace lego
