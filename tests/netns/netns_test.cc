// Topology: hosts reach each other through the bridge, and everything is removed after.
#include <catch2/catch.hpp>

#include "tests/netns/netns.h"

using namespace lego::testing;

TEST_CASE("hosts of a topology ping each other and vanish after") {
  std::vector<std::string> names;
  {
    auto t = Topology::create(3, "nstest");
    INFO(t.status().message());
    REQUIRE(t.is_ok());
    for (int i = 0; i < 3; i++) {
      names.push_back(t.value()->name(i));
      for (int j = 0; j < 3; j++) {
        if (i == j) continue;
        auto pid = t.value()->spawn(i, {"ping", "-c1", "-W2", t.value()->address(j)});
        REQUIRE(pid.is_ok());
        auto rc = Topology::wait_exit(pid.value(), std::chrono::seconds(10));
        REQUIRE(rc.is_ok());
        CHECK(rc.value() == 0);
      }
    }
    auto bad = t.value()->spawn(0, {"/nonexistent/program"});
    CHECK(bad.status().code() == ENOENT);
  }
  auto list = run_command({"ip", "netns", "list"});
  REQUIRE(list.is_ok());
  for (auto& n : names) CHECK(list.value().find(n) == std::string::npos);
}
