#include "runtime/bench/fault_floor.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lego/excache.h"

namespace lego::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kLine = 4096;
constexpr size_t kWords = kLine / sizeof(uint64_t);
constexpr size_t kZapBatch = 32;  // lego's eviction batch

// The child's exit codes, each with what went wrong (the parent turns them into errors).
enum ChildExit : int {
  kOk = 0,
  kNoUffd = 10,
  kApi,
  kMap,
  kRegister,
  kCopy,
  kStrayFault,
  kZap,
  kWrongContent,
  kPipe,
  kHandlerApi,
  kHandlerEvent,
  kHandlerCopy,
  kHandlerWait,
  kHandlerThread,
  kPin,
  kFence,
  kConnect,
  kRoundTrip,
  kThread,
};

const char* describe(int code) {
  switch (code) {
    case kNoUffd:
      return "userfaultfd() failed";
    case kApi:
      return "UFFDIO_API refused SIGBUS + write-protect features";
    case kMap:
      return "mmap of the region failed";
    case kRegister:
      return "UFFDIO_REGISTER (missing + write-protect) failed";
    case kCopy:
      return "UFFDIO_COPY in the SIGBUS handler failed";
    case kStrayFault:
      return "a SIGBUS outside the region";
    case kZap:
      return "MADV_DONTNEED of a batch failed";
    case kWrongContent:
      return "a line read back with the wrong content after its fault";
    case kPipe:
      return "could not report to the parent";
    case kHandlerApi:
      return "the handler delivery's userfaultfd (no SIGBUS, kernel faults too) was refused";
    case kHandlerEvent:
      return "the handler thread read an event other than a missing-page fault in the region";
    case kHandlerCopy:
      return "UFFDIO_COPY in the handler thread failed";
    case kHandlerWait:
      return "the handler thread's read() or poll() of the userfaultfd failed";
    case kHandlerThread:
      return "pthread_create of the handler thread failed";
    case kPin:
      return "could not pin the faulting and handler threads to one CPU";
    case kFence:
      return "UFFDIO_WRITEPROTECT of a resident line failed";
    case kConnect:
      return "a thread could not connect to the round-trip server";
    case kRoundTrip:
      return "a round trip in the SIGBUS handler failed (the server went away)";
    case kThread:
      return "could not start a faulting thread";
    default:
      return "unexpected exit";
  }
}

// The child's state: globals because the SIGBUS handler reads them. Every line of the
// source holds the same words (so any line's content can be checked against line 0).
alignas(kLine) uint64_t g_source[kZapBatch * kWords];
int g_uffd = -1;
uintptr_t g_base = 0;
size_t g_bytes = 0;
size_t g_window = 1;  // lines one fault maps: 1, or kZapBatch (a prefetch window)

// The address of a SIGBUS that a missing line of the region (g_base, g_bytes) raised; any
// other SIGBUS ends the child.
uintptr_t region_fault_address(const siginfo_t* info) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  if (info->si_code != BUS_ADRERR || addr < g_base || addr >= g_base + g_bytes) _exit(kStrayFault);
  return addr;
}

// Maps len bytes at dst from src with UFFDIO_COPY, writable (the faults are stores, as lego
// maps a store miss), which wakes the faulting thread; ends the child with `code` if it
// fails. Only system calls: a SIGBUS handler may call it.
void copy_or_exit(int uffd, uintptr_t dst, const void* src, size_t len, int code) {
  uffdio_copy copy{};
  copy.dst = dst;
  copy.src = reinterpret_cast<uintptr_t>(src);
  copy.len = len;
  copy.mode = 0;
  // EAGAIN: the address space changed meanwhile (nothing was copied): again.
  while (ioctl(uffd, UFFDIO_COPY, &copy) != 0) {
    if (errno != EAGAIN) _exit(code);
  }
}

void on_sigbus(int, siginfo_t* info, void*) {
  const int saved_errno = errno;  // the interrupted code's
  const uintptr_t addr = region_fault_address(info);
  const uintptr_t window = g_window * kLine;
  copy_or_exit(g_uffd, g_base + (addr - g_base) / window * window, g_source, window, kCopy);
  errno = saved_errno;
}

// Mean µs per item of `n` items done between t0 and t1.
double us_each(Clock::time_point t0, Clock::time_point t1, size_t n) {
  return std::chrono::duration<double, std::micro>(t1 - t0).count() / static_cast<double>(n);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Drops the lines order[from, from + n) of the region at `base` with one process_madvise, or
// one madvise per line where the kernel refuses MADV_DONTNEED through process_madvise
// (before Linux 6.13), as lego does.
bool zap(int pidfd, uintptr_t base, const std::vector<size_t>& order, size_t from, size_t n) {
  iovec iov[kZapBatch];
  for (size_t k = 0; k < n; k++) {
    iov[k] = {reinterpret_cast<void*>(base + order[from + k] * kLine), kLine};
  }
  if (pidfd >= 0 && syscall(SYS_process_madvise, pidfd, iov, n, MADV_DONTNEED, 0) ==
                        static_cast<long>(n * kLine)) {
    return true;
  }
  for (size_t k = 0; k < n; k++) {
    if (madvise(iov[k].iov_base, kLine, MADV_DONTNEED) != 0) return false;
  }
  return true;
}

// Whether line i holds the source's words, with word 0 stored to once (+1).
bool line_ok(const uint64_t* heap, size_t i) {
  const uint64_t* line = &heap[i * kWords];
  return line[0] == g_source[0] + 1 && memcmp(line + 1, g_source + 1, kLine - 8) == 0;
}

// Maps a region of `lines` 4 KiB lines and registers it with `uffd` as lego registers its
// ExCache: missing + write-protect.
uint64_t* map_registered(int uffd, size_t lines) {
  void* p = mmap(nullptr, lines * kLine, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) _exit(kMap);
  uffdio_register reg{};
  reg.range = {.start = reinterpret_cast<uintptr_t>(p), .len = lines * kLine};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP;
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) _exit(kRegister);
  return static_cast<uint64_t*>(p);
}

// The SIGBUS delivery's region, as lego's sigbus delivery sets it up: g_uffd (user-mode
// faults only, SIGBUS + write-protect), `lines` lines mapped and registered (g_base,
// g_bytes), and `on_fault` as the SIGBUS handler (all signals blocked while it runs).
uint64_t* map_sigbus_region(size_t lines, void (*on_fault)(int, siginfo_t*, void*)) {
  g_uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY));
  if (g_uffd < 0) _exit(kNoUffd);
  uffdio_api api{.api = UFFD_API,
                 .features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_PAGEFAULT_FLAG_WP,
                 .ioctls = 0};
  if (ioctl(g_uffd, UFFDIO_API, &api) != 0) _exit(kApi);
  uint64_t* heap = map_registered(g_uffd, lines);
  g_base = reinterpret_cast<uintptr_t>(heap);
  g_bytes = lines * kLine;
  struct sigaction sa = {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO;
  sigfillset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, nullptr);
  return heap;
}

// One read-modify-write instruction per line in `order`, so the miss is a store fault, as
// the random workload's `+= 1` is.
void touch_all(uint64_t* heap, const std::vector<size_t>& order) {
  for (size_t i : order) __atomic_fetch_add(&heap[i * kWords], 1, __ATOMIC_RELAXED);
}

// One round: zap every line of `heap` in random batches of 32, then store to every line in
// another random order (each store a miss), and check each line's content. The mean µs per
// line of the zaps and of the misses are added to *zaps and *faults.
void random_round(uint64_t* heap, size_t lines, std::vector<size_t>& order, std::mt19937_64& rng,
                  int pidfd, std::vector<double>* faults, std::vector<double>* zaps) {
  std::shuffle(order.begin(), order.end(), rng);
  auto t0 = Clock::now();
  for (size_t i = 0; i < lines; i += kZapBatch) {
    if (!zap(pidfd, reinterpret_cast<uintptr_t>(heap), order, i, std::min(kZapBatch, lines - i))) {
      _exit(kZap);
    }
  }
  auto t1 = Clock::now();
  std::shuffle(order.begin(), order.end(), rng);
  touch_all(heap, order);
  auto t2 = Clock::now();
  zaps->push_back(us_each(t0, t1, lines));
  faults->push_back(us_each(t1, t2, lines));
  // Each line was just mapped from the source and stored to once.
  for (size_t i = 0; i < lines; i++) {
    if (!line_ok(heap, i)) _exit(kWrongContent);
  }
}

// The handler delivery's fence: write-protect every (resident, dirty) line of `heap` in
// random order, one UFFDIO_WRITEPROTECT each, as an eviction write-protects its scattered
// dirty victims before it copies them out. The mean µs per line is added to *fences. (The
// next round's zap drops the lines, write-protection and all.)
void fence_round(uint64_t* heap, size_t lines, std::vector<size_t>& order, std::mt19937_64& rng,
                 std::vector<double>* fences) {
  std::shuffle(order.begin(), order.end(), rng);
  auto t0 = Clock::now();
  for (size_t i : order) {
    uffdio_writeprotect wp{};
    wp.range = {.start = reinterpret_cast<uintptr_t>(heap) + i * kLine, .len = kLine};
    wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
    if (ioctl(g_uffd, UFFDIO_WRITEPROTECT, &wp) != 0) _exit(kFence);
  }
  fences->push_back(us_each(t0, Clock::now(), lines));
}

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
          .count());
}

// A region served as lego-run's default --delivery handler serves its ExCache: a
// userfaultfd without UFFD_FEATURE_SIGBUS (non-blocking, kernel-mode faults too, as lego
// opens it) and a handler thread reading it.
struct HandlerRegion {
  int uffd = -1;
  int stop_fd = -1;
  uint64_t* heap = nullptr;
  size_t bytes = 0;
  pthread_t thread{};
  std::atomic<bool> stopping{false};
};

// One fault read by the handler thread: a missing-page fault in the region (a store: it is
// mapped writable, as lego maps a store miss), served with UFFDIO_COPY of one line, which
// wakes the faulting thread.
void serve(const HandlerRegion& h, const uffd_msg& msg) {
  if (msg.event != UFFD_EVENT_PAGEFAULT || (msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)) {
    _exit(kHandlerEvent);
  }
  const auto base = reinterpret_cast<uintptr_t>(h.heap);
  const uintptr_t addr = msg.arg.pagefault.address & ~uintptr_t{kLine - 1};
  if (addr < base || addr >= base + h.bytes) _exit(kHandlerEvent);
  copy_or_exit(h.uffd, addr, g_source, kLine, kHandlerCopy);
}

// The handler thread, polling as lego's does while several threads fault and no fetch is
// in flight (runtime/excache/fault.cc, ExCache::Impl::handler_loop): a non-blocking read() of
// up to 16 faults, each served at once; between empty reads a sched_yield() for as long as
// lego's default handler_spin_us after the last fault, then a sleep in poll() on the
// userfaultfd and the stop eventfd. (With one thread faulting lego's sleeps at once, which
// here, with the other CPU idle, makes every miss wake a halted CPU: ~70 µs. lego's memory
// node keeps that CPU busy, so its handler is woken where the fault happened.) Program
// signals stay on the faulting thread.
void handler_loop(const HandlerRegion& h) {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  const uint64_t spin_ns = uint64_t{ExCacheOptions{}.handler_spin_us} * 1000;
  uffd_msg msgs[16];
  uint64_t last_event = now_ns();
  while (!h.stopping.load(std::memory_order_acquire)) {
    const ssize_t n = read(h.uffd, msgs, sizeof msgs);
    if (n > 0) {
      for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) serve(h, msgs[i]);
      last_event = now_ns();
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN) _exit(kHandlerWait);
    if (now_ns() - last_event < spin_ns) {
      sched_yield();
      continue;
    }
    pollfd fds[2] = {{.fd = h.uffd, .events = POLLIN, .revents = 0},
                     {.fd = h.stop_fd, .events = POLLIN, .revents = 0}};
    if (poll(fds, 2, -1) < 0 && errno != EINTR) _exit(kHandlerWait);
    last_event = now_ns();
  }
}

// Sets up h (lines of 4 KiB) and starts its handler thread, on CPU `cpu` alone (>= 0) or
// wherever the scheduler puts it (-1), as lego's is.
void start_handler(HandlerRegion* h, size_t lines, int cpu) {
  h->uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (h->uffd < 0) _exit(kNoUffd);
  uffdio_api api{.api = UFFD_API, .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP, .ioctls = 0};
  if (ioctl(h->uffd, UFFDIO_API, &api) != 0) _exit(kHandlerApi);
  h->heap = map_registered(h->uffd, lines);
  h->bytes = lines * kLine;
  h->stop_fd = eventfd(0, EFD_CLOEXEC);
  if (h->stop_fd < 0) _exit(kHandlerWait);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  if (cpu >= 0) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    if (pthread_attr_setaffinity_np(&attr, sizeof one, &one) != 0) _exit(kPin);
  }
  if (pthread_create(
          &h->thread, &attr,
          [](void* arg) -> void* {
            handler_loop(*static_cast<const HandlerRegion*>(arg));
            return nullptr;
          },
          h) != 0) {
    _exit(kHandlerThread);
  }
  pthread_attr_destroy(&attr);
}

void stop_handler(HandlerRegion* h) {
  h->stopping.store(true, std::memory_order_release);
  const uint64_t one = 1;
  if (write(h->stop_fd, &one, sizeof one) != sizeof one) _exit(kHandlerWait);
  pthread_join(h->thread, nullptr);
  close(h->stop_fd);
  munmap(h->heap, h->bytes);
  close(h->uffd);
}

// Runs `f` with this thread on CPU `cpu` alone, then back on the CPUs it had.
template <typename F>
void on_cpu(int cpu, F f) {
  cpu_set_t before, one;
  if (sched_getaffinity(0, sizeof before, &before) != 0) _exit(kPin);
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  if (sched_setaffinity(0, sizeof one, &one) != 0) _exit(kPin);
  f();
  if (sched_setaffinity(0, sizeof before, &before) != 0) _exit(kPin);
}

[[noreturn]] void child(int out, size_t lines, int rounds, std::vector<size_t>& order) {
  std::mt19937_64 rng(1234);
  for (size_t i = 0; i < kWords; i++) g_source[i] = rng();
  for (size_t l = 1; l < kZapBatch; l++) memcpy(g_source + l * kWords, g_source, kLine);
  uint64_t* heap = map_sigbus_region(lines, on_sigbus);
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, getpid(), 0));
  // The handler delivery's regions: one whose handler runs wherever the scheduler puts it,
  // and one whose handler is pinned to the CPU this thread is pinned to for its rounds.
  const int cpu = sched_getcpu();
  if (cpu < 0) _exit(kPin);
  HandlerRegion free_handler, pinned_handler;
  start_handler(&free_handler, lines, -1);
  start_handler(&pinned_handler, lines, cpu);

  // First faults untimed; then the deliveries' rounds in turn, so that a change of the
  // host's load meanwhile moves all three alike.
  touch_all(heap, order);
  touch_all(free_handler.heap, order);
  on_cpu(cpu, [&] { touch_all(pinned_handler.heap, order); });
  std::vector<double> fault_us, zap_us, handler_us, pinned_us, fence_us, unused;
  for (int r = 0; r < rounds; r++) {
    fence_round(heap, lines, order, rng, &fence_us);
    random_round(heap, lines, order, rng, pidfd, &fault_us, &zap_us);
    random_round(free_handler.heap, lines, order, rng, pidfd, &handler_us, &unused);
    on_cpu(cpu, [&] {
      random_round(pinned_handler.heap, lines, order, rng, pidfd, &pinned_us, &unused);
    });
  }
  stop_handler(&free_handler);
  stop_handler(&pinned_handler);

  // Windows: each fault maps kZapBatch lines with one UFFDIO_COPY, as a prefetch does, and
  // a scan stores to every line in order; eviction drops whole windows with one madvise.
  g_window = kZapBatch;
  const size_t windowed = lines / kZapBatch * kZapBatch;
  std::vector<double> window_fault_us, window_zap_us;
  for (int r = 0; r < rounds; r++) {
    auto t0 = Clock::now();
    for (size_t i = 0; i < lines; i += kZapBatch) {
      const size_t n = std::min(kZapBatch, lines - i);
      if (madvise(reinterpret_cast<void*>(g_base + i * kLine), n * kLine, MADV_DONTNEED) != 0) {
        _exit(kZap);
      }
    }
    auto t1 = Clock::now();
    for (size_t i = 0; i < windowed; i++)
      __atomic_fetch_add(&heap[i * kWords], 1, __ATOMIC_RELAXED);
    auto t2 = Clock::now();
    window_zap_us.push_back(us_each(t0, t1, lines));
    window_fault_us.push_back(us_each(t1, t2, windowed));
    for (size_t i = 0; i < windowed; i++) {
      if (!line_ok(heap, i)) _exit(kWrongContent);
    }
  }
  char text[224];
  int n = snprintf(text, sizeof text, "%.4f %.4f %.4f %.4f %.4f %.4f %.4f\n", median(fault_us),
                   median(zap_us), median(window_fault_us), median(window_zap_us),
                   median(handler_us), median(pinned_us), median(fence_us));
  _exit(write(out, text, static_cast<size_t>(n)) == n ? kOk : kPipe);
}

// What a measuring child wrote, and the CPU time it used.
struct ChildReport {
  std::string text;
  rusage usage{};
};

// Forks a child that runs body(the write end of a pipe), which writes its report there and
// _exits with a ChildExit code; reads the report until the child exits, and reaps it.
// Errors start with `what`.
template <typename Body>
Result<ChildReport> run_measuring_child(const std::string& what, Body body) {
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0) return Status::from_errno(errno, what + "pipe");
  pid_t pid = fork();
  if (pid < 0) {
    int err = errno;
    close(pipefd[0]);
    close(pipefd[1]);
    return Status::from_errno(err, what + "fork");
  }
  if (pid == 0) {
    close(pipefd[0]);
    body(pipefd[1]);
    _exit(kPipe);  // body returned without a report
  }
  close(pipefd[1]);
  ChildReport report;
  char buf[128];
  for (ssize_t n; (n = read(pipefd[0], buf, sizeof buf)) != 0;) {
    if (n > 0)
      report.text.append(buf, static_cast<size_t>(n));
    else if (errno != EINTR)
      break;
  }
  close(pipefd[0]);
  int status = 0;
  while (wait4(pid, &status, 0, &report.usage) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status)) {
    return Status(EIO, what + "the measuring child died of signal " + strsignal(WTERMSIG(status)));
  }
  if (WEXITSTATUS(status) != kOk) return Status(EIO, what + describe(WEXITSTATUS(status)));
  return report;
}

}  // namespace

Result<FaultFloor> measure_fault_floor(size_t lines, int rounds) {
  if (lines < 2 * kZapBatch || rounds < 1) {
    return Status(EINVAL, "fault floor: needs at least 64 lines and 1 round");
  }
  // (The callers, lego-bench and its test, fork this from one thread: the child may
  // allocate.)
  std::vector<size_t> order(lines);
  std::iota(order.begin(), order.end(), size_t{0});
  auto report =
      run_measuring_child("fault floor: ", [&](int out) { child(out, lines, rounds, order); });
  if (!report) return report.status();
  const std::string& text = report->text;
  FaultFloor f;
  if (sscanf(text.c_str(), "%lf %lf %lf %lf %lf %lf %lf", &f.fault_us, &f.zap_us,
             &f.window_fault_us, &f.window_zap_us, &f.handler_fault_us,
             &f.handler_fault_same_cpu_us, &f.fence_us) != 7) {
    return Status(EIO, "fault floor: unreadable report '" + text + "'");
  }
  return f;
}

namespace {

// The threaded floor's child (measure_threaded_miss_floor): each thread's connection, its
// kZapBatch request buffers (a miss sends the next one: with victims, each holds a line the
// thread dropped in its last batch) and reply buffer, and its miss count, for the SIGBUS
// handler; the server's message sizes, whether requests carry victims, and how to wait.
// initial-exec: a signal handler must not reach its thread's variables through
// __tls_get_addr, which may allocate (in a shared object, as a test binary may link this).
__attribute__((tls_model("initial-exec"))) thread_local int t_fd = -1;
__attribute__((tls_model("initial-exec"))) thread_local char* t_requests = nullptr;
__attribute__((tls_model("initial-exec"))) thread_local char* t_reply = nullptr;
__attribute__((tls_model("initial-exec"))) thread_local size_t t_misses = 0;
size_t g_request_bytes = 0, g_reply_bytes = 0;
bool g_victims = false;
Wait g_wait = Wait::kSpin;
constexpr size_t kLinesPerThread = 2048;

// Each thread's untimed misses before the timed ones.
int warm_up_misses(int misses_per_thread) {
  return std::max(64, misses_per_thread / 10);
}

void on_sigbus_round_trip(int, siginfo_t* info, void*) {
  const int saved_errno = errno;  // the interrupted code's
  const uintptr_t addr = region_fault_address(info);
  const char* request = t_requests + (t_misses++ % kZapBatch) * g_request_bytes;
  if (!round_trip(t_fd, request, g_request_bytes, t_reply, g_reply_bytes, g_wait)) {
    _exit(kRoundTrip);
  }
  copy_or_exit(g_uffd, addr & ~uintptr_t{kLine - 1}, t_reply + g_reply_bytes - kLine, kLine, kCopy);
  errno = saved_errno;
}

// One thread of the child: `misses` store misses on its slice (lines in random order), the
// 32 lines of each batch checked, copied into the next batch's requests when they carry
// victims (the dirty lines a full cache writes back), and then dropped.
void miss_on_slice(uint64_t* slice, int pidfd, std::mt19937_64& rng, std::vector<size_t>& order,
                   size_t& next, int misses) {
  // The server's reply is all 'y': a mapped line holds that, with word 0 stored to once.
  uint64_t y;
  memset(&y, 'y', sizeof y);
  for (int m = 0; m < misses; m++) {
    __atomic_fetch_add(&slice[order[next] * kWords], 1, __ATOMIC_RELAXED);
    if (++next % kZapBatch != 0) continue;
    for (size_t k = next - kZapBatch; k < next; k++) {
      const uint64_t* line = &slice[order[k] * kWords];
      if (line[0] != y + 1 || line[kWords - 1] != y) _exit(kWrongContent);
      if (g_victims) {
        char* victim = t_requests + (k % kZapBatch + 1) * g_request_bytes - kLine;
        memcpy(victim, line, kLine);
      }
    }
    if (!zap(pidfd, reinterpret_cast<uintptr_t>(slice), order, next - kZapBatch, kZapBatch)) {
      _exit(kZap);
    }
    if (next == order.size()) {  // every line dropped: a new order
      std::shuffle(order.begin(), order.end(), rng);
      next = 0;
    }
  }
}

[[noreturn]] void threaded_child(int out, const RoundTripServer& server, int threads,
                                 int misses_per_thread) {
  uint64_t* heap =
      map_sigbus_region(kLinesPerThread * static_cast<size_t>(threads), on_sigbus_round_trip);
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, getpid(), 0));
  const auto life0 = Clock::now();
  std::atomic<int> warm{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; t++) {
    try {
      workers.emplace_back([&, t] {
        auto fd = server.connect();
        if (!fd) _exit(kConnect);
        t_fd = fd.value();
        std::vector<char> requests(kZapBatch * g_request_bytes, 'x'), reply(g_reply_bytes);
        t_requests = requests.data();
        t_reply = reply.data();
        uint64_t* slice = heap + static_cast<size_t>(t) * kLinesPerThread * kWords;
        std::mt19937_64 rng(1234 + static_cast<uint64_t>(t));
        std::vector<size_t> order(kLinesPerThread);
        std::iota(order.begin(), order.end(), size_t{0});
        std::shuffle(order.begin(), order.end(), rng);
        size_t next = 0;
        miss_on_slice(slice, pidfd, rng, order, next, warm_up_misses(misses_per_thread));
        warm.fetch_add(1);
        while (!go.load(std::memory_order_acquire)) sched_yield();
        miss_on_slice(slice, pidfd, rng, order, next, misses_per_thread);
        close(t_fd);
      });
    } catch (...) {
      _exit(kThread);
    }
  }
  while (warm.load() < threads) sched_yield();
  const auto t0 = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& w : workers) w.join();
  const auto t1 = Clock::now();
  const double timed = std::chrono::duration<double>(t1 - t0).count();
  const double life = std::chrono::duration<double>(t1 - life0).count();
  char text[96];
  int n = snprintf(text, sizeof text, "%.3f %.6f\n",
                   static_cast<double>(threads) * misses_per_thread / timed, life);
  _exit(write(out, text, static_cast<size_t>(n)) == n ? kOk : kPipe);
}

}  // namespace

Result<ThreadedMissFloor> measure_threaded_miss_floor(RoundTripServer& server, int threads,
                                                      int misses_per_thread, Wait wait) {
  if (threads < 1 || misses_per_thread < 1 || server.reply_bytes() < kLine) {
    return Status(EINVAL,
                  "threaded miss floor: needs a thread, a miss, and a reply of at least 4 KiB");
  }
  g_request_bytes = server.request_bytes();
  g_reply_bytes = server.reply_bytes();
  g_victims = g_request_bytes >= kLine;
  g_wait = wait;
  const std::string what = "threaded miss floor (" + std::to_string(threads) + " thread" +
                           (threads > 1 ? "s" : "") + (g_victims ? ", victims" : "") + ", " +
                           wait_name(wait) + "): ";
  auto report = run_measuring_child(
      what, [&](int out) { threaded_child(out, server, threads, misses_per_thread); });
  if (!report) return report.status();
  const std::string& text = report->text;
  const rusage& usage = report->usage;
  ThreadedMissFloor f;
  double life = 0;
  if (sscanf(text.c_str(), "%lf %lf", &f.misses_per_s, &life) != 2 || life <= 0) {
    return Status(EIO, what + "unreadable report '" + text + "'");
  }
  auto server_exit = server.wait_exit(10000);
  if (!server_exit) {
    return Status(server_exit.status().code(), what + server_exit.status().message());
  }
  // One round trip per miss, each answered: else the floor timed something else.
  const uint64_t misses =
      uint64_t(threads) * uint64_t(misses_per_thread + warm_up_misses(misses_per_thread));
  if (server_exit->requests != misses) {
    return Status(EIO, what + "the server answered " + std::to_string(server_exit->requests) +
                           " requests for " + std::to_string(misses) + " misses");
  }
  f.cpus_busy = (cpu_seconds(usage) + server_exit->cpu_seconds) / life;
  return f;
}

}  // namespace lego::bench
