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

// The floor itself fails unless the server answered exactly one request per miss and every
// line it mapped holds the reply's bytes.
TEST_CASE("the threaded miss floor makes a round trip per miss on each thread's connection") {
  using lego::bench::Wait;
  for (Wait wait : {Wait::kSpin, Wait::kYield, Wait::kBlock}) {
    for (int threads : {1, 2}) {
      INFO(lego::bench::wait_name(wait) << ", " << threads << " threads");
      auto server =
          lego::bench::RoundTripServer::start("", "127.0.0.1", 0, 72, 4128, threads, wait);
      REQUIRE(server.is_ok());
      auto floor = lego::bench::measure_threaded_miss_floor(*server.value(), threads, 500, wait);
      REQUIRE(floor.is_ok());
      CHECK(floor.value().misses_per_s > 0);
      CHECK(floor.value().cpus_busy > 0);
    }
  }
}

// With requests of 4 KiB or more each miss also writes back a dropped line: the server must
// still have received exactly one (longer) request per miss, or the floor fails.
TEST_CASE("the threaded miss floor carries a victim line in each request when asked") {
  using lego::bench::Wait;
  for (int threads : {1, 2}) {
    INFO(threads << " threads");
    auto server = lego::bench::RoundTripServer::start("", "127.0.0.1", 0, 72 + 4096, 4128, threads,
                                                      Wait::kYield);
    REQUIRE(server.is_ok());
    auto floor =
        lego::bench::measure_threaded_miss_floor(*server.value(), threads, 500, Wait::kYield);
    REQUIRE(floor.is_ok());
    CHECK(floor.value().misses_per_s > 0);
  }
}

TEST_CASE("the threaded miss floor refuses a reply too short to map a line") {
  auto server =
      lego::bench::RoundTripServer::start("", "127.0.0.1", 0, 72, 72, 1, lego::bench::Wait::kSpin);
  REQUIRE(server.is_ok());
  auto floor =
      lego::bench::measure_threaded_miss_floor(*server.value(), 1, 100, lego::bench::Wait::kSpin);
  REQUIRE_FALSE(floor.is_ok());
  CHECK(floor.status().message().find("at least 4 KiB") != std::string::npos);
}
