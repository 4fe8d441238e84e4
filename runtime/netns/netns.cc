// Named network namespaces and the networks between them (include/lego/netns.h).
#include "lego/netns.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <set>

#include "runtime/netns/rtnetlink.h"

namespace lego::netns {
namespace {

constexpr char kRunDir[] = "/var/run/netns";
constexpr char kThreadNamespace[] = "/proc/thread-self/ns/net";
constexpr size_t kMaxLinkName = 15;  // IFNAMSIZ - 1

// An open namespace file, closed on scope exit.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

Result<Fd> open_namespace(const std::string& path, const std::string& what) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::from_errno(errno, "opening " + what + " (" + path + ")");
  return Fd(fd);
}

// While alive, the calling thread is in another network namespace; the destructor brings
// it back. Failing to come back would leave the thread on the wrong network for good, and
// cannot happen with the namespace fd held open and CAP_SYS_ADMIN: it aborts.
class Visit {
 public:
  static Result<std::unique_ptr<Visit>> to(int ns_fd, const std::string& what) {
    auto home = open_namespace(kThreadNamespace, "this thread's network namespace");
    if (!home) return home.status();
    if (setns(ns_fd, CLONE_NEWNET) != 0) return Status::from_errno(errno, "entering " + what);
    return std::unique_ptr<Visit>(new Visit(std::move(home.value())));
  }
  ~Visit() {
    if (setns(home_.get(), CLONE_NEWNET) != 0) {
      perror("lego netns: returning to this thread's network namespace");
      abort();
    }
  }

 private:
  explicit Visit(Fd home) : home_(std::move(home)) {}
  Fd home_;
};

Status check_name(const std::string& name) {
  if (name.empty() || name.size() > 200 || name.find('/') != std::string::npos || name == "." ||
      name == "..") {
    return Status(EINVAL, "'" + name + "' is not a network namespace name");
  }
  return Status::ok();
}

// /var/run/netns as `ip netns add` leaves it: a shared mount point, so that namespaces
// bound there later are seen from mount namespaces made before (and after) them.
Status prepare_run_dir() {
  if (mkdir(kRunDir, 0755) != 0 && errno != EEXIST) {
    return Status::from_errno(errno, std::string("creating ") + kRunDir);
  }
  if (mount("", kRunDir, "none", MS_SHARED | MS_REC, nullptr) == 0) return Status::ok();
  if (errno != EINVAL) return Status::from_errno(errno, std::string("sharing ") + kRunDir);
  // Not a mount point yet: make it one (bound on itself), then share it.
  if (mount(kRunDir, kRunDir, "none", MS_BIND | MS_REC, nullptr) != 0 ||
      mount("", kRunDir, "none", MS_SHARED | MS_REC, nullptr) != 0) {
    return Status::from_errno(errno, std::string("making ") + kRunDir + " a shared mount point");
  }
  return Status::ok();
}

}  // namespace

std::string namespace_path(const std::string& name) {
  return std::string(kRunDir) + "/" + name;
}

std::string ipv4_string(uint32_t a) {
  char buf[16];
  snprintf(buf, sizeof buf, "%u.%u.%u.%u", a >> 24, (a >> 16) & 255, (a >> 8) & 255, a & 255);
  return buf;
}

Status create_namespace(const std::string& name) {
  LEGO_RETURN_IF_ERROR(check_name(name));
  LEGO_RETURN_IF_ERROR(prepare_run_dir());
  const std::string path = namespace_path(name);
  const std::string what = "network namespace " + name;
  const int fd = open(path.c_str(), O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0);
  if (fd < 0) return Status::from_errno(errno, "creating " + what + " (" + path + ")");
  close(fd);
  auto home = open_namespace(kThreadNamespace, "this thread's network namespace");
  if (!home) {
    unlink(path.c_str());
    return home.status();
  }
  // The new namespace is the calling thread's for a moment: bound at `path`, it outlives
  // the thread's stay in it.
  Status st;
  if (unshare(CLONE_NEWNET) != 0) {
    st = Status::from_errno(errno, "creating " + what + " (unshare)");
  } else {
    if (mount(kThreadNamespace, path.c_str(), "none", MS_BIND, nullptr) != 0) {
      st = Status::from_errno(errno, "creating " + what + " (binding it at " + path + ")");
    }
    if (setns(home.value().get(), CLONE_NEWNET) != 0) {
      perror("lego netns: returning to this thread's network namespace");
      abort();
    }
  }
  if (!st) unlink(path.c_str());
  return st;
}

Status delete_namespace(const std::string& name) {
  LEGO_RETURN_IF_ERROR(check_name(name));
  const std::string path = namespace_path(name);
  // EINVAL: not mounted (a file a failed create left): removed all the same.
  (void)umount2(path.c_str(), MNT_DETACH);
  if (unlink(path.c_str()) != 0) {
    return Status::from_errno(errno, "removing network namespace " + name);
  }
  return Status::ok();
}

Status enter_namespace(const std::string& name) {
  LEGO_RETURN_IF_ERROR(check_name(name));
  auto fd = open_namespace(namespace_path(name), "network namespace " + name);
  if (!fd) return fd.status();
  if (setns(fd.value().get(), CLONE_NEWNET) != 0) {
    return Status::from_errno(errno, "entering network namespace " + name);
  }
  return Status::ok();
}

Status delete_link(const std::string& name) {
  auto nl = Rtnl::open();
  if (!nl) return nl.status();
  return nl.value().delete_link(name);
}

Result<std::unique_ptr<Network>> Network::create(const NetworkSpec& spec) {
  const size_t n = spec.namespaces.size();
  if (n < 1 || n > 253) return Status(EINVAL, "a network has 1 to 253 namespaces");
  if (std::set<std::string>(spec.namespaces.begin(), spec.namespaces.end()).size() != n) {
    return Status(EINVAL, "a network's namespace names must differ");
  }
  if (spec.attach_host && (spec.host_link.empty() || spec.host_link.size() > kMaxLinkName ||
                           spec.host_link.find('/') != std::string::npos)) {
    return Status(EINVAL, "'" + spec.host_link + "' is not an interface name (1 to 15 characters)");
  }
  if ((spec.subnet & 255) != 0) {
    return Status(EINVAL, ipv4_string(spec.subnet) + " does not start a /24");
  }
  if (spec.mtu < 68 || spec.mtu > 65535) {
    return Status(EINVAL, "MTU " + std::to_string(spec.mtu) + " is not in 68..65535");
  }
  std::unique_ptr<Network> net(new Network());
  Status st = net->build(spec);
  if (!st) return st;  // the destructor removed what was made
  return net;
}

Status Network::build(const NetworkSpec& spec) {
  const int n = static_cast<int>(spec.namespaces.size());
  const bool pair = spec.attach_host && n == 1;
  const uint32_t first = spec.subnet + (spec.attach_host ? 2 : 1);
  std::vector<Fd> fds;
  for (int i = 0; i < n; i++) {
    const std::string& name = spec.namespaces[static_cast<size_t>(i)];
    LEGO_RETURN_IF_ERROR(create_namespace(name));
    made_.push_back(name);
    names_.push_back(name);
    addresses_.push_back(ipv4_string(first + static_cast<uint32_t>(i)));
    auto fd = open_namespace(namespace_path(name), "network namespace " + name);
    if (!fd) return fd.status();
    fds.push_back(std::move(fd.value()));
  }
  if (spec.attach_host) host_address_ = ipv4_string(spec.subnet + 1);
  const int prefix = pair ? 30 : 24;
  // Each member's end is "eth0": its address on it, it and the loopback up.
  auto configure_member = [&](int i) -> Status {
    const std::string what = "network namespace " + names_[static_cast<size_t>(i)];
    auto visit = Visit::to(fds[static_cast<size_t>(i)].get(), what);
    if (!visit) return visit.status();
    auto nl = Rtnl::open();
    if (!nl) return nl.status().with_context(what);
    auto eth0 = nl.value().link_index("eth0");
    if (!eth0) return eth0.status().with_context(what);
    LEGO_RETURN_IF_ERROR(nl.value().add_address(eth0.value(), first + static_cast<uint32_t>(i),
                                                prefix, what + ": eth0"));
    LEGO_RETURN_IF_ERROR(nl.value().set_up(eth0.value(), what + ": eth0"));
    return nl.value().set_up(1, what + ": lo");
  };

  if (pair) {
    // The host's end here, its peer straight in the namespace.
    auto nl = Rtnl::open();
    if (!nl) return nl.status();
    LEGO_RETURN_IF_ERROR(nl.value().add_veth(spec.host_link, 0, "eth0", fds[0].get(), spec.mtu));
    // From here the pair goes with the namespace.
    auto index = nl.value().link_index(spec.host_link);
    if (!index) return index.status();
    LEGO_RETURN_IF_ERROR(
        nl.value().add_address(index.value(), spec.subnet + 1, prefix, spec.host_link));
    return configure_member(0);
  }

  const std::string sw =
      spec.switch_namespace.empty() ? spec.namespaces[0] + "-sw" : spec.switch_namespace;
  LEGO_RETURN_IF_ERROR(create_namespace(sw));
  made_.push_back(sw);
  {
    auto sw_fd = open_namespace(namespace_path(sw), "network namespace " + sw);
    if (!sw_fd) return sw_fd.status();
    auto host_fd = open_namespace(kThreadNamespace, "this thread's network namespace");
    if (!host_fd) return host_fd.status();
    const std::string what = "network namespace " + sw;
    auto visit = Visit::to(sw_fd.value().get(), what);
    if (!visit) return visit.status();
    auto nl = Rtnl::open();
    if (!nl) return nl.status().with_context(what);
    LEGO_RETURN_IF_ERROR(nl.value().add_bridge("br0"));
    auto bridge = nl.value().link_index("br0");
    if (!bridge) return bridge.status().with_context(what);
    LEGO_RETURN_IF_ERROR(nl.value().set_up(1, what + ": lo"));
    // A port per member, its peer made straight in the member's namespace.
    for (int i = 0; i < n; i++) {
      LEGO_RETURN_IF_ERROR(nl.value().add_veth("p" + std::to_string(i), bridge.value(), "eth0",
                                               fds[static_cast<size_t>(i)].get(), spec.mtu));
    }
    if (spec.attach_host) {
      LEGO_RETURN_IF_ERROR(nl.value().add_veth("host", bridge.value(), spec.host_link,
                                               host_fd.value().get(), spec.mtu));
    }
  }
  for (int i = 0; i < n; i++) LEGO_RETURN_IF_ERROR(configure_member(i));
  if (spec.attach_host) {
    auto nl = Rtnl::open();
    if (!nl) return nl.status();
    auto index = nl.value().link_index(spec.host_link);
    if (!index) return index.status();
    LEGO_RETURN_IF_ERROR(
        nl.value().add_address(index.value(), spec.subnet + 1, prefix, spec.host_link));
    LEGO_RETURN_IF_ERROR(nl.value().set_up(index.value(), spec.host_link));
  }
  return Status::ok();
}

Network::~Network() {
  for (const std::string& name : made_) (void)delete_namespace(name);
}

}  // namespace lego::netns
