// lego-stord: the storage node daemon. Serves the files of one directory to programs
// running on processor nodes (see include/lego/storage_node.h and storage_proto.h).
#include <sys/stat.h>

#include <chrono>
#include <memory>
#include <string>

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
  --metrics ADDR:PORT  serve its counters and FIT's in the Prometheus text format at
                     http://ADDR:PORT/metrics (lego_stord_*), from a thread of its own;
                     off by default. ADDR is an IPv4 address or [IPv6]; port 0 picks one
  --status           ask the running storage node --node for its state and counters,
                     FIT's included (connections, handshakes, peers cut off)
  --as ID            with --status: the node id to speak as (default: the first
                     processor node in the cluster file)
  --help             this text

Stops cleanly on SIGTERM or SIGINT.
)";

}  // namespace

int main(int argc, char** argv) {
  stor::StorageNodeOptions options;
  daemon::NodeDaemon d{"lego-stord", kUsage, fit::Role::kStorage, stor::kStatus, {}, {}};
  d.flags.push_back({"export", true, [&](const char* a) { options.export_dir = a; }});
  d.flags.push_back({"lease-ms", true, [&](const char* a) {
                       options.lease = std::chrono::milliseconds(
                           daemon::number("--lease-ms", a, 100, 86400000));
                     }});
  d.flags.push_back({"max-files", true, [&](const char* a) {
                       options.max_files =
                           static_cast<uint32_t>(daemon::number("--max-files", a, 1, 1 << 24));
                     }});
  d.start = [&](const fit::NodeConfig&) {
    if (options.export_dir.empty()) {
      daemon::die("--export DIR is required (see --help)", daemon::kExitUsage);
    }
    // Modes arrive already masked by the client's umask; do not mask them twice.
    umask(0);
    auto storage = stor::StorageNode::create(options);
    if (!storage) daemon::die(storage.status().message(), daemon::kExitUsage);
    std::shared_ptr<stor::StorageNode> s = std::move(storage.value());
    return daemon::Service{
        [s](fit::Node& node) { s->serve(node); },
        [s] { s->expire_idle(); },
        options.export_dir,
        ", lease " + std::to_string(options.lease.count()) + " ms, " +
            std::to_string(options.max_files) + " files per session",
        [s](metrics::Exposition& e) {
          const stor::StorageNodeStats st = s->stats();
#define LEGO_STORAGE_NODE_METRIC(name, type, doc) e.add(#name, #type, doc, st.name);
          LEGO_STORAGE_NODE_COUNTERS(LEGO_STORAGE_NODE_METRIC)
#undef LEGO_STORAGE_NODE_METRIC
        },
        nullptr,  // started: no threads of its own that call other nodes
        nullptr,  // stopping
    };
  };
  return daemon::run_node(argc, argv, d);
}
