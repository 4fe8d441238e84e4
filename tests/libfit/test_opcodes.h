// Opcodes served by fit_test_peer.
#pragma once
#include <cstdint>

namespace lego::testing {
inline constexpr uint16_t kEcho = 1;   // replies "<node id>:" + the request
inline constexpr uint16_t kSleep = 2;  // request: uint32 milliseconds; replies empty after
inline constexpr uint16_t kExit = 3;   // the peer exits without replying
inline constexpr uint16_t kStats = 4;  // replies fit::stats_text() of the peer's node
}  // namespace lego::testing
