// lego-memd: the memory node daemon. Serves the memory of lego processes running on
// processor nodes (see include/lego/memory_node.h and memory_proto.h).
#include <getopt.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "lego/memory_node.h"
#include "lego/units.h"

using namespace lego;

namespace {

const char* kUsage = R"(usage: lego-memd --config FILE --node ID [options]
       lego-memd --status --config FILE --node ID [--as ID]

The lego memory node: owns the anonymous memory of programs run with lego-run on
processor nodes, serving their line misses, write-backs and unmaps over FIT.

options:
  --config FILE      the cluster file (TOML; see README.md)
  --node ID          this memory node's id in the cluster file
  --capacity SIZE    most memory to hold for all processes (default 1G); a process
                     whose write-back does not fit gets ENOMEM, the daemon stays up
  --lease-ms MS      free a process's memory when nothing was heard from it for this
                     long: its processor node is lost (default 20000)
  --ready-fd FD      write "ready\n" to FD once serving (for supervisors and tests)
  --status           ask the running memory node --node for its state and counters
  --as ID            with --status: the node id to speak as (default: the first
                     processor node in the cluster file)
  --help             this text

Stops cleanly on SIGTERM or SIGINT.
)";

std::atomic<bool> g_stop{false};

void on_signal(int) {
  g_stop = true;
}

[[noreturn]] void die(const std::string& msg, int code = 1) {
  fprintf(stderr, "lego-memd: %s\n", msg.c_str());
  exit(code);
}

long number(const char* flag, const char* text, long lo, long hi) {
  auto v = parse_int(text, flag, lo, hi);
  if (!v) die(v.status().message(), 2);
  return v.value();
}

int status(const fit::ClusterConfig& config, fit::NodeId node, long as) {
  fit::NodeId me;
  if (as >= 0) {
    me = static_cast<fit::NodeId>(as);
  } else {
    const fit::NodeConfig* p = config.first_of(fit::Role::kProcessor);
    if (p == nullptr) die("--status needs --as ID: the cluster file has no processor node", 2);
    me = p->id;
  }
  auto client = fit::Node::create(config, me);
  if (!client) die(client.status().message());
  std::vector<std::byte> reply(config.max_message_bytes);
  auto r = client.value()->send_reply(node, mem::kStatus, {}, reply);
  if (!r) die("memory node " + std::to_string(node) + ": " + r.status().message());
  fwrite(reply.data(), 1, r.value(), stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  enum { kConfig = 1, kNode, kCapacity, kLease, kReadyFd, kStatus, kAs, kHelp };
  static const option longopts[] = {{"config", required_argument, nullptr, kConfig},
                                    {"node", required_argument, nullptr, kNode},
                                    {"capacity", required_argument, nullptr, kCapacity},
                                    {"lease-ms", required_argument, nullptr, kLease},
                                    {"ready-fd", required_argument, nullptr, kReadyFd},
                                    {"status", no_argument, nullptr, kStatus},
                                    {"as", required_argument, nullptr, kAs},
                                    {"help", no_argument, nullptr, kHelp},
                                    {nullptr, 0, nullptr, 0}};
  std::string config_path;
  long node = -1, as = -1;
  int ready_fd = -1;
  bool want_status = false;
  mem::MemoryNodeOptions options;
  int c;
  while ((c = getopt_long(argc, argv, "h", longopts, nullptr)) != -1) {
    switch (c) {
      case kConfig:
        config_path = optarg;
        break;
      case kNode:
        node = number("--node", optarg, 0, 65535);
        break;
      case kCapacity: {
        auto v = parse_size(optarg, "--capacity");
        if (!v) die(v.status().message(), 2);
        if (v.value() < mem::kLineBytes) die("--capacity must hold at least one 4 KiB line", 2);
        options.capacity_bytes = v.value();
        break;
      }
      case kLease:
        options.lease = std::chrono::milliseconds(number("--lease-ms", optarg, 100, 86400000));
        break;
      case kReadyFd:
        ready_fd = static_cast<int>(number("--ready-fd", optarg, 0, 65535));
        break;
      case kStatus:
        want_status = true;
        break;
      case kAs:
        as = number("--as", optarg, 0, 65535);
        break;
      case 'h':
      case kHelp:
        fputs(kUsage, stdout);
        return 0;
      default:
        fputs(kUsage, stderr);
        return 2;
    }
  }
  if (optind < argc) die(std::string("unexpected argument '") + argv[optind] + "' (see --help)", 2);
  if (config_path.empty() || node < 0) die("--config and --node are required (see --help)", 2);
  auto config = fit::ClusterConfig::parse_file(config_path);
  if (!config) die(config.status().message(), 2);
  const fit::NodeConfig* me = config->find(static_cast<fit::NodeId>(node));
  if (me == nullptr) die("node " + std::to_string(node) + " is not in " + config_path, 2);
  if (want_status) return status(config.value(), static_cast<fit::NodeId>(node), as);
  if (me->role != fit::Role::kMemory) {
    die("node " + std::to_string(node) + " is a " + fit::role_name(me->role) + " node in " +
            config_path + ", not a memory node",
        2);
  }

  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  mem::MemoryNode memory(options);
  auto fit_node = fit::Node::create(config.value(), static_cast<fit::NodeId>(node));
  if (!fit_node) die(fit_node.status().message());
  memory.serve(*fit_node.value());
  Status st = fit_node.value()->start();
  if (!st) die(st.message());
  fprintf(stderr, "lego-memd: node %ld serving at %s:%u (%s, %s), capacity %s, lease %lld ms\n",
          node, me->address.c_str(), me->port, me->provider.c_str(),
          fit::progress_name(me->progress), format_size(options.capacity_bytes).c_str(),
          static_cast<long long>(options.lease.count()));
  if (ready_fd >= 0) {
    (void)!write(ready_fd, "ready\n", 6);
    close(ready_fd);
  }
  while (!g_stop) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    memory.expire_idle();
  }
  fprintf(stderr, "lego-memd: node %ld stopping\n", node);
  fit_node.value()->stop();
  return 0;
}
