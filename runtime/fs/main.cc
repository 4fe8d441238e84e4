// lego-fs: mounts a storage node's export at a directory of this processor node (FUSE).
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "lego/daemon.h"
#include "lego/fit.h"
#include "lego/flags.h"
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

}  // namespace

int main(int argc, char** argv) {
  std::string config_path;
  long node = -1, storage = -1;
  fit::Progress progress = fit::Progress::kBlocking;
  fs::MountOptions options;
  auto id = [](const char* flag, const char* a) { return daemon::number(flag, a, 0, 65535); };
  std::vector<daemon::Flag> flags = {
      {"config", true, [&](const char* a) { config_path = a; }},
      {"node", true, [&](const char* a) { node = id("--node", a); }},
      {"storage", true, [&](const char* a) { storage = id("--storage", a); }},
      {"allow-other", false, [&](const char*) { options.allow_other = true; }},
      {"progress", true,
       [&](const char* a) {
         static constexpr const char* kProgress[] = {"blocking", "polling"};
         progress = flags::choice("--progress", a, kProgress) == "polling"
                        ? fit::Progress::kPolling
                        : fit::Progress::kBlocking;
       }},
      {"ready-fd", true,
       [&](const char* a) { options.ready_fd = static_cast<int>(id("--ready-fd", a)); }},
      {"debug", false, [&](const char*) { options.debug = true; }},
  };
  int first = daemon::parse_flags(argc, argv, "lego-fs", kUsage, flags);
  if (first + 1 != argc)
    daemon::die("exactly one MOUNTPOINT is required (see --help)", daemon::kExitUsage);
  options.mountpoint = argv[first];
  if (config_path.empty()) daemon::die("--config is required (see --help)", daemon::kExitUsage);
  fit::ClusterConfig config = daemon::load_config(config_path);
  if (node < 0) {
    const fit::NodeConfig* p = config.first_of(fit::Role::kProcessor);
    if (p == nullptr)
      daemon::die("--node ID is needed: " + config_path + " has no processor node",
                  daemon::kExitUsage);
    node = p->id;
  }
  if (storage < 0) {
    const fit::NodeConfig* s = config.first_of(fit::Role::kStorage);
    if (s == nullptr)
      daemon::die("--storage ID is needed: " + config_path + " has no storage node",
                  daemon::kExitUsage);
    storage = s->id;
  }
  if (config.find(static_cast<fit::NodeId>(node)) == nullptr) {
    daemon::die("node " + std::to_string(node) + " is not in " + config_path, daemon::kExitUsage);
  }
  if (config.find(static_cast<fit::NodeId>(storage)) == nullptr) {
    daemon::die("storage node " + std::to_string(storage) + " is not in " + config_path,
                daemon::kExitUsage);
  }
  (void)daemon::node_of_role(config, config_path, storage, fit::Role::kStorage);
  // The cluster file's progress for this node is for its memory traffic (lego-run's
  // runtime); the mount's own waiting is --progress.
  for (auto& n : config.nodes) {
    if (n.id == static_cast<fit::NodeId>(node)) n.progress = progress;
  }
  daemon::ignore_sigpipe();
  auto fit_node = fit::Node::create(config, static_cast<fit::NodeId>(node));
  if (!fit_node) daemon::die(fit_node.status().message());
  auto client = stor::StorageClient::connect(*fit_node.value(), static_cast<fit::NodeId>(storage));
  if (!client) daemon::die(client.status().message());
  Status st = fs::serve(*client.value(), options);
  client.value().reset();
  if (!st) daemon::die(st.message());
  return 0;
}
