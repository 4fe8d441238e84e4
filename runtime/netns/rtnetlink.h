// A minimal rtnetlink (NETLINK_ROUTE) client: what lego's namespaces need, and no more.
// Internal to //netns (include/lego/netns.h is the API).
//
// One request at a time, each answered before the next is sent; every answer is checked
// and an error names the step ("veth lgo123a: File exists").
//
// Thread-safety: an Rtnl is used by one thread at a time. Its socket stays in the network
// namespace of the thread that opened it, wherever that thread goes afterwards.
#pragma once

#include <cstdint>
#include <string>

#include "lego/status.h"

namespace lego::netns {

class Rtnl {
 public:
  // A socket in the calling thread's network namespace.
  static Result<Rtnl> open();
  Rtnl(Rtnl&& other) noexcept;
  Rtnl& operator=(Rtnl&&) = delete;
  ~Rtnl();

  // The index of interface `name`; ENODEV when there is none.
  Result<int> link_index(const std::string& name);
  // A veth pair: `name` here, up (enslaved to bridge `master` when not 0), its peer
  // `peer` in the namespace open at `peer_ns_fd`, down (set_up it there); both with `mtu`.
  Status add_veth(const std::string& name, int master, const std::string& peer, int peer_ns_fd,
                  uint32_t mtu);
  // A bridge, up.
  Status add_bridge(const std::string& name);
  // Sets interface `index` up (1 is the loopback of every namespace).
  Status set_up(int index, const std::string& what);
  // Adds IPv4 `address` (host byte order) / `prefix` to interface `index`.
  Status add_address(int index, uint32_t address, int prefix, const std::string& what);
  // Removes interface `name`; ENODEV when there is none.
  Status delete_link(const std::string& name);

 private:
  explicit Rtnl(int fd) : fd_(fd) {}
  // Sends the request in buf (a whole netlink message) and reads its answer: the ACK,
  // or with `reply` (cap bytes) the first message, copied there.
  Status talk(void* request, const std::string& what, void* reply = nullptr, size_t cap = 0);
  int fd_ = -1;
  uint32_t seq_ = 0;
};

}  // namespace lego::netns
