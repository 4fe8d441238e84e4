// Network namespaces and the links between them: lego's "remote" nodes on one machine.
//
// lego-run gives its private memory node a namespace of its own, lego-bench measures its
// transport floors across one, and the tests run whole clusters in them. This is the one
// place that makes them.
//
// A namespace here is a named one, as `ip netns add` makes it: a bind mount of the
// namespace at /var/run/netns/NAME (made a shared mount point first, so the namespace is
// seen from every mount namespace). `ip netns exec NAME`, setns() on that path, and a
// sweep that lists /var/run/netns all find it; it lives until deleted, even with no
// process in it. Names must carry something unique to the caller (its pid): parallel
// users must never collide.
//
// A Network is namespaces on one IPv4 subnet, every member able to reach every other,
// made in one call:
//   - one namespace with the host attached (the caller's own namespace: lego-run's
//     processor and its private memory node): a veth pair, one end here and one there,
//     on a /30;
//   - anything else (several namespaces, with or without the host): a bridge in a
//     namespace of its own, and a veth pair from it to each member, on a /24. The bridge
//     is not in the host's namespace, so the host gets one interface (with `attach_host`)
//     or none.
// Every veth end is made where it belongs (the peer straight in its namespace: moving an
// end between namespaces is the slow step, 4-50 ms), with 64 KiB frames as on loopback
// (a 4 KiB line crosses as one packet), all through rtnetlink: no `ip` is run.
//
// Cost: a namespace is ~1-3 ms on a quiet host (the kernel's namespace locks make it
// 100 ms and more under load), a link well under a millisecond.
//
// Needs CAP_NET_ADMIN and CAP_SYS_ADMIN in the initial user namespace (root).
//
// Thread-safety: the functions may be called from any thread, each call on its own
// objects. Making a Network moves the calling thread into each namespace in turn (setns)
// and back, so a signal handler that runs meanwhile may see another namespace; threads
// started meanwhile by other threads are not affected.
//
// Errors: lego::Status with an errno code and a message naming the namespace or link and
// the step that failed ("veth lgo123a: File exists"). Nothing is left behind when a
// create() fails.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lego/status.h"

namespace lego::netns {

// /var/run/netns/NAME.
std::string namespace_path(const std::string& name);

// Makes the named namespace NAME (as `ip netns add`), with no interface but a loopback
// that is down. EEXIST when the name is taken; EINVAL for a name with '/' or empty.
Status create_namespace(const std::string& name);
// Removes the named namespace (as `ip netns del`): its name goes at once; the namespace
// itself, and every interface in it (a veth pair with one end here included), when no
// process is left in it (the kernel frees it asynchronously, within milliseconds).
// ENOENT when there is none of that name.
Status delete_namespace(const std::string& name);
// Moves the calling thread into the named namespace (threads it starts later inherit it).
Status enter_namespace(const std::string& name);

// Removes interface NAME of the calling thread's namespace (a veth end takes its peer
// with it). ENODEV when there is none.
Status delete_link(const std::string& name);

// "10.64.3.2" for 0x0a400302.
std::string ipv4_string(uint32_t address);

struct NetworkSpec {
  // The members' namespace names, made by create() and removed with the Network.
  // 1..253 of them.
  std::vector<std::string> namespaces;
  // Whether the caller's namespace joins too (lego-run's processor).
  bool attach_host = false;
  // With attach_host: the name of the host's interface (at most 15 characters); it
  // should carry the pid, since it is in a namespace others share (lego-run: lgoPIDa).
  std::string host_link;
  // Bridge topologies: the namespace holding the bridge. Default "<namespaces[0]>-sw".
  std::string switch_namespace;
  // The subnet's first address, host byte order: 10.64.3.0 is 0x0a400300. A multiple of
  // 256. Addresses: the host .1; namespace i .(i + 2) with the host, .(i + 1) without.
  // Default 10.128.0.0: any subnet does for a network without the host, whose addresses
  // only its own namespaces see. With the host, pick one that no other network attached
  // to the host uses (lego-run: private_subnet(pid)).
  uint32_t subnet = 0x0a800000;
  // Every link's MTU. Default 65535, as on loopback.
  uint32_t mtu = 65535;
};

class Network {
 public:
  // Makes the namespaces and links of `spec`. On failure nothing of it is left.
  static Result<std::unique_ptr<Network>> create(const NetworkSpec& spec);
  // Deletes every namespace it made, and with them its links (see delete_namespace).
  ~Network();
  Network(const Network&) = delete;
  Network& operator=(const Network&) = delete;

  int size() const { return static_cast<int>(names_.size()); }
  // Member i's namespace name and IPv4 address.
  const std::string& name(int i) const { return names_.at(static_cast<size_t>(i)); }
  const std::string& address(int i) const { return addresses_.at(static_cast<size_t>(i)); }
  // The host's address on the network ("" without attach_host).
  const std::string& host_address() const { return host_address_; }
  // Moves the calling thread into member i's namespace.
  Status enter(int i) const { return enter_namespace(name(i)); }

 private:
  Network() = default;
  Status build(const NetworkSpec& spec);
  std::vector<std::string> made_;  // namespaces to delete, in order
  std::vector<std::string> names_, addresses_;
  std::string host_address_;
};

}  // namespace lego::netns
