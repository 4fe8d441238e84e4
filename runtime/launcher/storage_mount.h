// The storage node's files for PROGRAM: lego-fs serving the node's export at the mount
// point, in a mount namespace of lego-run's own (which PROGRAM inherits): nothing else on
// the host sees the mount, and it vanishes with the run. Without root, in a user
// namespace (runtime/launcher/userns.h).
//
// Thread-safety: start() while lego-run has one thread (it may unshare a user namespace).
#pragma once

#include <sys/types.h>

#include <string>

#include "lego/fit.h"

namespace lego::launch {

class StorageMount {
 public:
  ~StorageMount() { stop(); }

  // Mounts storage node `storage` of the cluster file `config_path` at `mountpoint`
  // (created if missing, and left in place), speaking as processor node `self`;
  // lego-fs's log goes in `run_dir`. Returns "" or what went wrong (lego-fs's own
  // messages are shown on stderr first).
  std::string start(const std::string& mountpoint, const std::string& config_path, fit::NodeId self,
                    fit::NodeId storage, const std::string& run_dir);
  // Unmounts (lego-fs exits on SIGTERM) and removes the log. Idempotent.
  void stop();

 private:
  pid_t pid_ = -1;
  std::string mountpoint_, log_;
};

}  // namespace lego::launch
