// Opcodes served by fit_test_peer.
#pragma once
#include <cstddef>
#include <cstdint>

namespace lego::testing {
inline constexpr uint16_t kEcho = 1;   // replies "<node id>:" + the request
inline constexpr uint16_t kSleep = 2;  // request: uint32 milliseconds; replies empty after
inline constexpr uint16_t kExit = 3;   // the peer exits without replying
inline constexpr uint16_t kStats = 4;  // replies fit::stats_text() of the peer's node
// The peer's exposed region: kRegionBytes registered for remote reads and writes, byte i
// initially kRegionByte(i).
inline constexpr uint16_t kRegion = 5;  // replies the fit::RemoteRegion
inline constexpr uint16_t kPeek = 6;    // request: uint64 offset, uint32 length; replies
                                        // those bytes of the region as the peer sees them
inline constexpr size_t kRegionBytes = 1 << 20;
inline constexpr std::byte kRegionByte(size_t i) {
  return static_cast<std::byte>(i * 7 + 3);
}
}  // namespace lego::testing
