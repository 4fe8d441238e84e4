// lego-stord: the storage node daemon. Serves the files of one directory to programs
// running on processor nodes (see include/lego/storage_node.h and storage_proto.h).
#include <getopt.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "lego/storage_node.h"
#include "lego/units.h"

using namespace lego;

namespace {

const char* kUsage = R"(usage: lego-stord --config FILE --node ID --export DIR [options]
       lego-stord --status --config FILE --node ID [--as ID]

The lego storage node: serves the files under DIR to programs on processor nodes
(mounted there by lego-fs or lego-run), over FIT. Nothing outside DIR is reachable:
paths, `..` and symlinks are resolved beneath it.

options:
  --config FILE      the cluster file (TOML; see README.md)
  --node ID          this storage node's id in the cluster file (role "storage")
  --export DIR       the directory to serve (must exist)
  --lease-ms MS      close a client's files when nothing was heard from it for this
                     long: its processor node is lost (default 20000)
  --max-files N      open files one client (a mount: all programs of a processor node)
                     may hold (default 65536); beyond it, and when this process runs out
                     of descriptors (its RLIMIT_NOFILE, raised to the hard limit at
                     start), programs' open() gets ENFILE
  --ready-fd FD      write "ready\n" to FD once serving (for supervisors and tests)
  --status           ask the running storage node --node for its state and counters
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
  fprintf(stderr, "lego-stord: %s\n", msg.c_str());
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
  auto r = client.value()->send_reply(node, stor::kStatus, {}, reply);
  if (!r) die("storage node " + std::to_string(node) + ": " + r.status().message());
  fwrite(reply.data(), 1, r.value(), stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  enum { kConfig = 1, kNode, kExport, kLease, kMaxFiles, kReadyFd, kStatus, kAs, kHelp };
  static const option longopts[] = {{"config", required_argument, nullptr, kConfig},
                                    {"node", required_argument, nullptr, kNode},
                                    {"export", required_argument, nullptr, kExport},
                                    {"lease-ms", required_argument, nullptr, kLease},
                                    {"max-files", required_argument, nullptr, kMaxFiles},
                                    {"ready-fd", required_argument, nullptr, kReadyFd},
                                    {"status", no_argument, nullptr, kStatus},
                                    {"as", required_argument, nullptr, kAs},
                                    {"help", no_argument, nullptr, kHelp},
                                    {nullptr, 0, nullptr, 0}};
  std::string config_path;
  long node = -1, as = -1;
  int ready_fd = -1;
  bool want_status = false;
  stor::StorageNodeOptions options;
  int c;
  while ((c = getopt_long(argc, argv, "h", longopts, nullptr)) != -1) {
    switch (c) {
      case kConfig:
        config_path = optarg;
        break;
      case kNode:
        node = number("--node", optarg, 0, 65535);
        break;
      case kExport:
        options.export_dir = optarg;
        break;
      case kLease:
        options.lease = std::chrono::milliseconds(number("--lease-ms", optarg, 100, 86400000));
        break;
      case kMaxFiles:
        options.max_files = static_cast<uint32_t>(number("--max-files", optarg, 1, 1 << 24));
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
  if (me->role != fit::Role::kStorage) {
    die("node " + std::to_string(node) + " is a " + fit::role_name(me->role) + " node in " +
            config_path + ", not a storage node",
        2);
  }

  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  if (options.export_dir.empty()) die("--export DIR is required (see --help)", 2);
  // Modes arrive already masked by the client's umask; do not mask them twice.
  umask(0);
  // Every open file of every client is an fd here: take all the fds we may.
  struct rlimit nofile {};
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    (void)setrlimit(RLIMIT_NOFILE, &nofile);
  }
  (void)getrlimit(RLIMIT_NOFILE, &nofile);
  auto storage_or = stor::StorageNode::create(options);
  if (!storage_or) die(storage_or.status().message(), 2);
  stor::StorageNode& storage = *storage_or.value();
  auto fit_node = fit::Node::create(config.value(), static_cast<fit::NodeId>(node));
  if (!fit_node) die(fit_node.status().message());
  storage.serve(*fit_node.value());
  Status st = fit_node.value()->start();
  if (!st) die(st.message());
  fprintf(stderr,
          "lego-stord: node %ld serving %s at %s:%u (%s, %s), lease %lld ms, %u files per "
          "session, %llu descriptors\n",
          node, options.export_dir.c_str(), me->address.c_str(), me->port, me->provider.c_str(),
          fit::progress_name(me->progress), static_cast<long long>(options.lease.count()),
          options.max_files, static_cast<unsigned long long>(nofile.rlim_cur));
  if (ready_fd >= 0) {
    (void)!write(ready_fd, "ready\n", 6);
    close(ready_fd);
  }
  while (!g_stop) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    storage.expire_idle();
  }
  fprintf(stderr, "lego-stord: node %ld stopping\n", node);
  fit_node.value()->stop();
  return 0;
}
