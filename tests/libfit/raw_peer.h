// A FIT peer on a raw TCP socket, for tests that act as a hostile or broken client: it
// writes any frame (bad magic, wrong kind, a header alone), runs the handshake or breaks
// it, and reads what the server answers until it closes the connection.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "lego/fit.h"
#include "lego/fit_wire.h"
#include "libfit/auth.h"

namespace lego::testing {

// One frame as read from the server.
struct RawFrame {
  fit::wire::FrameHeader header{};
  std::vector<std::byte> payload;

  std::string text() const {
    return std::string(reinterpret_cast<const char*>(payload.data()), payload.size());
  }
  fit::wire::Kind kind() const { return static_cast<fit::wire::Kind>(header.kind); }
};

class RawPeer {
 public:
  RawPeer() = default;
  RawPeer(const RawPeer&) = delete;
  RawPeer& operator=(const RawPeer&) = delete;
  RawPeer(RawPeer&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  ~RawPeer() { close_now(); }

  // Connects to address:port. `rcvbuf` > 0 sets SO_RCVBUF first (a peer that reads
  // slowly); `source` binds the local end to that address (another 127.0.0.x).
  // Non-blocking when `nonblocking` (the connect may still be in progress then).
  bool open(const std::string& address, uint16_t port, int rcvbuf = 0, const char* source = nullptr,
            bool nonblocking = false) {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    if (fd_ < 0) return false;
    if (rcvbuf > 0) setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    if (source != nullptr) {
      sockaddr_in s{};
      s.sin_family = AF_INET;
      inet_pton(AF_INET, source, &s.sin_addr);
      if (bind(fd_, reinterpret_cast<sockaddr*>(&s), sizeof(s)) != 0) return false;
    }
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, address.c_str(), &a.sin_addr);
    int r = connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    return r == 0 || (nonblocking && errno == EINPROGRESS);
  }
  int fd() const { return fd_; }
  void close_now() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

  // Writes all of `bytes` (blocking); false if the connection failed.
  bool write_all(const void* bytes, size_t n) {
    auto* p = static_cast<const char*>(bytes);
    while (n > 0) {
      ssize_t w = send(fd_, p, n, MSG_NOSIGNAL);
      if (w <= 0) {
        if (w < 0 && errno == EINTR) continue;
        return false;
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }

  static fit::wire::FrameHeader header(fit::wire::Kind kind, uint32_t length, uint16_t opcode = 0,
                                       uint64_t id = 0, uint32_t source_node = 1) {
    fit::wire::FrameHeader h{};
    std::byte raw[sizeof(h)];
    fit::wire::encode_header(raw, kind, opcode, length, 0, id, source_node);
    memcpy(&h, raw, sizeof(h));
    return h;
  }
  bool send_frame(const fit::wire::FrameHeader& h, const void* payload = nullptr, size_t n = 0) {
    return write_all(&h, sizeof(h)) && (n == 0 || write_all(payload, n));
  }

  // The next frame, waiting up to `timeout`; nullopt on timeout, EOF or a reset (eof()
  // then says which).
  std::optional<RawFrame> read_frame(std::chrono::milliseconds timeout) {
    RawFrame f;
    if (!read_exact(&f.header, sizeof(f.header), timeout)) return std::nullopt;
    if (f.header.length > (64u << 20)) return std::nullopt;
    f.payload.resize(f.header.length);
    if (!read_exact(f.payload.data(), f.payload.size(), timeout)) return std::nullopt;
    return f;
  }
  // Reads frames until the server closes the connection (EOF or reset) or `timeout`
  // passes. Returns the frames read; closed() then says whether it closed.
  std::vector<RawFrame> read_until_closed(std::chrono::milliseconds timeout) {
    std::vector<RawFrame> frames;
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!closed_) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      auto f = read_frame(left);
      if (!f) break;
      frames.push_back(std::move(*f));
    }
    return frames;
  }
  // Whether the server closed the connection (a read saw EOF or a reset).
  bool closed() const { return closed_; }

  // The client's side of the handshake with `key`, as node `self` to node `server`.
  // Returns the server's last frame (kWelcome, or the kError refusing us); nullopt when
  // the connection failed or was not answered.
  // `before_proof`, when given, runs between the challenge and the proof (a handshake
  // under way).
  std::optional<RawFrame> handshake(const std::vector<uint8_t>& key, uint32_t self, uint32_t server,
                                    std::chrono::milliseconds timeout = std::chrono::seconds(5),
                                    const std::function<void()>& before_proof = nullptr) {
    fit::wire::HelloPayload hello{};
    hello.client_node = self;
    hello.window = 16;
    fit::auth::make_nonce(hello.client_nonce);
    if (!send_frame(header(fit::wire::Kind::kHello, sizeof(hello), 0, 0, self), &hello,
                    sizeof(hello))) {
      return std::nullopt;
    }
    auto ch = read_frame(timeout);
    if (!ch || ch->kind() != fit::wire::Kind::kChallenge) return ch;
    fit::wire::ChallengePayload challenge{};
    if (ch->payload.size() != sizeof(challenge)) return std::nullopt;
    memcpy(&challenge, ch->payload.data(), sizeof(challenge));
    if (before_proof) before_proof();
    fit::wire::ProofPayload proof{};
    fit::auth::prove(key, fit::auth::Direction::kClientToServer, hello.client_nonce,
                     challenge.server_nonce, self, server, proof.client_proof);
    if (!send_frame(header(fit::wire::Kind::kProof, sizeof(proof), 0, 0, self), &proof,
                    sizeof(proof))) {
      return std::nullopt;
    }
    return read_frame(timeout);
  }

 private:
  bool read_exact(void* out, size_t n, std::chrono::milliseconds timeout) {
    auto* p = static_cast<char*>(out);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (n > 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd pfd{fd_, POLLIN, 0};
      if (poll(&pfd, 1, static_cast<int>(left.count())) <= 0) continue;
      ssize_t r = recv(fd_, p, n, MSG_DONTWAIT);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
        closed_ = true;
        return false;
      }
      if (r > 0) {
        p += r;
        n -= static_cast<size_t>(r);
      }
    }
    return true;
  }

  int fd_ = -1;
  bool closed_ = false;
};

// The resident set of process `pid` in KiB (/proc/PID/status VmRSS), or -1.
inline long rss_kib(pid_t pid) {
  std::string path = "/proc/" + std::to_string(pid) + "/status";
  FILE* f = fopen(path.c_str(), "r");
  if (f == nullptr) return -1;
  char line[256];
  long kib = -1;
  while (fgets(line, sizeof line, f) != nullptr) {
    if (strncmp(line, "VmRSS:", 6) == 0) kib = strtol(line + 6, nullptr, 10);
  }
  fclose(f);
  return kib;
}

}  // namespace lego::testing
