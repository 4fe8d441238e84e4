// The weighted choice of memory nodes (include/lego/placement.h): R distinct nodes, never an
// excluded one or one without room, in proportion to free capacity, ENOSPC naming why each
// node could not take the vRegion, and the same choices for the same seed (issue 13).
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <vector>

#include "lego/placement.h"

using lego::fit::NodeId;
using lego::placement::Candidate;
using lego::placement::choose;
using lego::placement::Rng;

namespace {
constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kV = 16 * kMiB;
}  // namespace

TEST_CASE("placement draws in proportion to free capacity", "[placement]") {
  const std::vector<Candidate> nodes = {{1, 100 * kV}, {2, 300 * kV}, {3, 600 * kV}};
  Rng rng(7);
  std::map<NodeId, int> first;
  constexpr int kDraws = 20000;
  for (int i = 0; i < kDraws; i++) {
    auto r = choose(nodes, 1, kV, {}, rng);
    REQUIRE(r.is_ok());
    first[r.value()[0]]++;
  }
  // 10%, 30%, 60%, within a few standard deviations (~0.35% here).
  CHECK(first[1] == Approx(0.1 * kDraws).margin(0.02 * kDraws));
  CHECK(first[2] == Approx(0.3 * kDraws).margin(0.02 * kDraws));
  CHECK(first[3] == Approx(0.6 * kDraws).margin(0.02 * kDraws));
}

TEST_CASE("placement picks R distinct nodes and never an excluded or full one", "[placement]") {
  const std::vector<Candidate> nodes = {{1, 10 * kV}, {2, 10 * kV}, {3, kV - 1},
                                        {4, 10 * kV}, {5, 10 * kV}, {6, 0}};
  const std::vector<NodeId> exclude = {5};
  Rng rng(1);
  for (int i = 0; i < 2000; i++) {
    auto r = choose(nodes, 3, kV, exclude, rng);
    REQUIRE(r.is_ok());
    auto got = r.value();
    REQUIRE(got.size() == 3);
    std::sort(got.begin(), got.end());
    CHECK(got == std::vector<NodeId>{1, 2, 4});  // 3 too small, 5 excluded, 6 full
  }
}

TEST_CASE("placement answers ENOSPC naming each node's reason", "[placement]") {
  const std::vector<Candidate> nodes = {{1, 10 * kV}, {2, 4 * kMiB}, {3, 10 * kV}};
  Rng rng(3);
  auto r = choose(nodes, 2, kV, std::vector<NodeId>{3}, rng);
  REQUIRE(r.status().code() == ENOSPC);
  CHECK(r.status().message() ==
        "no room for a 16 MiB vRegion on 2 distinct memory nodes: 1 of 3 can take it (node 2: "
        "4 MiB free, node 3: excluded)");
  CHECK(choose(nodes, 0, kV, {}, rng).status().code() == EINVAL);
  CHECK(choose({}, 1, kV, {}, rng).status().code() == ENOSPC);
  // A node listed twice counts once.
  const std::vector<Candidate> twice = {{1, 10 * kV}, {1, 10 * kV}};
  CHECK(choose(twice, 2, kV, {}, rng).status().code() == ENOSPC);
}

TEST_CASE("placement is deterministic for a seed", "[placement]") {
  const std::vector<Candidate> nodes = {{1, 5 * kV}, {2, 7 * kV}, {3, 9 * kV}, {4, 2 * kV}};
  auto run = [&](uint64_t seed) {
    Rng rng(seed);
    std::vector<NodeId> all;
    for (int i = 0; i < 50; i++) {
      auto r = choose(nodes, 2, kV, {}, rng);
      REQUIRE(r.is_ok());
      all.insert(all.end(), r.value().begin(), r.value().end());
    }
    return all;
  };
  CHECK(run(11) == run(11));
  CHECK(run(11) != run(12));
}
