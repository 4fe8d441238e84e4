// runtime/excache/evict_clock.cc: CLOCK (second chance) eviction driven by re-faults.
//
// What is honestly achievable from user space: the CPU sets the PTE accessed bit on every
// access, but without a kernel module nothing lets us read and clear it cheaply.
//   - /proc/self/pagemap and PAGEMAP_SCAN report present / written / soft-dirty, never
//     "accessed".
//   - /sys/kernel/mm/page_idle (idle page tracking) does, per PFN, but needs
//     CONFIG_IDLE_PAGE_TRACKING (absent on our hosts), CAP_SYS_ADMIN, and ~3 syscalls per
//     candidate (pagemap PFN lookup, bitmap read, bitmap write): more than the miss it
//     would save.
//   - Making lines inaccessible again to sample them would turn hits into ~5 µs faults.
// So the only access signal is a fault on a line that is already resident or being filled:
// its first store (the write-protect fault) or a second thread missing on it while it is
// filled. Those set the frame's reference bit; the hand clears a set bit and spares the
// frame once (classic second chance). A fill does NOT set the bit: with no other signal
// that would just delay every line by one lap and degenerate into FIFO.
// Net effect: lines written after being read, and lines shared between threads, survive one
// more lap than FIFO would give them. Read-only hot lines are evicted as in FIFO.
// With the kernel module (kmod/) the accessed bit is available: evict.cc's
// sweep_accessed_bits() reads and clears it for the frames ahead of the hand once per
// eviction and sets the reference bit of those used since the previous sweep, so spare()
// below then implements true second-chance CLOCK.
#include "runtime/excache/excache_impl.h"

namespace lego::excache_internal {

namespace {

void clock_on_fill(std::atomic<uint64_t>&, bool) {}

void clock_on_refault(std::atomic<uint64_t>& frame) {
  frame.fetch_or(kFrameRefBit, std::memory_order_relaxed);
}

}  // namespace

bool spare_if_referenced(std::atomic<uint64_t>& frame) {
  if ((frame.load(std::memory_order_relaxed) & kFrameRefBit) == 0) return false;
  frame.fetch_and(~kFrameRefBit, std::memory_order_relaxed);
  return true;
}

const PolicyOps kClockPolicyOps = {
    .name = "clock",
    .on_fill = clock_on_fill,
    .on_refault = clock_on_refault,
    .spare = spare_if_referenced,
};

}  // namespace lego::excache_internal
