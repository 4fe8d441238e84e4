// runtime/excache/region.cc: reserving the disaggregated region, registering it with userfaultfd,
// and ExCache's lifetime (create, destructor, accessors).
//
// The region is one MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE mapping registered with
// UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP:
//   MISSING  a touch of a line with no PTE is a miss (fault.cc);
//   WP       lines mapped clean are uffd-write-protected, so their first store faults and
//            we learn they are dirty; evict.cc write-protects dirty victims before copying
//            them out so no racing store is lost.
// madvise: MADV_NOHUGEPAGE (lines must be 4 KiB; THP may be "always"), and MADV_DONTFORK
// unless fork events are on (fork.cc): a forked child would otherwise silently read zeros
// where lines are not resident: better a clear SIGSEGV.
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "runtime/excache/excache_impl.h"
#include "runtime/excache/pcache_dev.h"

namespace lego {

using namespace excache_internal;

namespace {

// Opens a userfaultfd; returns fd or -errno.
int open_uffd(bool user_mode_only) {
  int flags = O_CLOEXEC | O_NONBLOCK | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
  int fd = static_cast<int>(syscall(SYS_userfaultfd, flags));
  return fd >= 0 ? fd : -errno;
}

std::string hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

void* map_anon(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

}  // namespace

Status ExCache::Impl::init_region() {
  const bool sigbus = options.delivery == ExCacheOptions::Delivery::kSigbus;
  // The features we need; everything else (WP_ASYNC, MOVE, ...) stays off. THREAD_ID: the
  // handler tells one thread's faults from several threads' (await_reply_briefly).
  uint64_t wanted =
      UFFD_FEATURE_PAGEFAULT_FLAG_WP | (sigbus ? UFFD_FEATURE_SIGBUS : UFFD_FEATURE_THREAD_ID);

  // kSigbus never serves kernel-mode faults (they return EFAULT either way), so ask only for
  // user-mode ones: that needs no privilege. kHandlerThread wants kernel-mode faults too,
  // which needs CAP_SYS_PTRACE (or vm.unprivileged_userfaultfd=1); without, fall back.
  int fd = open_uffd(/*user_mode_only=*/sigbus);
  kernel_faults = !sigbus && fd >= 0;
  if (fd == -EPERM && !sigbus) {
    fd = open_uffd(true);
    kernel_faults = false;
  }
  if (fd < 0) return Status::from_errno(-fd, "userfaultfd()");
  uffd = fd;

  // UFFDIO_API may be called once per fd and fails on any unknown bit, so probe what the
  // kernel offers on a throwaway fd first to name what is missing.
  uint64_t offered = 0;
  if (int probe = open_uffd(true); probe >= 0) {
    uffdio_api api{.api = UFFD_API, .features = 0, .ioctls = 0};
    if (ioctl(probe, UFFDIO_API, &api) == 0) offered = api.features;
    close(probe);
  }
  if ((offered & wanted) != wanted) {
    return Status(EOPNOTSUPP, "userfaultfd lacks features " + hex(wanted & ~offered) +
                                  " (kernel offers " + hex(offered) + ")");
  }
  // fork() support (fork.cc): the child's region stays registered, with a userfaultfd of
  // its own that the fork event hands to our handler thread. Only with a handler thread
  // (the event blocks fork() until it is read) and kernel-mode faults (it needs the same
  // privilege). If the kernel refuses it, go on without: fork() then fails clearly.
  if (kernel_faults && (offered & UFFD_FEATURE_EVENT_FORK)) {
    uffdio_api api{.api = UFFD_API, .features = wanted | UFFD_FEATURE_EVENT_FORK, .ioctls = 0};
    if (ioctl(uffd, UFFDIO_API, &api) == 0) {
      fork_events = true;
    } else {
      // UFFDIO_API may not be retried on the same fd.
      close(uffd);
      uffd = -1;
      fd = open_uffd(false);
      if (fd < 0) return Status::from_errno(-fd, "userfaultfd() after EVENT_FORK was refused");
      uffd = fd;
    }
  }
  if (!fork_events) {
    uffdio_api api{.api = UFFD_API, .features = wanted, .ioctls = 0};
    if (ioctl(uffd, UFFDIO_API, &api) != 0) return Status::from_errno(errno, "UFFDIO_API");
  }

  void* region = map_anon(size);
  if (region == nullptr) return Status::from_errno(errno, "mmap region of " + hex(size));
  base = static_cast<std::byte*>(region);
  if (madvise(base, size, MADV_NOHUGEPAGE) != 0) {
    return Status::from_errno(errno, "madvise(MADV_NOHUGEPAGE) region");
  }
  if (!fork_events && madvise(base, size, MADV_DONTFORK) != 0) {
    return Status::from_errno(errno, "madvise(MADV_DONTFORK) region");
  }

  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(base);
  reg.range.len = size;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP;
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
    return Status::from_errno(errno, "UFFDIO_REGISTER region at " + hex(reg.range.start));
  }
  const uint64_t needed_ioctls =
      (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_WAKE) | (1ULL << _UFFDIO_WRITEPROTECT);
  if ((reg.ioctls & needed_ioctls) != needed_ioctls) {
    return Status(EOPNOTSUPP,
                  "region lacks userfaultfd ioctls " + hex(needed_ioctls & ~reg.ioctls));
  }

  lines_bytes = (nlines * sizeof(std::atomic<uint64_t>) + kLine - 1) & ~(kLine - 1);
  void* l = map_anon(lines_bytes);  // zero = kAbsent, not backed
  if (l == nullptr) return Status::from_errno(errno, "mmap line states");
  lines = static_cast<std::atomic<uint64_t>*>(l);
  return init_buffers();
}

Status ExCache::Impl::init_buffers() {
  void* s = map_anon(kStagingBuffers * kStagingStride);
  if (s == nullptr) return Status::from_errno(errno, "mmap staging buffers");
  staging = static_cast<std::byte*>(s);

  prefetch_max = std::min<size_t>({options.prefetch_lines, kMaxPrefetch, capacity / 8});
  if (prefetch_max > 0) {
    void* pb = map_anon(kPrefetchBuffers * sizeof(PrefetchBuffer));
    if (pb == nullptr) return Status::from_errno(errno, "mmap prefetch buffers");
    prefetch_buffers = static_cast<PrefetchBuffer*>(pb);
  }

  // process_madvise(MADV_DONTNEED) on ourselves (Linux >= 6.13) zaps a whole eviction batch
  // with one TLB flush (measured 0.6 µs per line vs 1.6 µs for one madvise per line). Probe
  // it on a staging line, mapped just above and never touched yet (a no-op); fall back to
  // madvise per run if refused. Not on the region: a forked child adopting its cache
  // (fork.cc) gets here with the region live, and the probe zapped its line 0, which it
  // then read back from the fork snapshot: its own stores since fork() were lost (jemalloc's
  // postfork_child re-initialising its base mutex there), and when the parent had evicted
  // that line into the snapshot during the fork, the child got it with the mutexes its
  // parent's prefork handler held, and its own next fork() waited on one forever.
  pidfd = static_cast<int>(syscall(SYS_pidfd_open, getpid(), 0));
  if (pidfd >= 0) {
    iovec probe{staging, kLine};
    if (syscall(SYS_process_madvise, pidfd, &probe, 1, MADV_DONTNEED, 0) != long{kLine}) {
      close(pidfd);
      pidfd = -1;
    }
  }
  owner_pid = getpid();
  task_dir = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fork_events) {
    // Shared with the children to come (fork.cc, "Adoption"); a child that adopts makes
    // its own for its children.
    void* h = mmap(nullptr, sizeof(HandoverPage), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (h == MAP_FAILED) return Status::from_errno(errno, "mmap of the fork handover page");
    handover = static_cast<HandoverPage*>(h);
  }
  return Status::ok();
}

Status ExCache::Impl::open_kernel_module() {
  if (options.kernel_module == ExCacheOptions::KernelModule::kOff) return Status::ok();
  uint32_t max_lines = 0;
  uint64_t features = 0;
  Result<int> fd = PcacheDevice::open_checked(&max_lines, &features);
  if (!fd) {
    if (options.kernel_module == ExCacheOptions::KernelModule::kAuto) return Status::ok();
    return fd.status().with_context("lego_pcache required (modprobe lego_pcache)");
  }
  pcache_fd = fd.value();
  // Load misses become writable and clean after their fill (fault.cc), so stores are
  // tracked by the PTE's dirty bit, not by write-protect faults (an older module lacks it).
  pcache_mkclean = (features & LEGO_PCACHE_FEAT_MKCLEAN) != 0;
  // A batch is evicted with one ioctl: it must fit the module's limit.
  pcache_max_lines = max_lines;
  batch = std::min<size_t>(batch, max_lines);
  pc_lines = std::make_unique<uint64_t[]>(kSweep);
  pc_frames = std::make_unique<uint32_t[]>(kSweep);
  pc_bits = std::make_unique<uint64_t[]>(2 * kSweep / 64);
  pc_pending = std::make_unique<uint32_t[]>(kSweep);
  return Status::ok();
}

int ExCache::Impl::write_protect(uint64_t addr, uint64_t len, bool wp) {
  uffdio_writeprotect w{};
  w.range.start = addr;
  w.range.len = len;
  w.mode = wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
  for (;;) {
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w) == 0) return 0;
    if (errno != EAGAIN && errno != EINTR) return errno;
    if (errno == EAGAIN) drain_events(uffd, -1);  // the mm is changing: see drain_events
  }
}

ExCache::Impl::~Impl() {
  // Background fetches in flight must be collected (their replies land in our buffers).
  complete_all_prefetches();
  evict_lock.lock();
  reap_write_back_locked();
  evict_lock.unlock();
  unregister_region(this);
  if (handler_running) {
    stopping.store(true, std::memory_order_release);
    uint64_t one = 1;
    if (write(stop_fd, &one, sizeof one) != sizeof one) fatal("stopping handler thread", errno, 0);
    pthread_join(handler, nullptr);
  }
  for (Child& c : children) {
    if (c.uffd >= 0) close(c.uffd);
    if (int pidfd = c.pidfd.load(); pidfd >= 0) close(pidfd);
  }
  if (stop_fd >= 0) close(stop_fd);
  if (handover_fd >= 0) close(handover_fd);
  if (int fd = pending_fork_uffd.exchange(-1); fd >= 0) close(fd);
  if (handover != nullptr) munmap(handover, sizeof(HandoverPage));
  if (pidfd >= 0) close(pidfd);
  if (task_dir >= 0) close(task_dir);
  if (pcache_fd >= 0) close(pcache_fd);
  if (uffd >= 0) close(uffd);
  if (base != nullptr) munmap(base, size);
  if (lines != nullptr) munmap(lines, lines_bytes);
  if (staging != nullptr) munmap(staging, kStagingBuffers * kStagingStride);
  if (prefetch_buffers != nullptr) {
    munmap(prefetch_buffers, kPrefetchBuffers * sizeof(PrefetchBuffer));
  }
}

Result<std::unique_ptr<ExCache>> ExCache::create(const ExCacheOptions& options,
                                                 LineBackend* backend) {
  auto impl = std::make_unique<Impl>();
  if (Status st = impl->setup(options, backend); !st) return st;
  if (Status st = impl->init_region(); !st) return st.with_context("ExCache::create");
  if (Status st = impl->open_kernel_module(); !st) return st.with_context("ExCache::create");

  Impl* raw = impl.get();
  if (options.on_fatal != nullptr) excache_internal::fatal_hook.store(options.on_fatal);
  std::unique_ptr<ExCache> cache(new ExCache(std::move(impl)));
  raw->owner = cache.get();
  if (options.delivery == ExCacheOptions::Delivery::kSigbus) {
    if (Status st = register_region(raw); !st) return st.with_context("ExCache::create");
  } else {
    if (Status st = raw->start_handler_thread(); !st) return st.with_context("ExCache::create");
  }
  return cache;
}

Status ExCache::Impl::setup(const ExCacheOptions& opts, LineBackend* line_backend) {
  if (line_backend == nullptr) return Status(EINVAL, "ExCache::create: no backend");
  options = opts;
  backend = line_backend;
  const char* test_knob = getenv("LEGO_TEST_FORK_EVICT_LINE0");  // test only (excache_impl.h)
  test_fork_evict_line0 = test_knob != nullptr && strcmp(test_knob, "1") == 0;
  size = (options.region_bytes + kLine - 1) & ~(kLine - 1);
  nlines = size >> kLineShift;
  capacity = options.capacity_bytes >> kLineShift;
  // Frame numbers live in 32 bits of the line word; line indexes in 63 bits of a frame word.
  if (capacity < kExCacheMinLines || capacity > (uint64_t{1} << 31)) {
    return Status(EINVAL, "ExCache::create: capacity_bytes " +
                              std::to_string(options.capacity_bytes) +
                              " is not in [64 KiB, 8 TiB]");
  }
  if (size < options.capacity_bytes) {
    return Status(EINVAL, "ExCache::create: capacity_bytes " +
                              std::to_string(options.capacity_bytes) +
                              " is larger than the region (region_bytes " +
                              std::to_string(options.region_bytes) + ")");
  }
  if (nlines >= (uint64_t{1} << 47)) {
    return Status(EINVAL, "ExCache::create: region_bytes " + std::to_string(options.region_bytes) +
                              " is 2^59 or more");
  }
  batch = std::clamp<size_t>(std::min(options.evict_batch_lines, kMaxBatch), 1, capacity / 8);
  victims = std::make_unique<Impl::Victim[]>(batch);
  write_backs = std::make_unique<LineBackend::WriteBack[]>(batch);
  zap_iov = std::make_unique<iovec[]>(batch);
  wb_lines = std::make_unique<uint64_t[]>(batch);
  policy = policy_ops(options.policy);
  if (policy == nullptr) return Status(EINVAL, "ExCache::create: unknown policy");

  frames = std::make_unique<Impl::Frames[]>(capacity);
  free_stack = std::make_unique<uint32_t[]>(capacity);
  // Hand out low frames first (the stack pops from the top).
  for (size_t i = 0; i < capacity; ++i) {
    free_stack[i] = static_cast<uint32_t>(capacity - 1 - i);
  }
  free_top = capacity;
  return Status::ok();
}

ExCache::ExCache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ExCache::~ExCache() = default;

void* ExCache::region_base() const {
  return impl_->base;
}
size_t ExCache::region_size() const {
  return impl_->size;
}
size_t ExCache::capacity_lines() const {
  return impl_->capacity;
}
const ExCacheOptions& ExCache::options() const {
  return impl_->options;
}
bool ExCache::serves_kernel_faults() const {
  return impl_->kernel_faults;
}
bool ExCache::uses_kernel_module() const {
  return impl_->pcache_fd >= 0;
}

Status ExCache::discard(void* addr, size_t len) {
  return impl_->discard(reinterpret_cast<uint64_t>(addr), len);
}

}  // namespace lego
