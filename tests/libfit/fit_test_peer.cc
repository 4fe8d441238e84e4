// A FIT node for end-to-end tests: serves echo, a slow opcode (sleeps the requested
// milliseconds before answering), one that exits without answering, so tests can
// watch a peer die mid-call, its own FIT counters, and a registered region for one-sided
// reads and writes (kRegion names it, kPeek shows what the peer sees in it). Prints
// "ready" once serving; serves until killed.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "tests/libfit/test_opcodes.h"

using namespace lego;

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: fit_test_peer CONFIG NODE_ID\n");
    return 2;
  }
  auto config = fit::ClusterConfig::parse_file(argv[1]);
  if (!config) {
    fprintf(stderr, "fit_test_peer: %s\n", config.status().message().c_str());
    return 2;
  }
  auto node = fit::Node::create(config.value(), static_cast<fit::NodeId>(atoi(argv[2])));
  if (!node) {
    fprintf(stderr, "fit_test_peer: %s\n", node.status().message().c_str());
    return 2;
  }
  fit::NodeId self = node.value()->id();
  node.value()->handle(testing::kEcho,
                       [self](const fit::RpcContext&, std::span<const std::byte> req,
                              std::span<std::byte> rep) -> Result<size_t> {
                         // Echo, prefixed by our node id so callers know who answered.
                         std::string prefix = std::to_string(self) + ":";
                         if (prefix.size() + req.size() > rep.size())
                           return Status(EMSGSIZE, "echo too large");
                         memcpy(rep.data(), prefix.data(), prefix.size());
                         memcpy(rep.data() + prefix.size(), req.data(), req.size());
                         return prefix.size() + req.size();
                       });
  node.value()->handle(testing::kSleep,
                       [](const fit::RpcContext&, std::span<const std::byte> req,
                          std::span<std::byte>) -> Result<size_t> {
                         uint32_t ms = 0;
                         if (req.size() != sizeof(ms))
                           return Status(EINVAL, "sleep takes a 4-byte duration");
                         memcpy(&ms, req.data(), sizeof(ms));
                         std::this_thread::sleep_for(std::chrono::milliseconds(ms));
                         return size_t{0};
                       });
  node.value()->handle(testing::kExit,
                       [](const fit::RpcContext&, std::span<const std::byte>,
                          std::span<std::byte>) -> Result<size_t> { _exit(3); });
  fit::Node* self_node = node.value().get();
  node.value()->handle(testing::kStats,
                       [self_node](const fit::RpcContext&, std::span<const std::byte>,
                                   std::span<std::byte> rep) -> Result<size_t> {
                         std::string text = fit::stats_text(self_node->stats());
                         size_t n = std::min(text.size(), rep.size());
                         memcpy(rep.data(), text.data(), n);
                         return n;
                       });
  // Registered after start() (providers register with the serving domain); the handlers
  // only run once "ready" is printed, after it is set.
  static std::vector<std::byte> exposed(testing::kRegionBytes);
  for (size_t i = 0; i < exposed.size(); i++) exposed[i] = testing::kRegionByte(i);
  static fit::MemoryRegion region;
  node.value()->handle(testing::kRegion,
                       [](const fit::RpcContext&, std::span<const std::byte>,
                          std::span<std::byte> rep) -> Result<size_t> {
                         fit::RemoteRegion r = region.remote();
                         if (rep.size() < sizeof(r)) return Status(EMSGSIZE, "reply too small");
                         memcpy(rep.data(), &r, sizeof(r));
                         return sizeof(r);
                       });
  node.value()->handle(
      testing::kPeek,
      [](const fit::RpcContext&, std::span<const std::byte> req,
         std::span<std::byte> rep) -> Result<size_t> {
        uint64_t offset = 0;
        uint32_t len = 0;
        if (req.size() != sizeof(offset) + sizeof(len))
          return Status(EINVAL, "peek takes an offset and a length");
        memcpy(&offset, req.data(), sizeof(offset));
        memcpy(&len, req.data() + sizeof(offset), sizeof(len));
        if (offset > exposed.size() || len > exposed.size() - offset || len > rep.size())
          return Status(EINVAL, "peek outside the region");
        memcpy(rep.data(), exposed.data() + offset, len);
        return size_t{len};
      });
  Status st = node.value()->start();
  if (!st) {
    fprintf(stderr, "fit_test_peer: %s\n", st.message().c_str());
    return 1;
  }
  auto mr = node.value()->register_memory(exposed.data(), exposed.size(), true);
  if (!mr) {
    fprintf(stderr, "fit_test_peer: %s\n", mr.status().message().c_str());
    return 1;
  }
  region = std::move(mr.value());
  printf("ready\n");
  fflush(stdout);
  for (;;) pause();
}
