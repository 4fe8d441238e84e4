// The daemons' shared plumbing (include/lego/daemon.h), which lego-memd, lego-stord and
// lego-fs use for their command lines, cluster files, --status, signals and --ready-fd.
// Guards: what a bad command line or cluster file prints and the exit status it gives
// (2, and 0 for --help), each flag reaching its setter, operands left for the caller,
// stop signals ending run_until_stopped, and "ready\n" on --ready-fd. Each case that
// exits runs in a forked child whose stdout, stderr and status are checked.
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "lego/daemon.h"
#include "tests/libfit/cluster_fixture.h"
#include "tests/support.h"

using namespace lego;
using lego::testing::drain;
using lego::testing::in_child;
using lego::testing::Outcome;

namespace {

const char* kUsage = "usage: test-daemon [options]\n";

int parse(std::vector<std::string> args, daemon::NodeFlags* f = nullptr) {
  daemon::NodeFlags local;
  if (f == nullptr) f = &local;
  args.insert(args.begin(), "test-daemon");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  optind = 0;  // getopt_long starts afresh
  return daemon::parse_flags(static_cast<int>(args.size()), argv.data(), "test-daemon", kUsage,
                             daemon::node_flags(*f, true));
}

// Writes `c` to a cluster file of this test's; returns its path (the caller unlinks it).
std::string write_cluster_file(const fit::ClusterConfig& c) {
  return testing::write_cluster_file(c, "daemon-test");
}

}  // namespace

TEST_CASE("parse_flags: --help, unknown flags and bad values exit as the daemons do", "[daemon]") {
  struct Case {
    std::vector<std::string> args;
    int status;
    std::string out, err;  // err: a substring
  } cases[] = {
      {{"--help"}, 0, kUsage, ""},
      {{"-h"}, 0, kUsage, ""},
      {{"--bogus"}, 2, "", kUsage},
      {{"--node"}, 2, "", kUsage},
      {{"--node", "abc"}, 2, "", "test-daemon: --node"},
      {{"--node", "70000"}, 2, "", "test-daemon: --node"},
      {{"--ready-fd", "x"}, 2, "", "test-daemon: --ready-fd"},
  };
  for (auto& c : cases) {
    INFO(c.args[0] << (c.args.size() > 1 ? " " + c.args[1] : ""));
    Outcome o = in_child([&] { return parse(c.args) == 0 ? 99 : 98; });
    CHECK(o.status == c.status);
    CHECK(o.out == c.out);
    CHECK(o.err.find(c.err) != std::string::npos);
  }
}

TEST_CASE("parse_flags: every node flag reaches its field; operands are left", "[daemon]") {
  daemon::NodeFlags f;
  int first = parse(
      {"--config", "c.toml", "--node", "3", "--ready-fd", "7", "--status", "--as", "1", "operand"},
      &f);
  CHECK(f.config == "c.toml");
  CHECK(f.node == 3);
  CHECK(f.ready_fd == 7);
  CHECK(f.status);
  CHECK(f.as == 1);
  CHECK(first == 10);  // argv[10] is "operand"
}

TEST_CASE("load_config and node_of_role: messages and exit status 2", "[daemon]") {
  fit::ClusterConfig c = testing::make_cluster(2, "tcp");
  c.nodes[1].role = fit::Role::kStorage;
  const std::string path = write_cluster_file(c);
  daemon::set_program("test-daemon");

  fit::ClusterConfig loaded = daemon::load_config(path);
  CHECK(loaded.nodes.size() == 2);
  CHECK(daemon::node_of_role(loaded, path, 2, fit::Role::kStorage).id == 2);

  Outcome o = in_child([&] {
    daemon::node_of_role(loaded, path, 2, fit::Role::kMemory);
    return 0;
  });
  CHECK(o.status == 2);
  CHECK(o.err ==
        std::string("test-daemon: node 2 is a storage node in ") + path + ", not a memory node\n");
  o = in_child([&] {
    daemon::node_of_role(loaded, path, 9, fit::Role::kMemory);
    return 0;
  });
  CHECK(o.status == 2);
  CHECK(o.err == std::string("test-daemon: node 9 is not in ") + path + "\n");
  o = in_child([&] {
    daemon::load_config("/nonexistent/cluster.toml");
    return 0;
  });
  CHECK(o.status == 2);
  CHECK(o.err.find("/nonexistent/cluster.toml") != std::string::npos);
  unlink(path.c_str());
}

namespace {

// A child process running fn(ready_fd), which must signal_ready(ready_fd) (or exit);
// returns once it has, with the child's pid and what it wrote.
struct ReadyChild {
  pid_t pid = -1;
  std::string said;
};
ReadyChild start_ready_child(const std::function<int(int ready_fd)>& fn) {
  int ready[2];
  REQUIRE(pipe(ready) == 0);
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    close(ready[0]);
    _exit(fn(ready[1]));
  }
  close(ready[1]);
  ReadyChild c{pid, {}};
  char buf[8] = {};
  if (read(ready[0], buf, sizeof(buf)) > 0) c.said = buf;
  close(ready[0]);
  return c;
}

// Sends `sig` to `pid` and reaps it: its exit status (-1 if killed) and how long it took.
std::pair<int, std::chrono::steady_clock::duration> stop_child(pid_t pid, int sig) {
  const auto t0 = std::chrono::steady_clock::now();
  kill(pid, sig);
  int status = 0;
  waitpid(pid, &status, 0);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, std::chrono::steady_clock::now() - t0};
}

}  // namespace

// A stop signal ends run_until_stopped at once, not at the end of the period it is
// sleeping through (it slept in slices a signal did not cut short -- libstdc++'s sleep_for
// resumes after EINTR -- so every daemon took up to 200 ms to stop).
TEST_CASE("SIGTERM and SIGINT end run_until_stopped at once; SIGPIPE is ignored; signal_ready",
          "[daemon]") {
  for (int sig : {SIGTERM, SIGINT}) {
    INFO("signal " << sig);
    ReadyChild c = start_ready_child([](int ready_fd) {
      daemon::install_stop_handlers();
      int dead[2];
      if (pipe(dead) != 0) return 3;
      close(dead[0]);
      if (write(dead[1], "x", 1) != -1 || errno != EPIPE) return 4;  // not killed
      daemon::signal_ready(ready_fd);
      // A 60 s period: a loop that slept through signals would outlast the test.
      daemon::run_until_stopped(std::chrono::seconds(60), [] { _exit(6); });
      return daemon::stop_requested() ? 0 : 5;
    });
    CHECK(c.said == "ready\n");
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    auto [status, took] = stop_child(c.pid, sig);
    CHECK(status == 0);
    // Generous: a loaded host may be slow to schedule the child, but not 60 s slow.
    CHECK(took < std::chrono::seconds(10));
  }
}

// The wake-up machinery loses no tick and makes no burst of them.
TEST_CASE("run_until_stopped: ticks keep their period", "[daemon]") {
  Outcome o = in_child([] {
    daemon::install_stop_handlers();
    int ticks = 0;
    std::thread stopper([] {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      kill(getpid(), SIGINT);
    });
    daemon::run_until_stopped(std::chrono::milliseconds(20), [&] { ticks++; });
    stopper.join();
    printf("%d", ticks);
    return 0;
  });
  CHECK(o.status == 0);
  INFO("ticks in 500 ms: " << o.out);
  CHECK(std::stoi(o.out) >= 5);   // at most 25; fewer only on a very busy host
  CHECK(std::stoi(o.out) <= 26);  // never a burst
}

// run_node: a node daemon's main() around a service. Guards what lego-memd and lego-stord
// (and the daemons to come) get from it: --status answered by the running node through
// the service's handler, the role checked, the start line, --ready-fd, the service's tick,
// and a prompt, clean stop on SIGTERM with exit status 0.
TEST_CASE("run_node: a service on its node, --status, --ready-fd, ticks, stop", "[daemon]") {
  static constexpr uint16_t kTestStatus = 0x7e01;
  fit::ClusterConfig c = testing::make_cluster(2, "tcp");
  c.nodes[1].role = fit::Role::kStorage;
  const std::string path = write_cluster_file(c);

  // The daemon: its status text counts its ticks; --greeting is its own flag.
  auto run = [&](std::vector<std::string> args) {
    args.insert(args.begin(), "test-node");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    optind = 0;
    auto greeting = std::make_shared<std::string>("none");
    daemon::NodeDaemon d{"test-node", kUsage, fit::Role::kStorage, kTestStatus, {}, {}};
    d.flags.push_back({"greeting", true, [greeting](const char* a) { *greeting = a; }});
    d.start = [greeting](const fit::NodeConfig&) {
      auto ticks = std::make_shared<std::atomic<int>>(0);
      return daemon::Service{
          [ticks, greeting](fit::Node& node) {
            node.handle(kTestStatus,
                        [ticks, greeting](const fit::RpcContext&, std::span<const std::byte>,
                                          std::span<std::byte> rep) -> Result<size_t> {
                          std::string t = *greeting + " ticks " + std::to_string(ticks->load());
                          memcpy(rep.data(), t.data(), t.size());
                          return t.size();
                        });
          },
          [ticks] { ++*ticks; },
          "things",
          ", greeting " + *greeting,
          {},  // FIT's metrics only
          nullptr,
          nullptr,
      };
    };
    return daemon::run_node(static_cast<int>(args.size()), argv.data(), d);
  };

  // A node of another role is refused before anything starts.
  Outcome o = in_child([&] { return run({"--config", path, "--node", "1"}); });
  CHECK(o.status == 2);
  CHECK(o.err.find("node 1 is a processor node") != std::string::npos);

  int err[2];
  REQUIRE(pipe(err) == 0);
  ReadyChild d = start_ready_child([&](int ready_fd) {
    close(err[0]);
    dup2(err[1], 2);
    return run({"--config", path, "--node", "2", "--greeting", "hi", "--ready-fd",
                std::to_string(ready_fd)});
  });
  close(err[1]);
  CHECK(d.said == "ready\n");
  std::this_thread::sleep_for(std::chrono::milliseconds(700));  // a few 200 ms ticks
  o = in_child([&] { return run({"--config", path, "--node", "2", "--status"}); });
  CHECK(o.status == 0);
  INFO("status: " << o.out);
  CHECK(o.out.rfind("hi ticks ", 0) == 0);
  CHECK(std::stoi(o.out.substr(9)) >= 1);
  auto [status, took] = stop_child(d.pid, SIGTERM);
  CHECK(status == 0);
  CHECK(took < std::chrono::seconds(10));
  std::string log = drain(err[0]);
  INFO("stderr: " << log);
  CHECK(log.find("test-node: node 2 serving things at 127.0.0.1:" +
                 std::to_string(c.nodes[1].port) + " (tcp, ") != std::string::npos);
  CHECK(log.find("), greeting hi, ") != std::string::npos);
  CHECK(log.find(" descriptors\ntest-node: node 2 stopping\n") != std::string::npos);
  unlink(path.c_str());
}
