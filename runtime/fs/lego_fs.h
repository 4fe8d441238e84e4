// lego-fs: a FUSE file system (Debian's libfuse3, high-level API) whose files are a
// storage node's export, reached through a StorageClient. Used by the lego-fs binary and
// by lego-run, which mounts it in the program's own mount namespace.
//
// Every FUSE operation becomes one or a few storage requests; the errno a program sees is
// the StorageClient's (the storage node's own, or EIO when it is unreachable or died, and
// never a hang: calls are bounded by the cluster's timeout). Files stay open on the
// storage node while the program holds them, so an unlinked open file keeps working.
//
// Thread-safety: serve() runs FUSE's multi-threaded loop; the client must be thread-safe
// (StorageClient is).
#pragma once

#include <string>

#include "lego/status.h"
#include "lego/storage_client.h"

namespace lego::fs {

struct MountOptions {
  std::string mountpoint;
  bool allow_other = false;  // let other users in (kernel permission checks apply)
  bool debug = false;        // libfuse's request trace on stderr
  int ready_fd = -1;         // written "ready\n" once the mount serves, then closed
};

// Mounts at options.mountpoint and serves until unmounted or SIGTERM/SIGINT/SIGHUP; then
// unmounts. Errors: EINVAL/ENOENT for the mount point, EIO when libfuse fails.
Status serve(stor::StorageClient& client, const MountOptions& options);

}  // namespace lego::fs
