// The transport floors fit-bench and lego-bench print (libfit/bench/floors.h): that they
// measure (a positive rate, each way of waiting) and refuse what they cannot measure.
// Never their timings. Servers listen on a port the kernel picks (0): a fixed one may be
// taken by another test running beside this one.
#include <unistd.h>

#include <algorithm>
#include <vector>

#include <catch2/catch.hpp>

#include "libfit/bench/floors.h"

using lego::bench::Wait;

TEST_CASE("concurrent round trips: each client thread gets its answers, whichever way it waits",
          "[floors]") {
  for (Wait wait : {Wait::kSpin, Wait::kYield, Wait::kBlock}) {
    for (int clients : {1, 2, 3}) {
      auto rate = lego::bench::tcp_concurrent_round_trips_per_s("", "127.0.0.1", 0, 72, 4128,
                                                                clients, 300, wait);
      INFO("clients " << clients << " " << lego::bench::wait_name(wait) << ": "
                      << (rate.is_ok() ? "" : rate.status().message()));
      REQUIRE(rate.is_ok());
      CHECK(rate.value() > 0);
    }
  }
}

TEST_CASE("concurrent round trips: bad arguments are refused with a reason", "[floors]") {
  auto bad_addr = lego::bench::tcp_concurrent_round_trips_per_s("", "not-an-address", 0, 72, 4128,
                                                                1, 10, Wait::kSpin);
  REQUIRE_FALSE(bad_addr.is_ok());
  CHECK(bad_addr.status().code() == EINVAL);
  CHECK_THAT(bad_addr.status().message(), Catch::Contains("not-an-address"));
  auto none = lego::bench::tcp_concurrent_round_trips_per_s("", "127.0.0.1", 0, 72, 4128, 0, 10,
                                                            Wait::kBlock);
  REQUIRE_FALSE(none.is_ok());
  CHECK(none.status().code() == EINVAL);
}

TEST_CASE("concurrent round trips: a server that cannot listen is an error, not a hang",
          "[floors]") {
  // The server's namespace does not exist: its child cannot enter it and says nothing.
  auto r = lego::bench::tcp_concurrent_round_trips_per_s("lego-no-such-netns-floors", "127.0.0.1",
                                                         0, 72, 4128, 2, 10, Wait::kSpin);
  REQUIRE_FALSE(r.is_ok());
  CHECK_THAT(r.status().message(), Catch::Contains("could not listen"));
}

TEST_CASE("a round-trip server answers each client's requests with its reply, then exits",
          "[floors]") {
  for (Wait wait : {Wait::kSpin, Wait::kYield, Wait::kBlock}) {
    INFO(lego::bench::wait_name(wait));
    // Port 0: the server picks a free one.
    auto server = lego::bench::RoundTripServer::start("", "127.0.0.1", 0, 72, 4128, 2, wait);
    REQUIRE(server.is_ok());
    CHECK(server.value()->port() != 0);
    auto a = server.value()->connect();
    auto b = server.value()->connect();
    REQUIRE(a.is_ok());
    REQUIRE(b.is_ok());
    std::vector<char> buf(4128, 'x');
    for (int i = 0; i < 50; i++) {
      buf.assign(4128, 'x');
      REQUIRE(lego::bench::round_trip(i % 2 ? a.value() : b.value(), buf.data(), 72, 4128, wait));
      CHECK(std::count(buf.begin(), buf.end(), 'y') == 4128);
    }
    close(a.value());
    close(b.value());
    auto done = server.value()->wait_exit(5000);
    REQUIRE(done.is_ok());
    CHECK(done.value().requests == 50);
    if (wait == Wait::kSpin) CHECK(done.value().cpu_seconds > 0);
    // Reaped once: asking again is an error, not a hang.
    CHECK_FALSE(server.value()->wait_exit(10).is_ok());
  }
}

TEST_CASE("a round-trip server whose clients never close is reported, not waited for", "[floors]") {
  auto server = lego::bench::RoundTripServer::start("", "127.0.0.1", 0, 72, 4128, 1, Wait::kBlock);
  REQUIRE(server.is_ok());
  auto a = server.value()->connect();
  REQUIRE(a.is_ok());
  auto done = server.value()->wait_exit(50);
  REQUIRE_FALSE(done.is_ok());
  CHECK(done.status().code() == ETIMEDOUT);
  close(a.value());
}
