// lego-mond with real lego-memd daemons, each in a network namespace of its own: a memory
// node started before the monitor serves anyway and registers once it is up; registration and
// heartbeats; kPlace weighted over the live nodes (R distinct, ENOSPC when fewer can take it);
// hot-plug (a node started later receives placements; the reply names where it listens);
// lost after lost_after_ms; a restarted monitor rebuilds the same view of processes' vRegions
// from the nodes' re-registrations; a duplicate id and a wrong key are refused with a clear
// message and exit status 1 (issue 13).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "lego/memory_proto.h"
#include "lego/monitor_proto.h"
#include "tests/libfit/cluster_fixture.h"
#include "tests/netns/netns.h"
#include "tests/support.h"

using namespace lego;
using namespace std::chrono_literals;
using lego::testing::Topology;

namespace {

// Hosts of the topology: 0 this test (the processor, node 1), 1 the monitor (node 9),
// 2.. memory nodes 2.. .
constexpr int kHosts = 6;
constexpr fit::NodeId kMonitor = 9;
constexpr int kHeartbeatMs = 100, kLostAfterMs = 700;

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string hex_key(const std::vector<uint8_t>& key) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (uint8_t b : key) {
    out += d[b >> 4];
    out += d[b & 15];
  }
  return out;
}

struct Cluster {
  std::unique_ptr<Topology> topo;
  std::string dir, file;
  uint16_t port = 0;
  std::vector<uint8_t> key = testing::random_key();
  std::unique_ptr<fit::Node> node;  // this test, node 1 in host 0
  std::map<std::string, pid_t> daemons;

  Cluster() {
    auto t = Topology::create(kHosts, "mon" + std::to_string(getpid() % 100000));
    INFO(t.status().message());
    REQUIRE(t.is_ok());
    topo = std::move(t.value());
    dir = testing::temp_dir("monitor");
    port = static_cast<uint16_t>(20000 + getpid() % 20000);
    file = write_config("cluster.toml", key, {});
    REQUIRE(topo->enter(0).is_ok());  // this thread is the processor
    auto c = fit::ClusterConfig::parse_file(file);
    REQUIRE(c.is_ok());
    auto n = fit::Node::create(c.value(), 1);
    REQUIRE(n.is_ok());
    node = std::move(n.value());
  }
  ~Cluster() {
    for (auto& [name, pid] : daemons) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }

  // The cluster file: the processor, the monitor and memory nodes 2..4 (5 only when asked:
  // the files of misconfigured nodes), with `moved` nodes at another host's address.
  std::string write_config(const std::string& name, const std::vector<uint8_t>& with_key,
                           std::map<fit::NodeId, int> moved, bool with_5 = false) {
    std::string t = "[cluster]\nkey = \"" + hex_key(with_key) +
                    "\"\ntimeout_ms = 2000\nheartbeat_ms = " + std::to_string(kHeartbeatMs) +
                    "\nlost_after_ms = " + std::to_string(kLostAfterMs) + "\n";
    auto add = [&](fit::NodeId id, const char* role, int host) {
      if (moved.count(id)) host = moved[id];
      t += "[[node]]\nid = " + std::to_string(id) + "\nrole = \"" + role + "\"\naddress = \"" +
           topo->address(host) + "\"\nport = " + std::to_string(port) + "\n";
    };
    add(1, "processor", 0);
    add(kMonitor, "monitor", 1);
    for (fit::NodeId m = 2; m <= 4; m++) add(m, "memory", static_cast<int>(m));
    if (with_5) add(5, "memory", 5);
    const std::string path = dir + "/" + name;
    std::ofstream(path) << t;
    return path;
  }

  // Starts `argv` in `host` with --ready-fd, stderr to dir/NAME.err; waits for "ready"
  // unless told not to. Returns its pid.
  pid_t start(const std::string& name, int host, std::vector<std::string> argv,
              bool wait_ready = true) {
    int p[2];
    REQUIRE(pipe(p) == 0);  // the write end is inherited
    argv.push_back("--ready-fd");
    argv.push_back(std::to_string(p[1]));
    std::vector<std::string> sh = {"sh", "-c", "exec \"$@\" 2>>" + dir + "/" + name + ".err", "sh"};
    sh.insert(sh.end(), argv.begin(), argv.end());
    auto pid = topo->spawn(host, sh);
    close(p[1]);
    INFO(pid.status().message());
    REQUIRE(pid.is_ok());
    daemons[name] = pid.value();
    if (wait_ready) {
      fcntl(p[0], F_SETFL, 0);
      char buf[8] = {};
      const ssize_t n = read(p[0], buf, sizeof buf);
      INFO(name << ": " << read_file(dir + "/" + name + ".err"));
      REQUIRE(n == 6);
    }
    close(p[0]);
    return pid.value();
  }
  pid_t start_memd(fit::NodeId id, const std::string& config = "", int host = -1) {
    return start(
        "memd" + std::to_string(id), host < 0 ? static_cast<int>(id) : host,
        {testing::runfile("daemons/memory/lego-memd"), "--config", config.empty() ? file : config,
         "--node", std::to_string(id), "--capacity", "64M"});
  }
  pid_t start_mond() {
    return start("mond", 1,
                 {testing::runfile("daemons/monitor/lego-mond"), "--config", file, "--node",
                  std::to_string(kMonitor)});
  }
  void kill_daemon(const std::string& name) {
    kill(daemons[name], SIGKILL);
    waitpid(daemons[name], nullptr, 0);
    daemons.erase(name);
  }
  std::string err(const std::string& name) { return read_file(dir + "/" + name + ".err"); }

  template <typename T>
  Result<size_t> call(fit::NodeId to, uint16_t op, const T& req, std::vector<std::byte>& rep) {
    return node->send_reply(to, op, {reinterpret_cast<const std::byte*>(&req), sizeof(req)}, rep);
  }

  // The monitor's view: node id -> state.
  std::map<fit::NodeId, uint32_t> view() {
    std::vector<std::byte> rep(64 * 1024);
    auto r = node->send_reply(kMonitor, mon::kView, {}, rep);
    std::map<fit::NodeId, uint32_t> out;
    if (!r) return out;
    mon::ViewReply head;
    memcpy(&head, rep.data(), sizeof(head));
    for (uint32_t i = 0; i < head.count; i++) {
      mon::NodeInfo n;
      memcpy(&n, rep.data() + sizeof(head) + i * sizeof(n), sizeof(n));
      out[n.where.id] = n.state;
    }
    return out;
  }
  std::string status() {
    std::vector<std::byte> rep(128 * 1024);
    auto r = node->send_reply(kMonitor, mon::kStatus, {}, rep);
    if (!r) return "";
    return std::string(reinterpret_cast<const char*>(rep.data()), r.value());
  }
  Result<std::vector<mon::NodeAddress>> place(uint64_t vregion, uint32_t replicas,
                                              std::vector<fit::NodeId> exclude = {}) {
    mon::PlaceRequest r{};
    r.process_key = 0xabc;
    r.owner_node = 1;
    r.pid = 1;
    r.vregion = vregion;
    r.replicas = replicas;
    r.exclude_count = static_cast<uint32_t>(exclude.size());
    for (size_t i = 0; i < exclude.size(); i++) r.exclude[i] = exclude[i];
    std::vector<std::byte> rep(sizeof(mon::PlaceReply));
    auto res = call(kMonitor, mon::kPlace, r, rep);
    if (!res) return res.status();
    mon::PlaceReply out;
    memcpy(&out, rep.data(), sizeof(out));
    return std::vector<mon::NodeAddress>(out.nodes, out.nodes + out.count);
  }
};

// Waits up to `limit` for `ok()`.
bool eventually(const std::function<bool()>& ok, std::chrono::milliseconds limit = 10s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (ok()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return ok();
}

// The status text's process section (the lines from the first "process" on, up to the
// counters): what must be the same before and after a monitor restart.
std::string processes_of(const std::string& status) {
  std::istringstream in(status);
  std::string line, out;
  bool on = false;
  while (std::getline(in, line)) {
    if (line.rfind("process ", 0) == 0) on = true;
    if (line.rfind("registrations ", 0) == 0) break;
    if (on) out += line + "\n";
  }
  return out;
}

}  // namespace

TEST_CASE("lego-mond: membership, placement, hot-plug, loss, restart and refusals", "[monitor]") {
  Cluster c;
  // A memory node started before the monitor serves anyway, and says so once.
  c.start_memd(2);
  CHECK_THAT(c.err("memd2"), Catch::Contains("does not answer"));
  c.start_mond();
  c.start_memd(3);
  REQUIRE(eventually([&] {
    auto v = c.view();
    return v.size() == 2 && v[2] == mon::kAlive && v[3] == mon::kAlive;
  }));
  CHECK_THAT(c.err("memd2"), Catch::Contains("registered again"));

  // R distinct live nodes; more than live is ENOSPC, saying why.
  {
    auto two = c.place(0, 2);
    INFO(two.status().message());
    REQUIRE(two.is_ok());
    std::set<uint32_t> ids{two.value()[0].id, two.value()[1].id};
    CHECK(ids == std::set<uint32_t>{2, 3});
    auto three = c.place(0, 3);
    CHECK(three.status().code() == ENOSPC);
    CHECK_THAT(three.status().message(), Catch::Contains("2 of 2 can take it"));
    auto excluded = c.place(1, 1, {2});
    REQUIRE(excluded.is_ok());
    CHECK(excluded.value()[0].id == 3);
  }

  // Hot-plug: node 4 joins the running cluster and receives placements; the reply names
  // where it listens.
  c.start_memd(4);
  REQUIRE(eventually([&] { return c.view().size() == 3; }));
  {
    auto three = c.place(2, 3);
    INFO(three.status().message());
    REQUIRE(three.is_ok());
    bool saw4 = false;
    for (auto& a : three.value()) {
      if (a.id == 4) {
        saw4 = true;
        CHECK(std::string(a.address) == c.topo->address(4));
        CHECK(a.port == c.port);
      }
    }
    CHECK(saw4);
  }

  // A process's spaces on nodes 2 and 3: the monitor lists its vRegions and replicas.
  mem::SpaceHandle h2{}, h3{};
  for (fit::NodeId m : {2u, 3u}) {
    mem::OpenRequest o{};
    o.version = mem::kProtoVersion;
    o.pid = 4242;
    o.process_key = 0x5eed;
    strcpy(o.program, "monitor-test");
    std::vector<std::byte> rep(sizeof(mem::OpenReply));
    REQUIRE(c.call(m, mem::kOpen, o, rep).is_ok());
    mem::OpenReply out;
    memcpy(&out, rep.data(), sizeof(out));
    (m == 2 ? h2 : h3) = out.handle;
    std::vector<std::byte> placed(sizeof(mem::PlaceReply));
    for (uint64_t v : {0, 3}) {
      REQUIRE(c.call(m, mem::kPlace, mem::PlaceRequest{out.handle, v, 0, 0, 0}, placed).is_ok());
    }
  }
  {
    std::vector<std::byte> placed(sizeof(mem::PlaceReply));
    REQUIRE(c.call(3, mem::kPlace, mem::PlaceRequest{h3, 7, 0, mem::kPlaceIncomingCopy, 0}, placed)
                .is_ok());
  }
  const std::string want =
      "process 0000000000005eed owner 1 pid 4242 program monitor-test vregions 3\n"
      "  vregion 0: 2 3\n"
      "  vregion 3: 2 3\n"
      "  vregion 7: 3(copying)\n";
  REQUIRE(eventually([&] { return processes_of(c.status()) == want; }));
  const std::string before = c.status();
  CHECK_THAT(before, Catch::Contains("node 2 at " + c.topo->address(2)));
  CHECK_THAT(before, Catch::Contains(" alive incarnation "));

  // The monitor dies and restarts: the nodes re-register (their heartbeat is answered
  // ENOENT) and it shows the same placements.
  c.kill_daemon("mond");
  c.start_mond();
  REQUIRE(eventually([&] { return processes_of(c.status()) == want; }));
  // The placements come back with the nodes holding them; a node holding none re-registers
  // at its next heartbeat, maybe a moment later.
  CHECK(eventually([&] { return c.view().size() == 3; }));
  CHECK_THAT(c.status(), Catch::Contains("unknown_heartbeats "));
  // lego-mond --status prints the same (from the command line, in the processor's host).
  {
    const std::string out = c.dir + "/status.out";
    auto pid = c.topo->spawn(
        0, {"sh", "-c", "exec \"$@\" >" + out, "sh", testing::runfile("daemons/monitor/lego-mond"),
            "--status", "--config", c.file, "--node", std::to_string(kMonitor)});
    REQUIRE(pid.is_ok());
    REQUIRE(Topology::wait_exit(pid.value(), 10s).value() == 0);
    CHECK(processes_of(read_file(out)) == want);
  }

  // lego-memd --status shows its monitor's state.
  {
    const std::string out = c.dir + "/memd-status.out";
    auto pid = c.topo->spawn(
        0, {"sh", "-c", "exec \"$@\" >" + out, "sh", testing::runfile("daemons/memory/lego-memd"),
            "--status", "--config", c.file, "--node", "2"});
    REQUIRE(pid.is_ok());
    REQUIRE(Topology::wait_exit(pid.value(), 10s).value() == 0);
    const std::string text = read_file(out);
    CHECK_THAT(text, Catch::Contains("monitor 9 " + c.topo->address(1) + ":" +
                                     std::to_string(c.port) + " registered last_answer_ms "));
    CHECK_THAT(text, Catch::Contains("monitor_registrations 2\n"));  // before and after
  }

  // A second lego-memd --node 2 (its file puts node 2 on host 5): refused while node 2 is
  // live, then exit 1 naming the conflict.
  {
    const std::string dup = c.write_config("dup.toml", c.key, {{2, 5}});
    pid_t pid = c.start("dup2", 5,
                        {testing::runfile("daemons/memory/lego-memd"), "--config", dup, "--node",
                         "2", "--capacity", "64M"},
                        /*wait_ready=*/false);
    auto code = Topology::wait_exit(pid, 15s);
    c.daemons.erase("dup2");
    REQUIRE(code.is_ok());
    CHECK(code.value() == 1);
    CHECK_THAT(c.err("dup2"), Catch::Contains("node 2 is already live in this cluster (another "
                                              "lego-memd --node 2?)"));
  }
  // A node whose file has another key: the monitor refuses it, exit 1.
  {
    const std::string wrong = c.write_config("wrong.toml", testing::random_key(), {}, true);
    pid_t pid = c.start("wrong5", 5,
                        {testing::runfile("daemons/memory/lego-memd"), "--config", wrong, "--node",
                         "5", "--capacity", "64M"},
                        /*wait_ready=*/false);
    auto code = Topology::wait_exit(pid, 15s);
    c.daemons.erase("wrong5");
    REQUIRE(code.is_ok());
    CHECK(code.value() == 1);
    CHECK_THAT(c.err("wrong5"), Catch::Contains("refused this node's key"));
    CHECK(c.view().count(5) == 0);
  }

  // Node 3 dies: lost after lost_after_ms, no more placements on it.
  c.kill_daemon("memd3");
  REQUIRE(eventually([&] { return c.view()[3] == mon::kLost; }, 5s));
  CHECK_THAT(c.err("mond"), Catch::Contains("memory node 3"));
  // (Each node has 64 MiB: node 2 holds two vRegions, and what the monitor hands out
  // counts until the node's heartbeat shows it: two placements fit, a third not.)
  for (int i = 0; i < 2; i++) {
    auto two = c.place(10 + i, 2);
    INFO(two.status().message());
    REQUIRE(two.is_ok());
    for (auto& a : two.value()) CHECK(a.id != 3);
  }
  auto full = c.place(12, 2);
  CHECK(full.status().code() == ENOSPC);
  CHECK_THAT(full.status().message(), Catch::Contains("node 2: 0 MiB free"));
  CHECK(c.place(40, 3).status().code() == ENOSPC);
  // Its placements are gone from the view; node 2's remain.
  REQUIRE(eventually([&] {
    return processes_of(c.status()) ==
           "process 0000000000005eed owner 1 pid 4242 program monitor-test vregions 2\n"
           "  vregion 0: 2\n"
           "  vregion 3: 2\n";
  }));
  // Restarted empty, it rejoins (a new incarnation) and is placed on again.
  c.start_memd(3);
  REQUIRE(eventually([&] { return c.view()[3] == mon::kAlive; }));
  // (Once a heartbeat shows the two placements above were never made: they stop counting.)
  Status last;
  CHECK(eventually(
      [&] {
        last = c.place(50, 3).status();
        return last.is_ok();
      },
      3s));
  INFO(last.message());
}
