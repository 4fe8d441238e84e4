// runtime/excache/evict_fifo.cc: FIFO eviction. The clock hand walks the frames in order and takes
// whatever it finds: lines leave roughly in the order they were filled (a frame freed by
// discard() is refilled out of turn). Needs no access signal at all, which is why it is the
// default: user space cannot see accesses to resident lines (see evict_clock.cc).
#include "runtime/excache/excache_impl.h"

namespace lego::excache_internal {

namespace {

void fifo_on_fill(std::atomic<uint64_t>&, bool) {}
void fifo_on_refault(std::atomic<uint64_t>&) {}
bool fifo_spare(std::atomic<uint64_t>&) {
  return false;
}

}  // namespace

const PolicyOps kFifoPolicyOps = {
    .name = "fifo",
    .on_fill = fifo_on_fill,
    .on_refault = fifo_on_refault,
    .spare = fifo_spare,
};

}  // namespace lego::excache_internal
