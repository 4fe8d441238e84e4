// The storage client against a real StorageNode (in this process, over tcp) while libfit's
// fault injection (libfit/fault_injection.h) loses its frames or breaks its connection: a
// request on a connection that breaks is sent again and lands once; one whose reply is
// lost gives EIO within the cluster's timeout (it landed, as the file shows); one whose
// connection breaks on every try gives EIO after kAttempts tries and changes nothing.
// Files are read back from the export directly: no write is lost or torn. Guards issue 15
// (faults were tested only by killing processes).
#include <fcntl.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "lego/fit.h"
#include "lego/retry.h"
#include "lego/storage_client.h"
#include "lego/storage_node.h"
#include "libfit/fault_injection.h"
#include "tests/libfit/cluster_fixture.h"
#include "tests/storage/test_files.h"

using namespace lego;
using namespace lego::stor;
using lego::fit::wire::Kind;
using lego::testing::Fault;
using lego::testing::fault_on;
using lego::testing::FaultPlan;
using lego::testing::FaultRule;
using lego::testing::Way;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

// The cluster's timeout_ms: generous enough for calls that must succeed on a loaded host.
constexpr milliseconds kTimeout{1000};

using lego::testing::bytes;
using lego::testing::read_file;

struct Rig {
  std::string exp;  // the export
  std::unique_ptr<StorageNode> storage;
  std::unique_ptr<fit::Node> server, client_node;
  std::shared_ptr<FaultPlan> plan = std::make_shared<FaultPlan>();
  std::unique_ptr<StorageClient> client;

  Rig() {
    exp = lego::testing::make_temp_dir("faults");
    fit::ClusterConfig cluster = lego::testing::make_cluster(2, "tcp");
    cluster.timeout = kTimeout;
    cluster.nodes[1].role = fit::Role::kStorage;
    StorageNodeOptions options;
    options.export_dir = exp;
    lego::testing::start_storage_node(cluster, 2, options, storage, server);
    auto cn = fit::Node::create(cluster, 1);
    REQUIRE(cn.is_ok());
    client_node = std::move(cn.value());
    lego::testing::inject_faults(*client_node, plan);
    auto c = StorageClient::connect(*client_node, 2);
    INFO(c.status().message());
    REQUIRE(c.is_ok());
    client = std::move(c.value());
  }
  ~Rig() {
    plan->clear();
    client.reset();
    client_node.reset();
    server.reset();
    std::string cmd = "rm -rf '" + exp + "'";
    (void)!system(cmd.c_str());
  }

  uint64_t create(const std::string& name, const std::string& content) {
    auto f = client->open(name, O_CREAT | O_RDWR | O_TRUNC, 0644);
    INFO(f.status().message());
    REQUIRE(f.is_ok());
    if (!content.empty()) REQUIRE(client->write(f->handle, 0, bytes(content)).is_ok());
    return f->handle;
  }
  std::string on_disk(const std::string& name) const { return read_file(exp + "/" + name); }
};

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

TEST_CASE(
    "a write whose reply is lost gives EIO within the timeout; it landed once, and the "
    "file is intact",
    "[faults][storage]") {
  Rig rig;
  uint64_t h = rig.create("f", "");
  size_t lost = rig.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kDrop, kWrite));
  auto t0 = Clock::now();
  auto r = rig.client->write(h, 0, bytes("hello"));
  REQUIRE_FALSE(r.is_ok());
  INFO(r.status().message());
  CHECK(r.status().code() == EIO);
  CHECK(seconds_since(t0) < 3 * kTimeout.count() / 1000.0);  // not kAttempts timeouts
  CHECK(rig.plan->fired(lost) == 1);
  CHECK(rig.on_disk("f") == "hello");  // the request ran; only its answer was lost
  REQUIRE(rig.client->write(h, 5, bytes(" world")).is_ok());
  CHECK(rig.on_disk("f") == "hello world");
}

TEST_CASE("a write on a connection that breaks is sent again and lands once", "[faults][storage]") {
  Rig rig;
  uint64_t h = rig.create("f", "0123456789");
  SECTION("broken as the request leaves") {
    size_t reset = rig.plan->add(fault_on(Way::kSend, Kind::kRequest, Fault::kReset, kWrite));
    auto r = rig.client->write(h, 2, bytes("ab"));
    INFO(r.status().message());
    REQUIRE(r.is_ok());
    CHECK(r.value() == 2);
    CHECK(rig.plan->fired(reset) == 1);
    CHECK(rig.on_disk("f") == "01ab456789");
  }
  SECTION("broken as the reply arrives: it ran, and running it again leaves the same bytes") {
    size_t reset = rig.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kReset, kWrite));
    auto r = rig.client->write(h, 8, bytes("XYZ"));
    INFO(r.status().message());
    REQUIRE(r.is_ok());
    CHECK(r.value() == 3);
    CHECK(rig.plan->fired(reset) == 1);
    CHECK(rig.on_disk("f") == "01234567XYZ");
  }
}

TEST_CASE(
    "a connection that breaks on every try gives EIO after kAttempts tries, and the "
    "file keeps what it had",
    "[faults][storage]") {
  Rig rig;
  uint64_t h = rig.create("f", "unchanged");
  size_t reset = rig.plan->add(fault_on(Way::kSend, Kind::kRequest, Fault::kReset, kWrite, -1));
  auto r = rig.client->write(h, 0, bytes("CHANGED!!"));
  REQUIRE_FALSE(r.is_ok());
  INFO(r.status().message());
  CHECK(r.status().code() == EIO);
  CHECK(rig.plan->fired(reset) == lego::kAttempts);
  CHECK(rig.on_disk("f") == "unchanged");
  rig.plan->clear();
  REQUIRE(rig.client->write(h, 0, bytes("changed")).is_ok());
  CHECK(rig.on_disk("f") == "changeded");
}

TEST_CASE(
    "a write of many chunks broken part way comes out whole once the program writes "
    "what was not taken",
    "[faults][storage]") {
  Rig rig;
  uint64_t h = rig.create("big", "");
  const size_t chunk = rig.client->max_io();
  std::string data(4 * chunk + 1000, '\0');
  for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<char>('a' + (i * 7) % 26);
  // The second chunk's reply breaks the connection: the chunks after it fail too.
  size_t reset = rig.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kReset, kWrite, 1, 1));
  size_t done = 0;
  for (int writes = 0; done < data.size() && writes < 10; writes++) {
    auto r = rig.client->write(h, done, bytes(data).subspan(done));
    INFO(r.status().message());
    REQUIRE(r.is_ok());
    REQUIRE(r.value() > 0);
    done += r.value();
  }
  CHECK(done == data.size());
  CHECK(rig.plan->fired(reset) == 1);
  CHECK(rig.on_disk("big") == data);
}

TEST_CASE(
    "path requests: one on a broken connection is sent again; one whose reply is lost "
    "gives EIO, and sent again answers what its first run left",
    "[faults][storage]") {
  Rig rig;
  rig.create("f", "x");
  size_t reset = rig.plan->add(fault_on(Way::kSend, Kind::kRequest, Fault::kReset, kStat));
  auto st = rig.client->stat("f");
  INFO(st.status().message());
  REQUIRE(st.is_ok());
  CHECK(st->size == 1);
  CHECK(rig.plan->fired(reset) == 1);

  size_t lost = rig.plan->add(fault_on(Way::kReceive, Kind::kReply, Fault::kDrop, kMkdir));
  Status made = rig.client->mkdir("d");
  CHECK(made.code() == EIO);
  CHECK(rig.plan->fired(lost) == 1);
  CHECK(rig.client->mkdir("d").code() == EEXIST);  // the first one ran (lego/retry.h)
  CHECK(rig.client->stat("d").is_ok());
}
