// What storage tests share: a fresh directory under the test's temporary directory, a
// file's content read or written directly (beside the storage node, to check what it did),
// and a storage node started in the test's own process.
#pragma once

#include <fstream>
#include <memory>
#include <span>
#include <sstream>
#include <string>

#include "lego/fit.h"
#include "lego/storage_node.h"
#include "tests/support.h"

namespace lego::testing {

// A new directory $TEST_TMPDIR/stor-<tag>-XXXXXX (or under /tmp).
inline std::string make_temp_dir(const std::string& tag) {
  return temp_dir("stor-" + tag);
}

inline void write_file(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline std::span<const std::byte> bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// Starts a StorageNode serving `options` as node `id` of `cluster`, in this process:
// `storage` and `server` receive it and its started FIT node (the caller's members, so
// that it decides the order they are destroyed in).
inline void start_storage_node(const fit::ClusterConfig& cluster, fit::NodeId id,
                               const stor::StorageNodeOptions& options,
                               std::unique_ptr<stor::StorageNode>& storage,
                               std::unique_ptr<fit::Node>& server) {
  auto s = stor::StorageNode::create(options);
  INFO(s.status().message());
  REQUIRE(s.is_ok());
  storage = std::move(s.value());
  auto sn = fit::Node::create(cluster, id);
  REQUIRE(sn.is_ok());
  server = std::move(sn.value());
  storage->serve(*server);
  Status started = server->start();
  INFO(started.to_string());
  REQUIRE(started.is_ok());
}

}  // namespace lego::testing
