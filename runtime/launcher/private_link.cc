// The private memory node's link (runtime/launcher/private_link.h).
#include "runtime/launcher/private_link.h"

namespace lego::launch {

std::string private_namespace(pid_t pid) {
  return kPrivateNamespacePrefix + std::to_string(pid);
}

std::string private_link_name(pid_t pid) {
  return kPrivateLinkPrefix + std::to_string(pid) + kPrivateLinkSuffix;
}

uint32_t private_subnet(pid_t pid) {
  const uint32_t n = static_cast<uint32_t>(pid) % 16000;
  return (10u << 24) | ((64 + n / 250) << 16) | ((n % 250) << 8);
}

Result<std::unique_ptr<netns::Network>> private_link(const std::string& ns, const std::string& link,
                                                     uint32_t subnet) {
  netns::NetworkSpec spec;
  spec.namespaces = {ns};
  spec.attach_host = true;
  spec.host_link = link;
  spec.subnet = subnet;
  spec.mtu = 65535;
  return netns::Network::create(spec);
}

}  // namespace lego::launch
