// lego-run's user namespaces (runtime/launcher/userns.h).
#include "runtime/launcher/userns.h"

#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace lego::launch {
namespace {

struct UserNamespace {
  bool entered = false;
  uid_t uid = 0;  // the user's, outside
  gid_t gid = 0;
} g_userns;

bool write_proc(const char* path, const std::string& text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  close(fd);
  return ok;
}

// Maps `inside` to the caller's ids in the namespace above (after unshare(CLONE_NEWUSER)).
bool map_ids(uid_t uid_inside, uid_t uid_outside, gid_t gid_inside, gid_t gid_outside) {
  // setgroups must be denied before an unprivileged gid_map (it is inherited when nested).
  (void)write_proc("/proc/self/setgroups", "deny");
  return write_proc("/proc/self/uid_map",
                    std::to_string(uid_inside) + " " + std::to_string(uid_outside) + " 1\n") &&
         write_proc("/proc/self/gid_map",
                    std::to_string(gid_inside) + " " + std::to_string(gid_outside) + " 1\n");
}

}  // namespace

std::string enter_user_namespace() {
  uid_t uid = geteuid();
  gid_t gid = getegid();
  if (unshare(CLONE_NEWUSER) != 0) return std::string("unshare(CLONE_NEWUSER): ") + strerror(errno);
  if (!map_ids(0, uid, 0, gid)) return std::string("writing uid_map/gid_map: ") + strerror(errno);
  g_userns = {true, uid, gid};
  return "";
}

bool in_user_namespace() {
  return g_userns.entered;
}

bool leave_user_namespace() {
  if (!g_userns.entered) return true;
  return unshare(CLONE_NEWUSER) == 0 && map_ids(g_userns.uid, 0, g_userns.gid, 0);
}

std::string needs_root(const std::string& why) {
  return "mounting the storage node's files needs root, or unprivileged user namespaces (" + why +
         "); run as root, or give --storage-node none to run without the files";
}

}  // namespace lego::launch
