// RegionAllocator: hands out page-aligned ranges of the ExCache region to jemalloc's
// extent hooks and to interposed mmap(). It never calls malloc (it runs inside jemalloc)
// and keeps its free list in a fixed array mapped at init. It also counts the bytes
// allocated in each vRegion (a fixed-size slice of the region): the runtime places a
// vRegion on memory nodes while it holds allocated bytes and unplaces it when its last
// byte is freed (runtime/preload/cluster_backend.h).
//
// Thread-safety: all methods are safe from any thread (one spinlock; critical sections
// are a binary search and a memmove of the free list).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "lego/status.h"

namespace lego::runtime {

class RegionAllocator {
 public:
  // Manages [base, base + size). max_ranges bounds the free list's fragmentation.
  // vregion_bytes: the slice whose allocated bytes are counted (0: none counted), a power of
  // two; vRegion 0 starts at base rounded down to it.
  Status init(uintptr_t base, size_t size, size_t max_ranges = 1 << 18, size_t vregion_bytes = 0);
  ~RegionAllocator();

  // A range of `size` bytes (rounded up to 4 KiB) aligned to `align` (a power of two,
  // at least 4 KiB), or 0 when the region has no such hole.
  uintptr_t allocate(size_t size, size_t align);
  // Returns [addr, addr + size) (4 KiB aligned, previously allocated) to the free list.
  // Partial frees of an allocation are allowed (munmap of part of a mapping).
  void release(uintptr_t addr, size_t size);

  bool contains(uintptr_t addr) const { return addr >= base_ && addr < base_ + size_; }
  size_t free_bytes() const;

  // The vRegions [*first, *last] that [addr, addr + size) touches (size > 0, in the region).
  void vregions(uintptr_t addr, size_t size, uint64_t* first, uint64_t* last) const;
  // Bytes allocated now in vRegion v (0 when v is out of range or nothing is counted).
  // Lock-free.
  uint64_t vregion_bytes_used(uint64_t v) const;

 private:
  struct Range {
    uintptr_t start, end;
  };
  void lock() const {
    while (lock_.exchange(true, std::memory_order_acquire)) {
      while (lock_.load(std::memory_order_relaxed)) __builtin_ia32_pause();
    }
  }
  void unlock() const { lock_.store(false, std::memory_order_release); }
  // Adds `sign` * the bytes of [addr, end) to each vRegion's count. Under the lock.
  void count(uintptr_t addr, uintptr_t end, int sign);

  uintptr_t base_ = 0;
  size_t size_ = 0;
  Range* ranges_ = nullptr;  // sorted, disjoint, non-adjacent free ranges
  size_t count_ = 0;
  size_t capacity_ = 0;
  size_t vregion_bytes_ = 0;
  uintptr_t origin_ = 0;  // base_ rounded down to vregion_bytes_: where vRegion 0 starts
  uint64_t vregion_count_ = 0;
  std::atomic<uint64_t>* used_ = nullptr;  // vregion_count_ counters, mapped at init
  mutable std::atomic<bool> lock_{false};
};

}  // namespace lego::runtime
