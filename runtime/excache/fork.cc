// runtime/excache/fork.cc: fork() of a process whose memory lives in an ExCache.
//
// With UFFD_FEATURE_EVENT_FORK a forked child keeps the region registered, with a
// userfaultfd of its own that the kernel hands to our handler thread (fork() blocks until
// the thread has read the event). The child's resident lines are the copies fork() made;
// its other lines must read as the parent's did at the fork, so:
//   1. prepare_fork (parent, just before fork()): holding evict_lock, so that no eviction is
//      half done, take a backend snapshot (the memory node copies the space) and publish
//      its id in fork_snapshot.
//   2. Until the fork event is read, every eviction also writes its dirty victims into the
//      snapshot, and every discard releases its range there too: a line zapped before
//      fork() copied the page tables is absent in the child, which then reads the snapshot.
//      (Evictions and discards whose zap comes after the copy leave the child a present
//      page, so writing the snapshot for them is harmless.) A discard checks the fork
//      generation after its release, because it does not hold evict_lock.
//   3. The handler thread reads the fork event: it takes the child's userfaultfd into its
//      table with the snapshot, and clears fork_snapshot.
//   4. From then on it serves the child's misses from the snapshot with UFFDIO_COPY on the
//      child's userfaultfd, and un-protects on its write-protect faults. Child lines are
//      never evicted (the parent cannot zap another process's pages): a child that execs
//      soon, the common case, touches few; a long-lived child's touched memory becomes
//      local to it. A child's own forks (grandchildren) arrive on the child's userfaultfd
//      and share its snapshot: the child never evicts, so its absent lines still are the
//      snapshot's.
//   5. A child is gone when its pidfd says it exited or its userfaultfd answers ESRCH (it
//      exec'd or exited); its slot is freed and the snapshot dropped with its last user.
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

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
  if (parent_slot < 0) {
    last_child_slot.store(static_cast<int>(slot), std::memory_order_release);
    fork_snapshot.store(-1, std::memory_order_release);  // evictions stop writing into it
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

}  // namespace lego
