// fork() under lego-run while another thread discards memory: the parent's discard must not
// drop lines its child wrote after taking the fork snapshot as its own memory
// (runtime/excache/fork.cc, "Adoption" d).
//
// A discard that finds a fork under way releases its range in the fork snapshot too. The
// backend checks that the snapshot is alive, then sends the release; a thread descheduled
// between the two (LEGO_TEST_SNAPSHOT_RELEASE_DELAY_MS widens that window, test only: see
// runtime/preload/cluster_backend.cc) used to send it after the child had adopted the
// snapshot, written the range and evicted it: the memory node dropped the child's lines and
// the child read zeros where it had written.
//
// The parent writes buffer X, then reads a buffer larger than its ExCache (so that X is on
// the memory node). A pthread_atfork prepare handler (ours runs inside fork(), after
// lego's prepare_fork took the snapshot) wakes thread T, which madvise(MADV_DONTNEED)s X,
// and gives it 300 ms to get into its release into the snapshot. The child writes X, reads
// the big buffer (evicting X: written back into the child's memory), waits WAIT_MS (longer
// than the delay) and checks X. The parent checks that X reads as zeros.
//
// usage: lego_fork_discard BIG_MIB WAIT_MS   (BIG_MIB: more than the ExCache)
// Prints "fork discard ok" and exits 0, or says what was wrong and exits 1.
#include <pthread.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace {

constexpr size_t kBytes = size_t{1} << 20;  // X: one discard chunk (2 MiB at most)
constexpr size_t kWords = kBytes / sizeof(uint64_t);

uint64_t mix(uint64_t index, uint64_t version) {
  uint64_t x = index * 0x9e3779b97f4a7c15ull ^ (version << 32 | version);
  x ^= x >> 29;
  return x * 0xbf58476d1ce4e5b9ull;
}

uint64_t* x_buffer = nullptr;
std::atomic<int> go{0};    // the prepare handler wakes T
std::atomic<int> done{0};  // T's madvise returned
bool discard_spanned_fork = false;

void sleep_ms(long ms) {
  timespec t{ms / 1000, (ms % 1000) * 1000000};
  while (nanosleep(&t, &t) != 0) {
  }
}

void prepare() {
  if (go.exchange(1) != 0) return;  // the first fork only
  sleep_ms(300);
  discard_spanned_fork = done.load() == 0;
}

void* map(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    perror("mmap");
    exit(3);
  }
  return p;
}

// Reads every page of the big buffer: evicts whatever was resident before.
uint64_t read_all(const volatile uint64_t* big, size_t bytes) {
  uint64_t sum = 0;
  for (size_t i = 0; i < bytes / sizeof(uint64_t); i += 4096 / sizeof(uint64_t)) sum += big[i];
  return sum;
}

bool check(const uint64_t* words, uint64_t version, bool zero, const char* who) {
  for (size_t i = 0; i < kWords; i++) {
    const uint64_t want = zero ? 0 : mix(i, version);
    if (words[i] != want) {
      fprintf(stderr, "%s: word %zu of the buffer is %#llx, expected %#llx\n", who, i,
              static_cast<unsigned long long>(words[i]), static_cast<unsigned long long>(want));
      return false;
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: lego_fork_discard BIG_MIB WAIT_MS\n");
    return 2;
  }
  const size_t big_bytes = strtoull(argv[1], nullptr, 10) << 20;
  const long wait_ms = atol(argv[2]);
  if (big_bytes == 0 || wait_ms <= 0) {
    fprintf(stderr, "lego_fork_discard: bad arguments\n");
    return 2;
  }
  x_buffer = static_cast<uint64_t*>(map(kBytes));
  auto* big = static_cast<uint64_t*>(map(big_bytes));
  for (size_t i = 0; i < kWords; i++) x_buffer[i] = mix(i, 1);
  (void)read_all(big, big_bytes);

  std::thread discarder([] {
    while (go.load() == 0) sleep_ms(1);
    if (madvise(x_buffer, kBytes, MADV_DONTNEED) != 0) perror("madvise");
    done.store(1);
  });
  if (pthread_atfork(prepare, nullptr, nullptr) != 0) {
    fprintf(stderr, "lego_fork_discard: pthread_atfork failed\n");
    return 3;
  }
  const pid_t pid = fork();
  if (pid < 0) {
    perror("fork");
    return 1;
  }
  if (pid == 0) {
    for (size_t i = 0; i < kWords; i++) x_buffer[i] = mix(i, 2);
    (void)read_all(big, big_bytes);
    sleep_ms(wait_ms);
    _exit(check(x_buffer, 2, false, "child") ? 0 : 1);
  }
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) {
    perror("waitpid");
    return 1;
  }
  discarder.join();
  int failures = 0;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "child failed (status %#x)\n", status);
    failures++;
  }
  if (!check(x_buffer, 0, true, "parent")) failures++;
  if (!discard_spanned_fork) {
    // Nothing was tested: the release into the snapshot was not delayed (is
    // LEGO_TEST_SNAPSHOT_RELEASE_DELAY_MS set?) or the discard did not find the fork.
    fprintf(stderr, "the discard ended before the fork: no release into its snapshot was late\n");
    failures++;
  }
  if (failures != 0) return 1;
  printf("fork discard ok\n");
  return 0;
}
