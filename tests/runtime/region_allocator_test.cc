// RegionAllocator's per-vRegion byte counts: the runtime unplaces a vRegion from its memory
// nodes when its count drops to zero, so a count that is wrong either drops memory still in
// use (a later fetch reads zeros) or keeps a vRegion placed forever (capacity leaks).
#include "runtime/preload/region_allocator.h"

#include <catch2/catch.hpp>

namespace lego::runtime {
namespace {

constexpr uint64_t kUnit = 16 << 20;  // the vRegion, as the runtime uses it
constexpr uintptr_t kBase = uintptr_t{1} << 40;

TEST_CASE("allocations count their bytes in every vRegion they touch") {
  RegionAllocator va;
  REQUIRE(va.init(kBase, 8 * kUnit, 1024, kUnit).is_ok());
  const uintptr_t a = va.allocate(4096, 4096);
  REQUIRE(a == kBase);
  CHECK(va.vregion_bytes_used(0) == 4096);
  // Across a vRegion boundary: the bytes on each side go to each side.
  const uintptr_t b = va.allocate(kUnit, 4096);
  REQUIRE(b == kBase + 4096);
  CHECK(va.vregion_bytes_used(0) == kUnit);
  CHECK(va.vregion_bytes_used(1) == 4096);
  uint64_t first = 0, last = 0;
  va.vregions(b, kUnit, &first, &last);
  CHECK((first == 0 && last == 1));
  // A partial free (munmap of part of a mapping) takes only its bytes.
  va.release(b + kUnit - 4096, 4096);
  CHECK(va.vregion_bytes_used(1) == 0);
  CHECK(va.vregion_bytes_used(0) == kUnit);
  va.release(a, 4096);
  va.release(b, kUnit - 4096);
  CHECK(va.vregion_bytes_used(0) == 0);
  CHECK(va.vregion_bytes_used(99) == 0);  // out of range
}

TEST_CASE("vRegions count from the base rounded down to a vRegion") {
  RegionAllocator va;
  REQUIRE(va.init(kBase + kUnit / 2, 4 * kUnit, 1024, kUnit).is_ok());
  const uintptr_t a = va.allocate(kUnit, 4096);
  REQUIRE(a == kBase + kUnit / 2);
  CHECK(va.vregion_bytes_used(0) == kUnit / 2);
  CHECK(va.vregion_bytes_used(1) == kUnit / 2);
  uint64_t first = 0, last = 0;
  va.vregions(a, kUnit, &first, &last);
  CHECK((first == 0 && last == 1));
}

TEST_CASE("without a vRegion size nothing is counted") {
  RegionAllocator va;
  REQUIRE(va.init(kBase, 8 * kUnit).is_ok());
  REQUIRE(va.allocate(4096, 4096) != 0);
  CHECK(va.vregion_bytes_used(0) == 0);
}

}  // namespace
}  // namespace lego::runtime
