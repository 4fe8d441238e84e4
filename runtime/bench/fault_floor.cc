#include "runtime/bench/fault_floor.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

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

void on_sigbus(int, siginfo_t* info, void*) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  if (info->si_code != BUS_ADRERR || addr < g_base || addr >= g_base + g_bytes) _exit(kStrayFault);
  const uintptr_t window = g_window * kLine;
  uffdio_copy copy{};
  copy.dst = g_base + (addr - g_base) / window * window;
  copy.src = reinterpret_cast<uintptr_t>(g_source);
  copy.len = window;
  copy.mode = 0;  // writable: the fault was a store, as lego maps a store miss
  if (ioctl(g_uffd, UFFDIO_COPY, &copy) != 0) _exit(kCopy);
}

// Mean µs per item of `n` items done between t0 and t1.
double us_each(Clock::time_point t0, Clock::time_point t1, size_t n) {
  return std::chrono::duration<double, std::micro>(t1 - t0).count() / static_cast<double>(n);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Drops lines[from, from + n) with one process_madvise, or one madvise per line where the
// kernel refuses MADV_DONTNEED through process_madvise (before Linux 6.13), as lego does.
bool zap(int pidfd, const std::vector<size_t>& order, size_t from, size_t n) {
  iovec iov[kZapBatch];
  for (size_t k = 0; k < n; k++) {
    iov[k] = {reinterpret_cast<void*>(g_base + order[from + k] * kLine), kLine};
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

[[noreturn]] void child(int out, size_t lines, int rounds, std::vector<size_t>& order) {
  std::mt19937_64 rng(1234);
  for (size_t i = 0; i < kWords; i++) g_source[i] = rng();
  for (size_t l = 1; l < kZapBatch; l++) memcpy(g_source + l * kWords, g_source, kLine);
  g_uffd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY));
  if (g_uffd < 0) _exit(kNoUffd);
  uffdio_api api{.api = UFFD_API,
                 .features = UFFD_FEATURE_SIGBUS | UFFD_FEATURE_PAGEFAULT_FLAG_WP,
                 .ioctls = 0};
  if (ioctl(g_uffd, UFFDIO_API, &api) != 0) _exit(kApi);
  g_bytes = lines * kLine;
  void* p = mmap(nullptr, g_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) _exit(kMap);
  g_base = reinterpret_cast<uintptr_t>(p);
  uffdio_register reg{};
  reg.range = {.start = g_base, .len = g_bytes};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP;
  if (ioctl(g_uffd, UFFDIO_REGISTER, &reg) != 0) _exit(kRegister);
  struct sigaction sa = {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO;
  sigfillset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, nullptr);
  const int pidfd = static_cast<int>(syscall(SYS_pidfd_open, getpid(), 0));

  auto* heap = static_cast<uint64_t*>(p);
  auto touch_all = [&] {
    // One read-modify-write instruction per line, so the miss is a store fault, as the
    // random workload's `+= 1` is.
    for (size_t i : order) __atomic_fetch_add(&heap[i * kWords], 1, __ATOMIC_RELAXED);
  };
  touch_all();  // first faults: untimed
  std::vector<double> fault_us, zap_us;
  for (int r = 0; r < rounds; r++) {
    std::shuffle(order.begin(), order.end(), rng);
    auto t0 = Clock::now();
    for (size_t i = 0; i < lines; i += kZapBatch) {
      if (!zap(pidfd, order, i, std::min(kZapBatch, lines - i))) _exit(kZap);
    }
    auto t1 = Clock::now();
    std::shuffle(order.begin(), order.end(), rng);
    touch_all();
    auto t2 = Clock::now();
    zap_us.push_back(us_each(t0, t1, lines));
    fault_us.push_back(us_each(t1, t2, lines));
    // Each line was just mapped from the source and stored to once.
    for (size_t i = 0; i < lines; i++) {
      if (!line_ok(heap, i)) _exit(kWrongContent);
    }
  }

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
  char text[128];
  int n = snprintf(text, sizeof text, "%.4f %.4f %.4f %.4f\n", median(fault_us), median(zap_us),
                   median(window_fault_us), median(window_zap_us));
  _exit(write(out, text, static_cast<size_t>(n)) == n ? kOk : kPipe);
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
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0) return Status::from_errno(errno, "fault floor: pipe");
  pid_t pid = fork();
  if (pid < 0) {
    int err = errno;
    close(pipefd[0]);
    close(pipefd[1]);
    return Status::from_errno(err, "fault floor: fork");
  }
  if (pid == 0) {
    close(pipefd[0]);
    child(pipefd[1], lines, rounds, order);
  }
  close(pipefd[1]);
  std::string text;
  char buf[128];
  for (ssize_t n; (n = read(pipefd[0], buf, sizeof buf)) != 0;) {
    if (n > 0)
      text.append(buf, static_cast<size_t>(n));
    else if (errno != EINTR)
      break;
  }
  close(pipefd[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status)) {
    return Status(EIO, std::string("fault floor: the measuring child died of signal ") +
                           strsignal(WTERMSIG(status)));
  }
  if (WEXITSTATUS(status) != kOk) {
    return Status(EIO, std::string("fault floor: ") + describe(WEXITSTATUS(status)));
  }
  FaultFloor f;
  if (sscanf(text.c_str(), "%lf %lf %lf %lf", &f.fault_us, &f.zap_us, &f.window_fault_us,
             &f.window_zap_us) != 4) {
    return Status(EIO, "fault floor: unreadable report '" + text + "'");
  }
  return f;
}

}  // namespace lego::bench
