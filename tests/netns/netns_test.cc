// //netns (include/lego/netns.h) and the tests' Topology on it: every topology's members
// reach each other (and the host when it is attached), links carry 64 KiB frames, the
// host's interface has the name asked for, nothing is left after a Network, and specs or
// names that cannot be made are refused with nothing left behind.
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <thread>

#include "lego/netns.h"
#include "tests/netns/netns.h"

using namespace lego::testing;
namespace netns = lego::netns;

namespace {

bool exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// The kernel frees a deleted namespace's interfaces asynchronously: give it a moment.
bool gone_soon(const std::string& path) {
  for (int i = 0; i < 200 && exists(path); i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return !exists(path);
}

// ping from namespace `ns` ("" for the host) to `address`; its exit status.
int ping(const std::string& ns, const std::string& address) {
  std::vector<std::string> argv = {"ping", "-c1", "-W2", address};
  if (!ns.empty()) argv.insert(argv.begin(), {"ip", "netns", "exec", ns});
  auto r = run_command(argv);
  return r.is_ok() ? 0 : 1;
}

std::string tag() {
  return std::to_string(getpid());
}

// A /24 of 10.128.0.0/9 of this test's own.
uint32_t subnet(unsigned k) {
  const unsigned net = (static_cast<unsigned>(getpid()) * 7 + 17 * k) % 32000;
  return (10u << 24) | ((128 + net / 250) << 16) | ((net % 250) << 8);
}

}  // namespace

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

TEST_CASE("one namespace with the host: a veth pair, 64 KiB frames, both ways, gone after") {
  const std::string ns = "nst-pair-" + tag(), link = "nst" + tag() + "a";
  {
    netns::NetworkSpec spec;
    spec.namespaces = {ns};
    spec.attach_host = true;
    spec.host_link = link;
    spec.subnet = subnet(1);
    auto net = netns::Network::create(spec);
    INFO(net.status().message());
    REQUIRE(net.is_ok());
    const netns::Network& n = *net.value();
    CHECK(n.host_address() == netns::ipv4_string(spec.subnet + 1));
    CHECK(n.address(0) == netns::ipv4_string(spec.subnet + 2));
    CHECK(exists(netns::namespace_path(ns)));
    // The host's end, by the name asked for, with the MTU; its peer, in the namespace.
    std::ifstream mtu("/sys/class/net/" + link + "/mtu");
    int m = 0;
    mtu >> m;
    CHECK(m == 65535);
    auto inside = run_command({"ip", "-n", ns, "-o", "link", "show", "eth0"});
    REQUIRE(inside.is_ok());
    CHECK(inside.value().find("mtu 65535") != std::string::npos);
    CHECK(inside.value().find("UP") != std::string::npos);
    auto lo = run_command({"ip", "-n", ns, "-o", "link", "show", "lo"});
    REQUIRE(lo.is_ok());
    CHECK(lo.value().find("UP") != std::string::npos);
    CHECK(ping("", n.address(0)) == 0);
    CHECK(ping(ns, n.host_address()) == 0);
    // A full-size frame crosses without fragmenting (-M do: refuse to).
    CHECK(run_command({"ping", "-c1", "-W2", "-M", "do", "-s", "65000", n.address(0)}).is_ok());
  }
  CHECK_FALSE(exists(netns::namespace_path(ns)));
  CHECK(gone_soon("/sys/class/net/" + link));
}

TEST_CASE("a bridge with the host attached: every member and the host reach each other") {
  const std::string a = "nst-br-" + tag() + "-0", b = "nst-br-" + tag() + "-1";
  const std::string link = "nsb" + tag() + "h";
  std::string sw;
  {
    netns::NetworkSpec spec;
    spec.namespaces = {a, b};
    spec.attach_host = true;
    spec.host_link = link;
    spec.subnet = subnet(2);
    auto net = netns::Network::create(spec);
    INFO(net.status().message());
    REQUIRE(net.is_ok());
    const netns::Network& n = *net.value();
    sw = a + "-sw";
    CHECK(exists(netns::namespace_path(sw)));
    CHECK(n.host_address() == netns::ipv4_string(spec.subnet + 1));
    CHECK(n.address(1) == netns::ipv4_string(spec.subnet + 3));
    CHECK(ping("", n.address(0)) == 0);
    CHECK(ping("", n.address(1)) == 0);
    CHECK(ping(a, n.host_address()) == 0);
    CHECK(ping(b, n.host_address()) == 0);
    CHECK(ping(a, n.address(1)) == 0);
    CHECK(ping(b, n.address(0)) == 0);
  }
  for (const std::string& ns : {a, b, sw}) CHECK_FALSE(exists(netns::namespace_path(ns)));
  CHECK(gone_soon("/sys/class/net/" + link));
}

TEST_CASE("specs and names that cannot be made are refused, leaving nothing behind") {
  netns::NetworkSpec good;
  good.namespaces = {"nst-bad-" + tag()};
  good.attach_host = true;
  good.host_link = "nst" + tag() + "x";
  good.subnet = subnet(3);

  netns::NetworkSpec s = good;
  s.namespaces.clear();
  CHECK(netns::Network::create(s).status().code() == EINVAL);
  s = good;
  s.host_link = "a-name-too-long-for-linux";
  CHECK(netns::Network::create(s).status().code() == EINVAL);
  s = good;
  s.subnet += 4;
  CHECK(netns::Network::create(s).status().code() == EINVAL);
  s = good;
  s.namespaces = {"nst-dup-" + tag(), "nst-dup-" + tag()};
  CHECK(netns::Network::create(s).status().code() == EINVAL);
  s = good;
  s.namespaces = {"a/b"};
  CHECK(netns::Network::create(s).status().code() == EINVAL);

  // A taken namespace name: refused, naming it; the one made before it is removed; the
  // taken one (not the Network's) stays.
  const std::string taken = "nst-taken-" + tag(), first = "nst-first-" + tag();
  REQUIRE(netns::create_namespace(taken).is_ok());
  s = good;
  s.namespaces = {first, taken};
  s.attach_host = false;
  auto r = netns::Network::create(s);
  CHECK(r.status().code() == EEXIST);
  CHECK(r.status().message().find(taken) != std::string::npos);
  CHECK_FALSE(exists(netns::namespace_path(first)));
  CHECK_FALSE(exists(netns::namespace_path(first + "-sw")));
  CHECK(exists(netns::namespace_path(taken)));
  CHECK(netns::delete_namespace(taken).is_ok());
  CHECK(netns::delete_namespace(taken).code() == ENOENT);

  // A taken interface name on the host: the namespace made for it goes again.
  s = good;
  s.host_link = "lo";
  r = netns::Network::create(s);
  CHECK(r.status().code() == EEXIST);
  CHECK(r.status().message().find("lo") != std::string::npos);
  CHECK_FALSE(exists(netns::namespace_path(good.namespaces[0])));

  CHECK(netns::enter_namespace("nst-none-" + tag()).code() == ENOENT);
  CHECK(netns::delete_link("nst" + tag() + "z").code() == ENODEV);
}
