// Description: the runtime's ClusterBackend, on one memory node (N = 1, R = 1), against a
// real MemoryNode (in this process,
// over tcp) while libfit's fault injection (libfit/fault_injection.h) loses, delays,
// duplicates and cuts its frames: fetches and write-backs, sync and async, are retried
// as lego/retry.h says and every line holds what was last written; a memory node that
// never answers gives ETIMEDOUT, and under an ExCache ends the process in its fatal hook
// naming the address (in a forked child). Guards issue 15 (faults were tested only by
// killing processes).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "lego/excache.h"
#include "lego/fit.h"
#include "lego/memory_node.h"
#include "lego/memory_proto.h"
#include "lego/retry.h"
#include "libfit/fault_injection.h"
#include "runtime/preload/cluster_backend.h"
#include "tests/libfit/cluster_fixture.h"
#include "tests/runtime/child_report.h"

namespace {

using lego::ExCache;
using lego::ExCacheOptions;
using lego::LineBackend;
using lego::fit::wire::Kind;
using lego::testing::Fault;
using lego::testing::fault_on;
using lego::testing::FaultPlan;
using lego::testing::FaultRule;
using lego::testing::Way;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr size_t kLine = lego::kExCacheLineBytes;
// The cluster's timeout_ms: generous enough for calls that must succeed on a loaded host.
constexpr milliseconds kTimeout{1000};

// A memory node and a client node whose frames go through `plan`, and the backend on them.
struct Rig {
  lego::fit::ClusterConfig cluster;
  std::unique_ptr<lego::mem::MemoryNode> memory;
  std::unique_ptr<lego::fit::Node> server, client;
  std::shared_ptr<FaultPlan> plan = std::make_shared<FaultPlan>();
  std::unique_ptr<lego::runtime::ClusterBackend> backend;

  // Returns an error rather than REQUIRE: a forked child builds one too.
  lego::Status open() {
    cluster = lego::testing::make_cluster(2, "tcp");
    cluster.timeout = kTimeout;
    memory = std::make_unique<lego::mem::MemoryNode>(lego::mem::MemoryNodeOptions{});
    auto s = lego::fit::Node::create(cluster, 2);
    if (!s) return s.status();
    server = std::move(s.value());
    memory->serve(*server);
    LEGO_RETURN_IF_ERROR(server->start());
    auto c = lego::fit::Node::create(cluster, 1);
    if (!c) return c.status();
    client = std::move(c.value());
    lego::testing::inject_faults(*client, plan);
    lego::runtime::ClusterBackendOptions o;
    o.memory_nodes = {2};
    o.program = "fault-test";
    auto b = lego::runtime::ClusterBackend::open(client.get(), o);
    if (!b) return b.status();
    backend = std::move(b.value());
    // The tests' lines: the first vRegion (kA, kB) and each ExCache's region (make_cache),
    // all of user space counted as the region, every vRegion of it in use.
    LEGO_RETURN_IF_ERROR(backend->set_region(0, uint64_t{1} << 47));
    backend->set_used_fn([](uint64_t) { return true; });
    return backend->sync_placement(0, 0);
  }
};

Rig& rig() {
  static Rig* r = nullptr;  // one per process: each test starts from a fresh plan
  if (r == nullptr) {
    r = new Rig();
    lego::Status st = r->open();
    INFO(st.message());
    REQUIRE(st.is_ok());
  }
  r->plan->clear();
  return *r;
}

// A line's content: `tag` in every word.
struct Line {
  alignas(64) std::byte data[kLine];
  explicit Line(uint64_t tag = 0) {
    for (size_t w = 0; w < kLine / 8; w++) memcpy(data + w * 8, &tag, 8);
  }
  uint64_t tag() const {
    uint64_t t;
    memcpy(&t, data, 8);
    for (size_t w = 1; w < kLine / 8; w++) {
      if (memcmp(data + w * 8, &t, 8) != 0) return ~uint64_t{0};  // torn
    }
    return t;
  }
};

constexpr uint64_t kA = 0x10000, kB = 0x20000;  // two line addresses

uint64_t fetched_tag(LineBackend& b, uint64_t addr) {
  Line out;
  lego::Status st = b.fetch(addr, std::span<std::byte, kLine>(out.data, kLine));
  INFO(st.message());
  REQUIRE(st.is_ok());
  return out.tag();
}

lego::Status write_line(LineBackend& b, uint64_t addr, const Line& l) {
  LineBackend::WriteBack wb{addr, l.data};
  return b.write_back({&wb, 1});
}

}  // namespace

TEST_CASE("a fetch whose request or reply is lost times out; sent again it returns the line",
          "[faults][memory]") {
  Rig& r = rig();
  Line a(11), b(22);
  REQUIRE(write_line(*r.backend, kA, a).is_ok());
  REQUIRE(write_line(*r.backend, kB, b).is_ok());

  size_t lost = r.plan->add(fault_on(Way::kSend, Kind::kRequest, Fault::kDrop, lego::mem::kFetch));
  Line out;
  lego::Status st = r.backend->fetch(kA, std::span<std::byte, kLine>(out.data, kLine));
  CHECK(st.code() == ETIMEDOUT);
  CHECK(classify(st) == lego::ErrorClass::kRetry);
  CHECK(fetched_tag(*r.backend, kA) == 11);
  CHECK(r.plan->fired(lost) == 1);

  SECTION("async: the reply of a fetch started ahead is lost") {
    size_t gone =
        r.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kDrop, lego::mem::kFetch));
    alignas(64) std::byte buf[LineBackend::kFetchHeadroom + 2 * kLine];
    std::byte* at = buf + LineBackend::kFetchHeadroom;
    const uint64_t addrs[2] = {kA, kB};
    LineBackend::FetchTicket ticket;
    REQUIRE(r.backend->start_fetch_batch(addrs, at, &ticket).is_ok());
    st = r.backend->finish_fetch_batch(&ticket);
    CHECK(st.code() == ETIMEDOUT);
    REQUIRE(r.backend->fetch_batch(addrs, at).is_ok());  // what the ExCache does next
    Line got_a, got_b;
    memcpy(got_a.data, at, kLine);
    memcpy(got_b.data, at + kLine, kLine);
    CHECK(got_a.tag() == 11);
    CHECK(got_b.tag() == 22);
    CHECK(r.plan->fired(gone) == 1);
  }
  SECTION("a late reply is not taken for a later fetch's") {
    FaultRule late = fault_on(Way::kReceive, Kind::kReply, Fault::kDelay, lego::mem::kFetch);
    late.delay = kTimeout * 2;
    r.plan->add(late);
    st = r.backend->fetch(kA, std::span<std::byte, kLine>(out.data, kLine));
    CHECK(st.code() == ETIMEDOUT);
    for (int i = 0; i < 6; i++) {
      CHECK(fetched_tag(*r.backend, kB) == 22);  // A's late reply arrives meanwhile
      std::this_thread::sleep_for(kTimeout / 2);
    }
  }
}

// The handler thread's pipeline (runtime/excache/fault.cc) keeps several fetches in flight
// and maps each when fetch_ready says its reply is in: a backend whose fetch_ready said
// "ready" at once would make it wait for every oldest fetch in turn.
TEST_CASE(
    "fetch_ready: false while a started fetch's reply is on its way, true once it is in; "
    "two fetches in flight end in either order",
    "[faults][memory]") {
  Rig& r = rig();
  REQUIRE(write_line(*r.backend, kA, Line(31)).is_ok());
  REQUIRE(write_line(*r.backend, kB, Line(32)).is_ok());
  // A's reply is held back; B's, sent after it, passes.
  FaultRule slow = fault_on(Way::kReceive, Kind::kReply, Fault::kDelay, lego::mem::kFetch);
  slow.delay = kTimeout / 2;
  const size_t held = r.plan->add(slow);
  alignas(64) std::byte buf_a[LineBackend::kFetchHeadroom + kLine];
  alignas(64) std::byte buf_b[LineBackend::kFetchHeadroom + kLine];
  std::byte* at_a = buf_a + LineBackend::kFetchHeadroom;
  std::byte* at_b = buf_b + LineBackend::kFetchHeadroom;
  const uint64_t a[1] = {kA}, b[1] = {kB};
  LineBackend::FetchTicket ta, tb;
  const auto t0 = Clock::now();
  REQUIRE(r.backend->start_fetch_batch(a, at_a, &ta).is_ok());
  REQUIRE(r.backend->start_fetch_batch(b, at_b, &tb).is_ok());
  CHECK_FALSE(r.backend->fetch_ready(&ta));
  // B's reply comes while A's is held: B is ready first and ends first.
  while (!r.backend->fetch_ready(&tb) && Clock::now() - t0 < kTimeout * 4) {
  }
  REQUIRE(r.backend->fetch_ready(&tb));
  if (Clock::now() - t0 < slow.delay / 2) CHECK_FALSE(r.backend->fetch_ready(&ta));
  REQUIRE(r.backend->finish_fetch_batch(&tb).is_ok());
  Line got;
  memcpy(got.data, at_b, kLine);
  CHECK(got.tag() == 32);
  while (!r.backend->fetch_ready(&ta) && Clock::now() - t0 < kTimeout * 4) {
  }
  REQUIRE(r.backend->fetch_ready(&ta));
  CHECK(Clock::now() - t0 >= slow.delay);  // not before the held reply was let through
  REQUIRE(r.backend->finish_fetch_batch(&ta).is_ok());
  memcpy(got.data, at_a, kLine);
  CHECK(got.tag() == 31);
  CHECK(r.plan->fired(held) == 1);
}

TEST_CASE(
    "an async write-back whose request or reply is lost is sent again by "
    "finish_write_back; the line holds what was written",
    "[faults][memory]") {
  Rig& r = rig();
  REQUIRE(write_line(*r.backend, kA, Line(1)).is_ok());
  for (Way way : {Way::kSend, Way::kReceive}) {
    INFO((way == Way::kSend ? "request lost" : "reply lost"));
    r.plan->clear();
    const Kind kind = way == Way::kSend ? Kind::kRequest : Kind::kReply;
    size_t lost = r.plan->add(fault_on(way, kind, Fault::kDrop, lego::mem::kWriteBack));
    const uint64_t tag = way == Way::kSend ? 2 : 3;
    Line l(tag);
    LineBackend::WriteBack wb{kA, l.data};
    LineBackend::WriteBackTicket ticket;
    REQUIRE(r.backend->start_write_back({&wb, 1}, &ticket).is_ok());
    lego::Status st = r.backend->finish_write_back(&ticket);
    INFO(st.message());
    CHECK(st.is_ok());
    CHECK(r.plan->fired(lost) == 1);
    CHECK(fetched_tag(*r.backend, kA) == tag);
  }
}

TEST_CASE("a write-back on a connection reset mid-call is sent again on a new one",
          "[faults][memory]") {
  Rig& r = rig();
  SECTION("reset as the reply arrives: finish_write_back sends it again") {
    size_t reset =
        r.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kReset, lego::mem::kWriteBack));
    Line l(44);
    LineBackend::WriteBack wb{kB, l.data};
    LineBackend::WriteBackTicket ticket;
    REQUIRE(r.backend->start_write_back({&wb, 1}, &ticket).is_ok());
    lego::Status st = r.backend->finish_write_back(&ticket);
    INFO(st.message());
    CHECK(st.is_ok());
    CHECK(r.plan->fired(reset) == 1);
    CHECK(fetched_tag(*r.backend, kB) == 44);
  }
  SECTION(
      "reset as the request leaves: start fails with nothing in flight, and the caller "
      "writes back in place") {
    size_t reset =
        r.plan->add(fault_on(Way::kSend, Kind::kRequest, Fault::kReset, lego::mem::kWriteBack));
    Line l(55);
    LineBackend::WriteBack wb{kB, l.data};
    LineBackend::WriteBackTicket ticket;
    lego::Status st = r.backend->start_write_back({&wb, 1}, &ticket);
    CHECK(st.code() == ECONNRESET);
    CHECK(classify(st) == lego::ErrorClass::kRetry);
    CHECK(write_line(*r.backend, kB, l).is_ok());  // what the ExCache does (write_back_batch)
    CHECK(r.plan->fired(reset) == 1);
    CHECK(fetched_tag(*r.backend, kB) == 55);
  }
  SECTION("a sync write-back whose reply is lost: ETIMEDOUT, and sent again it is stored") {
    size_t lost =
        r.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kDrop, lego::mem::kWriteBack));
    Line l(66);
    lego::Status st = write_line(*r.backend, kB, l);
    CHECK(st.code() == ETIMEDOUT);
    CHECK(write_line(*r.backend, kB, l).is_ok());
    CHECK(r.plan->fired(lost) == 1);
    CHECK(fetched_tag(*r.backend, kB) == 66);
  }
}

TEST_CASE(
    "a write-back the memory node never gets gives up after kAttempts tries with "
    "ETIMEDOUT, and nothing was stored",
    "[faults][memory]") {
  Rig& r = rig();
  REQUIRE(write_line(*r.backend, kA, Line(7)).is_ok());
  size_t lost =
      r.plan->add(fault_on(Way::kSend, Kind::kRequest, Fault::kDrop, lego::mem::kWriteBack, -1));
  Line l(8);
  LineBackend::WriteBack wb{kA, l.data};
  LineBackend::WriteBackTicket ticket;
  auto t0 = Clock::now();
  REQUIRE(r.backend->start_write_back({&wb, 1}, &ticket).is_ok());
  lego::Status st = r.backend->finish_write_back(&ticket);
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  INFO(st.message() << " after " << took << " s");
  CHECK(st.code() == ETIMEDOUT);
  CHECK(r.plan->fired(lost) == lego::kAttempts);
  CHECK(took >= 0.9 * lego::kAttempts * kTimeout.count() / 1000.0);
  r.plan->clear();
  CHECK(fetched_tag(*r.backend, kA) == 7);  // the caller was told: nothing pretends to be stored
}

namespace {

uint64_t pattern(size_t i, size_t w, uint64_t round) {
  return (i * 0x9e3779b97f4a7c15ull) ^ (w * 0xbf58476d1ce4e5b9ull) ^ (round << 56) ^ round;
}

constexpr size_t kCapacity = 16, kLines = 64;

std::unique_ptr<ExCache> make_cache(LineBackend* backend, void (*on_fatal)(const char*)) {
  ExCacheOptions o;
  o.capacity_bytes = kCapacity * kLine;
  o.region_bytes = kLines * kLine;
  o.delivery = ExCacheOptions::Delivery::kHandlerThread;  // the plan allocates
  o.evict_batch_lines = 4;
  o.prefetch_lines = 0;
  o.on_fatal = on_fatal;
  auto c = ExCache::create(o, backend);
  if (!c) {
    fprintf(stderr, "ExCache::create: %s\n", c.status().message().c_str());
    abort();
  }
  // Its lines are written back only to placed vRegions (memory_proto.h).
  auto* cluster = static_cast<lego::runtime::ClusterBackend*>(backend);
  const uint64_t base = reinterpret_cast<uint64_t>(c.value()->region_base());
  const uint64_t vr = lego::mem::kVRegionBytes;
  lego::Status st = cluster->sync_placement(base / vr, (base + c.value()->region_size() - 1) / vr);
  if (!st) {
    fprintf(stderr, "sync_placement: %s\n", st.message().c_str());
    abort();
  }
  return std::move(c.value());
}

size_t write_then_check(ExCache& cache, uint64_t round) {
  auto* base = static_cast<char*>(cache.region_base());
  auto word = [&](size_t i, size_t w) { return reinterpret_cast<uint64_t*>(base + i * kLine) + w; };
  for (size_t i = 0; i < kLines; ++i) {
    for (size_t w = 0; w < kLine / 8; w += 41) *word(i, w) = pattern(i, w, round);
  }
  size_t bad = 0;
  for (size_t i = 0; i < kLines; ++i) {
    for (size_t w = 0; w < kLine / 8; w += 41) bad += *word(i, w) != pattern(i, w, round);
  }
  return bad;
}

int g_report_fd = -1;
void report_fatal(const char* message) {
  (void)!write(g_report_fd, message, strlen(message));
}

}  // namespace

TEST_CASE("an ExCache over a memory node that loses, resets and repeats frames loses no write",
          "[faults][memory][excache]") {
  Rig& r = rig();
  auto cache = make_cache(r.backend.get(), nullptr);
  const uint16_t fetch = lego::mem::kFetch, wb = lego::mem::kWriteBack;
  size_t rules[] = {
      // A miss's reply lost: it times out and is fetched again.
      r.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kDrop, fetch, 1, 5)),
      // A write-back's request lost: finish_write_back sends it again.
      r.plan->add(fault_on(Way::kSend, Kind::kRequest, Fault::kDrop, wb, 1, 3)),
      // A reset as a write-back's reply arrives: sent again on a new connection.
      r.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kReset, wb, 1, 6)),
      // A reset as a write-back leaves: start fails, the eviction writes back in place.
      r.plan->add(fault_on(Way::kSend, Kind::kRequest, Fault::kReset, wb, 1, 9)),
  };
  FaultRule copies = fault_on(Way::kReceive, Kind::kReply, Fault::kDuplicate, fetch, 3, 12);
  copies.delay = milliseconds(1);
  r.plan->add(copies);
  for (uint64_t round = 1; round <= 3; ++round) {
    INFO("round " << round);
    CHECK(write_then_check(*cache, round) == 0);
  }
  for (size_t i : rules) {
    INFO("rule " << i);
    CHECK(r.plan->fired(i) == 1);
  }
}

TEST_CASE(
    "an ExCache over a memory node that never answers a fetch ends in its fatal hook, "
    "naming the address",
    "[faults][memory][excache]") {
  lego::testing::ChildEnd end = lego::testing::run_child([](int report_fd) {
    g_report_fd = report_fd;
    Rig child;
    if (!child.open().is_ok()) _exit(3);
    auto cache = make_cache(child.backend.get(), report_fatal);
    if (write_then_check(*cache, 1) != 0) _exit(4);
    child.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kDrop, lego::mem::kFetch, -1));
    auto* target = static_cast<char*>(cache->region_base()) + 3 * kLine;  // evicted long ago
    lego::testing::report_line(report_fd, target);
    volatile char c = *target;
    (void)c;
  });
  INFO(end.report);
  const std::string addr = lego::testing::reported_line(end.report);
  CHECK(WIFSIGNALED(end.status));
  CHECK_THAT(end.report, Catch::Contains("LineBackend::fetch_batch failed (errno " +
                                         std::to_string(ETIMEDOUT) + ") at " + addr));
}
