// runtime/excache/evict_refault.cc: second chance for lines that come back soon.
//
// User space sees no access to a resident line (evict_clock.cc says why; on this kernel
// DAMON's sysfs interface would give region-level hotness, but docs/measurements.md says
// why the runtime cannot use it here). What it does see is every miss, and a miss on a
// line it evicted a short while ago says the line is hot: the clock hand would have found
// it used, had it been able to look. So each eviction stamps the line's word with the hand's
// lap (evict.cc), and a fill of a line evicted less than two laps ago (ExCache::Impl::
// refault) sets the frame's reference bit: the hand spares it once, as CLOCK spares a line
// it saw used. A line that keeps coming back keeps being spared; a line seen once leaves
// in FIFO order. Under uniform random access no line is hotter than another and refaults
// are spread evenly: the policy then behaves as FIFO does (same miss rate in simulation).
// Cost: a load and a compare per miss, one relaxed add per lap; no memory.
//
// Write faults and threads waiting on a fill (clock's signals) are ignored: in a
// read-modify-write workload every fill is followed by a write fault, which would make
// every line look hot.
#include "runtime/excache/excache_impl.h"

namespace lego::excache_internal {

namespace {

void refault_on_fill(std::atomic<uint64_t>& frame, bool refault) {
  if (refault) frame.fetch_or(kFrameRefBit, std::memory_order_relaxed);
}

void refault_on_refault(std::atomic<uint64_t>&) {}

}  // namespace

const PolicyOps kRefaultPolicyOps = {
    .name = "refault",
    .on_fill = refault_on_fill,
    .on_refault = refault_on_refault,
    .spare = spare_if_referenced,
};

}  // namespace lego::excache_internal
