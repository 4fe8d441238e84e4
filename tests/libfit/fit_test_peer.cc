// A FIT node for end-to-end tests: serves echo, a slow opcode (sleeps the requested
// milliseconds before answering), one that exits without answering, so tests can
// watch a peer die mid-call, and its own FIT counters. Prints "ready" once serving;
// serves until killed.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

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
  Status st = node.value()->start();
  if (!st) {
    fprintf(stderr, "fit_test_peer: %s\n", st.message().c_str());
    return 1;
  }
  printf("ready\n");
  fflush(stdout);
  for (;;) pause();
}
