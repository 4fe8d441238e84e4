// The weighted choice of memory nodes (include/lego/placement.h).
#include "lego/placement.h"

#include <algorithm>
#include <cerrno>

namespace lego::placement {

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t Rng::below(uint64_t bound) {
  // Rejection sampling: no modulo bias, whatever the bound.
  const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
  for (;;) {
    const uint64_t v = next();
    if (v < limit) return v % bound;
  }
}

Result<std::vector<fit::NodeId>> choose(std::span<const Candidate> candidates, uint32_t count,
                                        uint64_t need_bytes, std::span<const fit::NodeId> exclude,
                                        Rng& rng) {
  if (count == 0) return Status(EINVAL, "placement: asked for 0 nodes");
  // Weights are capped so that their sum cannot overflow (2^46 B = 64 TiB per node, for up
  // to 2^17 nodes): a node beyond the cap weighs as much as one at it.
  constexpr uint64_t kMaxWeight = uint64_t{1} << 46;
  struct Pool {
    fit::NodeId id;
    uint64_t weight;
  };
  std::vector<Pool> pool;
  std::string why;
  for (const Candidate& c : candidates) {
    const bool excluded = std::find(exclude.begin(), exclude.end(), c.id) != exclude.end();
    const bool dup =
        std::any_of(pool.begin(), pool.end(), [&](const Pool& p) { return p.id == c.id; });
    if (excluded || dup || c.free_bytes < need_bytes || c.free_bytes == 0) {
      why += (why.empty() ? "" : ", ") + std::string("node ") + std::to_string(c.id) + ": " +
             (excluded ? "excluded"
              : dup    ? "listed twice"
                       : std::to_string(c.free_bytes >> 20) + " MiB free");
      continue;
    }
    pool.push_back({c.id, std::min(c.free_bytes, kMaxWeight)});
  }
  if (pool.size() < count) {
    return Status(ENOSPC, "no room for a " + std::to_string(need_bytes >> 20) + " MiB vRegion on " +
                              std::to_string(count) + " distinct memory node" +
                              (count == 1 ? "" : "s") + ": " + std::to_string(pool.size()) +
                              " of " + std::to_string(candidates.size()) + " can take it" +
                              (why.empty() ? "" : " (" + why + ")"));
  }
  std::vector<fit::NodeId> out;
  for (uint32_t k = 0; k < count; k++) {
    uint64_t total = 0;
    for (const Pool& p : pool) total += p.weight;
    uint64_t r = rng.below(total);
    size_t i = 0;
    while (r >= pool[i].weight) r -= pool[i++].weight;
    out.push_back(pool[i].id);
    pool.erase(pool.begin() + static_cast<long>(i));
  }
  return out;
}

}  // namespace lego::placement
