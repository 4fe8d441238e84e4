// lego-run without root: the storage node's mount in a user namespace of its own.
//
// lego-run becomes root in a new user namespace (uid 0 there mapped to the user, so the
// mount namespace and the FUSE mount are its own) and PROGRAM, in a namespace nested in
// that one, is the user again (its uid and gid mapped back, no capabilities). Programs
// see the export's files owned by root on the storage node as their own, and other
// owners as nobody (read-only: the kernel refuses writes to a file whose owner it cannot
// map); supplementary groups read as nogroup. With --export, the private storage node
// runs in that namespace too, so the user's files are root's to it.
//
// Thread-safety: enter_user_namespace() must run while lego-run has one thread
// (unshare(CLONE_NEWUSER) refuses others); leave_user_namespace() in PROGRAM's child.
#pragma once

#include <string>

namespace lego::launch {

// Enters the user namespace. Returns "" or what failed.
std::string enter_user_namespace();
// Whether enter_user_namespace() succeeded in this process.
bool in_user_namespace();
// In PROGRAM's child before exec: the user again, in a namespace nested in lego-run's.
// True when there was nothing to do. On failure errno says why.
bool leave_user_namespace();
// The message for a mount that needs root or user namespaces; `why` is what failed.
std::string needs_root(const std::string& why);

}  // namespace lego::launch
