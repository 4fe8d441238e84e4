// Description: libfit between two processes, the same cases for every provider that
// connects nodes over a network: send_reply (sync, both progress modes; async; several
// channels from several threads), one-sided reads and writes of a region the peer
// registered (checked on the peer's side too), a one-sided op with a wrong key, a node
// with the wrong cluster key, and a peer that dies mid-call. The peer is fit_test_peer.
//
// Which providers and where: LEGO_FIT_PROVIDERS (comma-separated, default "tcp,ofi_tcp":
// what this machine can run) and LEGO_FIT_ADDRESSES ("CLIENT,SERVER", default both
// 127.0.0.1). The verbs stage of tests/verbs/verbs_guest_test.sh runs this binary in a
// booted guest with soft-RoCE: LEGO_FIT_PROVIDERS=verbs and the two rxe devices'
// addresses, so verbs runs exactly the cases tcp and ofi_tcp pass here.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "lego/units.h"
#include "tests/libfit/cluster_fixture.h"
#include "tests/libfit/test_opcodes.h"
#include "tests/support.h"

using namespace lego;
using namespace lego::fit;
using lego::testing::as_bytes;
using Clock = std::chrono::steady_clock;

namespace {

std::string env_or(const char* name, const char* fallback) {
  const char* v = getenv(name);
  return v != nullptr && *v != '\0' ? v : fallback;
}

std::vector<std::string> providers() {
  return lego::split_list(env_or("LEGO_FIT_PROVIDERS", "tcp,ofi_tcp"));
}

std::pair<std::string, std::string> addresses() {
  auto a = lego::split_list(env_or("LEGO_FIT_ADDRESSES", "127.0.0.1,127.0.0.1"));
  if (a.size() != 2) FAIL("LEGO_FIT_ADDRESSES must be CLIENT,SERVER");
  return {a[0], a[1]};
}

// Node 1 (client) and node 2 (fit_test_peer) at the configured addresses.
ClusterConfig cluster(const std::string& provider, Progress progress) {
  auto [client, server] = addresses();
  ClusterConfig c = testing::make_cluster(2, provider, progress, client);
  c.nodes[1].address = server;
  // Generous: an emulated guest is slow, and the cases that need a failure do not wait
  // for a timeout.
  c.timeout = std::chrono::milliseconds(20000);
  return c;
}

// The first line read from fd (without its newline), or what came before EOF.
std::string read_line(int fd) {
  std::string line;
  char ch;
  while (read(fd, &ch, 1) == 1 && ch != '\n') line += ch;
  return line;
}

// A fit_test_peer process serving node 2; killed on destruction.
struct Peer {
  pid_t pid = -1;
  std::string config;
  explicit Peer(const ClusterConfig& c) {
    config = testing::write_cluster_file(c, "fit-provider-e2e");
    std::string bin = testing::runfile("tests/libfit/fit_test_peer");
    int out[2];
    REQUIRE(pipe(out) == 0);
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      dup2(out[1], 1);
      close(out[0]);
      execl(bin.c_str(), bin.c_str(), config.c_str(), "2", nullptr);
      _exit(127);
    }
    close(out[1]);
    // "ready" once it serves (and its region is registered).
    std::string said = read_line(out[0]);
    close(out[0]);
    INFO("fit_test_peer said: " << said);
    REQUIRE(said == "ready");
  }
  ~Peer() {
    kill_now();
    unlink(config.c_str());
  }
  void kill_now() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      pid = -1;
    }
  }
};

std::string text(std::span<const std::byte> b, size_t n) {
  return std::string(reinterpret_cast<const char*>(b.data()), n);
}

std::unique_ptr<Node> client_node(const ClusterConfig& c) {
  auto n = Node::create(c, 1);
  INFO(n.status().message());
  REQUIRE(n.is_ok());
  return std::move(n.value());
}

RemoteRegion peer_region(Node& client) {
  RemoteRegion r;
  std::vector<std::byte> reply(sizeof(r));
  auto got = client.send_reply(2, testing::kRegion, {}, reply);
  INFO(got.status().message());
  REQUIRE(got.is_ok());
  REQUIRE(got.value() == sizeof(r));
  memcpy(&r, reply.data(), sizeof(r));
  REQUIRE(r.node == 2);
  REQUIRE(r.length == testing::kRegionBytes);
  return r;
}

// The peer's own view of its region's bytes [offset, offset+len).
std::vector<std::byte> peek(Node& client, uint64_t offset, uint32_t len) {
  std::byte req[12];
  memcpy(req, &offset, 8);
  memcpy(req + 8, &len, 4);
  std::vector<std::byte> reply(len);
  auto got = client.send_reply(2, testing::kPeek, req, reply);
  INFO(got.status().message());
  REQUIRE(got.is_ok());
  REQUIRE(got.value() == len);
  return reply;
}

}  // namespace

TEST_CASE("send_reply between two processes carries every size, polling and blocking",
          "[provider][rpc]") {
  for (const std::string& provider : providers()) {
    for (Progress progress : {Progress::kPolling, Progress::kBlocking}) {
      SECTION(provider + "/" + progress_name(progress)) {
        ClusterConfig c = cluster(provider, progress);
        Peer peer(c);
        auto client = client_node(c);
        for (size_t size : {size_t{0}, size_t{1}, size_t{64}, size_t{4096}, size_t{100000}}) {
          std::string msg(size, 'x');
          for (size_t i = 0; i < size; i++) msg[i] = static_cast<char>('a' + i % 26);
          std::vector<std::byte> reply(size + 8);
          auto r = client->send_reply(2, testing::kEcho, as_bytes(msg), reply);
          INFO(provider << " " << size << " bytes: " << r.status().message());
          REQUIRE(r.is_ok());
          REQUIRE(text(reply, r.value()) == "2:" + msg);
        }
      }
    }
  }
}

TEST_CASE("async calls to another process complete, waited for in reverse order",
          "[provider][rpc]") {
  for (const std::string& provider : providers()) {
    SECTION(provider) {
      ClusterConfig c = cluster(provider, Progress::kPolling);
      Peer peer(c);
      auto client = client_node(c);
      constexpr int kN = Node::max_outstanding();
      std::vector<std::string> msgs;
      std::vector<std::vector<std::byte>> replies(kN, std::vector<std::byte>(4200));
      std::vector<RpcFuture> futures;
      for (int i = 0; i < kN; i++) msgs.push_back(std::string(4000, 'a' + i) + std::to_string(i));
      for (int i = 0; i < kN; i++) {
        futures.push_back(
            client->send_reply_async(2, testing::kEcho, as_bytes(msgs[i]), replies[i]));
      }
      for (int i = kN - 1; i >= 0; i--) {
        auto r = futures[i].wait();
        INFO(provider << " call " << i << ": " << r.status().message());
        REQUIRE(r.is_ok());
        REQUIRE(text(replies[i], r.value()) == "2:" + msgs[i]);
      }
    }
  }
}

TEST_CASE("several threads use the peer's channels at once", "[provider][rpc]") {
  for (const std::string& provider : providers()) {
    SECTION(provider) {
      ClusterConfig c = cluster(provider, Progress::kPolling);
      c.channels_per_peer = 3;
      Peer peer(c);
      auto client = client_node(c);
      REQUIRE(client->connect(2).is_ok());
      std::atomic<int> bad{0};
      std::string first_error;
      std::mutex mu;
      std::vector<std::thread> threads;
      for (int t = 0; t < 4; t++) {  // more threads than channels: some share one
        threads.emplace_back([&, t] {
          std::vector<std::byte> reply(256);
          for (int i = 0; i < 50; i++) {
            std::string msg = "t" + std::to_string(t) + "i" + std::to_string(i);
            auto r = client->send_reply(2, testing::kEcho, as_bytes(msg), reply);
            if (!r.is_ok() || text(reply, r.value()) != "2:" + msg) {
              std::lock_guard<std::mutex> g(mu);
              if (bad++ == 0) first_error = r.is_ok() ? "wrong reply" : r.status().message();
            }
          }
        });
      }
      for (auto& t : threads) t.join();
      INFO(first_error);
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("one-sided reads and writes reach the other process's registered memory",
          "[provider][rma]") {
  for (const std::string& provider : providers()) {
    SECTION(provider) {
      ClusterConfig c = cluster(provider, Progress::kPolling);
      Peer peer(c);
      auto client = client_node(c);
      RemoteRegion region = peer_region(*client);

      // Larger than a bounce buffer: several operations.
      std::vector<std::byte> got(300000);
      Status st = client->rma_read(region, 1000, got);
      INFO(st.message());
      REQUIRE(st.is_ok());
      for (size_t i = 0; i < got.size(); i++) REQUIRE(got[i] == testing::kRegionByte(i + 1000));

      std::vector<std::byte> put(200000);
      for (size_t i = 0; i < put.size(); i++) put[i] = std::byte(i % 251);
      st = client->rma_write(region, 4096, put);
      INFO(st.message());
      REQUIRE(st.is_ok());
      // The owner sees the bytes (its memory, through its own eyes), and so does a read.
      auto seen = peek(*client, 4096, 4096);
      CHECK(memcmp(seen.data(), put.data(), seen.size()) == 0);
      seen = peek(*client, 4096 + put.size() - 4096, 4096);
      CHECK(memcmp(seen.data(), put.data() + put.size() - 4096, seen.size()) == 0);
      std::vector<std::byte> back(put.size());
      REQUIRE(client->rma_read(region, 4096, back).is_ok());
      CHECK(back == put);
      // Around the write, the peer's bytes are untouched.
      auto edge = peek(*client, 4095, 1);
      CHECK(edge[0] == testing::kRegionByte(4095));
      edge = peek(*client, 4096 + put.size(), 1);
      CHECK(edge[0] == testing::kRegionByte(4096 + put.size()));

      std::vector<std::byte> outside(16);
      CHECK(client->rma_read(region, region.length - 8, outside).code() == EINVAL);
      CHECK(client->stats().rma_reads == 2);
      CHECK(client->stats().rma_writes == 1);
    }
  }
}

// A one-sided op with a key the peer never handed out must fail (not read or write
// anything, not hang), and the node must go on working: on an RDMA NIC the failed op
// breaks the queue pair, and libfabric's tcp provider closes the connection, so libfit
// has to connect again for the next call instead of failing it too. The error is EACCES
// where the provider says why (tcp: libfit's server; verbs: a remote access error);
// libfabric's tcp provider only closes the connection, which libfit reports as EIO.
TEST_CASE("a one-sided op with a wrong key fails, and the node goes on working",
          "[provider][rma][auth]") {
  for (const std::string& provider : providers()) {
    SECTION(provider) {
      const int refused = provider == "ofi_tcp" ? EIO : EACCES;
      ClusterConfig c = cluster(provider, Progress::kPolling);
      Peer peer(c);
      auto client = client_node(c);
      RemoteRegion region = peer_region(*client);
      RemoteRegion forged = region;
      forged.key ^= 0x5a5a;
      std::vector<std::byte> buf(4096, std::byte{0xee});
      auto t0 = Clock::now();
      Status rd = client->rma_read(forged, 0, buf);
      INFO("read: " << rd.message());
      CHECK(rd.code() == refused);
      Status wr = client->rma_write(forged, 0, buf);
      INFO("write: " << wr.message());
      CHECK(wr.code() == refused);
      CHECK(Clock::now() - t0 < c.timeout);  // refused, not timed out (20 s each)
      // Nothing was written.
      auto seen = peek(*client, 0, 4096);
      for (size_t i = 0; i < seen.size(); i++) REQUIRE(seen[i] == testing::kRegionByte(i));
      // The right key still works, and so do calls.
      std::vector<std::byte> got(4096);
      Status ok = client->rma_read(region, 0, got);
      INFO(ok.message());
      REQUIRE(ok.is_ok());
      CHECK(got == seen);
      std::vector<std::byte> reply(32);
      auto r = client->send_reply(2, testing::kEcho, as_bytes("after"), reply);
      INFO(r.status().message());
      REQUIRE(r.is_ok());
      CHECK(text(reply, r.value()) == "2:after");
    }
  }
}

TEST_CASE("a node with another cluster key is refused by a peer process", "[provider][auth]") {
  for (const std::string& provider : providers()) {
    SECTION(provider) {
      ClusterConfig c = cluster(provider, Progress::kPolling);
      Peer peer(c);
      ClusterConfig wrong = c;
      wrong.key[3] ^= 0x10;
      auto intruder = client_node(wrong);
      std::vector<std::byte> reply(32);
      auto r = intruder->send_reply(2, testing::kEcho, as_bytes("x"), reply);
      INFO(r.status().message());
      CHECK(r.status().code() == EACCES);
      // The peer serves its own cluster as before.
      auto client = client_node(c);
      auto ok = client->send_reply(2, testing::kEcho, as_bytes("x"), reply);
      INFO(ok.status().message());
      REQUIRE(ok.is_ok());
      CHECK(text(reply, ok.value()) == "2:x");
    }
  }
}

TEST_CASE("a peer that dies mid-call gives ECONNRESET at once, then ECONNREFUSED",
          "[provider][rpc]") {
  for (const std::string& provider : providers()) {
    for (Progress progress : {Progress::kPolling, Progress::kBlocking}) {
      SECTION(provider + "/" + progress_name(progress)) {
        ClusterConfig c = cluster(provider, progress);
        Peer peer(c);
        auto client = client_node(c);
        std::vector<std::byte> reply(32);
        REQUIRE(client->send_reply(2, testing::kEcho, as_bytes("up"), reply).is_ok());
        std::thread killer([&] {
          std::this_thread::sleep_for(std::chrono::milliseconds(500));
          peer.kill_now();
        });
        uint32_t ms = 60000;
        auto t0 = Clock::now();
        auto r = client->send_reply(2, testing::kSleep,
                                    {reinterpret_cast<const std::byte*>(&ms), sizeof(ms)}, reply);
        killer.join();
        auto took = Clock::now() - t0;
        INFO(r.status().message());
        CHECK(r.status().code() == ECONNRESET);
        // Noticed through the connection, not by waiting out the call's timeout (20 s):
        // in an emulated guest on a busy host the disconnect alone took up to 12 s.
        CHECK(took < c.timeout);
        // Nobody listens there any more.
        auto again = client->send_reply(2, testing::kEcho, as_bytes("x"), reply);
        INFO(again.status().message());
        CHECK(again.status().code() == ECONNREFUSED);
      }
    }
  }
}
