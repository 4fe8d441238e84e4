// A data-integrity workload for lego-run: threads doing random read-modify-writes over a
// malloc'ed heap (meant to be several times the ExCache), checking every value read.
// Words of different threads share cache lines, so evictions race with writers of the
// same line: a lost write-back or a torn eviction shows up as a mismatch.
//
// usage: lego_integrity HEAP_MIB THREADS OPS_PER_THREAD
// Prints "integrity ok" and exits 0, or names the first bad word and exits 1.
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

namespace {

uint64_t mix(uint64_t index, uint32_t version) {
  uint64_t x = index * 0x9e3779b97f4a7c15ull ^ (uint64_t{version} << 32 | version);
  x ^= x >> 29;
  return x * 0xbf58476d1ce4e5b9ull;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: lego_integrity HEAP_MIB THREADS OPS_PER_THREAD\n");
    return 2;
  }
  size_t heap_mib = strtoull(argv[1], nullptr, 10);
  int threads = atoi(argv[2]);
  long ops = atol(argv[3]);
  size_t words = heap_mib * (1 << 20) / sizeof(uint64_t);
  if (words == 0 || threads < 1 || ops < 0) {
    fprintf(stderr, "lego_integrity: bad arguments\n");
    return 2;
  }
  // Both arrays come from malloc: under lego-run they live on the memory node.
  auto* heap = static_cast<uint64_t*>(malloc(words * sizeof(uint64_t)));
  auto* version = static_cast<uint32_t*>(calloc(words, sizeof(uint32_t)));
  if (heap == nullptr || version == nullptr) {
    fprintf(stderr, "lego_integrity: out of memory\n");
    return 3;
  }
  for (size_t i = 0; i < words; i++) heap[i] = mix(i, 0);

  std::atomic<long> bad{0};
  std::atomic<size_t> first_bad{~size_t{0}};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; t++) {
    pool.emplace_back([&, t] {
      std::mt19937_64 rng(1234 + t);
      size_t mine = (words - t + threads - 1) / threads;  // words with i % threads == t
      for (long n = 0; n < ops; n++) {
        size_t i = (rng() % mine) * threads + t;
        if (heap[i] != mix(i, version[i])) {
          bad++;
          size_t expected = ~size_t{0};
          first_bad.compare_exchange_strong(expected, i);
        }
        version[i]++;
        heap[i] = mix(i, version[i]);
      }
    });
  }
  for (auto& th : pool) th.join();
  for (size_t i = 0; i < words; i++) {
    if (heap[i] != mix(i, version[i])) {
      bad++;
      size_t expected = ~size_t{0};
      first_bad.compare_exchange_strong(expected, i);
    }
  }
  if (bad != 0) {
    size_t i = first_bad;
    fprintf(stderr, "lego_integrity: %ld bad words; first at index %zu (address %p)\n", bad.load(),
            i, static_cast<void*>(&heap[i]));
    return 1;
  }
  printf("integrity ok: %zu MiB, %d threads, %ld ops each\n", heap_mib, threads, ops);
  return 0;
}
