// The rtnetlink requests behind include/lego/netns.h (runtime/netns/rtnetlink.h).
#include "runtime/netns/rtnetlink.h"

#include <arpa/inet.h>
#include <linux/if.h>
#include <linux/if_addr.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace lego::netns {
namespace {

// One request: a header, its family message and attributes, in a fixed buffer (every
// request here is a few hundred bytes).
struct Request {
  alignas(NLMSG_ALIGNTO) char buf[1024];

  Request(uint16_t type, uint16_t flags) {
    memset(buf, 0, sizeof buf);
    header()->nlmsg_len = NLMSG_LENGTH(0);
    header()->nlmsg_type = type;
    header()->nlmsg_flags = static_cast<uint16_t>(NLM_F_REQUEST | flags);
  }
  nlmsghdr* header() { return reinterpret_cast<nlmsghdr*>(buf); }
  char* tail() { return buf + NLMSG_ALIGN(header()->nlmsg_len); }
  // Appends raw bytes (a family message: ifinfomsg, ifaddrmsg), aligned.
  template <typename T>
  T* put(const T& value) {
    auto* at = reinterpret_cast<T*>(tail());
    memcpy(at, &value, sizeof value);
    header()->nlmsg_len = static_cast<uint32_t>(NLMSG_ALIGN(header()->nlmsg_len) + sizeof value);
    return at;
  }
  // Appends attribute `type` holding len bytes; returns it (to close a nest with end()).
  rtattr* attr(uint16_t type, const void* data, size_t len) {
    auto* a = reinterpret_cast<rtattr*>(tail());
    a->rta_type = type;
    a->rta_len = static_cast<uint16_t>(RTA_LENGTH(len));
    if (len > 0) memcpy(RTA_DATA(a), data, len);
    header()->nlmsg_len =
        static_cast<uint32_t>(NLMSG_ALIGN(header()->nlmsg_len) + RTA_ALIGN(a->rta_len));
    return a;
  }
  rtattr* attr(uint16_t type, const std::string& s) { return attr(type, s.c_str(), s.size() + 1); }
  rtattr* attr(uint16_t type, uint32_t v) { return attr(type, &v, sizeof v); }
  rtattr* nest(uint16_t type) { return attr(type, nullptr, 0); }
  // Closes a nest: it holds everything appended since.
  void end(rtattr* nest) {
    nest->rta_len =
        static_cast<uint16_t>(buf + header()->nlmsg_len - reinterpret_cast<char*>(nest));
  }
};

ifinfomsg link_message(int index, bool up) {
  ifinfomsg m{};
  m.ifi_family = AF_UNSPEC;
  m.ifi_index = index;
  if (up) {
    m.ifi_flags = IFF_UP;
    m.ifi_change = IFF_UP;
  }
  return m;
}

}  // namespace

Result<Rtnl> Rtnl::open() {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  if (fd < 0) return Status::from_errno(errno, "rtnetlink socket");
  sockaddr_nl sa{};
  sa.nl_family = AF_NETLINK;
  if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    const int e = errno;
    close(fd);
    return Status::from_errno(e, "binding an rtnetlink socket");
  }
  return Rtnl(fd);
}

Rtnl::Rtnl(Rtnl&& other) noexcept : fd_(other.fd_), seq_(other.seq_) {
  other.fd_ = -1;
}

Rtnl::~Rtnl() {
  if (fd_ >= 0) close(fd_);
}

Status Rtnl::talk(void* request, const std::string& what, void* reply, size_t cap) {
  auto* req = static_cast<nlmsghdr*>(request);
  req->nlmsg_seq = ++seq_;
  if (reply == nullptr) req->nlmsg_flags |= NLM_F_ACK;
  if (send(fd_, req, req->nlmsg_len, 0) != static_cast<ssize_t>(req->nlmsg_len)) {
    return Status::from_errno(errno, what + ": sending to rtnetlink");
  }
  // A link's description can run to a few KiB (its statistics).
  alignas(NLMSG_ALIGNTO) char buf[32768];
  for (;;) {
    const ssize_t n = recv(fd_, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::from_errno(errno, what + ": reading rtnetlink");
    size_t left = static_cast<size_t>(n);
    for (auto* h = reinterpret_cast<nlmsghdr*>(buf); NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
      if (h->nlmsg_seq != req->nlmsg_seq) continue;  // not ours (a late answer)
      if (h->nlmsg_type == NLMSG_ERROR) {
        if (h->nlmsg_len < NLMSG_LENGTH(sizeof(nlmsgerr))) {
          return Status(EPROTO, what + ": a truncated rtnetlink error");
        }
        const int err = -static_cast<nlmsgerr*>(NLMSG_DATA(h))->error;
        if (err == 0) return Status::ok();  // the ACK
        return Status::from_errno(err, what);
      }
      if (reply == nullptr) continue;
      memcpy(reply, h, std::min<size_t>(h->nlmsg_len, cap));
      return Status::ok();
    }
  }
}

Result<int> Rtnl::link_index(const std::string& name) {
  Request r(RTM_GETLINK, 0);
  r.put(link_message(0, false));
  r.attr(IFLA_IFNAME, name);
  alignas(NLMSG_ALIGNTO) char reply[NLMSG_LENGTH(sizeof(ifinfomsg))];
  Status st = talk(r.buf, "interface " + name, reply, sizeof reply);
  if (!st) return st;
  const auto* h = reinterpret_cast<const nlmsghdr*>(reply);
  if (h->nlmsg_type != RTM_NEWLINK || h->nlmsg_len < NLMSG_LENGTH(sizeof(ifinfomsg))) {
    return Status(EPROTO, "interface " + name + ": an unexpected rtnetlink answer");
  }
  return static_cast<const ifinfomsg*>(NLMSG_DATA(h))->ifi_index;
}

Status Rtnl::add_veth(const std::string& name, int master, const std::string& peer, int peer_ns_fd,
                      uint32_t mtu) {
  Request r(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
  r.put(link_message(0, true));
  r.attr(IFLA_IFNAME, name);
  r.attr(IFLA_MTU, mtu);
  if (master != 0) r.attr(IFLA_MASTER, static_cast<uint32_t>(master));
  rtattr* info = r.nest(IFLA_LINKINFO);
  r.attr(IFLA_INFO_KIND, "veth", 4);
  rtattr* data = r.nest(IFLA_INFO_DATA);
  rtattr* peer_info = r.nest(VETH_INFO_PEER);
  // The peer's own ifinfomsg, not up: a veth end cannot open before it knows its peer
  // (ENOTCONN), and the peer is made first. Its namespace sets it up.
  r.put(link_message(0, false));
  r.attr(IFLA_IFNAME, peer);
  r.attr(IFLA_MTU, mtu);
  r.attr(IFLA_NET_NS_FD, static_cast<uint32_t>(peer_ns_fd));
  r.end(peer_info);
  r.end(data);
  r.end(info);
  return talk(r.buf, "veth pair " + name + " / " + peer);
}

Status Rtnl::add_bridge(const std::string& name) {
  Request r(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
  r.put(link_message(0, true));
  r.attr(IFLA_IFNAME, name);
  rtattr* info = r.nest(IFLA_LINKINFO);
  r.attr(IFLA_INFO_KIND, "bridge", 6);
  r.end(info);
  return talk(r.buf, "bridge " + name);
}

Status Rtnl::set_up(int index, const std::string& what) {
  Request r(RTM_NEWLINK, 0);
  r.put(link_message(index, true));
  return talk(r.buf, what + ": setting it up");
}

Status Rtnl::add_address(int index, uint32_t address, int prefix, const std::string& what) {
  Request r(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
  ifaddrmsg m{};
  m.ifa_family = AF_INET;
  m.ifa_prefixlen = static_cast<uint8_t>(prefix);
  m.ifa_index = static_cast<uint32_t>(index);
  r.put(m);
  const uint32_t be = htonl(address);
  r.attr(IFA_LOCAL, &be, sizeof be);
  r.attr(IFA_ADDRESS, &be, sizeof be);
  return talk(r.buf, what + ": adding its address");
}

Status Rtnl::delete_link(const std::string& name) {
  Request r(RTM_DELLINK, 0);
  r.put(link_message(0, false));
  r.attr(IFLA_IFNAME, name);
  return talk(r.buf, "removing interface " + name);
}

}  // namespace lego::netns
