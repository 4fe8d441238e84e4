// The transport floors fit-bench and lego-bench print (libfit/bench/floors.h): that they
// measure (a positive rate, both ways of waiting) and refuse what they cannot measure.
// Never their timings.
#include <unistd.h>

#include <catch2/catch.hpp>

#include "libfit/bench/floors.h"

namespace {

uint16_t test_port(int k) {
  return static_cast<uint16_t>(30000 + (getpid() * 7 + k) % 20000);
}

}  // namespace

TEST_CASE("concurrent round trips: each client thread gets its answers, busy-polling or blocking",
          "[floors]") {
  int k = 0;
  for (bool spin : {true, false}) {
    for (int clients : {1, 2, 3}) {
      auto rate = lego::bench::tcp_concurrent_round_trips_per_s("", "127.0.0.1", test_port(k++), 72,
                                                                4128, clients, 300, spin);
      INFO("clients " << clients << (spin ? " spin" : " block"));
      REQUIRE(rate.is_ok());
      CHECK(rate.value() > 0);
    }
  }
}

TEST_CASE("concurrent round trips: bad arguments are refused with a reason", "[floors]") {
  auto bad_addr = lego::bench::tcp_concurrent_round_trips_per_s("", "not-an-address", test_port(10),
                                                                72, 4128, 1, 10, true);
  REQUIRE_FALSE(bad_addr.is_ok());
  CHECK(bad_addr.status().code() == EINVAL);
  CHECK_THAT(bad_addr.status().message(), Catch::Contains("not-an-address"));
  auto none = lego::bench::tcp_concurrent_round_trips_per_s("", "127.0.0.1", test_port(11), 72,
                                                            4128, 0, 10, false);
  REQUIRE_FALSE(none.is_ok());
  CHECK(none.status().code() == EINVAL);
}

TEST_CASE("concurrent round trips: a server that cannot listen is an error, not a hang",
          "[floors]") {
  // The server's namespace does not exist: its child cannot enter it and says nothing.
  auto r = lego::bench::tcp_concurrent_round_trips_per_s("lego-no-such-netns-floors", "127.0.0.1",
                                                         test_port(12), 72, 4128, 2, 10, true);
  REQUIRE_FALSE(r.is_ok());
  CHECK_THAT(r.status().message(), Catch::Contains("could not listen"));
}
