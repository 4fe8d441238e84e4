// lego-stord: the storage node daemon. Serves the files of one directory to programs
// running on processor nodes (see include/lego/storage_node.h and storage_proto.h).
#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "lego/daemon.h"
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
                     long while this node was serving: its processor node is lost
                     (default 20000); time in which the node could not serve (stopped,
                     stuck) does not count
  --max-files N      open files one client (a mount: all programs of a processor node)
                     may hold (default 65536); beyond it, and when this process runs out
                     of descriptors (its RLIMIT_NOFILE, raised to the hard limit at
                     start), programs' open() gets ENFILE
  --ready-fd FD      write "ready\n" to FD once serving (for supervisors and tests)
  --status           ask the running storage node --node for its state and counters,
                     FIT's included (connections, handshakes, peers cut off)
  --as ID            with --status: the node id to speak as (default: the first
                     processor node in the cluster file)
  --help             this text

Stops cleanly on SIGTERM or SIGINT.
)";

}  // namespace

int main(int argc, char** argv) {
  daemon::NodeFlags f;
  stor::StorageNodeOptions options;
  std::vector<daemon::Flag> flags = daemon::node_flags(f, true);
  flags.push_back({"export", true, [&](const char* a) { options.export_dir = a; }});
  flags.push_back({"lease-ms", true, [&](const char* a) {
                     options.lease =
                         std::chrono::milliseconds(daemon::number("--lease-ms", a, 100, 86400000));
                   }});
  flags.push_back({"max-files", true, [&](const char* a) {
                     options.max_files =
                         static_cast<uint32_t>(daemon::number("--max-files", a, 1, 1 << 24));
                   }});
  const int first = daemon::parse_flags(argc, argv, "lego-stord", kUsage, flags);
  fit::ClusterConfig config = daemon::load_node_config(argc, argv, first, f);
  const auto id = static_cast<fit::NodeId>(f.node);
  if (f.status) return daemon::print_status(config, id, f.as, stor::kStatus, "storage node");
  const fit::NodeConfig& me = daemon::node_of_role(config, f.config, f.node, fit::Role::kStorage);

  daemon::install_stop_handlers();
  if (options.export_dir.empty()) {
    daemon::die("--export DIR is required (see --help)", daemon::kExitUsage);
  }
  // Modes arrive already masked by the client's umask; do not mask them twice.
  umask(0);
  // Every open file of every client is an fd here: take all the fds we may.
  const uint64_t fd_limit = daemon::raise_fd_limit();
  auto storage_or = stor::StorageNode::create(options);
  if (!storage_or) daemon::die(storage_or.status().message(), daemon::kExitUsage);
  stor::StorageNode& storage = *storage_or.value();
  auto fit_node = fit::Node::create(config, id);
  if (!fit_node) daemon::die(fit_node.status().message());
  storage.serve(*fit_node.value());
  Status st = fit_node.value()->start();
  if (!st) daemon::die(st.message());
  fprintf(stderr,
          "lego-stord: node %ld serving %s at %s:%u (%s, %s), lease %lld ms, %u files per "
          "session, %llu descriptors\n",
          f.node, options.export_dir.c_str(), me.address.c_str(), me.port,
          fit::provider_name(me.provider), fit::progress_name(me.progress),
          static_cast<long long>(options.lease.count()), options.max_files,
          static_cast<unsigned long long>(fd_limit));
  daemon::signal_ready(f.ready_fd);
  daemon::run_until_stopped(std::chrono::milliseconds(200), [&] { storage.expire_idle(); });
  fprintf(stderr, "lego-stord: node %ld stopping\n", f.node);
  fit_node.value()->stop();
  return 0;
}
