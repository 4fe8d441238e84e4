// lego-fs: mounts a storage node's export at a directory of this processor node (FUSE).
#include <getopt.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "lego/fit.h"
#include "lego/storage_client.h"
#include "lego/units.h"
#include "runtime/fs/lego_fs.h"

using namespace lego;

namespace {

const char* kUsage = R"(usage: lego-fs --config FILE [options] MOUNTPOINT

Mounts the export of a lego storage node (lego-stord) at MOUNTPOINT: unmodified
programs read, write, create, rename, delete, list and stat its files, which live on
the storage node. Runs in the foreground until unmounted (umount MOUNTPOINT) or
SIGTERM/SIGINT. Errors reach programs as their errno; a lost storage node gives EIO
within the cluster's timeout_ms, never a hang.

options:
  --config FILE      the cluster file (TOML; see README.md)
  --node ID          this processor node's id (default: the first processor node)
  --storage ID       the storage node's id (default: the first storage node)
  --allow-other      let other users use the mount (kernel permission checks apply)
  --progress P       how this mount waits for the storage node's replies: blocking
                     (default: sleeps in the kernel; a FUSE request already costs two
                     kernel crossings and a thread wake-up, and spinning threads take
                     the CPU that the program and the storage node need) or polling
                     (spin, as the cluster file may say for this node's memory traffic)
  --ready-fd FD      write "ready\n" to FD once mounted (for supervisors and tests)
  --debug            trace every FUSE request on stderr
  --help             this text
)";

[[noreturn]] void die(const std::string& msg, int code = 1) {
  fprintf(stderr, "lego-fs: %s\n", msg.c_str());
  exit(code);
}

long number(const char* flag, const char* text, long lo, long hi) {
  auto v = parse_int(text, flag, lo, hi);
  if (!v) die(v.status().message(), 2);
  return v.value();
}

}  // namespace

int main(int argc, char** argv) {
  enum { kConfig = 1, kNode, kStorage, kAllowOther, kProgress, kReadyFd, kDebug, kHelp };
  static const option longopts[] = {{"config", required_argument, nullptr, kConfig},
                                    {"node", required_argument, nullptr, kNode},
                                    {"storage", required_argument, nullptr, kStorage},
                                    {"allow-other", no_argument, nullptr, kAllowOther},
                                    {"progress", required_argument, nullptr, kProgress},
                                    {"ready-fd", required_argument, nullptr, kReadyFd},
                                    {"debug", no_argument, nullptr, kDebug},
                                    {"help", no_argument, nullptr, kHelp},
                                    {nullptr, 0, nullptr, 0}};
  std::string config_path;
  long node = -1, storage = -1;
  fit::Progress progress = fit::Progress::kBlocking;
  fs::MountOptions options;
  int c;
  while ((c = getopt_long(argc, argv, "h", longopts, nullptr)) != -1) {
    switch (c) {
      case kConfig:
        config_path = optarg;
        break;
      case kNode:
        node = number("--node", optarg, 0, 65535);
        break;
      case kStorage:
        storage = number("--storage", optarg, 0, 65535);
        break;
      case kAllowOther:
        options.allow_other = true;
        break;
      case kProgress:
        if (strcmp(optarg, "blocking") == 0) {
          progress = fit::Progress::kBlocking;
        } else if (strcmp(optarg, "polling") == 0) {
          progress = fit::Progress::kPolling;
        } else {
          die("--progress: blocking or polling", 2);
        }
        break;
      case kReadyFd:
        options.ready_fd = static_cast<int>(number("--ready-fd", optarg, 0, 65535));
        break;
      case kDebug:
        options.debug = true;
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
  if (optind + 1 != argc) die("exactly one MOUNTPOINT is required (see --help)", 2);
  options.mountpoint = argv[optind];
  if (config_path.empty()) die("--config is required (see --help)", 2);
  auto config = fit::ClusterConfig::parse_file(config_path);
  if (!config) die(config.status().message(), 2);
  if (node < 0) {
    const fit::NodeConfig* p = config->first_of(fit::Role::kProcessor);
    if (p == nullptr) die("--node ID is needed: " + config_path + " has no processor node", 2);
    node = p->id;
  }
  if (storage < 0) {
    const fit::NodeConfig* s = config->first_of(fit::Role::kStorage);
    if (s == nullptr) die("--storage ID is needed: " + config_path + " has no storage node", 2);
    storage = s->id;
  }
  if (config->find(static_cast<fit::NodeId>(node)) == nullptr) {
    die("node " + std::to_string(node) + " is not in " + config_path, 2);
  }
  const fit::NodeConfig* sn = config->find(static_cast<fit::NodeId>(storage));
  if (sn == nullptr)
    die("storage node " + std::to_string(storage) + " is not in " + config_path, 2);
  if (sn->role != fit::Role::kStorage) {
    die("node " + std::to_string(storage) + " is a " + fit::role_name(sn->role) + " node in " +
            config_path + ", not a storage node",
        2);
  }
  // The cluster file's progress for this node is for its memory traffic (lego-run's
  // runtime); the mount's own waiting is --progress.
  for (auto& n : config.value().nodes) {
    if (n.id == static_cast<fit::NodeId>(node)) n.progress = progress;
  }
  signal(SIGPIPE, SIG_IGN);
  auto fit_node = fit::Node::create(config.value(), static_cast<fit::NodeId>(node));
  if (!fit_node) die(fit_node.status().message());
  auto client = stor::StorageClient::connect(*fit_node.value(), static_cast<fit::NodeId>(storage));
  if (!client) die(client.status().message());
  Status st = fs::serve(*client.value(), options);
  client.value().reset();
  if (!st) die(st.message());
  return 0;
}
