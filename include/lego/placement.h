// Placement: the one weighted choice of R distinct memory nodes for a vRegion, by free
// capacity. lego-mond places with it; a processor's runtime places with it too when the
// cluster file has no monitor (over the file's memory nodes and their kUsage).
//
// The choice: among the candidates not excluded whose free capacity holds the vRegion, R
// distinct nodes drawn one after another, each with probability proportional to its free
// bytes (weighted sampling without replacement). A node twice as empty receives about twice
// the placements, so the nodes fill at about the same pace; the draw (rather than "the
// emptiest") spreads the vRegions of concurrent allocations that see the same free figures.
//
// Deterministic given the Rng's seed (tests); callers seed it randomly.
//
// Thread-safety: choose() is a pure function of its arguments (and mutates only `rng`); an
// Rng is not shared between threads without a lock.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "lego/fit.h"
#include "lego/status.h"

namespace lego::placement {

struct Candidate {
  fit::NodeId id = 0;
  uint64_t free_bytes = 0;  // capacity less what is promised (and, at the monitor, less what
                            // it handed out that the node has not reported yet)
};

// A small, fast generator (splitmix64): the draws need no cryptographic quality.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  // Uniform in [0, bound), bound > 0.
  uint64_t below(uint64_t bound);

 private:
  uint64_t state_;
};

// `count` distinct node ids from `candidates` (in draw order), none in `exclude`, each with
// free_bytes >= need_bytes. Costs O(count x candidates). Errors: EINVAL for count 0;
// ENOSPC when fewer than `count` candidates qualify, the message naming each node and why
// it could not take the vRegion ("node 3: 4 MiB free", "node 4: excluded").
Result<std::vector<fit::NodeId>> choose(std::span<const Candidate> candidates, uint32_t count,
                                        uint64_t need_bytes, std::span<const fit::NodeId> exclude,
                                        Rng& rng);

}  // namespace lego::placement
