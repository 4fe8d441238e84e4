// The memory node's protocol over real FIT connections: lines round trip, never-written
// lines read as zeros, one process cannot touch another's space, capacity gives ENOMEM
// and the node keeps serving, malformed requests are refused, idle spaces expire.
#include <catch2/catch.hpp>

#include <cstring>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "lego/memory_node.h"
#include "tests/libfit/cluster_fixture.h"

using namespace lego;
using namespace lego::mem;

namespace {

struct Rig {
  std::unique_ptr<MemoryNode> memory;
  std::unique_ptr<fit::Node> server, client;

  explicit Rig(MemoryNodeOptions options = {}) {
    auto c = testing::make_cluster(2, "tcp");
    memory = std::make_unique<MemoryNode>(options);
    auto s = fit::Node::create(c, 2);
    REQUIRE(s.is_ok());
    server = std::move(s.value());
    memory->serve(*server);
    REQUIRE(server->start().is_ok());
    auto cl = fit::Node::create(c, 1);
    REQUIRE(cl.is_ok());
    client = std::move(cl.value());
  }

  Result<size_t> call(uint16_t op, const std::vector<std::byte>& req, std::vector<std::byte>& rep) {
    return client->send_reply(2, op, req, rep);
  }

  SpaceHandle open() {
    OpenRequest r{};
    r.version = kProtoVersion;
    r.pid = 42;
    strcpy(r.program, "test");
    std::vector<std::byte> req(sizeof(r)), rep(sizeof(OpenReply));
    memcpy(req.data(), &r, sizeof(r));
    auto res = call(kOpen, req, rep);
    REQUIRE(res.is_ok());
    OpenReply out;
    memcpy(&out, rep.data(), sizeof(out));
    REQUIRE(out.line_bytes == kLineBytes);
    return out.handle;
  }

  Result<size_t> write(const SpaceHandle& h, const std::vector<uint64_t>& addrs,
                       const std::vector<std::vector<std::byte>>& lines) {
    WriteBackRequest r{};
    r.handle = h;
    r.count = static_cast<uint32_t>(addrs.size());
    std::vector<std::byte> req(sizeof(r) + addrs.size() * (8 + kLineBytes));
    memcpy(req.data(), &r, sizeof(r));
    memcpy(req.data() + sizeof(r), addrs.data(), addrs.size() * 8);
    for (size_t i = 0; i < lines.size(); i++) {
      memcpy(req.data() + sizeof(r) + addrs.size() * 8 + i * kLineBytes, lines[i].data(),
             kLineBytes);
    }
    std::vector<std::byte> rep(8);
    return call(kWriteBack, req, rep);
  }

  // Returns each line's content (zeros where not stored).
  Result<std::vector<std::vector<std::byte>>> fetch(const SpaceHandle& h,
                                                    const std::vector<uint64_t>& addrs) {
    FetchRequest r{};
    r.handle = h;
    r.count = static_cast<uint32_t>(addrs.size());
    std::vector<std::byte> req(sizeof(r) + addrs.size() * 8);
    memcpy(req.data(), &r, sizeof(r));
    memcpy(req.data() + sizeof(r), addrs.data(), addrs.size() * 8);
    std::vector<std::byte> rep(sizeof(FetchReply) + addrs.size() * kLineBytes);
    auto res = call(kFetch, req, rep);
    if (!res) return res.status();
    if (addrs.size() == 1) {
      // One line: no header; the line, or nothing when never stored.
      REQUIRE((res.value() == 0 || res.value() == kLineBytes));
      std::vector<std::byte> line(kLineBytes);
      if (res.value() == kLineBytes) memcpy(line.data(), rep.data(), kLineBytes);
      return std::vector<std::vector<std::byte>>{line};
    }
    FetchReply out;
    memcpy(&out, rep.data(), sizeof(out));
    std::vector<std::vector<std::byte>> lines;
    size_t off = sizeof(out);
    for (size_t i = 0; i < addrs.size(); i++) {
      std::vector<std::byte> line(kLineBytes);
      if (out.stored_mask & (1ull << i)) {
        memcpy(line.data(), rep.data() + off, kLineBytes);
        off += kLineBytes;
      }
      lines.push_back(line);
    }
    REQUIRE(off == res.value());
    return lines;
  }
};

std::vector<std::byte> pattern(uint8_t seed) {
  std::vector<std::byte> line(kLineBytes);
  for (size_t i = 0; i < kLineBytes; i++) line[i] = std::byte(static_cast<uint8_t>(seed + i * 13));
  return line;
}

}  // namespace

TEST_CASE("lines round trip and unwritten lines read as zeros", "[memd]") {
  Rig rig;
  SpaceHandle h = rig.open();
  auto zeros = rig.fetch(h, {0x10000, 0x20000});
  REQUIRE(zeros.is_ok());
  for (auto& l : zeros.value()) REQUIRE(l == std::vector<std::byte>(kLineBytes));

  REQUIRE(rig.write(h, {0x10000, 0x30000}, {pattern(1), pattern(2)}).is_ok());
  auto got = rig.fetch(h, {0x30000, 0x20000, 0x10000});
  REQUIRE(got.is_ok());
  CHECK(got.value()[0] == pattern(2));
  CHECK(got.value()[1] == std::vector<std::byte>(kLineBytes));
  CHECK(got.value()[2] == pattern(1));
  CHECK(rig.memory->stats().lines_stored == 2);

  // An all-zero write-back frees the line.
  REQUIRE(rig.write(h, {0x10000}, {std::vector<std::byte>(kLineBytes)}).is_ok());
  CHECK(rig.memory->stats().lines_stored == 1);
}

TEST_CASE("one process cannot read or write another's space", "[memd][isolation]") {
  Rig rig;
  SpaceHandle a = rig.open();
  SpaceHandle b = rig.open();
  REQUIRE(rig.write(a, {0x1000}, {pattern(7)}).is_ok());
  SpaceHandle forged = b;
  forged.id = a.id;  // b's secret, a's id
  auto r = rig.fetch(forged, {0x1000});
  REQUIRE(r.status().code() == EACCES);
  REQUIRE(rig.write(forged, {0x1000}, {pattern(9)}).status().code() == EACCES);
  auto mine = rig.fetch(a, {0x1000});
  REQUIRE(mine.is_ok());
  CHECK(mine.value()[0] == pattern(7));
  auto theirs = rig.fetch(b, {0x1000});
  REQUIRE(theirs.is_ok());
  CHECK(theirs.value()[0] == std::vector<std::byte>(kLineBytes));
}

TEST_CASE("a full memory node answers ENOMEM and keeps serving", "[memd][capacity]") {
  MemoryNodeOptions o;
  o.capacity_bytes = 4 * kLineBytes;
  Rig rig(o);
  SpaceHandle h = rig.open();
  REQUIRE(
      rig.write(h, {0x0, 0x1000, 0x2000, 0x3000}, {pattern(1), pattern(2), pattern(3), pattern(4)})
          .is_ok());
  auto full = rig.write(h, {0x4000}, {pattern(5)});
  REQUIRE(full.status().code() == ENOMEM);
  CHECK_THAT(full.status().message(), Catch::Contains("full"));
  // Overwriting an existing line needs no new space; releasing frees some.
  REQUIRE(rig.write(h, {0x0}, {pattern(9)}).is_ok());
  ReleaseRequest rel{h, 0x1000, 0x2000};
  std::vector<std::byte> req(sizeof(rel)), rep(8);
  memcpy(req.data(), &rel, sizeof(rel));
  REQUIRE(rig.call(kRelease, req, rep).is_ok());
  REQUIRE(rig.write(h, {0x4000}, {pattern(5)}).is_ok());
  auto got = rig.fetch(h, {0x0, 0x1000, 0x4000});
  REQUIRE(got.is_ok());
  CHECK(got.value()[0] == pattern(9));
  CHECK(got.value()[1] == std::vector<std::byte>(kLineBytes));
  CHECK(got.value()[2] == pattern(5));
}

TEST_CASE("malformed requests are refused with an errno", "[memd][hostile]") {
  Rig rig;
  SpaceHandle h = rig.open();
  std::vector<std::byte> rep(64 * 1024);
  SECTION("short open") {
    std::vector<std::byte> req(3);
    CHECK(rig.call(kOpen, req, rep).status().code() == EPROTO);
  }
  SECTION("wrong protocol version") {
    OpenRequest r{};
    r.version = 99;
    std::vector<std::byte> req(sizeof(r));
    memcpy(req.data(), &r, sizeof(r));
    CHECK(rig.call(kOpen, req, rep).status().code() == EPROTONOSUPPORT);
  }
  SECTION("fetch count larger than the addresses sent") {
    FetchRequest r{h, 5, 0};
    std::vector<std::byte> req(sizeof(r) + 8);
    memcpy(req.data(), &r, sizeof(r));
    CHECK(rig.call(kFetch, req, rep).status().code() == EPROTO);
  }
  SECTION("fetch count above the batch limit") {
    FetchRequest r{h, kMaxBatch + 1, 0};
    std::vector<std::byte> req(sizeof(r) + (kMaxBatch + 1) * 8);
    memcpy(req.data(), &r, sizeof(r));
    CHECK(rig.call(kFetch, req, rep).status().code() == EPROTO);
  }
  SECTION("unaligned addresses") {
    CHECK(rig.fetch(h, {0x1001}).status().code() == EINVAL);
    CHECK(rig.write(h, {0x1001}, {pattern(1)}).status().code() == EINVAL);
  }
  SECTION("write-back shorter than its count says") {
    WriteBackRequest r{h, 2, 0};
    std::vector<std::byte> req(sizeof(r) + 16 + kLineBytes);
    memcpy(req.data(), &r, sizeof(r));
    CHECK(rig.call(kWriteBack, req, rep).status().code() == EPROTO);
  }
  SECTION("release that wraps around") {
    ReleaseRequest rel{h, ~uint64_t{0} & ~uint64_t{4095}, 0x2000};
    std::vector<std::byte> req(sizeof(rel));
    memcpy(req.data(), &rel, sizeof(rel));
    CHECK(rig.call(kRelease, req, rep).status().code() == EINVAL);
  }
  // Still serving.
  CHECK(rig.fetch(h, {0x0}).is_ok());
}

TEST_CASE("an idle space expires and a heartbeat keeps it", "[memd][lease]") {
  MemoryNodeOptions o;
  o.lease = std::chrono::milliseconds(300);
  Rig rig(o);
  SpaceHandle idle = rig.open();
  SpaceHandle alive = rig.open();
  REQUIRE(rig.write(idle, {0x0}, {pattern(1)}).is_ok());
  for (int i = 0; i < 6; i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    SpaceRequest hb{alive};
    std::vector<std::byte> req(sizeof(hb)), rep(8);
    memcpy(req.data(), &hb, sizeof(hb));
    REQUIRE(rig.call(kHeartbeat, req, rep).is_ok());
    rig.memory->expire_idle();
  }
  CHECK(rig.fetch(idle, {0x0}).status().code() == EACCES);
  CHECK(rig.fetch(alive, {0x0}).is_ok());
  CHECK(rig.memory->stats().spaces_expired == 1);
  CHECK(rig.memory->stats().lines_stored == 0);
}

TEST_CASE("reservations are bounded by capacity and freed with the space", "[memd][capacity]") {
  MemoryNodeOptions o;
  o.capacity_bytes = 1 << 20;
  Rig rig(o);
  SpaceHandle a = rig.open();
  SpaceHandle b = rig.open();
  auto reserve = [&](const SpaceHandle& h, int64_t delta) {
    ReserveRequest r{h, delta};
    std::vector<std::byte> req(sizeof(r)), rep(8);
    memcpy(req.data(), &r, sizeof(r));
    return rig.call(kReserve, req, rep).status();
  };
  REQUIRE(reserve(a, 768 << 10).is_ok());
  Status full = reserve(b, 512 << 10);
  REQUIRE(full.code() == ENOMEM);
  CHECK_THAT(full.message(), Catch::Contains("full"));
  REQUIRE(reserve(b, 256 << 10).is_ok());
  CHECK(rig.memory->stats().bytes_reserved == 1 << 20);
  REQUIRE(reserve(a, -(512 << 10)).is_ok());
  REQUIRE(reserve(b, 512 << 10).is_ok());
  // Closing a space returns its promise.
  SpaceRequest close{b};
  std::vector<std::byte> req(sizeof(close)), rep(8);
  memcpy(req.data(), &close, sizeof(close));
  REQUIRE(rig.call(kClose, req, rep).is_ok());
  CHECK(rig.memory->stats().bytes_reserved == 256 << 10);
}

TEST_CASE("fork copies a space; the copy and the original then diverge", "[memd][fork]") {
  MemoryNodeOptions opt;
  opt.capacity_bytes = 64 * kLineBytes;
  Rig rig(opt);
  SpaceHandle parent = rig.open();
  REQUIRE(rig.write(parent, {0x1000, 0x2000}, {pattern(1), pattern(2)}).is_ok());

  auto fork = [&](const SpaceHandle& h) -> Result<SpaceHandle> {
    std::vector<std::byte> req(sizeof(SpaceRequest)), rep(sizeof(OpenReply));
    SpaceRequest r{h};
    memcpy(req.data(), &r, sizeof(r));
    auto res = rig.call(kFork, req, rep);
    if (!res) return res.status();
    OpenReply out;
    memcpy(&out, rep.data(), sizeof(out));
    return out.handle;
  };
  auto child = fork(parent);
  REQUIRE(child.is_ok());
  CHECK(child.value().id != parent.id);
  CHECK(rig.memory->stats().lines_stored == 4);

  // Each side's writes stay its own.
  REQUIRE(rig.write(parent, {0x1000}, {pattern(9)}).is_ok());
  REQUIRE(rig.write(child.value(), {0x2000, 0x3000}, {pattern(8), pattern(7)}).is_ok());
  auto p = rig.fetch(parent, {0x1000, 0x2000, 0x3000});
  auto c = rig.fetch(child.value(), {0x1000, 0x2000, 0x3000});
  REQUIRE(p.is_ok());
  REQUIRE(c.is_ok());
  CHECK(p.value()[0] == pattern(9));
  CHECK(p.value()[1] == pattern(2));
  CHECK(p.value()[2] == std::vector<std::byte>(kLineBytes));
  CHECK(c.value()[0] == pattern(1));
  CHECK(c.value()[1] == pattern(8));
  CHECK(c.value()[2] == pattern(7));

  // A forged handle cannot fork someone's space.
  SpaceHandle forged = parent;
  forged.secret[0] ^= 1;
  CHECK(fork(forged).status().code() == EACCES);

  // The copy needs the parent's promise again: a node that cannot give it says ENOMEM.
  ReserveRequest rr{parent, int64_t{40} * kLineBytes};
  std::vector<std::byte> req(sizeof(rr)), rep(8);
  memcpy(req.data(), &rr, sizeof(rr));
  REQUIRE(rig.call(kReserve, req, rep).is_ok());
  CHECK(fork(parent).status().code() == ENOMEM);
  CHECK(rig.memory->stats().spaces_open == 2);
}
