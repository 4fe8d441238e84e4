// The memory node's leases measure the client, not the server: a space whose process
// kept using it survives a stall of the memory node's server thread (a handler that
// blocks longer than the lease; lego-memd stopped with SIGSTOP), while a space whose
// process really stopped still expires. Guards issue 17: a peer that held lego-memd's
// server thread made it free running programs' memory ("no request for 20000 ms").
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "lego/memory_node.h"
#include "tests/libfit/cluster_fixture.h"

using namespace lego;
using namespace lego::mem;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr uint16_t kBlock = 0x7ff0;  // test only: the handler blocks this many ms

std::vector<std::byte> line_of(uint8_t v) {
  return std::vector<std::byte>(kLineBytes, std::byte{v});
}

// The memory-node calls a process makes, from client node `node`.
struct Process {
  fit::Node& node;

  template <typename T>
  Result<size_t> call(uint16_t op, const T& req, std::vector<std::byte>& rep,
                      const std::vector<std::byte>& tail = {}) {
    std::vector<std::byte> r(sizeof(T) + tail.size());
    memcpy(r.data(), &req, sizeof(T));
    if (!tail.empty()) memcpy(r.data() + sizeof(T), tail.data(), tail.size());
    return node.send_reply(2, op, r, rep);
  }
  SpaceHandle open() {
    OpenRequest r{};
    r.version = kProtoVersion;
    r.pid = 7;
    strcpy(r.program, "lease-test");
    std::vector<std::byte> rep(sizeof(OpenReply));
    auto res = call(kOpen, r, rep);
    INFO(res.status().message());
    REQUIRE(res.is_ok());
    OpenReply out;
    memcpy(&out, rep.data(), sizeof(out));
    // The tests' lines are in vRegion 0 of a region at 0.
    PlaceRequest place{out.handle, 0, 0, 0, 0};
    std::vector<std::byte> placed(sizeof(PlaceReply));
    REQUIRE(call(kPlace, place, placed).is_ok());
    return out.handle;
  }
  Status write(const SpaceHandle& h, uint64_t addr, const std::vector<std::byte>& line) {
    WriteBackRequest r{};
    r.handle = h;
    r.count = 1;
    r.version = 1;
    std::vector<std::byte> tail(sizeof(addr) + kLineBytes), rep(8);
    memcpy(tail.data(), &addr, sizeof(addr));
    memcpy(tail.data() + sizeof(addr), line.data(), kLineBytes);
    return call(kWriteBack, r, rep, tail).status();
  }
  // The line at addr (one-line fetch: its 4 KiB, or nothing for zeros).
  Result<std::vector<std::byte>> fetch(const SpaceHandle& h, uint64_t addr) {
    FetchRequest r{};
    r.handle = h;
    r.count = 1;
    std::vector<std::byte> tail(sizeof(addr)), rep(kLineBytes);
    memcpy(tail.data(), &addr, sizeof(addr));
    auto res = call(kFetch, r, rep, tail);
    if (!res) return res.status();
    if (res.value() == 0) return line_of(0);
    return rep;
  }
  Status heartbeat(const SpaceHandle& h) {
    SpaceRequest r{h};
    std::vector<std::byte> rep(8);
    return call(kHeartbeat, r, rep).status();
  }
};

// Calls `fn` every `period` on a thread of its own until destroyed.
struct Every {
  std::atomic<bool> stop{false};
  std::thread thread;
  Every(milliseconds period, std::function<void()> fn) {
    thread = std::thread([this, period, fn] {
      while (!stop) {
        fn();
        std::this_thread::sleep_for(period);
      }
    });
  }
  ~Every() {
    stop = true;
    thread.join();
  }
};

}  // namespace

TEST_CASE("a space in use survives a stalled server thread; an abandoned one expires",
          "[memd][lease]") {
  MemoryNodeOptions o;
  o.lease = milliseconds(500);
  MemoryNode memory(o);
  fit::ClusterConfig c = testing::make_cluster(3, "tcp");
  c.nodes[2].role = fit::Role::kProcessor;  // node 3: whoever stalls the server
  auto server = fit::Node::create(c, 2);
  REQUIRE(server.is_ok());
  memory.serve(*server.value());
  server.value()->handle(kBlock,
                         [](const fit::RpcContext&, std::span<const std::byte> req,
                            std::span<std::byte>) -> Result<size_t> {
                           uint32_t ms = 0;
                           memcpy(&ms, req.data(), std::min(req.size(), sizeof(ms)));
                           std::this_thread::sleep_for(milliseconds(ms));
                           return size_t{0};
                         });
  REQUIRE(server.value()->start().is_ok());
  auto client = fit::Node::create(c, 1);
  auto staller = fit::Node::create(c, 3);
  REQUIRE(client.is_ok());
  REQUIRE(staller.is_ok());
  Process p{*client.value()};
  SpaceHandle used = p.open();
  SpaceHandle abandoned = p.open();
  REQUIRE(p.write(used, 0x1000, line_of(0xaa)).is_ok());
  REQUIRE(p.write(abandoned, 0x1000, line_of(0xbb)).is_ok());

  {
    // lego-memd's expiry tick, faster; and the process using its space (heartbeats every
    // lease/4, as the runtime does), including while the server thread is stuck.
    Every tick(milliseconds(50), [&] { memory.expire_idle(); });
    Every beat(milliseconds(125), [&] { (void)p.heartbeat(used); });
    std::this_thread::sleep_for(milliseconds(200));
    uint32_t block = 1500;  // three leases
    std::vector<std::byte> req(sizeof(block)), rep(8);
    memcpy(req.data(), &block, sizeof(block));
    REQUIRE(staller.value()->send_reply(2, kBlock, req, rep).is_ok());
    // Three leases of wall time went by, but the server served for ~300 ms of them (the
    // 200 ms before the stall, and the first 100 ms of it): nothing expired yet.
    CHECK(memory.stats().spaces_expired == 0);
    // The abandoned space expires once the server has served for a lease since it was
    // last used.
    auto t0 = Clock::now();
    while (memory.stats().spaces_expired == 0 && Clock::now() - t0 < milliseconds(3000)) {
      std::this_thread::sleep_for(milliseconds(20));
    }
  }
  auto s = memory.stats();
  CHECK(s.spaces_expired == 1);
  auto kept = p.fetch(used, 0x1000);
  INFO(kept.status().message());
  REQUIRE(kept.is_ok());
  CHECK(kept.value() == line_of(0xaa));
  CHECK(p.fetch(abandoned, 0x1000).status().code() == EACCES);
}

namespace {

std::string runfile(const std::string& path) {
  const char* srcdir = getenv("TEST_SRCDIR");
  return (srcdir ? std::string(srcdir) + "/lego/" : std::string()) + path;
}

// lego-memd on node 2 of `config`, with --lease-ms `lease_ms`; killed on destruction.
struct Memd {
  pid_t pid = -1;
  Memd(const std::string& config, int lease_ms) {
    int p[2];
    REQUIRE(pipe(p) == 0);
    std::string bin = runfile("daemons/memory/lego-memd");
    std::string ready = std::to_string(p[1]), lease = std::to_string(lease_ms);
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      close(p[0]);
      execl(bin.c_str(), bin.c_str(), "--config", config.c_str(), "--node", "2", "--lease-ms",
            lease.c_str(), "--ready-fd", ready.c_str(), nullptr);
      _exit(127);
    }
    close(p[1]);
    pollfd pfd{p[0], POLLIN, 0};
    char buf[8];
    bool up = poll(&pfd, 1, 20000) == 1 && read(p[0], buf, sizeof buf) > 0;
    close(p[0]);
    REQUIRE(up);
  }
  ~Memd() {
    kill(pid, SIGCONT);
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
};

// A counter from the memory node's status text (kStatus, what --status prints).
uint64_t status_value(fit::Node& n, const std::string& name) {
  std::vector<std::byte> rep(65536);
  auto r = n.send_reply(2, kStatus, {}, rep);
  REQUIRE(r.is_ok());
  std::istringstream in(std::string(reinterpret_cast<char*>(rep.data()), r.value()));
  std::string key, rest;
  while (in >> key && std::getline(in, rest)) {
    if (key == name) return std::stoull(rest);
  }
  FAIL("no " << name << " in the status text");
  return 0;
}

}  // namespace

TEST_CASE("lego-memd stopped for longer than the lease keeps the spaces in use", "[memd][lease]") {
  fit::ClusterConfig c = testing::make_cluster(2, "tcp");
  const std::string path = testing::write_cluster_file(c, "lease-test");
  Memd memd(path, 1000);
  auto client = fit::Node::create(c, 1);
  REQUIRE(client.is_ok());
  Process p{*client.value()};
  SpaceHandle h = p.open();
  REQUIRE(p.write(h, 0x2000, line_of(0xcd)).is_ok());
  for (int i = 0; i < 3; i++) {
    std::this_thread::sleep_for(milliseconds(100));
    REQUIRE(p.heartbeat(h).is_ok());
  }
  // Stopped for three leases: nothing the process sends can be heard meanwhile.
  REQUIRE(kill(memd.pid, SIGSTOP) == 0);
  std::this_thread::sleep_for(milliseconds(3000));
  REQUIRE(kill(memd.pid, SIGCONT) == 0);
  // Its expiry tick (every 200 ms) has run since it was resumed.
  std::this_thread::sleep_for(milliseconds(450));
  auto kept = p.fetch(h, 0x2000);
  INFO(kept.status().message());
  REQUIRE(kept.is_ok());
  CHECK(kept.value() == line_of(0xcd));
  CHECK(status_value(*client.value(), "spaces_expired") == 0);
  CHECK(status_value(*client.value(), "server_stalls") >= 1);
  // The process stops for real: its space goes a lease later (status requests touch no space).
  auto t0 = Clock::now();
  while (status_value(*client.value(), "spaces_open") != 0 &&
         Clock::now() - t0 < milliseconds(5000)) {
    std::this_thread::sleep_for(milliseconds(50));
  }
  CHECK(status_value(*client.value(), "spaces_open") == 0);
  CHECK(status_value(*client.value(), "spaces_expired") == 1);
  CHECK(Clock::now() - t0 >= milliseconds(400));
}
