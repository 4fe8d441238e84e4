// End to end: FIT nodes as separate processes. Over tcp each node sits in its own network
// namespace, joined by veth (as lego's nodes are "remote"); over shm they share a host.
// Guards: calls to several peers at once, a peer killed mid-call (ECONNRESET, not a hang
// or a timeout), a dead peer's port (ECONNREFUSED), a peer with another key (EACCES), and
// a stranger that sends garbage to the port (the server survives and serves others).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>

#include "lego/fit.h"
#include "tests/libfit/cluster_fixture.h"
#include "tests/libfit/test_opcodes.h"
#include "tests/netns/netns.h"
#include "tests/support.h"

using namespace lego;
using namespace lego::fit;
using lego::testing::as_bytes;
using Clock = std::chrono::steady_clock;

namespace {

// Bazel runs tests from the runfiles tree; the peer is a data dependency.
std::string peer_binary() {
  return lego::testing::runfile("tests/libfit/fit_test_peer");
}

std::string write_config(const ClusterConfig& c, const std::string& tag) {
  return lego::testing::write_cluster_file(c, "fit-e2e-" + tag);
}

// A fit_test_peer process; killed on destruction.
struct Peer {
  pid_t pid = -1;
  ~Peer() { kill_now(); }
  void kill_now() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      pid = -1;
    }
  }
};

// Starts fit_test_peer for `node` (in host `host` of topo, or here when topo is null) and
// waits until it serves.
void start_peer(Peer& p, testing::Topology* topo, int host, const std::string& config,
                NodeId node) {
  std::vector<std::string> argv{peer_binary(), config, std::to_string(node)};
  if (topo != nullptr) {
    auto pid = topo->spawn(host, argv);
    INFO(pid.status().message());
    REQUIRE(pid.is_ok());
    p.pid = pid.value();
  } else {
    p.pid = fork();
    REQUIRE(p.pid >= 0);
    if (p.pid == 0) {
      execl(argv[0].c_str(), argv[0].c_str(), argv[1].c_str(), argv[2].c_str(), nullptr);
      _exit(127);
    }
  }
  // Listening is quick; poll until the node refuses no more (or give up).
  REQUIRE(p.pid > 0);
}

Result<size_t> call_until_up(Node& n, NodeId peer, std::span<std::byte> reply) {
  auto deadline = Clock::now() + std::chrono::seconds(20);
  for (;;) {
    auto r = n.send_reply(peer, testing::kEcho, as_bytes("ping"), reply);
    if (r.is_ok() || Clock::now() > deadline ||
        (r.status().code() != ECONNREFUSED && r.status().code() != ETIMEDOUT)) {
      return r;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void enter(testing::Topology& topo, int host) {
  std::string path = "/var/run/netns/" + topo.name(host);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(setns(fd, CLONE_NEWNET) == 0);
  close(fd);
}

// Restores this thread's original network namespace when the test ends.
struct NamespaceGuard {
  int fd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
  ~NamespaceGuard() {
    setns(fd, CLONE_NEWNET);
    close(fd);
  }
};

ClusterConfig netns_cluster(testing::Topology& topo, Progress progress) {
  ClusterConfig c = testing::make_cluster(3, "tcp", progress);
  for (int i = 0; i < 3; i++) c.nodes[i].address = topo.address(i);
  return c;
}

std::string text(std::span<std::byte> b, size_t n) {
  return std::string(reinterpret_cast<const char*>(b.data()), n);
}

// Calls the peer's kSleep (15 s) and kills the peer 300 ms in. Returns the call's result;
// `took` is how long the call lasted (a dead peer must be noticed, not timed out).
Result<size_t> sleep_call_while_killed(Node& client, Peer& peer, std::span<std::byte> reply,
                                       Clock::duration* took) {
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    peer.kill_now();
  });
  uint32_t ms = 15000;
  auto t0 = Clock::now();
  auto r = client.send_reply(2, testing::kSleep,
                             {reinterpret_cast<const std::byte*>(&ms), sizeof(ms)}, reply);
  killer.join();
  *took = Clock::now() - t0;
  return r;
}

}  // namespace

TEST_CASE("tcp: three nodes in three namespaces call each other", "[e2e][netns]") {
  auto topo = testing::Topology::create(3, "fite2e");
  INFO(topo.status().message());
  REQUIRE(topo.is_ok());
  NamespaceGuard guard;
  for (Progress progress : {Progress::kPolling, Progress::kBlocking}) {
    ClusterConfig c = netns_cluster(*topo.value(), progress);
    std::string path = write_config(c, "three");
    Peer p2, p3;
    start_peer(p2, topo->get(), 1, path, 2);
    start_peer(p3, topo->get(), 2, path, 3);
    enter(*topo.value(), 0);
    auto client = Node::create(c, 1);
    REQUIRE(client.is_ok());
    std::vector<std::byte> reply(256);
    for (NodeId peer : {2u, 3u}) {
      auto r = call_until_up(*client.value(), peer, reply);
      INFO(r.status().message());
      REQUIRE(r.is_ok());
      CHECK(text(reply, r.value()) == std::to_string(peer) + ":ping");
    }
    // Several threads, both peers at once.
    std::atomic<int> bad{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; t++) {
      threads.emplace_back([&, t] {
        std::vector<std::byte> rep(256);
        for (int i = 0; i < 100; i++) {
          NodeId peer = 2 + (i + t) % 2;
          std::string msg = "t" + std::to_string(t) + "i" + std::to_string(i);
          auto r = client.value()->send_reply(peer, testing::kEcho, as_bytes(msg), rep);
          if (!r.is_ok() || text(rep, r.value()) != std::to_string(peer) + ":" + msg) bad++;
        }
      });
    }
    for (auto& t : threads) t.join();
    CHECK(bad == 0);
    unlink(path.c_str());
  }
}

TEST_CASE("tcp: a peer killed mid-call gives ECONNRESET, then ECONNREFUSED", "[e2e][netns]") {
  auto topo = testing::Topology::create(2, "fitkill");
  INFO(topo.status().message());
  REQUIRE(topo.is_ok());
  NamespaceGuard guard;
  ClusterConfig c = testing::make_cluster(2, "tcp");
  c.nodes[0].address = topo.value()->address(0);
  c.nodes[1].address = topo.value()->address(1);
  c.timeout = std::chrono::milliseconds(20000);
  std::string path = write_config(c, "kill");
  Peer p2;
  start_peer(p2, topo->get(), 1, path, 2);
  enter(*topo.value(), 0);
  auto client = Node::create(c, 1);
  REQUIRE(client.is_ok());
  std::vector<std::byte> reply(64);
  REQUIRE(call_until_up(*client.value(), 2, reply).is_ok());

  SECTION("killed by a signal while serving") {
    Clock::duration took;
    auto r = sleep_call_while_killed(*client.value(), p2, reply, &took);
    INFO(r.status().message());
    CHECK(r.status().code() == ECONNRESET);
    CHECK(took < std::chrono::seconds(10));  // noticed, not timed out
  }
  SECTION("exits inside the handler") {
    auto r = client.value()->send_reply(2, testing::kExit, as_bytes(""), reply);
    INFO(r.status().message());
    CHECK(r.status().code() == ECONNRESET);
    waitpid(p2.pid, nullptr, 0);
    p2.pid = -1;
  }
  // Nobody listens there any more.
  auto again = client.value()->send_reply(2, testing::kEcho, as_bytes("x"), reply);
  INFO(again.status().message());
  CHECK(again.status().code() == ECONNREFUSED);
  unlink(path.c_str());
}

TEST_CASE("tcp: a peer with another key is refused, and garbage does not hurt the server",
          "[e2e][netns][auth]") {
  auto topo = testing::Topology::create(2, "fitkey");
  INFO(topo.status().message());
  REQUIRE(topo.is_ok());
  NamespaceGuard guard;
  ClusterConfig c = testing::make_cluster(2, "tcp");
  c.nodes[0].address = topo.value()->address(0);
  c.nodes[1].address = topo.value()->address(1);
  std::string path = write_config(c, "key");
  Peer p2;
  start_peer(p2, topo->get(), 1, path, 2);
  enter(*topo.value(), 0);

  // A stranger: connects to the port, sends junk, goes away.
  for (int i = 0; i < 3; i++) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(c.nodes[1].port);
    inet_pton(AF_INET, c.nodes[1].address.c_str(), &a.sin_addr);
    auto deadline = Clock::now() + std::chrono::seconds(10);
    while (connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    std::string junk(1000, static_cast<char>(0x41 + i));
    (void)!write(s, junk.data(), junk.size());
    close(s);
  }

  ClusterConfig wrong = c;
  wrong.key[5] ^= 0x80;
  auto intruder = Node::create(wrong, 1);
  REQUIRE(intruder.is_ok());
  std::vector<std::byte> reply(64);
  auto r = call_until_up(*intruder.value(), 2, reply);
  INFO(r.status().message());
  CHECK(r.status().code() == EACCES);

  auto client = Node::create(c, 1);
  REQUIRE(client.is_ok());
  auto ok = call_until_up(*client.value(), 2, reply);
  INFO(ok.status().message());
  REQUIRE(ok.is_ok());
  CHECK(text(reply, ok.value()) == "2:ping");
  unlink(path.c_str());
}

TEST_CASE("shm: processes on one host call each other and notice a dead peer", "[e2e][shm]") {
  ClusterConfig c = testing::make_cluster(2, "shm");
  c.timeout = std::chrono::milliseconds(20000);
  std::string path = write_config(c, "shm");
  Peer p2;
  start_peer(p2, nullptr, 0, path, 2);
  auto client = Node::create(c, 1);
  REQUIRE(client.is_ok());
  std::vector<std::byte> reply(64);
  auto r = call_until_up(*client.value(), 2, reply);
  INFO(r.status().message());
  REQUIRE(r.is_ok());
  CHECK(text(reply, r.value()) == "2:ping");

  Clock::duration took;
  auto dead = sleep_call_while_killed(*client.value(), p2, reply, &took);
  INFO(dead.status().message());
  CHECK(dead.status().code() == ECONNRESET);
  CHECK(took < std::chrono::seconds(10));
  unlink(path.c_str());
}
