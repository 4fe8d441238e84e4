// The link lego-run gives its private memory node: a network namespace of its own, joined
// to the host's by a veth pair, and the names it has on the host. lego-bench measures its
// transport floor over the same kind of link.
//
// Thread-safety: as include/lego/netns.h.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>

#include "lego/netns.h"
#include "lego/status.h"

namespace lego::launch {

// The names a private cluster started by process `pid` uses on the host: its network
// namespace "lego-run-PID", the host's end of its veth pair "lgoPIDa", and its subnet
// 10.(64 + n / 250).(n % 250).0, n = PID % 16000 (distinct /24s for concurrent runs).
// The sweep of killed runs finds their leftovers by these names.
inline constexpr char kPrivateNamespacePrefix[] = "lego-run-";
inline constexpr char kPrivateLinkPrefix[] = "lgo";
inline constexpr char kPrivateLinkSuffix[] = "a";
std::string private_namespace(pid_t pid);
std::string private_link_name(pid_t pid);
uint32_t private_subnet(pid_t pid);

// A namespace `ns` joined to this one by a veth pair on a /30 of `subnet`: the host's end
// `link` (.1) here, eth0 (.2) there; 64 KiB frames, as on loopback, so that a 4 KiB line
// crosses as one packet, not three (misses over tcp ~4% cheaper). The link lego-run gives
// its private memory node. Removed with the returned Network.
Result<std::unique_ptr<netns::Network>> private_link(const std::string& ns, const std::string& link,
                                                     uint32_t subnet);

}  // namespace lego::launch
