// The storage node (LegoOS storage component): serves the files of one exported
// directory to processor nodes over FIT (storage_proto.h). Processor nodes keep no disk:
// their programs' file I/O becomes these requests (lego-fs mounts them).
//
// StorageNode resolves every path beneath its export's directory fd with openat2
// (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS), so neither `..`, nor absolute paths, nor
// symlinks, nor a directory swapped for a symlink mid-lookup lead outside it. Open files
// are per-session handles; sessions expire with their lease. lego-stord
// (daemons/storage/main.cc) is a StorageNode on a fit::Node.
//
// Thread-safety: all methods may be called from any thread; sessions are independent and
// locked one by one, so requests of different clients do not serialize.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "lego/fit.h"
#include "lego/status.h"
#include "lego/storage_proto.h"

namespace lego::stor {

struct StorageNodeOptions {
  std::string export_dir;  // the directory served; must exist
  // A session with no request for this long is freed with its open files: its client is
  // lost. Clients heartbeat every lease/4. Default 20 s. Counted in the FIT node's serving
  // time (fit::LeaseClock): time in which its server threads could not serve (a slow
  // disk under a handler, the daemon stopped) does not count against any session.
  std::chrono::milliseconds lease{20000};
  // Open files one session (one mount: all programs of a processor node) may hold; each is
  // a file descriptor of this process, which lego-stord's RLIMIT_NOFILE also bounds.
  // Beyond it open gets ENFILE. Default kMaxHandles (65536).
  uint32_t max_files = kMaxHandles;
};

// Every storage-node counter, once: X(name, counter|gauge, "what it counts"). This list
// makes StorageNodeStats, --status's lines and the daemon's Prometheus metrics
// (lego_stord_NAME, --metrics), in this order.
#define LEGO_STORAGE_NODE_COUNTERS(X)                                        \
  X(sessions_open, gauge, "sessions alive now")                              \
  X(sessions_opened, counter, "sessions ever opened")                        \
  X(sessions_expired, counter, "sessions freed because their lease ran out") \
  X(handles_open, gauge, "open files now, all sessions")                     \
  X(reads, counter, "kRead requests served")                                 \
  X(writes, counter, "kWrite requests served")                               \
  X(bytes_read, counter, "file bytes sent")                                  \
  X(bytes_written, counter, "file bytes written")                            \
  X(fsyncs, counter, "kFsync requests served")                               \
  X(metadata_ops, counter, "stat, open, readdir, mkdir, rename, ... served") \
  X(escapes, counter, "paths refused because they would leave the export")   \
  X(refused, counter, "malformed requests, unknown sessions or handles")     \
  X(files_refused, counter, "opens refused with ENFILE: --max-files or no fd left")

struct StorageNodeStats {
#define LEGO_STORAGE_NODE_FIELD(name, type, doc) uint64_t name = 0;
  LEGO_STORAGE_NODE_COUNTERS(LEGO_STORAGE_NODE_FIELD)
#undef LEGO_STORAGE_NODE_FIELD
};

class StorageNode {
 public:
  // Opens the export directory. ENOENT/ENOTDIR/EACCES name it.
  static Result<std::unique_ptr<StorageNode>> create(StorageNodeOptions options);
  ~StorageNode();

  // Registers the storage-node opcodes on `node` (before node.start()); leases then follow
  // its serving time and status_text() shows its FIT counters. `node` must outlive every
  // later call of expire_idle() and status_text().
  void serve(fit::Node& node);
  // Frees sessions whose lease ran out (closing their files); returns how many.
  // lego-stord calls it periodically (every 200 ms): each call also advances the lease
  // clock.
  size_t expire_idle();
  StorageNodeStats stats() const;
  // Multi-line human-readable state: what kStatus returns and `lego-stord --status` prints.
  std::string status_text() const;

 private:
  struct Impl;
  explicit StorageNode(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lego::stor
