// Description: the runtime's ClusterBackend against real MemoryNodes (in this process, over
// tcp, each on a fit::Node of its own): vRegions placed on `replicas` distinct nodes, every
// write-back on all of them, a memory node stopped mid-run (its connections cut, nothing
// listening: what a SIGKILLed lego-memd looks like) read around at once, its vRegions copied
// again onto the survivors in the background, and a second node stopped after that still
// loses nothing; with replicas 1 the loss is EHOSTDOWN naming the node; a vRegion whose last
// byte is freed is unplaced; a cluster without room fails the placement. Guards issue 13.
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <ctime>
#include <thread>
#include <vector>

#include "lego/excache.h"
#include "lego/fit.h"
#include "lego/memory_node.h"
#include "lego/memory_proto.h"
#include "libfit/fault_injection.h"
#include "runtime/preload/cluster_backend.h"
#include "tests/libfit/cluster_fixture.h"

namespace {

using lego::LineBackend;
using lego::runtime::ClusterBackend;
using lego::runtime::ClusterBackendOptions;
using Clock = std::chrono::steady_clock;

constexpr size_t kLine = lego::kExCacheLineBytes;
constexpr uint64_t kVR = lego::mem::kVRegionBytes;
// A region base as the ExCache's would be: page aligned, not vRegion aligned.
constexpr uint64_t kBase = (uint64_t{1} << 44) + 5 * 4096;
constexpr uint64_t kRegion = 64 * kVR;

// Which vRegions the test says hold allocated bytes (the preload's RegionAllocator's role).
std::atomic<bool> g_used[64];
bool used(uint64_t v) {
  return v < 64 && g_used[v].load();
}

// Memory nodes 2..n+1 and processor node 1, over tcp on loopback.
struct Cluster {
  lego::fit::ClusterConfig config;
  std::vector<std::unique_ptr<lego::mem::MemoryNode>> memory;
  std::vector<std::unique_ptr<lego::fit::Node>> servers;
  std::unique_ptr<lego::fit::Node> client;

  // `plan`: the memory nodes' own calls (their copy batches) go through it.
  Cluster(int memory_nodes, size_t capacity,
          std::shared_ptr<lego::testing::FaultPlan> plan = nullptr) {
    config = lego::testing::make_cluster(memory_nodes + 1, "tcp");
    config.timeout = std::chrono::milliseconds(2000);
    for (int i = 0; i < memory_nodes; i++) {
      lego::mem::MemoryNodeOptions o;
      o.capacity_bytes = capacity;
      memory.push_back(std::make_unique<lego::mem::MemoryNode>(o));
      auto s = lego::fit::Node::create(config, static_cast<lego::fit::NodeId>(i + 2));
      REQUIRE(s);
      servers.push_back(std::move(s.value()));
      if (plan != nullptr) lego::testing::inject_faults(*servers.back(), plan);
      memory.back()->serve(*servers.back());
      REQUIRE(servers.back()->start());
    }
    auto c = lego::fit::Node::create(config, 1);
    REQUIRE(c);
    client = std::move(c.value());
  }
  ~Cluster() {
    for (size_t i = 0; i < memory.size(); i++) stop(static_cast<int>(i));
  }
  // Memory node id-2 stops serving: its connections are cut, nothing listens any more.
  void stop(int index) {
    if (memory[static_cast<size_t>(index)] == nullptr) return;
    memory[static_cast<size_t>(index)]->stop();
    servers[static_cast<size_t>(index)]->stop();
    memory[static_cast<size_t>(index)].reset();
  }
  // rma: fetch by one-sided reads of the granted blocks (lego-run --rma on); adaptive:
  // where they have been faster (lego-run --rma auto on verbs).
  std::unique_ptr<ClusterBackend> backend(uint32_t replicas, bool rma = false,
                                          bool adaptive = false) {
    ClusterBackendOptions o;
    o.replicas = replicas;
    o.rma = rma || adaptive;
    o.rma_adaptive = adaptive;
    for (const auto& n : config.nodes) {
      if (n.role == lego::fit::Role::kMemory) o.memory_nodes.push_back(n.id);
    }
    o.program = "cluster-test";
    auto b = ClusterBackend::open(client.get(), o);
    INFO(b.status().message());
    REQUIRE(b);
    REQUIRE(b.value()->set_region(kBase, kRegion));
    b.value()->set_used_fn(used);
    return std::move(b.value());
  }
  uint64_t placed_on(int index) const {
    return memory[static_cast<size_t>(index)]->stats().vregions_placed;
  }
};

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

// Line k of vRegion v.
uint64_t line_addr(uint64_t v, uint64_t k) {
  const uint64_t origin = kBase & ~(kVR - 1);
  return origin + v * kVR + 8 * 4096 + k * kLine;
}

void place(ClusterBackend& b, uint64_t first, uint64_t last) {
  for (uint64_t v = first; v <= last; v++) g_used[v] = true;
  lego::Status st = b.sync_placement(first, last);
  INFO(st.message());
  REQUIRE(st);
}

// Writes tag v*1000+k into lines 0..n-1 of vRegions [0, vregions), asynchronously.
void write_all(ClusterBackend& b, uint64_t vregions, uint64_t n, uint64_t round) {
  for (uint64_t v = 0; v < vregions; v++) {
    std::vector<Line> lines;
    lines.reserve(n);
    std::vector<LineBackend::WriteBack> wb;
    for (uint64_t k = 0; k < n; k++) {
      lines.emplace_back(round * 1000000 + v * 1000 + k);
      wb.push_back({line_addr(v, k), lines.back().data});
    }
    LineBackend::WriteBackTicket t;
    lego::Status st = b.start_write_back(wb, &t);
    INFO(st.message());
    REQUIRE(st);
    st = b.finish_write_back(&t);
    INFO(st.message());
    REQUIRE(st);
  }
}

void check_all(ClusterBackend& b, uint64_t vregions, uint64_t n, uint64_t round) {
  for (uint64_t v = 0; v < vregions; v++) {
    for (uint64_t k = 0; k < n; k++) {
      Line out;
      lego::Status st = b.fetch(line_addr(v, k), std::span<std::byte, kLine>(out.data, kLine));
      INFO("vRegion " << v << " line " << k << ": " << st.message());
      REQUIRE(st);
      CHECK(out.tag() == round * 1000000 + v * 1000 + k);
    }
  }
}

bool wait_for(const std::function<bool()>& done, int seconds) {
  const auto end = Clock::now() + std::chrono::seconds(seconds);
  while (!done()) {
    if (Clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

void reset_used() {
  for (auto& u : g_used) u = false;
}

}  // namespace

TEST_CASE("two replicas: a lost memory node is read around at once and copied again", "[cluster]") {
  // With one-sided reads too: a read from the stopped node fails, is asked for by kFetch,
  // which finds the node lost, and the other replica is read; the new replicas get grants.
  const bool rma = GENERATE(false, true);
  CAPTURE(rma);
  reset_used();
  Cluster c(4, 256u << 20);
  auto b = c.backend(2, rma);
  constexpr uint64_t kVRegions = 6, kLines = 40;
  place(*b, 0, kVRegions - 1);
  // Every vRegion on two distinct nodes: 12 placements over 4 nodes.
  uint64_t placed = 0;
  for (int i = 0; i < 4; i++) placed += c.placed_on(i);
  CHECK(placed == 2 * kVRegions);
  write_all(*b, kVRegions, kLines, 1);
  check_all(*b, kVRegions, kLines, 1);

  // The node holding the most vRegions goes.
  int victim = 0;
  for (int i = 1; i < 4; i++) victim = c.placed_on(i) > c.placed_on(victim) ? i : victim;
  const uint64_t lost = c.placed_on(victim);
  REQUIRE(lost > 0);
  // The times lego-bench's failover row reads (CLOCK_MONOTONIC ns): none before a loss.
  CHECK(b->stats().first_loss_ns == 0);
  CHECK(b->stats().first_failover_ns == 0);
  CHECK(b->stats().rereplication_start_ns == 0);
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  const uint64_t stopped_ns = uint64_t(ts.tv_sec) * 1000000000 + uint64_t(ts.tv_nsec);
  c.stop(victim);
  check_all(*b, kVRegions, kLines, 1);  // every line read from the other copy
  // Written while the copies are made again: nothing may be lost either. (Every write-back
  // goes to both replicas: this finds the node lost, if no read did.)
  write_all(*b, kVRegions, kLines, 2);
  CHECK(b->stats().nodes_lost == 1);
  REQUIRE(wait_for([&] { return b->stats().vregions_rereplicated >= lost; }, 20));
  CHECK(b->stats().bytes_copied > 0);
  // Found lost after the stop; the first miss around it done after that; the copies after.
  const lego::runtime::ClusterStats t = b->stats();
  CHECK(t.first_loss_ns >= stopped_ns);
  CHECK(t.first_failover_ns >= t.first_loss_ns);
  CHECK(t.rereplication_start_ns >= t.first_loss_ns);
  CHECK(t.rereplication_end_ns > t.rereplication_start_ns);
  check_all(*b, kVRegions, kLines, 2);

  // A second node after re-replication (one that holds copies: a node holding none would
  // go unnoticed): every vRegion still has a copy.
  int second = -1;
  for (int i = 0; i < 4; i++) {
    if (i != victim && (second < 0 || c.placed_on(i) > c.placed_on(second))) second = i;
  }
  REQUIRE(c.placed_on(second) > 0);
  c.stop(second);
  check_all(*b, kVRegions, kLines, 2);
  // Every write-back goes to both replicas: this finds the node lost if no read did (a
  // fetch reads the first replica only).
  write_all(*b, kVRegions, kLines, 3);
  check_all(*b, kVRegions, kLines, 3);
  CHECK(b->stats().nodes_lost == 2);
  if (rma) {
    CHECK(b->stats().rma_lines > 0);
  } else {
    CHECK(b->stats().rma_lines == 0);
  }
}

TEST_CASE("two replicas on two nodes: a fetch whose node is gone is read from the other",
          "[cluster]") {
  const bool rma = GENERATE(false, true);
  CAPTURE(rma);
  reset_used();
  Cluster c(2, 512u << 20);
  auto b = c.backend(2, rma);
  // 16 vRegions, each on both nodes: node 2 is the first replica (the one read) of some of
  // them unless 16 draws all put it second (2^-16).
  constexpr uint64_t kVRegions = 16;
  place(*b, 0, kVRegions - 1);
  write_all(*b, kVRegions, 2, 1);
  c.stop(0);
  check_all(*b, kVRegions, 2, 1);
  CHECK(b->stats().nodes_lost == 1);
  CHECK(b->stats().failovers >= 1);
  // Only fetches met the lost node: the fetch that went around it is the time.
  CHECK(b->stats().first_failover_ns >= b->stats().first_loss_ns);
  CHECK(b->stats().first_loss_ns > 0);
  // One-sided: every line came from a grant (the lost node's reads fell back to kFetch).
  if (rma) {
    CHECK(b->stats().rma_lines == kVRegions * 2);
    CHECK(b->stats().rma_fallbacks >= 1);
  }
}

TEST_CASE("rma auto: one-line misses go the way that has been faster from the memory node",
          "[cluster][rma]") {
  // The processor's sent requests of one kind are held 3 ms each (libfit's fault injection
  // on the real transport): kFetch, so requests are slower and one-sided reads must win, or
  // one-sided reads (served by libfit over tcp as requests of their own opcode), so they
  // are slower and kFetch must win. Both miss paths are driven: the handler thread's
  // (start_fetch_batch, fetch_ready, finish_fetch_batch) and the synchronous one (fetch,
  // as the sigbus delivery's). Every line must read what was written either way.
  const bool slow_requests = GENERATE(true, false);
  CAPTURE(slow_requests);
  reset_used();
  Cluster c(1, 256u << 20);
  auto plan = std::make_shared<lego::testing::FaultPlan>();
  lego::testing::inject_faults(*c.client, plan);
  auto b = c.backend(1, false, /*adaptive=*/true);
  constexpr uint64_t kLines = 64, kRounds = 3;
  place(*b, 0, 0);
  write_all(*b, 1, kLines, 1);
  auto slow = lego::testing::fault_on(
      lego::testing::Way::kSend, lego::fit::wire::Kind::kRequest, lego::testing::Fault::kDelay,
      slow_requests ? uint16_t{lego::mem::kFetch} : uint16_t{0xfffe} /* libfit's kRmaRead */, -1);
  slow.delay = std::chrono::milliseconds(3);
  const size_t rule = plan->add(slow);
  uint64_t n = 0;
  for (uint64_t round = 0; round < kRounds; round++) {
    for (uint64_t k = 0; k < kLines; k++, n++) {
      Line out;
      const uint64_t addr[1] = {line_addr(0, (k * 7 + round) % kLines)};
      lego::Status st;
      if (n % 2 == 0) {
        LineBackend::FetchTicket t;
        st = b->start_fetch_batch(addr, out.data, &t);
        if (st) {
          while (!b->fetch_ready(&t)) {
          }
          st = b->finish_fetch_batch(&t);
        }
      } else {
        st = b->fetch(addr[0], std::span<std::byte, kLine>(out.data, kLine));
      }
      INFO("fetch " << n << ": " << st.message());
      REQUIRE(st);
      CHECK(out.tag() == 1000000 + (k * 7 + round) % kLines);
    }
  }
  const lego::runtime::ClusterStats s = b->stats();
  INFO("rma_lines " << s.rma_lines << ", rma_requests " << s.rma_requests << ", rma_probes "
                    << s.rma_probes << ", averages: request " << s.rma_request_ns
                    << " ns, one-sided " << s.rma_one_sided_ns << " ns");
  CHECK(plan->fired(rule) > 0);
  CHECK(s.rma_fallbacks == 0);
  CHECK(s.rma_lines + s.rma_requests == n);  // every miss had a grant, and went one way
  CHECK(s.rma_probes >= n / 64);             // the way not favoured is measured again
  // The slow way: its first measurement and the probes (1 in 64), no more.
  const uint64_t slow_way = slow_requests ? s.rma_requests : s.rma_lines;
  CHECK(slow_way <= n / 64 + 3);
  if (slow_requests) {
    CHECK(s.rma_request_ns > s.rma_one_sided_ns);
  } else {
    CHECK(s.rma_one_sided_ns > s.rma_request_ns);
  }
}

TEST_CASE(
    "a fork during a copy: the child reads a full replica's snapshot, never the joining one's",
    "[cluster]") {
  reset_used();
  // The memory nodes' copy batches crawl (300 ms each): the fork comes while the joining
  // replica holds a few of the vRegion's lines at most.
  auto plan = std::make_shared<lego::testing::FaultPlan>();
  auto slow = lego::testing::fault_on(lego::testing::Way::kSend, lego::fit::wire::Kind::kRequest,
                                      lego::testing::Fault::kDelay, lego::mem::kWriteBack, -1);
  slow.delay = std::chrono::milliseconds(300);
  plan->add(slow);
  Cluster c(3, 256u << 20, plan);
  auto b = c.backend(2);
  constexpr uint64_t kLines = 200;  // 7 copy batches
  place(*b, 0, 0);
  write_all(*b, 1, kLines, 1);
  // The replica read first (the one whose fetch counter moves) goes; the node without a
  // copy will be the joining one.
  uint64_t before[3];
  for (int i = 0; i < 3; i++) before[i] = c.memory[static_cast<size_t>(i)]->stats().fetches;
  check_all(*b, 1, 1, 1);
  int victim = -1, joiner = -1;
  for (int i = 0; i < 3; i++) {
    if (c.memory[static_cast<size_t>(i)]->stats().fetches > before[i]) victim = i;
    if (c.placed_on(i) == 0) joiner = i;
  }
  REQUIRE(victim >= 0);
  REQUIRE(joiner >= 0);
  c.stop(victim);
  check_all(*b, 1, kLines, 1);  // read around; the loss starts the repair
  REQUIRE(wait_for([&] { return c.placed_on(joiner) == 1; }, 10));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  REQUIRE(b->stats().vregions_rereplicated == 0);  // still copying

  auto snap = b->snapshot();
  INFO(snap.status().message());
  REQUIRE(snap);
  write_all(*b, 1, kLines, 2);  // the parent moves on; the child must not see it
  auto check_child = [&] {
    for (uint64_t k = 0; k < kLines; k++) {
      Line out;
      lego::Status st = b->fetch_snapshot(snap.value(), line_addr(0, k),
                                          std::span<std::byte, kLine>(out.data, kLine));
      INFO("line " << k << ": " << st.message());
      REQUIRE(st);
      CHECK(out.tag() == 1000000 + k);
    }
  };
  check_child();
  // The copy ends; the child still reads what the parent had at the fork.
  REQUIRE(wait_for([&] { return b->stats().vregions_rereplicated == 1; }, 20));
  check_child();
  check_all(*b, 1, kLines, 2);
  b->drop_snapshot(snap.value());
}

// Guards start-up's lazy channels (cluster_backend.cc): open() connects one channel per
// memory node, not channels_per_peer; placements share it; the miss path's first call waits
// for the others (connected by the heartbeat thread) instead of connecting one itself.
TEST_CASE("open connects one channel per node; the miss path waits for the rest", "[cluster]") {
  reset_used();
  Cluster c(2, 256 << 20);
  auto b = c.backend(2);
  const auto authenticated = [&](int i) {
    return c.servers[static_cast<size_t>(i)]->stats().connections_authenticated;
  };
  CHECK(authenticated(0) == 1);
  CHECK(authenticated(1) == 1);
  place(*b, 0, 1);
  CHECK(authenticated(0) == 1);
  CHECK(authenticated(1) == 1);
  write_all(*b, 2, 4, 1);
  const uint64_t all = static_cast<uint64_t>(c.config.channels_per_peer);
  CHECK(authenticated(0) == all);
  CHECK(authenticated(1) == all);
  check_all(*b, 2, 4, 1);
}

TEST_CASE("one replica: losing its node is EHOSTDOWN naming the node", "[cluster]") {
  reset_used();
  Cluster c(2, 256u << 20);
  auto b = c.backend(1);
  place(*b, 0, 3);
  write_all(*b, 4, 4, 1);
  c.stop(0);
  c.stop(1);
  Line out;
  lego::Status st = b->fetch(line_addr(0, 0), std::span<std::byte, kLine>(out.data, kLine));
  if (!st) st = b->fetch(line_addr(0, 0), std::span<std::byte, kLine>(out.data, kLine));
  REQUIRE_FALSE(st);
  CHECK(st.code() == EHOSTDOWN);
  CHECK(std::string(b->loss_message()).find("memory node ") != std::string::npos);
}

TEST_CASE("a vRegion whose last byte is freed is unplaced on every replica", "[cluster]") {
  reset_used();
  Cluster c(3, 256u << 20);
  auto b = c.backend(2);
  place(*b, 2, 2);
  CHECK(b->stats().vregions_placed == 1);
  g_used[2] = false;
  REQUIRE(b->sync_placement(2, 2));
  CHECK(b->stats().vregions_unplaced == 1);
  uint64_t placed = 0;
  for (int i = 0; i < 3; i++) placed += c.placed_on(i);
  CHECK(placed == 0);
  // A line of an unplaced vRegion reads as zeros, with no call.
  Line out(7);
  REQUIRE(b->fetch(line_addr(2, 0), std::span<std::byte, kLine>(out.data, kLine)));
  CHECK(out.tag() == 0);
}

TEST_CASE("a cluster without room for another vRegion fails the placement with ENOMEM",
          "[cluster]") {
  reset_used();
  Cluster c(2, 2 * kVR);  // two vRegions each
  auto b = c.backend(2);
  place(*b, 0, 1);  // both nodes full now
  g_used[2] = true;
  lego::Status st = b->sync_placement(2, 2);
  CHECK(st.code() == ENOMEM);
}
