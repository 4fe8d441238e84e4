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

struct StorageNodeStats {
  uint64_t sessions_open = 0;     // sessions alive now
  uint64_t sessions_opened = 0;   // ever opened
  uint64_t sessions_expired = 0;  // freed because their lease ran out
  uint64_t handles_open = 0;      // open files now, all sessions
  uint64_t reads = 0;             // kRead requests served
  uint64_t writes = 0;            // kWrite requests served
  uint64_t bytes_read = 0;        // file bytes sent
  uint64_t bytes_written = 0;     // file bytes written
  uint64_t fsyncs = 0;            // kFsync requests served
  uint64_t metadata_ops = 0;      // stat, open, readdir, mkdir, rename, ... served
  uint64_t escapes = 0;           // paths refused because they would leave the export
  uint64_t refused = 0;           // malformed requests, unknown sessions or handles
  uint64_t files_refused = 0;     // opens refused with ENFILE: --max-files or no fd left
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
