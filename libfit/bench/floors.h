// Transport floors for fit-bench: what libfit's round trips are compared against.
//   - fi_pingpong: libfabric's own ping-pong for a provider and endpoint type.
//   - a raw TCP socket ping-pong with both sides busy-polling (MSG_DONTWAIT loops).
// Each returns a round-trip time in microseconds. The server side runs in a child
// process, in network namespace `server_ns` when that is not empty; the caller's side runs
// in the calling thread's namespace. Children are always reaped, on every path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "lego/status.h"

namespace lego::bench {

// Median over 20 batches of mean round trips (robust to a noisy shared VM).
Result<double> tcp_busypoll_rtt_us(const std::string& server_ns, const std::string& server_addr,
                                   uint16_t port, size_t message_bytes, int iterations);

// Runs /usr/bin/fi_pingpong as server (in server_ns) and client. fi_pingpong reports
// "usec/xfer" per one-way transfer (its byte total counts both directions), so the round
// trip is twice that. Its figure is a mean over the whole run. Gives up after 120 s.
Result<double> fi_pingpong_rtt_us(const std::string& provider, const std::string& endpoint,
                                  size_t message_bytes, int iterations,
                                  const std::string& server_ns, const std::string& server_addr,
                                  uint16_t control_port);

}  // namespace lego::bench
