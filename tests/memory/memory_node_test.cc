// The memory node's protocol (v4) over real FIT connections: lines round trip, never-written
// lines read as zeros, one process cannot touch another's space, capacity is promised in
// vRegions (ENOMEM, and the node keeps serving), lines only in placed vRegions, malformed
// requests are refused, idle spaces expire, fork copies lines, versions and placements,
// kUsage and kListSpaces report what is held, one-sided reads of granted vRegion blocks. The
// copy rules are in copy_test.cc.
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

  explicit Rig(MemoryNodeOptions options = {}, const char* provider = "tcp") {
    auto c = testing::make_cluster(2, provider);
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

  ~Rig() { memory->stop(); }  // the copy worker calls through `server`: stopped first

  // Opens a space and (unless told not to) places vRegion 0 of a region at 0, where the
  // tests' lines are.
  SpaceHandle open(bool place_first = true) {
    OpenRequest r{};
    r.version = kProtoVersion;
    r.pid = 42;
    r.process_key = 0x1234;
    strcpy(r.program, "test");
    std::vector<std::byte> req(sizeof(r)), rep(sizeof(OpenReply));
    memcpy(req.data(), &r, sizeof(r));
    auto res = call(kOpen, req, rep);
    REQUIRE(res.is_ok());
    OpenReply out;
    memcpy(&out, rep.data(), sizeof(out));
    REQUIRE(out.line_bytes == kLineBytes);
    if (place_first) REQUIRE(place(out.handle, 0).is_ok());
    return out.handle;
  }

  Status place(const SpaceHandle& h, uint64_t vregion, uint32_t flags = 0, uint64_t base = 0,
               uint16_t op = kPlace) {
    PlaceRequest r{h, vregion, base, flags, 0};
    std::vector<std::byte> req(sizeof(r)), rep(sizeof(PlaceReply));
    memcpy(req.data(), &r, sizeof(r));
    auto res = call(op, req, rep);
    if (!res) return res.status();
    if (op == kUnplace) return Status();
    REQUIRE(res.value() == sizeof(PlaceReply));
    PlaceReply out;
    memcpy(&out, rep.data(), sizeof(out));
    if (out.error != 0) return Status(out.error, "placement refused");
    return Status();
  }

  // kPlace with kPlaceRma: the grant as a RemoteRegion of the vRegion's block.
  Result<fit::RemoteRegion> place_rma(const SpaceHandle& h, uint64_t vregion) {
    PlaceRequest r{h, vregion, 0, kPlaceRma, 0};
    std::vector<std::byte> req(sizeof(r)), rep(sizeof(PlaceReply));
    memcpy(req.data(), &r, sizeof(r));
    auto res = call(kPlace, req, rep);
    if (!res) return res.status();
    REQUIRE(res.value() == sizeof(PlaceReply));
    PlaceReply out;
    memcpy(&out, rep.data(), sizeof(out));
    if (out.error != 0) return Status(out.error, "placement refused");
    if (out.rma_granted != 1) return Status(ENOTSUP, "no grant");
    return fit::RemoteRegion{2, out.rma_key, out.rma_base, kVRegionBytes};
  }

  // Reads `lines` lines from line `first` of a granted block, one-sided.
  Result<std::vector<std::byte>> rma_read(const fit::RemoteRegion& g, uint64_t first,
                                          size_t lines) {
    std::vector<std::byte> out(lines * kLineBytes);
    Status st = client->rma_read(g, first * kLineBytes, out);
    if (!st) return st;
    return out;
  }

  Status release(const SpaceHandle& h, uint64_t addr, uint64_t length, uint64_t version) {
    ReleaseRequest rel{h, addr, length, version};
    std::vector<std::byte> req(sizeof(rel)), rep(8);
    memcpy(req.data(), &rel, sizeof(rel));
    return call(kRelease, req, rep).status();
  }

  uint64_t next_version = 1;

  Result<size_t> write(const SpaceHandle& h, const std::vector<uint64_t>& addrs,
                       const std::vector<std::vector<std::byte>>& lines, uint64_t version = 0) {
    WriteBackRequest r{};
    r.handle = h;
    r.count = static_cast<uint32_t>(addrs.size());
    r.version = version != 0 ? version : next_version++;
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

TEST_CASE("lines are stored only in placed vRegions; unplacing drops them", "[memd][place]") {
  Rig rig;
  SpaceHandle h = rig.open(/*place_first=*/false);
  // Nothing placed: a write-back is refused and stores nothing.
  auto refused = rig.write(h, {0x1000}, {pattern(1)});
  REQUIRE(refused.status().code() == EINVAL);
  CHECK_THAT(refused.status().message(), Catch::Contains("kPlace first"));
  REQUIRE(rig.place(h, 1).is_ok());
  REQUIRE(rig.place(h, 1).is_ok());  // again: a no-op (a retried call)
  CHECK(rig.memory->stats().bytes_reserved == kVRegionBytes);
  const uint64_t in1 = kVRegionBytes + 0x3000;
  // A batch with one line outside the placed vRegions stores none of them.
  REQUIRE(rig.write(h, {in1, 0x1000}, {pattern(2), pattern(3)}).status().code() == EINVAL);
  CHECK(rig.memory->stats().lines_stored == 0);
  REQUIRE(rig.write(h, {in1}, {pattern(2)}).is_ok());
  CHECK(rig.memory->stats().lines_stored == 1);
  // Another region base for the same space is refused.
  CHECK(rig.place(h, 2, 0, 64 * kVRegionBytes).code() == EINVAL);
  // An unaligned base, an index past the end.
  CHECK(rig.place(h, 2, 0, 4096).code() == EINVAL);
  CHECK(rig.place(h, kMaxVRegions).code() == EINVAL);
  REQUIRE(rig.place(h, 1, 0, 0, kUnplace).is_ok());
  CHECK(rig.memory->stats().lines_stored == 0);
  CHECK(rig.memory->stats().bytes_reserved == 0);
  CHECK(rig.write(h, {in1}, {pattern(2)}).status().code() == EINVAL);
  REQUIRE(rig.place(h, 1, 0, 0, kUnplace).is_ok());  // again: a no-op
}

TEST_CASE("a full memory node answers ENOMEM for a vRegion more and keeps serving",
          "[memd][capacity]") {
  MemoryNodeOptions o;
  o.capacity_bytes = 2 * kVRegionBytes + kVRegionBytes / 2;  // room for two vRegions
  Rig rig(o);
  SpaceHandle a = rig.open(false);
  SpaceHandle b = rig.open(false);
  REQUIRE(rig.place(a, 0).is_ok());
  REQUIRE(rig.place(b, 7).is_ok());
  Status full = rig.place(a, 1);
  REQUIRE(full.code() == ENOMEM);
  CHECK(rig.memory->stats().refused == 1);
  // Every line of a placed vRegion fits: the promise holds.
  std::vector<uint64_t> addrs;
  std::vector<std::vector<std::byte>> lines;
  for (uint64_t i = 0; i < kMaxBatch; i++) {
    addrs.push_back(i * kLineBytes);
    lines.push_back(pattern(static_cast<uint8_t>(i)));
  }
  for (uint64_t k = 0; k < kLinesPerVRegion / kMaxBatch; k++) {
    for (uint64_t i = 0; i < kMaxBatch; i++) addrs[i] = (k * kMaxBatch + i) * kLineBytes;
    REQUIRE(rig.write(a, addrs, lines).is_ok());
  }
  CHECK(rig.memory->stats().lines_stored == kLinesPerVRegion);
  // Unplacing gives the room back.
  REQUIRE(rig.place(b, 7, 0, 0, kUnplace).is_ok());
  REQUIRE(rig.place(a, 1).is_ok());
  // Closing a space returns its promise.
  SpaceRequest close{a};
  std::vector<std::byte> req(sizeof(close)), rep(8);
  memcpy(req.data(), &close, sizeof(close));
  REQUIRE(rig.call(kClose, req, rep).is_ok());
  CHECK(rig.memory->stats().bytes_reserved == 0);
  CHECK(rig.memory->stats().lines_stored == 0);
  CHECK(rig.fetch(b, {0x0}).is_ok());
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
    WriteBackRequest r{h, 2, 0, 1, 0};
    std::vector<std::byte> req(sizeof(r) + 16 + kLineBytes);
    memcpy(req.data(), &r, sizeof(r));
    CHECK(rig.call(kWriteBack, req, rep).status().code() == EPROTO);
  }
  SECTION("write-back with version 0, unknown flags, or a copy flag alone") {
    CHECK(rig.write(h, {0x1000}, {pattern(1)}, 0).is_ok());  // the rig numbers it
    WriteBackRequest r{h, 1, 0, 0, 0};
    std::vector<std::byte> req(write_back_request_bytes(1, 0));
    memcpy(req.data(), &r, sizeof(r));
    CHECK(rig.call(kWriteBack, req, rep).status().code() == EPROTO);
    r = {h, 1, 8, 1, 0};
    memcpy(req.data(), &r, sizeof(r));
    CHECK(rig.call(kWriteBack, req, rep).status().code() == EPROTO);
    r = {h, 0, kWriteBackCopyLast, 1, 0};
    std::vector<std::byte> empty(sizeof(r));
    memcpy(empty.data(), &r, sizeof(r));
    CHECK(rig.call(kWriteBack, empty, rep).status().code() == EPROTO);
  }
  SECTION("malformed place, copy, copy status, list") {
    std::vector<std::byte> req(5);
    CHECK(rig.call(kPlace, req, rep).status().code() == EPROTO);
    CHECK(rig.call(kCopyRange, req, rep).status().code() == EPROTO);
    CHECK(rig.call(kCopyStatus, req, rep).status().code() == EPROTO);
    CHECK(rig.call(kListSpaces, req, rep).status().code() == EPROTO);
    CHECK(rig.place(h, 3, 0x80).code() == EPROTO);  // unknown flag
  }
  SECTION("release that wraps around") {
    ReleaseRequest rel{h, ~uint64_t{0} & ~uint64_t{4095}, 0x2000, 1};
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

TEST_CASE("fork copies a space; the copy and the original then diverge", "[memd][fork]") {
  MemoryNodeOptions opt;
  opt.capacity_bytes = 3 * kVRegionBytes;
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

  // The child has the parent's placements: it may write in vRegion 0, not elsewhere.
  CHECK(rig.write(child.value(), {kVRegionBytes}, {pattern(3)}).status().code() == EINVAL);
  CHECK(rig.memory->stats().bytes_reserved == 2 * kVRegionBytes);

  // The copy needs the parent's promise again: a node that cannot give it says ENOMEM.
  REQUIRE(rig.place(parent, 1).is_ok());
  CHECK(fork(parent).status().code() == ENOMEM);
  CHECK(rig.memory->stats().spaces_open == 2);
}

namespace {

Result<UsageReply> usage(Rig& rig) {
  std::vector<std::byte> req, rep(sizeof(UsageReply));
  auto r = rig.call(kUsage, req, rep);
  if (!r) return r.status();
  REQUIRE(r.value() == sizeof(UsageReply));
  UsageReply u;
  memcpy(&u, rep.data(), sizeof(u));
  return u;
}

struct Listed {
  SpaceEntry entry;
  std::vector<uint64_t> full, copying;
};

// Every space, read with kListSpaces in pages of a reply buffer of `rep_bytes`.
std::vector<Listed> list_all(Rig& rig, size_t rep_bytes, int* pages) {
  std::vector<Listed> out;
  uint64_t cursor = 0;
  *pages = 0;
  do {
    ListSpacesRequest r{cursor, static_cast<uint32_t>(rep_bytes), 0};
    std::vector<std::byte> req(sizeof(r)), rep(rep_bytes);
    memcpy(req.data(), &r, sizeof(r));
    auto res = rig.call(kListSpaces, req, rep);
    REQUIRE(res.is_ok());
    (*pages)++;
    ListSpacesReply head;
    memcpy(&head, rep.data(), sizeof(head));
    size_t off = sizeof(head);
    for (uint32_t i = 0; i < head.count; i++) {
      Listed l;
      memcpy(&l.entry, rep.data() + off, sizeof(l.entry));
      off += sizeof(l.entry);
      l.full.resize(l.entry.vregion_count);
      if (!l.full.empty()) memcpy(l.full.data(), rep.data() + off, l.full.size() * 8);
      off += l.full.size() * 8;
      l.copying.resize(l.entry.copying_count);
      if (!l.copying.empty()) memcpy(l.copying.data(), rep.data() + off, l.copying.size() * 8);
      off += l.copying.size() * 8;
      out.push_back(l);
    }
    REQUIRE(off == res.value());
    cursor = head.next_cursor;
  } while (cursor != 0);
  return out;
}

}  // namespace

TEST_CASE("kUsage and kListSpaces report what the node holds, paged", "[memd][report]") {
  Rig rig;
  auto u0 = usage(rig);
  REQUIRE(u0.is_ok());
  CHECK(u0.value().capacity_bytes == MemoryNodeOptions{}.capacity_bytes);
  CHECK(u0.value().reserved_bytes == 0);
  CHECK(u0.value().incarnation == rig.memory->incarnation());
  CHECK(u0.value().incarnation != 0);
  std::vector<SpaceHandle> spaces;
  for (int i = 0; i < 5; i++) spaces.push_back(rig.open());
  REQUIRE(rig.place(spaces[2], 9).is_ok());
  REQUIRE(rig.place(spaces[2], 4, kPlaceIncomingCopy).is_ok());
  REQUIRE(rig.write(spaces[2], {0x1000, 0x2000}, {pattern(1), pattern(2)}).is_ok());
  auto u1 = usage(rig);
  REQUIRE(u1.is_ok());
  CHECK(u1.value().reserved_bytes == 7 * kVRegionBytes);
  CHECK(u1.value().stored_bytes == 2 * kLineBytes);
  CHECK(u1.value().generation != u0.value().generation);
  // A reply with room for two entries at a time: three pages, each space once, in order.
  int pages = 0;
  auto all = list_all(rig, sizeof(ListSpacesReply) + 2 * (sizeof(SpaceEntry) + 16), &pages);
  CHECK(pages == 3);
  REQUIRE(all.size() == 5);
  for (size_t i = 0; i < all.size(); i++) {
    CHECK(all[i].entry.space_id == spaces[i].id);
    CHECK(all[i].entry.process_key == 0x1234);
    CHECK(all[i].entry.pid == 42);
    CHECK(std::string(all[i].entry.program) == "test");
    CHECK(all[i].entry.owner_node == 1);
  }
  CHECK(all[2].full == std::vector<uint64_t>{0, 9});
  CHECK(all[2].copying == std::vector<uint64_t>{4});
  CHECK(all[2].entry.lines_stored == 2);
  CHECK(all[0].full == std::vector<uint64_t>{0});
  // A reply too small for one entry.
  ListSpacesRequest r{0, sizeof(ListSpacesReply) + 8, 0};
  std::vector<std::byte> req(sizeof(r)), rep(sizeof(ListSpacesReply) + 8);
  memcpy(req.data(), &r, sizeof(r));
  CHECK(rig.call(kListSpaces, req, rep).status().code() == EMSGSIZE);
}

// One-sided reads (memory_proto.h v4, docs/rma.md): a vRegion's lines lie at fixed places of
// the block kPlaceRma granted, zeros where nothing is stored; the key is read-only and dies
// with the placement. Over tcp and shm (served by the memory node's libfit, which checks the
// key); the verbs guest test runs the same path through the NIC.
TEST_CASE("kPlaceRma grants one-sided reads of a vRegion's lines, zeros where none is stored",
          "[memd][rma]") {
  const char* provider = GENERATE("tcp", "shm");
  CAPTURE(provider);
  Rig rig({}, provider);
  SpaceHandle h = rig.open(/*place_first=*/false);
  auto g = rig.place_rma(h, 0);
  REQUIRE(g.is_ok());
  REQUIRE(rig.write(h, {0x0, 0x5000}, {pattern(1), pattern(2)}).is_ok());
  auto got = rig.rma_read(g.value(), 0, 8);
  REQUIRE(got.is_ok());
  const std::vector<std::byte> zero(kLineBytes);
  for (size_t k = 0; k < 8; k++) {
    std::vector<std::byte> line(got.value().begin() + k * kLineBytes,
                                got.value().begin() + (k + 1) * kLineBytes);
    CHECK(line == (k == 0 ? pattern(1) : k == 5 ? pattern(2) : zero));
  }
  // A zero write-back and a release free their lines: their slots read zeros again.
  REQUIRE(rig.write(h, {0x0}, {zero}).is_ok());
  REQUIRE(rig.release(h, 0x5000, kLineBytes, rig.next_version++).is_ok());
  got = rig.rma_read(g.value(), 0, 8);
  REQUIRE(got.is_ok());
  CHECK(got.value() == std::vector<std::byte>(8 * kLineBytes));
  // A retried kPlaceRma answers the same grant.
  auto again = rig.place_rma(h, 0);
  REQUIRE(again.is_ok());
  CHECK(again.value().key == g.value().key);
  CHECK(again.value().base == g.value().base);
  // The last line of the block is the vRegion's last line.
  REQUIRE(rig.write(h, {kVRegionBytes - kLineBytes}, {pattern(3)}).is_ok());
  got = rig.rma_read(g.value(), kLinesPerVRegion - 1, 1);
  REQUIRE(got.is_ok());
  CHECK(got.value() == pattern(3));
  CHECK(rig.memory->stats().rma_grants == 1);
}

TEST_CASE("a one-sided write, a forged key and a read outside the block are refused",
          "[memd][rma][hostile]") {
  const char* provider = GENERATE("tcp", "shm");
  CAPTURE(provider);
  Rig rig({}, provider);
  SpaceHandle h = rig.open(/*place_first=*/false);
  auto g = rig.place_rma(h, 0);
  REQUIRE(g.is_ok());
  REQUIRE(rig.write(h, {0x0}, {pattern(1)}).is_ok());
  // The grant is for reads: a write with the right key changes nothing.
  const auto evil = pattern(9);
  CHECK(rig.client->rma_write(g.value(), 0, evil).code() == EACCES);
  // A forged key reads nothing.
  fit::RemoteRegion forged = g.value();
  forged.key ^= 0x5a5a;
  std::vector<std::byte> buf(kLineBytes);
  CHECK(rig.client->rma_read(forged, 0, buf).code() == EACCES);
  // A region claimed past the block (the next block: another vRegion's, maybe another
  // process's) is refused by the owner, whatever the initiator claims.
  fit::RemoteRegion past = g.value();
  past.base += kVRegionBytes;
  CHECK(rig.client->rma_read(past, 0, buf).code() == EACCES);
  // The memory node lost nothing and serves on.
  auto got = rig.fetch(h, {0x0});
  REQUIRE(got.is_ok());
  CHECK(got.value()[0] == pattern(1));
  auto read = rig.rma_read(g.value(), 0, 1);
  REQUIRE(read.is_ok());
  CHECK(read.value() == pattern(1));
}

TEST_CASE("a grant dies with its placement: kUnplace, kClose and an expired lease revoke the key",
          "[memd][rma][lease]") {
  MemoryNodeOptions o;
  o.lease = std::chrono::milliseconds(300);
  Rig rig(o);
  std::vector<std::byte> buf(kLineBytes);
  SpaceHandle h = rig.open(/*place_first=*/false);
  auto g = rig.place_rma(h, 0);
  REQUIRE(g.is_ok());
  REQUIRE(rig.write(h, {0x0}, {pattern(1)}).is_ok());
  REQUIRE(rig.client->rma_read(g.value(), 0, buf).is_ok());

  SECTION("kUnplace") {
    REQUIRE(rig.place(h, 0, 0, 0, kUnplace).is_ok());
    CHECK(rig.client->rma_read(g.value(), 0, buf).code() == EACCES);
    // Placed again: a new grant, the old key still dead, and no old line comes back.
    auto g2 = rig.place_rma(h, 0);
    REQUIRE(g2.is_ok());
    CHECK(rig.client->rma_read(g.value(), 0, buf).code() == EACCES);
    REQUIRE(rig.client->rma_read(g2.value(), 0, buf).is_ok());
    CHECK(buf == std::vector<std::byte>(kLineBytes));
  }
  SECTION("kClose") {
    SpaceRequest r{h};
    std::vector<std::byte> req(sizeof(r)), rep(8);
    memcpy(req.data(), &r, sizeof(r));
    REQUIRE(rig.call(kClose, req, rep).is_ok());
    CHECK(rig.client->rma_read(g.value(), 0, buf).code() == EACCES);
  }
  SECTION("the lease runs out") {
    for (int i = 0; i < 6; i++) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      rig.memory->expire_idle();
    }
    REQUIRE(rig.memory->stats().spaces_expired == 1);
    CHECK(rig.client->rma_read(g.value(), 0, buf).code() == EACCES);
  }
  CHECK(rig.memory->stats().rma_revoked == 1);
  // Another process's vRegion, given the freed block, is not readable with the old key.
  SpaceHandle other = rig.open(/*place_first=*/false);
  auto g3 = rig.place_rma(other, 0);
  REQUIRE(g3.is_ok());
  REQUIRE(rig.write(other, {0x0}, {pattern(7)}).is_ok());
  CHECK(rig.client->rma_read(g.value(), 0, buf).code() == EACCES);
}

TEST_CASE("a forked copy has blocks of its own: the parent's grant reads the parent's lines",
          "[memd][rma][fork]") {
  Rig rig;
  SpaceHandle h = rig.open(/*place_first=*/false);
  auto g = rig.place_rma(h, 0);
  REQUIRE(g.is_ok());
  REQUIRE(rig.write(h, {0x3000}, {pattern(1)}).is_ok());
  SpaceRequest r{h};
  std::vector<std::byte> req(sizeof(r)), rep(sizeof(OpenReply));
  memcpy(req.data(), &r, sizeof(r));
  REQUIRE(rig.call(kFork, req, rep).is_ok());
  OpenReply child;
  memcpy(&child, rep.data(), sizeof(child));
  REQUIRE(rig.write(child.handle, {0x3000}, {pattern(2)}).is_ok());
  auto got = rig.rma_read(g.value(), 3, 1);
  REQUIRE(got.is_ok());
  CHECK(got.value() == pattern(1));
  auto c = rig.fetch(child.handle, {0x3000});
  REQUIRE(c.is_ok());
  CHECK(c.value()[0] == pattern(2));
  // The child's own grant, asked for: another block.
  auto gc = rig.place_rma(child.handle, 0);
  REQUIRE(gc.is_ok());
  CHECK(gc.value().base != g.value().base);
  got = rig.rma_read(gc.value(), 3, 1);
  REQUIRE(got.is_ok());
  CHECK(got.value() == pattern(2));
}
