// Transport floors for fit-bench: what libfit's round trips are compared against.
//   - fi_pingpong: libfabric's own ping-pong for a provider and endpoint type.
//   - a raw TCP socket ping-pong with both sides busy-polling (MSG_DONTWAIT loops), and a
//     one-way busy-polled TCP stream (lego-bench's floor for file throughput).
// The ping-pongs return a round-trip time in microseconds. The server side runs in a child
// process, in network namespace `server_ns` when that is not empty; the caller's side runs
// in the calling thread's namespace. Children are always reaped, on every path.
#pragma once

#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
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

// How a floor's two ends wait for the other's bytes: busy-polling (MSG_DONTWAIT loops),
// busy-polling with a sched_yield() after each empty poll (so that a thread with work can
// run on a CPU the poller holds, as lego's pollers yield), or blocking (the server in
// epoll_wait, a client in recv).
enum class Wait { kSpin, kYield, kBlock };
const char* wait_name(Wait wait);  // "spin", "yield", "block"

// One server thread answering every request of request_bytes from `clients` connections with
// reply_bytes (all 'y'), as lego-memd's one server thread serves the processor's channels.
// It runs in a forked child, in server_ns when not empty, and accepts exactly `clients`
// connections before it serves; it exits once all of them closed, and dies with the process
// that started it. Port 0 picks a free port (port() says which).
class RoundTripServer {
 public:
  static Result<std::unique_ptr<RoundTripServer>> start(const std::string& server_ns,
                                                        const std::string& server_addr,
                                                        uint16_t port, size_t request_bytes,
                                                        size_t reply_bytes, int clients, Wait wait);
  ~RoundTripServer();  // kills and reaps the server if it still runs
  RoundTripServer(const RoundTripServer&) = delete;
  RoundTripServer& operator=(const RoundTripServer&) = delete;

  // A new connection to the server (TCP_NODELAY); the caller closes it.
  Result<int> connect() const;
  uint16_t port() const;

  // What the server did, read once it exited (after its clients closed).
  struct Exit {
    double cpu_seconds = 0;  // user + system
    uint64_t requests = 0;   // requests it answered, over all connections
  };
  // Waits for the server to exit; ETIMEDOUT if it has not within timeout_ms, EIO if it
  // failed (with what it said), ECHILD if it was already reaped.
  Result<Exit> wait_exit(int timeout_ms);

  size_t request_bytes() const { return request_bytes_; }
  size_t reply_bytes() const { return reply_bytes_; }

 private:
  RoundTripServer() = default;
  pid_t pid_ = -1;
  int report_fd_ = -1;  // where the server writes Exit::requests before it exits
  sockaddr_in addr_{};  // where it listens
  size_t request_bytes_ = 0, reply_bytes_ = 0;
};

// The CPU time, user + system, in seconds, of a getrusage() or wait4() report.
double cpu_seconds(const rusage& usage);

// One round trip on fd: sends request_bytes of buf, receives reply_bytes into buf (at least
// max(request_bytes, reply_bytes) long), waiting as `wait` says. No allocation and only
// system calls: a SIGBUS handler may call it (and must save errno around it, which it
// sets). False if the connection failed or closed.
bool round_trip(int fd, char* buf, size_t request_bytes, size_t reply_bytes, Wait wait);
// The same with the request in a buffer of its own: sends request_bytes of `request`,
// receives reply_bytes into `reply` (no copy of the request into the reply's buffer).
bool round_trip(int fd, const char* request, size_t request_bytes, char* reply, size_t reply_bytes,
                Wait wait);

// Round trips per second of `clients` threads, each with one connection and one request
// of request_bytes in flight at a time (answered by reply_bytes), against one
// RoundTripServer, both ends waiting as `wait` says. What that many threads each waiting on
// a round trip can do at best over this host's TCP, with both ends on its CPUs: lego-bench's
// floor for random_mt's threads. Each client makes `round_trips` after a warm-up.
Result<double> tcp_concurrent_round_trips_per_s(const std::string& server_ns,
                                                const std::string& server_addr, uint16_t port,
                                                size_t request_bytes, size_t reply_bytes,
                                                int clients, int round_trips, Wait wait);

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
