// The monitor's count of what it placed on a memory node that the node's heartbeats do not
// show yet (daemons/monitor/monitor.cc): a Monitor in this process, and this test speaking
// for the memory node (registration and heartbeats with the figures it chooses) and for the
// processor (kPlace). A placement counts against the node's free capacity from the moment
// it is handed out until a heartbeat shows the node's promise grown by it, never twice; one
// never placed stops counting after a few heartbeats. Guards issue 13's placement by free
// capacity: counted twice, a cluster placing fast near full refused room it had.
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <thread>

#include "lego/fit.h"
#include "lego/memory_proto.h"
#include "lego/monitor.h"
#include "lego/monitor_proto.h"
#include "tests/libfit/cluster_fixture.h"

using namespace lego;
using namespace std::chrono_literals;

namespace {

constexpr fit::NodeId kProcessor = 1, kMemory = 2, kMonitorNode = 3;
constexpr uint64_t kVR = mem::kVRegionBytes;
constexpr uint64_t kIncarnation = 0x5eed;

struct Rig {
  fit::ClusterConfig config;
  mon::Monitor monitor{mon::MonitorOptions{7}};
  std::unique_ptr<fit::Node> server, memory, processor;

  Rig() {
    config = testing::make_cluster(3, "tcp");
    config.nodes[2].role = fit::Role::kMonitor;
    config.heartbeat = 200ms;
    config.lost_after = 60s;  // no node is lost while the test runs
    auto s = fit::Node::create(config, kMonitorNode);
    REQUIRE(s);
    server = std::move(s.value());
    monitor.serve(*server);
    REQUIRE(server->start());
    auto m = fit::Node::create(config, kMemory);
    REQUIRE(m);
    memory = std::move(m.value());
    auto p = fit::Node::create(config, kProcessor);
    REQUIRE(p);
    processor = std::move(p.value());
  }
  ~Rig() { monitor.stop(); }

  mon::NodeUsage usage(uint64_t reserved) const {
    return mon::NodeUsage{4 * kVR, reserved, 0, 0, 0};  // 64 MiB: four vRegions
  }
  void register_node() {
    mon::RegisterRequest r{};
    r.version = mon::kProtoVersion;
    r.incarnation = kIncarnation;
    r.self.id = kMemory;
    r.self.port = config.nodes[1].port;
    r.self.provider = static_cast<uint8_t>(config.nodes[1].provider);
    strcpy(r.self.address, config.nodes[1].address.c_str());
    r.usage = usage(0);
    std::vector<std::byte> rep(sizeof(mon::RegisterReply));
    auto res = memory->send_reply(kMonitorNode, mon::kRegister,
                                  {reinterpret_cast<const std::byte*>(&r), sizeof r}, rep);
    INFO(res.status().message());
    REQUIRE(res);
  }
  void heartbeat(uint64_t reserved) {
    mon::NodeHeartbeat h{kMemory, 0, kIncarnation, usage(reserved)};
    auto res = memory->send_reply(kMonitorNode, mon::kNodeHeartbeat,
                                  {reinterpret_cast<const std::byte*>(&h), sizeof h}, {});
    INFO(res.status().message());
    REQUIRE(res);
  }
  // kPlace of vRegion v on one node: OK, or the monitor's refusal.
  Status place(uint64_t v) {
    mon::PlaceRequest p{};
    p.process_key = 0xabc;
    p.owner_node = kProcessor;
    p.pid = 4242;
    p.vregion = v;
    p.replicas = 1;
    std::vector<std::byte> rep(sizeof(mon::PlaceReply));
    auto res = processor->send_reply(kMonitorNode, mon::kPlace,
                                     {reinterpret_cast<const std::byte*>(&p), sizeof p}, rep);
    return res.status();
  }
};

}  // namespace

TEST_CASE("a placement counts against its node once: handed out, then in the node's promise",
          "[monitor]") {
  Rig rig;
  rig.register_node();
  REQUIRE(rig.place(0));
  REQUIRE(rig.place(1));
  // The node placed both and says so at once (well within a heartbeat of the answers): 32 of
  // its 64 MiB are promised, and nothing else is on its way.
  rig.heartbeat(2 * kVR);
  CHECK(rig.place(2));
  CHECK(rig.place(3));
  // Now it is full, counting the two handed out that its figure does not show yet.
  Status full = rig.place(4);
  INFO(full.message());
  CHECK(full.code() == ENOSPC);
  rig.heartbeat(4 * kVR);
  CHECK(rig.place(5).code() == ENOSPC);
  // Two unplaced: room for two again, not more.
  rig.heartbeat(2 * kVR);
  CHECK(rig.place(6));
  CHECK(rig.place(7));
  CHECK(rig.place(8).code() == ENOSPC);
}

TEST_CASE("a placement handed out and never placed stops counting after a few heartbeats",
          "[monitor]") {
  Rig rig;
  rig.register_node();
  for (uint64_t v = 0; v < 4; v++) REQUIRE(rig.place(v));
  CHECK(rig.place(4).code() == ENOSPC);
  // The processor died before placing any: the node's promise stays 0. Four heartbeats
  // (800 ms) later the monitor stops counting them.
  const auto end = std::chrono::steady_clock::now() + 3s;
  bool placed = false;
  while (!placed && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(200ms);
    rig.heartbeat(0);
    placed = rig.place(5).is_ok();
  }
  CHECK(placed);
}
