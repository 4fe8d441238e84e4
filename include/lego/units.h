// Parsing and printing of byte sizes for command-line flags ("64M", "1G", "4096").
// Header-only; thread-safe (pure functions).
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "lego/status.h"

namespace lego {

// "4096", "64K", "64M", "1G", "2T" (binary multiples, optional trailing "iB" or "B").
// EINVAL names the flag and the text when it is not a size or overflows.
inline Result<uint64_t> parse_size(const std::string& text, const std::string& flag) {
  auto bad = [&] {
    return Status(EINVAL, flag + ": '" + text + "' is not a size (examples: 4096, 64M, 1G)");
  };
  if (text.empty() || text[0] < '0' || text[0] > '9') return bad();
  char* end = nullptr;
  errno = 0;
  unsigned long long v = strtoull(text.c_str(), &end, 10);
  if (errno != 0) return bad();
  std::string unit(end);
  if (unit == "iB" || unit == "B") unit.clear();
  if (unit.size() >= 2 && (unit.substr(1) == "iB" || unit.substr(1) == "B"))
    unit = unit.substr(0, 1);
  int shift = 0;
  if (unit.empty())
    shift = 0;
  else if (unit == "K" || unit == "k")
    shift = 10;
  else if (unit == "M" || unit == "m")
    shift = 20;
  else if (unit == "G" || unit == "g")
    shift = 30;
  else if (unit == "T" || unit == "t")
    shift = 40;
  else
    return bad();
  if (shift > 0 && v > (~0ull >> shift)) return bad();
  return static_cast<uint64_t>(v << shift);
}

// A decimal integer flag within [lo, hi]; EINVAL names the flag, the text and the range.
inline Result<long> parse_int(const std::string& text, const std::string& flag, long lo, long hi) {
  char* end = nullptr;
  errno = 0;
  long v = strtol(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || *end != '\0' || v < lo || v > hi) {
    return Status(EINVAL, flag + ": '" + text + "' is not a number in " + std::to_string(lo) +
                              ".." + std::to_string(hi));
  }
  return v;
}

// "a,b,,c" -> {"a", "b", "c"}: a comma-separated flag value, empty items dropped.
inline std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    if (end > start) out.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

// 67108864 -> "64 MiB"; exact multiples only, otherwise bytes.
inline std::string format_size(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (u < 4 && bytes >= 1024 && bytes % 1024 == 0) {
    bytes /= 1024;
    u++;
  }
  return std::to_string(bytes) + " " + units[u];
}

}  // namespace lego
