// lego-bench's fault floor: the measurement runs a real userfaultfd miss path in a child and
// checks every line it maps (content after each fault), delivered by SIGBUS and by a
// handler thread (free and pinned beside the faulting thread), and times the handler
// delivery's fence (write-protecting resident lines); here it must succeed.
#include "runtime/bench/fault_floor.h"

#include <catch2/catch.hpp>

TEST_CASE("the fault floor maps every line with the right content and reports its cost") {
  auto floor = lego::bench::measure_fault_floor(256, 2);
  REQUIRE(floor.is_ok());
  CHECK(floor.value().fault_us > 0);
  CHECK(floor.value().zap_us > 0);
  CHECK(floor.value().window_fault_us > 0);
  CHECK(floor.value().window_zap_us > 0);
  CHECK(floor.value().handler_fault_us > 0);
  CHECK(floor.value().handler_fault_same_cpu_us > 0);
  CHECK(floor.value().fence_us > 0);
}

TEST_CASE("the fault floor refuses sizes it cannot batch") {
  auto floor = lego::bench::measure_fault_floor(10, 1);
  REQUIRE_FALSE(floor.is_ok());
  CHECK(floor.status().message().find("at least 64 lines") != std::string::npos);
}
