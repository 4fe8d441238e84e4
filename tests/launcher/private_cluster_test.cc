// The private cluster (runtime/launcher/private_cluster.h): what lego-run starts without
// --config, and lego-bench measures its floor across. Guards: the memory node answers a
// processor with the cluster's key, over tcp from a network namespace of its own named
// for the run (lego-run-PID, the host's end lgoPIDa, which the sweep of killed runs looks
// for) and over shm; with an export a storage node answers too; stop() leaves no daemon,
// namespace or veth behind; a daemon that cannot start is an error naming it, with
// nothing left; memory_exited() tells when lego-memd died.
#include "runtime/launcher/private_cluster.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <thread>

#include "lego/fit.h"
#include "lego/netns.h"
#include "tests/support.h"

using namespace lego;
using lego::testing::runfile;
using lego::testing::temp_dir;

namespace {

bool exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

bool alive(pid_t pid) {
  return pid > 0 && kill(pid, 0) == 0;
}

// The kernel frees a deleted namespace's interfaces asynchronously: give it a moment.
bool gone_soon(const std::string& path) {
  for (int i = 0; i < 200 && exists(path); i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return !exists(path);
}

launch::PrivateClusterOptions options(const std::string& dir, const std::string& transport) {
  launch::PrivateClusterOptions o;
  o.dir = dir;
  o.transport = *fit::parse_provider(transport);
  o.isolate = transport == "tcp";
  o.memory_capacity = 64 << 20;
  o.memd_path = runfile("daemons/memory/lego-memd");
  o.stord_path = runfile("daemons/storage/lego-stord");
  o.id = getpid();
  o.who = "private_cluster_test";
  return o;
}

// A processor node of `c` reaches `node` (authenticated with the cluster's key).
Status reach(const launch::PrivateCluster& c, fit::NodeId node) {
  auto n = fit::Node::create(c.config(), 1);
  if (!n) return n.status();
  return n.value()->connect(node);
}

}  // namespace

TEST_CASE(
    "over tcp: the memory node answers from a namespace named for the run; stop leaves nothing") {
  const std::string dir = temp_dir("pc-tcp");
  const std::string ns = launch::private_namespace(getpid());
  const std::string link = "/sys/class/net/" + launch::private_link_name(getpid());
  pid_t memd = -1;
  {
    auto c = launch::PrivateCluster::start(options(dir, "tcp"));
    INFO(c.status().message());
    REQUIRE(c.is_ok());
    const launch::PrivateCluster& pc = *c.value();
    CHECK(pc.network_namespace() == ns);
    CHECK(exists(netns::namespace_path(ns)));
    CHECK(exists(link));
    CHECK(pc.config_path() == dir + "/cluster.toml");
    struct stat st;
    REQUIRE(stat(pc.config_path().c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);  // it holds the key
    REQUIRE(pc.config().nodes.size() == 2);
    CHECK(pc.config().nodes[1].address == netns::ipv4_string(launch::private_subnet(getpid()) + 2));
    memd = pc.memory_pid();
    CHECK(alive(memd));
    Status st2 = reach(pc, 2);
    INFO(st2.message());
    CHECK(st2.is_ok());
    CHECK_FALSE(c.value()->memory_exited());
    // stop() itself removes everything: lego-run stops its cluster and exits without
    // destroying it.
    c.value()->stop();
    CHECK_FALSE(alive(memd));
    CHECK_FALSE(exists(netns::namespace_path(ns)));
    CHECK(gone_soon(link));
    c.value()->stop();  // idempotent
  }
}

TEST_CASE("over shm, and with an export a storage node beside the memory node") {
  const std::string dir = temp_dir("pc-shm");
  {
    auto c = launch::PrivateCluster::start(options(dir, "shm"));
    INFO(c.status().message());
    REQUIRE(c.is_ok());
    CHECK(c.value()->network_namespace().empty());
    CHECK(reach(*c.value(), 2).is_ok());
  }
  const std::string exported = temp_dir("pc-export");
  launch::PrivateClusterOptions o = options(dir, "tcp");
  o.export_dir = exported;
  pid_t stord = -1;
  {
    auto c = launch::PrivateCluster::start(o);
    INFO(c.status().message());
    REQUIRE(c.is_ok());
    REQUIRE(c.value()->config().nodes.size() == 3);
    CHECK(c.value()->config().nodes[2].role == fit::Role::kStorage);
    stord = c.value()->storage_pid();
    CHECK(alive(stord));
    Status st = reach(*c.value(), 3);
    INFO(st.message());
    CHECK(st.is_ok());
  }
  CHECK_FALSE(alive(stord));
  CHECK_FALSE(exists(netns::namespace_path(launch::private_namespace(getpid()))));
  // (The veth pair goes asynchronously: the next case reuses its name.)
  CHECK(gone_soon("/sys/class/net/" + launch::private_link_name(getpid())));
}

TEST_CASE("a memory node that cannot start is an error naming it, and nothing is left") {
  const std::string dir = temp_dir("pc-bad");
  launch::PrivateClusterOptions o = options(dir, "tcp");
  o.memory_capacity = 1;  // lego-memd refuses it
  auto c = launch::PrivateCluster::start(o);
  INFO(c.status().message());
  CHECK(c.status().code() == EIO);
  CHECK(c.status().message().find("private memory node 2 did not start") != std::string::npos);
  CHECK_FALSE(exists(netns::namespace_path(launch::private_namespace(getpid()))));
  CHECK(gone_soon("/sys/class/net/" + launch::private_link_name(getpid())));
  o = options(dir, "tcp");
  o.memd_path = dir + "/no-such-lego-memd";
  c = launch::PrivateCluster::start(o);
  CHECK(c.status().code() == ENOENT);
  CHECK(c.status().message().find("no-such-lego-memd") != std::string::npos);
}

TEST_CASE("memory_exited tells when lego-memd died") {
  const std::string dir = temp_dir("pc-died");
  auto c = launch::PrivateCluster::start(options(dir, "shm"));
  INFO(c.status().message());
  REQUIRE(c.is_ok());
  CHECK_FALSE(c.value()->memory_exited());
  kill(c.value()->memory_pid(), SIGKILL);
  bool exited = false;
  for (int i = 0; i < 200 && !exited; i++) {
    exited = c.value()->memory_exited();
    if (!exited) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(exited);
  CHECK(c.value()->memory_exited());  // and stays so
}
