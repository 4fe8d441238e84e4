// Re-replication between memory nodes (kCopyRange): a memory node S pushes a vRegion to node
// Y, where the process placed it with kPlaceIncomingCopy and keeps sending its write-backs and
// releases while the copy runs. Guards the invariant of memory_proto.h: when the copy
// completes Y holds, for every line, the newest version any replica holds, and nothing
// released or zeroed since comes back; a copy whose target dies ends "failed" with its errno;
// copies run on S's copy worker, bounded, never on a server thread.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "lego/memory_node.h"
#include "libfit/fault_injection.h"
#include "tests/libfit/cluster_fixture.h"

using namespace lego;
using namespace lego::mem;
using lego::testing::Fault;
using lego::testing::fault_on;
using lego::testing::FaultPlan;
using lego::testing::Way;
using Line = std::vector<std::byte>;
using namespace std::chrono_literals;

namespace {

constexpr fit::NodeId kS = 2, kY = 3;

Line pattern(uint64_t seed) {
  Line line(kLineBytes);
  for (size_t i = 0; i < kLineBytes; i += 8) {
    uint64_t w = seed * 0x9e3779b97f4a7c15ull + i;
    memcpy(line.data() + i, &w, 8);
  }
  return line;
}
const Line kZero(kLineBytes);

// Node 1 the processor (this test), 2 and 3 memory nodes, each a MemoryNode on its own
// fit::Node; S's node's calls (its copy batches) go through `plan`.
struct Rig {
  fit::ClusterConfig cluster;
  std::unique_ptr<MemoryNode> mem[2];
  std::unique_ptr<fit::Node> server[2], client;
  std::shared_ptr<FaultPlan> plan = std::make_shared<FaultPlan>();

  Rig() {
    cluster = testing::make_cluster(3, "tcp");
    for (int i = 0; i < 2; i++) {
      mem[i] = std::make_unique<MemoryNode>(MemoryNodeOptions{});
      auto s = fit::Node::create(cluster, kS + i);
      REQUIRE(s.is_ok());
      server[i] = std::move(s.value());
      if (i == 0) testing::inject_faults(*server[i], plan);
      mem[i]->serve(*server[i]);
      REQUIRE(server[i]->start().is_ok());
    }
    auto c = fit::Node::create(cluster, 1);
    REQUIRE(c.is_ok());
    client = std::move(c.value());
  }
  ~Rig() {
    for (auto& m : mem) m->stop();
  }
  MemoryNode& at(fit::NodeId n) { return *mem[n - kS]; }

  template <typename T>
  Result<size_t> call(fit::NodeId n, uint16_t op, const T& head, std::vector<std::byte>* rep,
                      const std::vector<std::byte>& tail = {}) {
    std::vector<std::byte> req(sizeof(T) + tail.size());
    memcpy(req.data(), &head, sizeof(T));
    if (!tail.empty()) memcpy(req.data() + sizeof(T), tail.data(), tail.size());
    std::vector<std::byte> none;
    return client->send_reply(n, op, req, rep != nullptr ? *rep : none);
  }

  SpaceHandle open(fit::NodeId n) {
    OpenRequest r{};
    r.version = kProtoVersion;
    r.pid = 77;
    r.process_key = 0xfeed;
    strcpy(r.program, "copy-test");
    std::vector<std::byte> rep(sizeof(OpenReply));
    auto res = call(n, kOpen, r, &rep);
    INFO(res.status().message());
    REQUIRE(res.is_ok());
    OpenReply out;
    memcpy(&out, rep.data(), sizeof(out));
    return out.handle;
  }
  Status place(fit::NodeId n, const SpaceHandle& h, uint64_t v, uint32_t flags = 0) {
    std::vector<std::byte> rep(sizeof(PlaceReply));
    auto r = call(n, kPlace, PlaceRequest{h, v, 0, flags, 0}, &rep);
    if (!r) return r.status();
    PlaceReply out;
    memcpy(&out, rep.data(), sizeof(out));
    return out.error == 0 ? Status() : Status(out.error, "placement refused");
  }
  Status write(fit::NodeId n, const SpaceHandle& h, uint64_t addr, const Line& line,
               uint64_t version) {
    std::vector<std::byte> tail(8 + kLineBytes);
    memcpy(tail.data(), &addr, 8);
    memcpy(tail.data() + 8, line.data(), kLineBytes);
    return call(n, kWriteBack, WriteBackRequest{h, 1, 0, version, 0}, nullptr, tail).status();
  }
  // A copy batch as a copy worker sends it.
  Status copy_batch(fit::NodeId n, const SpaceHandle& h, uint64_t vregion,
                    const std::vector<uint64_t>& addrs, const std::vector<uint64_t>& versions,
                    const std::vector<Line>& lines, bool last) {
    const uint32_t count = static_cast<uint32_t>(addrs.size());
    const uint32_t flags = kWriteBackCopy | (last ? kWriteBackCopyLast : 0);
    std::vector<std::byte> tail(write_back_request_bytes(count, flags) - sizeof(WriteBackRequest));
    memcpy(tail.data(), addrs.data(), count * 8);
    memcpy(tail.data() + count * 8, versions.data(), count * 8);
    for (uint32_t i = 0; i < count; i++) {
      memcpy(tail.data() + count * 16 + i * kLineBytes, lines[i].data(), kLineBytes);
    }
    return call(n, kWriteBack, WriteBackRequest{h, count, flags, 0, vregion}, nullptr, tail)
        .status();
  }
  Status release(fit::NodeId n, const SpaceHandle& h, uint64_t addr, uint64_t len,
                 uint64_t version) {
    return call(n, kRelease, ReleaseRequest{h, addr, len, version}, nullptr).status();
  }
  Result<Line> fetch(fit::NodeId n, const SpaceHandle& h, uint64_t addr) {
    std::vector<std::byte> tail(8), rep(kLineBytes);
    memcpy(tail.data(), &addr, 8);
    auto res = call(n, kFetch, FetchRequest{h, 1, 0}, &rep, tail);
    if (!res) return res.status();
    if (res.value() == 0) return kZero;
    return rep;
  }
  NodeAddress address_of(fit::NodeId n) {
    const fit::NodeConfig* c = cluster.find(n);
    NodeAddress a{};
    a.id = n;
    a.port = c->port;
    a.provider = static_cast<uint8_t>(c->provider);
    strncpy(a.address, c->address.c_str(), sizeof(a.address) - 1);
    return a;
  }
  Result<uint64_t> start_copy(const SpaceHandle& src, uint64_t v, const SpaceHandle& dst,
                              NodeAddress to) {
    std::vector<std::byte> rep(sizeof(CopyReply));
    auto r = call(kS, kCopyRange, CopyRequest{src, v, dst, to}, &rep);
    if (!r) return r.status();
    CopyReply out;
    memcpy(&out, rep.data(), sizeof(out));
    return out.job;
  }
  Result<CopyStatusReply> copy_status(const SpaceHandle& src, uint64_t job) {
    std::vector<std::byte> rep(sizeof(CopyStatusReply));
    auto r = call(kS, kCopyStatus, CopyStatusRequest{src, job}, &rep);
    if (!r) return r.status();
    CopyStatusReply out;
    memcpy(&out, rep.data(), sizeof(out));
    return out;
  }
  CopyStatusReply wait_copy(const SpaceHandle& src, uint64_t job) {
    for (int i = 0; i < 3000; i++) {
      auto st = copy_status(src, job);
      REQUIRE(st.is_ok());
      if (st.value().state != kCopyRunning) return st.value();
      std::this_thread::sleep_for(10ms);
    }
    FAIL("the copy did not end in 30 s");
    return {};
  }
};

uint64_t line_addr(uint64_t i) {
  return i * kLineBytes;
}

}  // namespace

TEST_CASE("a copy gives the target every line of the vRegion with its version", "[memd][copy]") {
  Rig rig;
  SpaceHandle s = rig.open(kS), y = rig.open(kY);
  REQUIRE(rig.place(kS, s, 0).is_ok());
  REQUIRE(rig.place(kS, s, 1).is_ok());
  for (uint64_t i = 0; i < 100; i++) {
    REQUIRE(rig.write(kS, s, line_addr(i * 37 % kLinesPerVRegion), pattern(i), 1 + i).is_ok());
  }
  // A line of another vRegion is not copied.
  REQUIRE(rig.write(kS, s, kVRegionBytes, pattern(999), 500).is_ok());
  REQUIRE(rig.place(kY, y, 0, kPlaceIncomingCopy).is_ok());
  auto job = rig.start_copy(s, 0, y, rig.address_of(kY));
  REQUIRE(job.is_ok());
  CopyStatusReply done = rig.wait_copy(s, job.value());
  CHECK(done.state == kCopyDone);
  CHECK(done.lines_total == 100);
  CHECK(done.lines_copied == 100);
  for (uint64_t i = 0; i < 100; i++) {
    auto got = rig.fetch(kY, y, line_addr(i * 37 % kLinesPerVRegion));
    REQUIRE(got.is_ok());
    CHECK(got.value() == pattern(i));
  }
  CHECK(rig.at(kY).stats().lines_stored == 100);
  CHECK(rig.at(kS).stats().copies_done == 1);
  // The copy is over: an older copied line (a retried batch) no longer lands.
  REQUIRE(rig.copy_batch(kY, y, 0, {line_addr(0)}, {1}, {pattern(12345)}, true).is_ok());
  CHECK(rig.fetch(kY, y, line_addr(0)).value() == pattern(0));
}

TEST_CASE("the target applies a copied line only when nothing newer happened to it",
          "[memd][copy]") {
  Rig rig;
  SpaceHandle y = rig.open(kY);
  REQUIRE(rig.place(kY, y, 0, kPlaceIncomingCopy).is_ok());
  const uint64_t a = line_addr(1), b = line_addr(2), c = line_addr(3), d = line_addr(4);
  // a: the process wrote version 10 here; the copy brings 5 (older), then 12 (newer).
  REQUIRE(rig.write(kY, y, a, pattern(10), 10).is_ok());
  REQUIRE(rig.copy_batch(kY, y, 0, {a}, {5}, {pattern(5)}, false).is_ok());
  CHECK(rig.fetch(kY, y, a).value() == pattern(10));
  REQUIRE(rig.copy_batch(kY, y, 0, {a}, {12}, {pattern(12)}, false).is_ok());
  CHECK(rig.fetch(kY, y, a).value() == pattern(12));
  // b: released at version 20; the copy's version 15 stays released, 21 lands (written
  // after the release).
  REQUIRE(rig.release(kY, y, b, kLineBytes, 20).is_ok());
  REQUIRE(rig.copy_batch(kY, y, 0, {b}, {15}, {pattern(15)}, false).is_ok());
  CHECK(rig.fetch(kY, y, b).value() == kZero);
  CHECK(rig.at(kY).stats().lines_stored == 1);
  // c: zeroed at version 30 (kept as a line while the copy is incoming); the copy's 25
  // must not bring the old content back.
  REQUIRE(rig.write(kY, y, c, kZero, 30).is_ok());
  CHECK(rig.at(kY).stats().zero_kept == 1);
  REQUIRE(rig.copy_batch(kY, y, 0, {c}, {25}, {pattern(25)}, false).is_ok());
  CHECK(rig.fetch(kY, y, c).value() == kZero);
  // d: nothing happened here: the copy's line lands. The same version again changes
  // nothing. A line outside the vRegion is refused.
  REQUIRE(rig.copy_batch(kY, y, 0, {d}, {7}, {pattern(7)}, false).is_ok());
  CHECK(rig.fetch(kY, y, d).value() == pattern(7));
  CHECK(rig.copy_batch(kY, y, 0, {kVRegionBytes}, {7}, {pattern(7)}, false).code() == EINVAL);
  // The last batch: b at 21 lands; the kept zero line and the release are forgotten.
  REQUIRE(rig.copy_batch(kY, y, 0, {b}, {21}, {pattern(21)}, true).is_ok());
  CHECK(rig.fetch(kY, y, b).value() == pattern(21));
  CHECK(rig.fetch(kY, y, c).value() == kZero);
  CHECK(rig.at(kY).stats().lines_stored == 3);  // a, b, d: c's zero line is gone
  // Now a full replica: an all-zero write-back frees the line again.
  REQUIRE(rig.write(kY, y, d, kZero, 40).is_ok());
  CHECK(rig.at(kY).stats().lines_stored == 2);
}

TEST_CASE("a copy racing write-backs, releases and zero lines ends with the newest of each line",
          "[memd][copy][race]") {
  Rig rig;
  SpaceHandle s = rig.open(kS), y = rig.open(kY);
  REQUIRE(rig.place(kS, s, 0).is_ok());
  constexpr uint64_t kLines = 1024;  // of the vRegion's 4096: the rest never written
  std::map<uint64_t, Line> model;    // what the process last wrote (absent: zeros)
  uint64_t version = 0;
  for (uint64_t i = 0; i < kLines; i++) {
    model[line_addr(i)] = pattern(++version);
    Status st = rig.write(kS, s, line_addr(i), model[line_addr(i)], version);
    INFO(st.message());
    REQUIRE(st.is_ok());
  }
  // Y joins: from now on the process sends everything to both.
  REQUIRE(rig.place(kY, y, 0, kPlaceIncomingCopy).is_ok());
  // Each copy batch waits 25 ms after S read its lines: the process's writes, releases and
  // zero lines overtake it, which is what the target's rule is for.
  auto slow = fault_on(Way::kSend, fit::wire::Kind::kRequest, Fault::kDelay, kWriteBack, -1);
  slow.delay = 25ms;
  rig.plan->add(slow);
  auto job = rig.start_copy(s, 0, y, rig.address_of(kY));
  REQUIRE(job.is_ok());
  std::mt19937_64 rng(42);
  int ops = 0;
  auto both = [&](auto&& op) {
    REQUIRE(op(kS, s).is_ok());
    REQUIRE(op(kY, y).is_ok());
  };
  for (;;) {
    auto st = rig.copy_status(s, job.value());
    REQUIRE(st.is_ok());
    if (st.value().state != kCopyRunning && ops > 200) break;
    const uint64_t i = rng() % (kLines + 64);  // some past the written ones
    const uint64_t addr = line_addr(i);
    switch (rng() % 4) {
      case 0:
      case 1: {  // a write-back
        Line l = pattern(++version);
        both([&](fit::NodeId n, SpaceHandle h) { return rig.write(n, h, addr, l, version); });
        model[addr] = l;
        break;
      }
      case 2: {  // an all-zero write-back
        ++version;
        both([&](fit::NodeId n, SpaceHandle h) { return rig.write(n, h, addr, kZero, version); });
        model.erase(addr);
        break;
      }
      case 3: {  // a release of 1..8 lines, carrying the last write-back's version
        const uint64_t len = (1 + rng() % 8) * kLineBytes;
        both([&](fit::NodeId n, SpaceHandle h) { return rig.release(n, h, addr, len, version); });
        for (uint64_t a = addr; a < addr + len; a += kLineBytes) model.erase(a);
        break;
      }
    }
    ops++;
  }
  CopyStatusReply done = rig.wait_copy(s, job.value());
  REQUIRE(done.state == kCopyDone);
  INFO(ops << " operations raced the copy; " << rig.at(kY).stats().copy_lines_skipped
           << " copied lines were older than Y's");
  CHECK(rig.at(kY).stats().copy_lines_skipped > 0);  // the race happened
  size_t wrong = 0;
  for (uint64_t i = 0; i < kLinesPerVRegion; i++) {
    auto it = model.find(line_addr(i));
    const Line& want = it == model.end() ? kZero : it->second;
    auto on_y = rig.fetch(kY, y, line_addr(i));
    auto on_s = rig.fetch(kS, s, line_addr(i));
    REQUIRE(on_y.is_ok());
    REQUIRE(on_s.is_ok());
    wrong += on_y.value() != want || on_s.value() != want;
  }
  CHECK(wrong == 0);
  // Y keeps no zero lines after the copy: it holds exactly what S holds.
  CHECK(rig.at(kY).stats().lines_stored == rig.at(kS).stats().lines_stored);
}

TEST_CASE("a copy whose target dies ends failed with its errno; the source keeps serving",
          "[memd][copy]") {
  Rig rig;
  SpaceHandle s = rig.open(kS), y = rig.open(kY);
  REQUIRE(rig.place(kS, s, 0).is_ok());
  for (uint64_t i = 0; i < 256; i++) {
    REQUIRE(rig.write(kS, s, line_addr(i), pattern(i), i + 1).is_ok());
  }
  REQUIRE(rig.place(kY, y, 0, kPlaceIncomingCopy).is_ok());
  auto slow = fault_on(Way::kSend, fit::wire::Kind::kRequest, Fault::kDelay, kWriteBack, -1);
  slow.delay = 50ms;
  rig.plan->add(slow);
  auto job = rig.start_copy(s, 0, y, rig.address_of(kY));
  REQUIRE(job.is_ok());
  std::this_thread::sleep_for(120ms);
  rig.mem[1]->stop();
  rig.server[1]->stop();  // Y is gone: its connections close, nothing listens
  const auto t0 = std::chrono::steady_clock::now();
  CopyStatusReply end = rig.wait_copy(s, job.value());
  CHECK(end.state == kCopyFailed);
  INFO("errno " << end.error);
  CHECK((end.error == ECONNREFUSED || end.error == ECONNRESET || end.error == ETIMEDOUT));
  CHECK(end.lines_copied < 256);
  CHECK(std::chrono::steady_clock::now() - t0 < 20s);
  CHECK(rig.at(kS).stats().copies_failed == 1);
  // S serves on, its lines intact.
  auto got = rig.fetch(kS, s, line_addr(200));
  REQUIRE(got.is_ok());
  CHECK(got.value() == pattern(200));
}

TEST_CASE("a stop does not wait for a copy batch that a silent target never answers",
          "[memd][copy]") {
  Rig rig;
  SpaceHandle s = rig.open(kS), y = rig.open(kY);
  REQUIRE(rig.place(kS, s, 0).is_ok());
  for (uint64_t i = 0; i < 64; i++) {
    REQUIRE(rig.write(kS, s, line_addr(i), pattern(i), i + 1).is_ok());
  }
  REQUIRE(rig.place(kY, y, 0, kPlaceIncomingCopy).is_ok());
  // Every batch S sends vanishes: Y is alive but silent, each call waits its whole timeout
  // (the cluster's 3 s).
  rig.plan->add(fault_on(Way::kSend, fit::wire::Kind::kRequest, Fault::kDrop, kWriteBack, -1));
  auto job = rig.start_copy(s, 0, y, rig.address_of(kY));
  REQUIRE(job.is_ok());
  std::this_thread::sleep_for(200ms);  // the first batch is on its way
  const auto t0 = std::chrono::steady_clock::now();
  rig.at(kS).stop();
  const auto took = std::chrono::steady_clock::now() - t0;
  INFO("stop took " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                    << " ms");
  CHECK(took < 1s);
  auto end = rig.copy_status(s, job.value());
  REQUIRE(end.is_ok());
  CHECK(end.value().state == kCopyFailed);
  CHECK(end.value().error == ECANCELED);
}

TEST_CASE("copies are checked, bounded, and their status is the source space's own",
          "[memd][copy]") {
  Rig rig;
  SpaceHandle s = rig.open(kS), y = rig.open(kY);
  REQUIRE(rig.place(kS, s, 0).is_ok());
  REQUIRE(rig.place(kS, s, 5, kPlaceIncomingCopy).is_ok());
  REQUIRE(rig.write(kS, s, 0, pattern(1), 1).is_ok());
  // Not placed here; itself incoming; a target named at another address than the file's.
  CHECK(rig.start_copy(s, 3, y, rig.address_of(kY)).status().code() == EINVAL);
  CHECK(rig.start_copy(s, 5, y, rig.address_of(kY)).status().code() == EINVAL);
  NodeAddress moved = rig.address_of(kY);
  moved.port++;
  CHECK(rig.start_copy(s, 0, y, moved).status().code() == EEXIST);
  NodeAddress self = rig.address_of(kS);
  CHECK(rig.start_copy(s, 0, y, self).status().code() == EINVAL);
  SpaceHandle forged = s;
  forged.secret[3] ^= 1;
  CHECK(rig.start_copy(forged, 0, y, rig.address_of(kY)).status().code() == EACCES);
  CHECK(rig.copy_status(s, 999).status().code() == ENOENT);
  // At most kMaxCopyJobs at once (each batch held up 300 ms here).
  auto slow = fault_on(Way::kSend, fit::wire::Kind::kRequest, Fault::kDelay, kWriteBack, -1);
  slow.delay = 300ms;
  rig.plan->add(slow);
  REQUIRE(rig.place(kY, y, 0, kPlaceIncomingCopy).is_ok());
  std::vector<uint64_t> jobs;
  for (uint32_t i = 0; i < kMaxCopyJobs; i++) {
    auto j = rig.start_copy(s, 0, y, rig.address_of(kY));
    REQUIRE(j.is_ok());
    jobs.push_back(j.value());
  }
  CHECK(rig.start_copy(s, 0, y, rig.address_of(kY)).status().code() == EBUSY);
  // Another space's handle does not read this job's status.
  SpaceHandle other = rig.open(kS);
  CHECK(rig.copy_status(other, jobs[0]).status().code() == ENOENT);
  // A server thread was never the copier: S answers at once while the copies crawl.
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(rig.fetch(kS, s, 0).is_ok());
  CHECK(std::chrono::steady_clock::now() - t0 < 250ms);
  rig.plan->clear();
  for (uint64_t j : jobs) CHECK(rig.wait_copy(s, j).state == kCopyDone);
}
