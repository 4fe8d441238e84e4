// Transport floors for fit-bench: what libfit's round trips are compared against.
//   - fi_pingpong: libfabric's own ping-pong for a provider and endpoint type.
//   - a raw TCP socket ping-pong with both sides busy-polling (MSG_DONTWAIT loops), and a
//     one-way busy-polled TCP stream (lego-bench's floor for file throughput).
// The ping-pongs return a round-trip time in microseconds. The server side runs in a child
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
// The same with a request of request_bytes answered by reply_bytes (a miss: a small request
// for a 4 KiB line).
Result<double> tcp_busypoll_rtt_us(const std::string& server_ns, const std::string& server_addr,
                                   uint16_t port, size_t request_bytes, size_t reply_bytes,
                                   int iterations);

// Round trips per second of `clients` threads, each with one connection and one request
// of request_bytes in flight at a time (answered by reply_bytes), against one server
// thread that serves every connection, as lego-memd's one server thread serves the
// processor's channels. spin: both sides busy-poll (MSG_DONTWAIT loops); else both block
// (the server in epoll_wait, the clients in recv). What that many threads each waiting on a
// round trip can do at best over this host's TCP, with both ends on its CPUs: lego-bench's
// floor for random_mt's threads. Each client makes `round_trips` after a warm-up.
Result<double> tcp_concurrent_round_trips_per_s(const std::string& server_ns,
                                                const std::string& server_addr, uint16_t port,
                                                size_t request_bytes, size_t reply_bytes,
                                                int clients, int round_trips, bool spin);

// One-way throughput in MB/s (10^6 bytes/s) of a busy-polled TCP stream of total_bytes,
// sent in chunk_bytes pieces: client -> server, or server -> client when server_sends.
Result<double> tcp_busypoll_stream_mb_s(const std::string& server_ns,
                                        const std::string& server_addr, uint16_t port,
                                        uint64_t total_bytes, size_t chunk_bytes,
                                        bool server_sends);

// Runs /usr/bin/fi_pingpong as server (in server_ns) and client. fi_pingpong reports
// "usec/xfer" per one-way transfer (its byte total counts both directions), so the round
// trip is twice that. Its figure is a mean over the whole run. Gives up after 120 s.
// server_domain: the libfabric domain the server opens (-d; "" for the provider's first).
Result<double> fi_pingpong_rtt_us(const std::string& provider, const std::string& endpoint,
                                  size_t message_bytes, int iterations,
                                  const std::string& server_ns, const std::string& server_addr,
                                  uint16_t control_port, const std::string& server_domain = "");

// The RDMA device (its name, e.g. "rxe1": libfabric's verbs domain) whose network
// interface holds IPv4 address `address`, from /sys/class/infiniband; ENODEV if none.
Result<std::string> rdma_device_of(const std::string& address);

}  // namespace lego::bench
