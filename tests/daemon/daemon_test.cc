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

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "lego/daemon.h"
#include "tests/libfit/cluster_fixture.h"
#include "tests/support.h"

using namespace lego;
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
  char path[] = "/tmp/daemon-test-XXXXXX";
  int fd = mkstemp(path);
  REQUIRE(fd >= 0);
  close(fd);
  std::ofstream(path) << c.to_toml();
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
  unlink(path);
}

TEST_CASE("SIGTERM ends run_until_stopped; SIGPIPE is ignored; signal_ready", "[daemon]") {
  for (int sig : {SIGTERM, SIGINT}) {
    int ready[2];
    REQUIRE(pipe(ready) == 0);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      close(ready[0]);
      daemon::install_stop_handlers();
      int dead[2];
      if (pipe(dead) != 0) _exit(3);
      close(dead[0]);
      if (write(dead[1], "x", 1) != -1 || errno != EPIPE) _exit(4);  // not killed
      daemon::signal_ready(ready[1]);
      int ticks = 0;
      daemon::run_until_stopped(std::chrono::milliseconds(5), [&] { ticks++; });
      _exit(daemon::stop_requested() ? 0 : 5);
    }
    close(ready[1]);
    char buf[8] = {};
    CHECK(read(ready[0], buf, sizeof(buf)) == 6);
    CHECK(std::string(buf) == "ready\n");
    close(ready[0]);
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    kill(pid, sig);
    int status = 0;
    waitpid(pid, &status, 0);
    INFO("signal " << sig);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
}
