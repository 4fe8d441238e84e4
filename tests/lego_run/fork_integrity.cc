// fork() under lego-run: a child must see the heap exactly as the parent had it at the
// fork, the two must not see each other's later writes, and grandchildren work too.
//
// The parent fills a heap (meant to be several times the ExCache, so most of it is on the
// memory node), then, while writer threads keep rewriting the heap (so evictions race with
// the fork), forks children repeatedly. Each child checks every word against the values
// the parent had at the fork, rewrites them, forks a grandchild that checks the child's
// values, and exits 0 only if all was right. The parent checks its own values afterwards.
//
// usage: lego_fork_integrity HEAP_MIB FORKS
// Prints "fork integrity ok" and exits 0, or says what was wrong and exits 1.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

uint64_t mix(uint64_t index, uint64_t version) {
  uint64_t x = index * 0x9e3779b97f4a7c15ull ^ (version << 32 | version);
  x ^= x >> 29;
  return x * 0xbf58476d1ce4e5b9ull;
}

// Words whose index % 8 == 0 belong to the writer threads; the rest only change between
// forks (from the main thread), so a child knows their exact values.
constexpr size_t kStride = 8;

bool check(const uint64_t* heap, size_t words, uint64_t version, const char* who) {
  for (size_t i = 0; i < words; i++) {
    if (i % kStride == 0) continue;
    if (heap[i] != mix(i, version)) {
      fprintf(stderr, "%s: word %zu is %#llx, expected %#llx (version %llu)\n", who, i,
              static_cast<unsigned long long>(heap[i]),
              static_cast<unsigned long long>(mix(i, version)),
              static_cast<unsigned long long>(version));
      return false;
    }
  }
  return true;
}

void fill(uint64_t* heap, size_t words, uint64_t version) {
  for (size_t i = 0; i < words; i++) {
    if (i % kStride != 0) heap[i] = mix(i, version);
  }
}

int wait_ok(pid_t pid, const char* who) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) {
    perror("waitpid");
    return 1;
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "%s failed (status %#x)\n", who, status);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: lego_fork_integrity HEAP_MIB FORKS\n");
    return 2;
  }
  const size_t words = strtoull(argv[1], nullptr, 10) * (1 << 20) / sizeof(uint64_t);
  const int forks = atoi(argv[2]);
  if (words == 0 || forks < 1) {
    fprintf(stderr, "lego_fork_integrity: bad arguments\n");
    return 2;
  }
  auto* heap = static_cast<uint64_t*>(malloc(words * sizeof(uint64_t)));
  if (heap == nullptr) {
    fprintf(stderr, "lego_fork_integrity: out of memory\n");
    return 3;
  }
  for (size_t i = 0; i < words; i++) heap[i] = mix(i, 0);

  // Writers: keep rewriting their words (and so keep lines dirty and evicting).
  std::atomic<bool> stop{false};
  std::atomic<long> bad{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 2; t++) {
    writers.emplace_back([&, t] {
      uint64_t round = 1;
      while (!stop.load(std::memory_order_relaxed)) {
        for (size_t i = t * kStride; i < words; i += 2 * kStride) heap[i] = mix(i, round);
        for (size_t i = t * kStride; i < words; i += 2 * kStride) {
          if (heap[i] != mix(i, round)) bad++;
        }
        round++;
      }
    });
  }

  int failures = 0;
  for (int f = 1; f <= forks && failures == 0; f++) {
    const uint64_t version = f * 100;
    fill(heap, words, version);
    pid_t pid = fork();
    if (pid < 0) {
      perror("fork");
      failures++;
      break;
    }
    if (pid == 0) {
      // The child: one thread (the writers stayed in the parent).
      if (!check(heap, words, version, "child")) _exit(1);
      fill(heap, words, version + 1);
      // Freeing and reusing memory in the child, and a grandchild of the child's values.
      std::vector<char> scratch(1 << 20, 'x');
      pid_t grandchild = fork();
      if (grandchild == 0) {
        _exit(check(heap, words, version + 1, "grandchild") && scratch[12345] == 'x' ? 0 : 1);
      }
      if (grandchild < 0 || wait_ok(grandchild, "grandchild") != 0) _exit(1);
      _exit(check(heap, words, version + 1, "child after grandchild") ? 0 : 1);
    }
    // The parent rewrites while the child checks: neither may see the other's writes.
    fill(heap, words, version + 50);
    failures += wait_ok(pid, "child");
    if (!check(heap, words, version + 50, "parent")) failures++;
  }
  stop = true;
  for (auto& w : writers) w.join();
  if (bad.load() != 0) {
    fprintf(stderr, "parent writers saw %ld bad words\n", bad.load());
    failures++;
  }
  if (failures != 0) return 1;
  printf("fork integrity ok\n");
  return 0;
}
