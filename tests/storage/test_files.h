// Files for storage tests: a fresh directory under the test's temporary directory, and a
// file's content read or written directly (beside the storage node, to check what it did).
#pragma once

#include <fstream>
#include <span>
#include <sstream>
#include <string>

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

}  // namespace lego::testing
