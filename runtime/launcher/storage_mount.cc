// The storage node's mount for a run (runtime/launcher/storage_mount.h).
#include "runtime/launcher/storage_mount.h"

#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "runtime/launcher/process.h"
#include "runtime/launcher/userns.h"

namespace lego::launch {

std::string StorageMount::start(const std::string& mountpoint, const std::string& config_path,
                                fit::NodeId self, fit::NodeId storage, const std::string& run_dir) {
  std::string fs = find_part("LEGO_FS", "runtime/fs/lego-fs", "lego-fs");
  if (fs.empty() || access(fs.c_str(), X_OK) != 0) {
    return "cannot find lego-fs (set LEGO_FS, or install it beside lego-run)";
  }
  if (geteuid() != 0) {
    std::string err = enter_user_namespace();
    if (!err.empty()) return needs_root(err);
  }
  // A mount namespace of our own: the mount is the run's, invisible to the host.
  if (unshare(CLONE_NEWNS) != 0) return std::string("unshare(CLONE_NEWNS): ") + strerror(errno);
  if (mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    return std::string("making / private in the run's mount namespace: ") + strerror(errno);
  }
  struct stat st;
  if (stat(mountpoint.c_str(), &st) != 0) {
    if (mkdir(mountpoint.c_str(), 0755) != 0) {
      std::string err = "cannot create the mount point " + mountpoint + ": " + strerror(errno);
      if (in_user_namespace()) err += " (as a user: mkdir it once as root, or give --mount DIR)";
      return err;
    }
  } else if (!S_ISDIR(st.st_mode)) {
    return "--mount " + mountpoint + ": not a directory";
  }
  mountpoint_ = mountpoint;
  log_ = run_dir + "/lego-fs.log";
  pid_ = start_daemon(fs,
                      {"lego-fs", "--config", config_path, "--node", std::to_string(self),
                       "--storage", std::to_string(storage), mountpoint},
                      log_, "");
  if (pid_ < 0) {
    show_log(log_, "lego-run", "lego-fs");
    stop();
    return "cannot mount storage node " + std::to_string(storage) + " at " + mountpoint +
           " (lego-fs's messages are above)";
  }
  return "";
}

void StorageMount::stop() {
  stop_process(pid_);  // lego-fs unmounts and exits on SIGTERM
  pid_ = -1;
  if (!mountpoint_.empty()) umount2(mountpoint_.c_str(), MNT_DETACH);
  // A mount point we created stays (empty, like /mnt): another lego-run may have mounted
  // on it in its own namespace, and rmdir of a directory that is a mount point only in
  // another namespace succeeds and detaches that run's mount.
  mountpoint_.clear();
  if (!log_.empty()) unlink(log_.c_str());
  log_.clear();
}

}  // namespace lego::launch
