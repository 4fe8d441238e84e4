#include "runtime/preload/region_allocator.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace lego::runtime {
namespace {
constexpr uintptr_t kPage = 4096;
uintptr_t round_up(uintptr_t v, uintptr_t a) {
  return (v + a - 1) & ~(a - 1);
}
}  // namespace

Status RegionAllocator::init(uintptr_t base, size_t size, size_t max_ranges, size_t vregion_bytes) {
  // Raw syscall: the interposed mmap() must not route our own bookkeeping into the region.
  void* p = reinterpret_cast<void*>(syscall(SYS_mmap, nullptr, max_ranges * sizeof(Range),
                                            PROT_READ | PROT_WRITE,
                                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (p == MAP_FAILED) return Status::from_errno(errno, "mmap of the region's free list");
  ranges_ = static_cast<Range*>(p);
  capacity_ = max_ranges;
  base_ = round_up(base, kPage);
  size_ = (base + size - base_) & ~(kPage - 1);
  ranges_[0] = {base_, base_ + size_};
  count_ = 1;
  if (vregion_bytes > 0) {
    if ((vregion_bytes & (vregion_bytes - 1)) != 0) {
      return Status(EINVAL, "the vRegion size is not a power of two");
    }
    vregion_bytes_ = vregion_bytes;
    origin_ = base_ & ~(vregion_bytes - 1);
    vregion_count_ = (base_ + size_ - origin_ + vregion_bytes - 1) / vregion_bytes;
    void* u = reinterpret_cast<void*>(syscall(SYS_mmap, nullptr, vregion_count_ * sizeof(uint64_t),
                                              PROT_READ | PROT_WRITE,
                                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (u == MAP_FAILED) return Status::from_errno(errno, "mmap of the vRegions' byte counts");
    used_ = static_cast<std::atomic<uint64_t>*>(u);  // zero-filled: all unused
  }
  return Status();
}

void RegionAllocator::vregions(uintptr_t addr, size_t size, uint64_t* first, uint64_t* last) const {
  const size_t unit = vregion_bytes_ > 0 ? vregion_bytes_ : size_;
  *first = (addr - origin_) / unit;
  *last = (addr + size - 1 - origin_) / unit;
}

uint64_t RegionAllocator::vregion_bytes_used(uint64_t v) const {
  if (used_ == nullptr || v >= vregion_count_) return 0;
  return used_[v].load(std::memory_order_acquire);
}

void RegionAllocator::count(uintptr_t addr, uintptr_t end, int sign) {
  if (used_ == nullptr) return;
  for (uintptr_t a = addr; a < end;) {
    const uint64_t v = (a - origin_) / vregion_bytes_;
    const uintptr_t stop = std::min<uintptr_t>(end, origin_ + (v + 1) * vregion_bytes_);
    const uint64_t n = stop - a;
    const uint64_t now = used_[v].load(std::memory_order_relaxed);
    // A release of bytes never counted (a list-full leak below) must not wrap around.
    used_[v].store(sign > 0 ? now + n : (now >= n ? now - n : 0), std::memory_order_release);
    a = stop;
  }
}

RegionAllocator::~RegionAllocator() {
  if (ranges_ != nullptr) syscall(SYS_munmap, ranges_, capacity_ * sizeof(Range));
  if (used_ != nullptr) syscall(SYS_munmap, used_, vregion_count_ * sizeof(uint64_t));
}

uintptr_t RegionAllocator::allocate(size_t size, size_t align) {
  size = round_up(size, kPage);
  if (align < kPage) align = kPage;
  if (size == 0 || (align & (align - 1)) != 0) return 0;
  lock();
  for (size_t i = 0; i < count_; i++) {
    Range& r = ranges_[i];
    uintptr_t start = round_up(r.start, align);
    if (start < r.start || start + size > r.end || start + size < start) continue;
    uintptr_t end = start + size;
    if (start == r.start && end == r.end) {
      memmove(&ranges_[i], &ranges_[i + 1], (count_ - i - 1) * sizeof(Range));
      count_--;
    } else if (start == r.start) {
      r.start = end;
    } else if (end == r.end) {
      r.end = start;
    } else {
      if (count_ == capacity_) continue;  // would need a split and the list is full
      memmove(&ranges_[i + 2], &ranges_[i + 1], (count_ - i - 1) * sizeof(Range));
      ranges_[i + 1] = {end, r.end};
      r.end = start;
      count_++;
    }
    count(start, start + size, +1);
    unlock();
    return start;
  }
  unlock();
  return 0;
}

void RegionAllocator::release(uintptr_t addr, size_t size) {
  size = round_up(size, kPage);
  if (size == 0 || !contains(addr)) return;
  uintptr_t end = addr + size;
  lock();
  // First range starting after addr.
  size_t lo = 0, hi = count_;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (ranges_[mid].start <= addr)
      lo = mid + 1;
    else
      hi = mid;
  }
  size_t i = lo;
  bool merge_prev = i > 0 && ranges_[i - 1].end == addr;
  bool merge_next = i < count_ && ranges_[i].start == end;
  if (merge_prev && merge_next) {
    ranges_[i - 1].end = ranges_[i].end;
    memmove(&ranges_[i], &ranges_[i + 1], (count_ - i - 1) * sizeof(Range));
    count_--;
  } else if (merge_prev) {
    ranges_[i - 1].end = end;
  } else if (merge_next) {
    ranges_[i].start = addr;
  } else if (count_ < capacity_) {
    memmove(&ranges_[i + 1], &ranges_[i], (count_ - i) * sizeof(Range));
    ranges_[i] = {addr, end};
    count_++;
  }
  // else: the list is full; the range leaks (address space only, its lines were freed).
  count(addr, end, -1);
  unlock();
}

size_t RegionAllocator::free_bytes() const {
  lock();
  size_t n = 0;
  for (size_t i = 0; i < count_; i++) n += ranges_[i].end - ranges_[i].start;
  unlock();
  return n;
}

}  // namespace lego::runtime
