// hostile_client: a hostile peer of lego's daemons (lego-memd, lego-stord), for the
// end-to-end hostile-client suite (tests/hostile/hostile_test.sh).
//
// It speaks FIT's wire format (include/lego/fit_wire.h; the handshake of libfit/node.cc's
// connect() and serve()) over raw TCP sockets, as any process that reaches a daemon's port
// can, and carries out one attack (--attack NAME, listed in kUsage). Each attack checks
// what the daemon is meant to do about it:
//   - a peer that does not read what it is sent is cut off within --cutoff-ms;
//   - a connection that never completes the handshake is closed within --close-ms;
//   - a rejected or malformed frame gets its error frame where the wire format promises
//     one (EPROTONOSUPPORT for another version, EACCES for a wrong proof or a request
//     before the handshake), then the connection is closed, within --close-ms.
// It prints what came back on each connection (tallied; one line per connection with
// --verbose) and ends with one line for scripts:
//   result attack=NAME connections=N ok=N bad=N ... verdict=ok|fail
// Exit status: 0 when every connection was treated as above, 1 when not, 2 for bad flags,
// 3 when the attack could not be carried out (no connection accepted, key refused).
//
// Single-threaded: one epoll loop over all of an attack's sockets.
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lego/fit_wire.h"
#include "lego/flags.h"
#include "lego/memory_proto.h"
#include "lego/storage_proto.h"
#include "libfit/auth.h"

namespace {

namespace wire = lego::fit::wire;
using wire::FrameHeader;
using wire::Kind;

const char* kUsage = R"(usage: hostile_client --attack NAME --address A --port P [options]

A hostile peer of a lego daemon (lego-memd, lego-stord) over tcp: it speaks FIT's
frame format on raw sockets and checks that the daemon defends itself.

attacks (--attack):
  flood          N connections (default 64) with a tiny receive buffer, sending small
                 frames as fast as the daemon takes them and never reading: frames of
                 kind reply (even connections) or requests before the handshake (odd
                 ones). A connection that is cut off is opened again after
                 --reconnect-ms, until --seconds. Each must be cut off within
                 --cutoff-ms of being opened.
  auth-flood     the same, authenticated with the cluster key (--key-file): requests
                 of --opcode whose replies are never read. Each must be cut off within
                 --cutoff-ms.
  idle           N connections (default 2000) that connect and say nothing (raises
                 this process's RLIMIT_NOFILE). Each must be closed within --close-ms
                 (default 10000) of being accepted.
  half           N connections (default 500) sending half a frame: half of them half a
                 header, the others a header promising --promise bytes and 16 of them;
                 then silence. Each must be closed within --close-ms (default 10000).
  bad-magic      a header with a wrong magic: an EPROTO error frame or nothing, then
                 the connection is closed within --close-ms (default 3000).
  bad-version    a hello of FIT version 2: an EPROTONOSUPPORT error frame, then closed.
  bad-kind       a frame of kind 99: an EPROTO error frame or nothing, then closed.
  wrong-proof    a hello, then a proof made with a wrong key: the challenge, an EACCES
                 error frame, then closed.
  early-request  a request (--opcode) before the handshake: an EACCES error frame, then
                 closed.
An EAGAIN error frame instead of the one named, then close, passes too: a daemon over its
cap on connections awaiting the handshake closes the oldest of them that way.
The single-frame attacks (bad-*, wrong-proof, early-request) open N connections at once
(default 16) and repeat such rounds until --seconds have passed.

options:
  --address A        the daemon's address (default 127.0.0.1)
  --port P           the daemon's port (required)
  --connections N    connections at once (defaults above)
  --seconds S        how long to keep attacking (default 5; at least one round)
  --close-ms MS      see above
  --cutoff-ms MS     flood, auth-flood: how soon a non-reading peer must be cut off
                     (default 8000; the daemon's timeout_ms plus a few seconds)
  --connect-ms MS    give up on a connect() after this long (default 5000)
  --reconnect-ms MS  flood, auth-flood: pause before reopening a cut-off connection
                     (default 50)
  --opcode OP        the request opcode: a number, memory-status or storage-status
                     (default memory-status)
  --node-id ID       the node id a hello claims (default 1)
  --promise BYTES    half: the payload length the header promises (default 65536)
  --key-file FILE    auth-flood: the cluster key, 64 hex digits (a cluster's key_file)
  --verbose          one line per connection
  --help             this text

Output ends with "result attack=NAME ... verdict=ok|fail". Exit status: 0 ok, 1 fail,
2 bad flags, 3 the attack could not be carried out.
)";

constexpr int kExitOk = 0;
constexpr int kExitFail = 1;
constexpr int kExitUsage = 2;
constexpr int kExitSetup = 3;

enum class Attack {
  kFlood,
  kAuthFlood,
  kIdle,
  kHalf,
  kBadMagic,
  kBadVersion,
  kBadKind,
  kWrongProof,
  kEarlyRequest,
};

struct AttackInfo {
  const char* name;
  Attack attack;
  int connections;  // default
  int close_ms;     // default
};
constexpr AttackInfo kAttacks[] = {
    {"flood", Attack::kFlood, 64, 0},
    {"auth-flood", Attack::kAuthFlood, 4, 0},
    {"idle", Attack::kIdle, 2000, 10000},
    {"half", Attack::kHalf, 500, 10000},
    {"bad-magic", Attack::kBadMagic, 16, 3000},
    {"bad-version", Attack::kBadVersion, 16, 3000},
    {"bad-kind", Attack::kBadKind, 16, 3000},
    {"wrong-proof", Attack::kWrongProof, 16, 3000},
    {"early-request", Attack::kEarlyRequest, 16, 3000},
};

struct Options {
  const AttackInfo* attack = nullptr;
  std::string address = "127.0.0.1";
  int port = 0;
  int connections = 0;
  double seconds = 5;
  int close_ms = 0;
  int cutoff_ms = 8000;
  int connect_ms = 5000;
  int reconnect_ms = 50;
  uint16_t opcode = lego::mem::kStatus;
  uint32_t node_id = 1;
  uint32_t promise = 65536;
  std::string key_file;
  bool verbose = false;
};

int64_t now_ms() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000 + ts.tv_nsec / 1000000;
}

[[noreturn]] void die(int status, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "hostile_client: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  exit(status);
}

const char* errno_name(int e) {
  const char* n = strerrorname_np(e);
  return n != nullptr ? n : "E?";
}

// The cluster key from a key_file: 64 hex digits, surrounding white space allowed.
std::vector<uint8_t> read_key(const std::string& path) {
  FILE* f = fopen(path.c_str(), "r");
  if (f == nullptr) die(kExitUsage, "--key-file %s: %s", path.c_str(), strerror(errno));
  char text[256] = {};
  size_t n = fread(text, 1, sizeof(text) - 1, f);
  fclose(f);
  std::string hex;
  for (size_t i = 0; i < n; i++) {
    if (!isspace(static_cast<unsigned char>(text[i]))) hex += text[i];
  }
  if (hex.size() != 64) die(kExitUsage, "--key-file %s: expected 64 hex digits", path.c_str());
  std::vector<uint8_t> key(32);
  for (size_t i = 0; i < 32; i++) {
    unsigned v = 0;
    if (sscanf(hex.c_str() + 2 * i, "%2x", &v) != 1) {
      die(kExitUsage, "--key-file %s: not hex", path.c_str());
    }
    key[i] = static_cast<uint8_t>(v);
  }
  return key;
}

// --- frames ------------------------------------------------------------------------------

std::vector<std::byte> frame(uint8_t kind, uint16_t opcode, uint32_t length,
                             std::span<const std::byte> payload, uint64_t id, uint32_t source,
                             uint32_t magic = wire::kMagic, uint8_t version = wire::kVersion) {
  FrameHeader h{};
  h.magic = magic;
  h.version = version;
  h.kind = kind;
  h.opcode = opcode;
  h.length = length;
  h.request_id = id;
  h.source_node = source;
  std::vector<std::byte> out(sizeof(h) + payload.size());
  memcpy(out.data(), &h, sizeof(h));
  if (!payload.empty()) memcpy(out.data() + sizeof(h), payload.data(), payload.size());
  return out;
}

template <typename T>
std::span<const std::byte> bytes_of(const T& v) {
  return {reinterpret_cast<const std::byte*>(&v), sizeof(v)};
}

constexpr uint8_t k(Kind kind) {
  return static_cast<uint8_t>(kind);
}

wire::HelloPayload hello_payload(uint32_t node, uint8_t (&nonce)[wire::kNonceBytes]) {
  wire::HelloPayload hello{};
  hello.client_node = node;
  hello.window = 16;
  lego::fit::auth::make_nonce(nonce);
  memcpy(hello.client_nonce, nonce, sizeof(nonce));
  return hello;
}

// --- connections -------------------------------------------------------------------------

struct Seen {
  uint8_t kind;
  int32_t status;
  std::vector<std::byte> payload;  // its first 256 bytes (a challenge, an error's message)
};

struct Conn {
  int fd = -1;
  int index = 0;          // its place in the attack's batch
  int64_t opened_ms = 0;  // connect() called
  int64_t ready_ms = -1;  // connected
  int64_t sent_ms = -1;   // the frame the daemon must answer went out
  int64_t closed_ms = -1;
  bool reset = false;          // closed by a reset rather than EOF
  bool seen_at_drain = false;  // flood: the close was found only by reading at the end
  int connect_error = 0;       // ETIMEDOUT: no answer within --connect-ms
  bool done = false;
  bool gave_up = false;  // still open when we stopped waiting
  std::vector<std::byte> in;
  std::vector<Seen> frames;
  bool garbage = false;  // bytes that are not FIT frames
  int stage = 0;         // handshake progress (wrong-proof, auth-flood)
  uint8_t client_nonce[wire::kNonceBytes] = {};
  size_t out_off = 0;  // flood: position in the batch
  bool writing = false;

  ~Conn() {
    if (fd >= 0) close(fd);
  }
  bool closed() const { return closed_ms >= 0; }
};

class Poller {
 public:
  Poller() : fd_(epoll_create1(EPOLL_CLOEXEC)) {
    if (fd_ < 0) die(kExitSetup, "epoll_create1: %s", strerror(errno));
  }
  ~Poller() { close(fd_); }
  void add(Conn* c, uint32_t events) { ctl(EPOLL_CTL_ADD, c, events); }
  void mod(Conn* c, uint32_t events) { ctl(EPOLL_CTL_MOD, c, events); }
  void del(Conn* c) { epoll_ctl(fd_, EPOLL_CTL_DEL, c->fd, nullptr); }
  // Events of up to 256 connections, waiting up to ms.
  std::span<epoll_event> wait(int ms) {
    int n = epoll_wait(fd_, events_, 256, ms);
    return {events_, static_cast<size_t>(std::max(n, 0))};
  }

 private:
  void ctl(int op, Conn* c, uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.ptr = c;
    if (epoll_ctl(fd_, op, c->fd, &ev) != 0) die(kExitSetup, "epoll_ctl: %s", strerror(errno));
  }
  int fd_;
  epoll_event events_[256];
};

sockaddr_in resolve(const Options& o) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* ai = nullptr;
  int r = getaddrinfo(o.address.c_str(), std::to_string(o.port).c_str(), &hints, &ai);
  if (r != 0) die(kExitUsage, "cannot resolve %s: %s", o.address.c_str(), gai_strerror(r));
  sockaddr_in to{};
  memcpy(&to, ai->ai_addr, sizeof(to));
  freeaddrinfo(ai);
  return to;
}

// Starts a non-blocking connect. `rcvbuf` > 0 shrinks the receive buffer first (before
// the window is advertised), so a peer that never reads stops the sender's stream at once.
std::unique_ptr<Conn> start_connect(const sockaddr_in& to, int rcvbuf) {
  auto c = std::make_unique<Conn>();
  c->opened_ms = now_ms();
  c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) die(kExitSetup, "socket: %s", strerror(errno));
  if (rcvbuf > 0) setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (connect(c->fd, reinterpret_cast<const sockaddr*>(&to), sizeof(to)) != 0 &&
      errno != EINPROGRESS) {
    c->connect_error = errno;
    c->done = true;
  }
  return c;
}

// After EPOLLOUT on a connecting socket: true when connected.
bool finish_connect(Conn& c) {
  int err = 0;
  socklen_t len = sizeof(err);
  getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) {
    c.connect_error = err;
    c.done = true;
    return false;
  }
  c.ready_ms = now_ms();
  return true;
}

void mark_closed(Conn& c, bool reset) {
  if (c.closed()) return;
  c.closed_ms = now_ms();
  c.reset = reset;
  c.done = true;
}

// Sends all of `data` (a few hundred bytes at most, into an empty socket buffer).
void send_small(Conn& c, std::span<const std::byte> data) {
  ssize_t n = send(c.fd, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (n < 0 && (errno == EPIPE || errno == ECONNRESET)) mark_closed(c, errno == ECONNRESET);
}

// Splits received bytes into frames (kept, with an error frame's text).
void parse_frames(Conn& c) {
  size_t off = 0;
  while (!c.garbage && c.in.size() - off >= sizeof(FrameHeader)) {
    FrameHeader h;
    memcpy(&h, c.in.data() + off, sizeof(h));
    if (h.magic != wire::kMagic || h.length > (1u << 24)) {
      c.garbage = true;
      break;
    }
    if (c.in.size() - off < sizeof(h) + h.length) break;
    const std::byte* p = c.in.data() + off + sizeof(h);
    c.frames.push_back({h.kind, h.status, {p, p + std::min<uint32_t>(h.length, 256)}});
    off += sizeof(h) + h.length;
  }
  c.in.erase(c.in.begin(), c.in.begin() + static_cast<long>(off));
}

// Reads what arrived; marks the connection closed on EOF or reset. `keep`: parse frames
// (false: discard, as a flood's drain does).
void read_some(Conn& c, bool keep) {
  std::byte buf[16384];
  for (;;) {
    ssize_t n = recv(c.fd, buf, sizeof(buf), MSG_DONTWAIT);
    if (n > 0) {
      if (keep && c.in.size() < (1u << 20)) c.in.insert(c.in.end(), buf, buf + n);
      continue;
    }
    if (n == 0) {
      mark_closed(c, false);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      mark_closed(c, true);
    }
    break;
  }
  if (keep) parse_frames(c);
}

std::string describe_frames(const Conn& c) {
  if (c.frames.empty() && !c.garbage) return "nothing";
  std::string s;
  for (const Seen& f : c.frames) {
    if (!s.empty()) s += ", ";
    s += f.kind == k(Kind::kError) ? std::string("error ") + errno_name(f.status)
                                   : std::string(wire::kind_name(f.kind));
  }
  if (c.garbage) s += s.empty() ? "bytes that are not FIT frames" : ", then non-FIT bytes";
  return s;
}

std::string describe_close(const Conn& c, int64_t since) {
  char buf[96];
  if (c.closed()) {
    snprintf(buf, sizeof(buf), "%s after %" PRId64 " ms%s", c.reset ? "reset" : "closed",
             c.closed_ms - since, c.seen_at_drain ? " (seen only when read at the end)" : "");
  } else {
    snprintf(buf, sizeof(buf), "still open after %" PRId64 " ms", now_ms() - since);
  }
  return buf;
}

// Raises RLIMIT_NOFILE to hold `want` descriptors (root may raise the hard limit too).
void raise_nofile(rlim_t want) {
  rlimit r{};
  if (getrlimit(RLIMIT_NOFILE, &r) != 0) return;
  if (r.rlim_max < want) r.rlim_max = want;
  r.rlim_cur = r.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &r) != 0) {
    getrlimit(RLIMIT_NOFILE, &r);
    r.rlim_cur = r.rlim_max;
    setrlimit(RLIMIT_NOFILE, &r);
  }
  getrlimit(RLIMIT_NOFILE, &r);
  if (r.rlim_cur < want) {
    die(kExitSetup, "RLIMIT_NOFILE is %llu, %llu descriptors are needed",
        static_cast<unsigned long long>(r.rlim_cur), static_cast<unsigned long long>(want));
  }
}

// Per-outcome counts, printed in order of first appearance.
struct Tally {
  std::vector<std::string> order;
  std::map<std::string, int> counts;
  void add(const std::string& what) {
    if (counts[what]++ == 0) order.push_back(what);
  }
  void print(const char* indent) const {
    for (const auto& w : order) printf("%s%6d x %s\n", indent, counts.at(w), w.c_str());
  }
};

// --- single-frame attacks ----------------------------------------------------------------

// What the daemon must send back before closing: a required error frame, an optional one,
// or an optional error frame of any status (half).
struct Expect {
  int error = 0;
  bool required = false;
  bool any_status = false;
  bool challenge_first = false;  // wrong-proof: the challenge precedes the error
};

Expect expectation(Attack a) {
  switch (a) {
    case Attack::kBadMagic:
    case Attack::kBadKind:
      return {EPROTO, false, false, false};
    case Attack::kBadVersion:
      return {EPROTONOSUPPORT, true, false, false};
    case Attack::kWrongProof:
      return {EACCES, true, false, true};
    case Attack::kEarlyRequest:
      return {EACCES, true, false, false};
    case Attack::kIdle:
    case Attack::kHalf:
      return {0, false, true, false};
    case Attack::kFlood:
    case Attack::kAuthFlood:
      break;
  }
  return {};
}

// The frames that fit the expectation? Sets `why` when not.
bool frames_ok(const Conn& c, const Expect& e, std::string* why) {
  if (c.garbage) {
    *why = "bytes that are not FIT frames";
    return false;
  }
  // A daemon over its cap on connections awaiting the handshake closes the oldest with
  // EAGAIN, whatever that one sent: an answer that defends the daemon too.
  auto evicted = [](const Seen& f) { return f.kind == k(Kind::kError) && f.status == EAGAIN; };
  if (c.frames.size() == 1 && evicted(c.frames[0])) return true;
  size_t first = 0;
  if (e.challenge_first) {
    if (c.frames.empty() || c.frames[0].kind != k(Kind::kChallenge)) {
      *why = "no challenge to the hello";
      return false;
    }
    first = 1;
  }
  size_t answers = c.frames.size() - first;
  if (answers == 0) {
    if (e.required) *why = std::string("no ") + errno_name(e.error) + " error frame";
    return !e.required;
  }
  const Seen& f = c.frames[first];
  if (answers > 1 || f.kind != k(Kind::kError) ||
      (!e.any_status && f.status != e.error && !evicted(f))) {
    *why = std::string("expected ") +
           (e.any_status ? "at most an error frame" : "an error frame ") +
           (e.any_status ? "" : errno_name(e.error));
    return false;
  }
  return true;
}

// The bytes a single-frame attack sends on connecting.
std::vector<std::byte> opening_bytes(const Options& o, Conn& c, int index) {
  switch (o.attack->attack) {
    case Attack::kBadMagic:
      return frame(k(Kind::kHello), 0, 0, {}, 1, o.node_id, 0x4b434148 /* "HACK" */);
    case Attack::kBadVersion:
      return frame(k(Kind::kHello), 0, 0, {}, 1, o.node_id, wire::kMagic, wire::kVersion + 1);
    case Attack::kBadKind:
      return frame(99, 0, 0, {}, 1, o.node_id);
    case Attack::kEarlyRequest:
      return frame(k(Kind::kRequest), o.opcode, 0, {}, 1, o.node_id);
    case Attack::kWrongProof: {
      wire::HelloPayload hello = hello_payload(o.node_id, c.client_nonce);
      return frame(k(Kind::kHello), 0, sizeof(hello), bytes_of(hello), 1, o.node_id);
    }
    case Attack::kHalf: {
      // Even connections: half a header. Odd ones: a header promising --promise bytes and
      // the first 16 of them.
      std::vector<std::byte> f = frame(k(Kind::kHello), 0, o.promise, {}, 1, o.node_id);
      if (index % 2 == 0) {
        f.resize(sizeof(FrameHeader) / 2);
      } else {
        f.resize(sizeof(FrameHeader) + std::min<uint32_t>(16, o.promise), std::byte{0x5a});
      }
      return f;
    }
    case Attack::kIdle:
    case Attack::kFlood:
    case Attack::kAuthFlood:
      break;
  }
  return {};
}

// wrong-proof: after the challenge, a proof made with a key that is not the cluster's.
void maybe_send_wrong_proof(const Options& o, Conn& c) {
  if (o.attack->attack != Attack::kWrongProof || c.stage != 0 || c.frames.empty()) return;
  c.stage = 1;
  const Seen& first = c.frames[0];
  if (first.kind != k(Kind::kChallenge) || first.payload.size() != sizeof(wire::ChallengePayload)) {
    return;  // judged by frames_ok
  }
  // The proof is right in every way but the key: the nonces and node ids are the ones
  // this handshake agreed on.
  wire::ChallengePayload ch;
  memcpy(&ch, first.payload.data(), sizeof(ch));
  std::vector<uint8_t> wrong_key(32);
  for (size_t i = 0; i < wrong_key.size(); i += 8) {
    uint64_t r = lego::fit::auth::random_u64();
    memcpy(wrong_key.data() + i, &r, 8);
  }
  wire::ProofPayload proof{};
  lego::fit::auth::prove(wrong_key, lego::fit::auth::Direction::kClientToServer, c.client_nonce,
                         ch.server_nonce, o.node_id, ch.server_node, proof.client_proof);
  send_small(c, frame(k(Kind::kProof), 0, sizeof(proof), bytes_of(proof), 2, o.node_id));
  c.sent_ms = now_ms();
}

struct Verdict {
  int connections = 0;
  int ok = 0;
  int bad = 0;
  int connect_failed = 0;
  int closed = 0;
  int still_open = 0;
  int error_frames = 0;
  int64_t max_close_ms = -1;
  std::string first_error;  // the first error frame's message, as an example
  Tally tally;
};

// Opens connections (at most 256 connecting at once), sends each its opening bytes and
// waits until the daemon closes each or --close-ms passes; adds the outcomes to `v`.
void run_batch(const Options& o, const sockaddr_in& to, int count, Verdict& v) {
  const Attack a = o.attack->attack;
  const Expect e = expectation(a);
  Poller poller;
  std::vector<std::unique_ptr<Conn>> conns;
  int started = 0, connecting = 0, pending = 0;
  for (;;) {
    while (started < count && connecting < 256) {
      conns.push_back(start_connect(to, 0));
      Conn* c = conns.back().get();
      c->index = started++;
      if (c->done) continue;
      poller.add(c, EPOLLOUT | EPOLLIN | EPOLLRDHUP);
      connecting++;
      pending++;
    }
    if (pending == 0 && started == count) break;
    for (const epoll_event& ev : poller.wait(20)) {
      auto* c = static_cast<Conn*>(ev.data.ptr);
      if (c->done) continue;
      if (c->ready_ms < 0) {
        connecting--;
        if (!finish_connect(*c)) {
          poller.del(c);
          pending--;
          continue;
        }
        std::vector<std::byte> first = opening_bytes(o, *c, c->index);
        if (!first.empty()) send_small(*c, first);
        if (a != Attack::kWrongProof) c->sent_ms = c->ready_ms;
        if (!c->done) poller.mod(c, EPOLLIN | EPOLLRDHUP);
        if (c->done) {
          poller.del(c);
          pending--;
        }
        continue;
      }
      read_some(*c, true);
      maybe_send_wrong_proof(o, *c);
      if (c->done) {
        poller.del(c);
        pending--;
      }
    }
    const int64_t now = now_ms();
    for (auto& cp : conns) {
      Conn& c = *cp;
      if (c.done) continue;
      if (c.ready_ms < 0 && now - c.opened_ms > o.connect_ms) {
        c.connect_error = ETIMEDOUT;
      } else if (c.ready_ms >= 0 && now - (c.sent_ms >= 0 ? c.sent_ms : c.ready_ms) > o.close_ms) {
        c.gave_up = true;
      } else {
        continue;
      }
      if (c.ready_ms < 0) connecting--;
      c.done = true;
      poller.del(&c);
      pending--;
    }
  }

  for (auto& cp : conns) {
    Conn& c = *cp;
    v.connections++;
    std::string what, why;
    bool ok = false;
    if (c.connect_error != 0) {
      v.connect_failed++;
      what = std::string("connect failed: ") + errno_name(c.connect_error);
      why = "not accepted";
    } else {
      const int64_t since = c.sent_ms >= 0 ? c.sent_ms : c.ready_ms;
      bool fok = frames_ok(c, e, &why);
      for (const Seen& f : c.frames) {
        if (f.kind != k(Kind::kError)) continue;
        v.error_frames++;
        if (v.first_error.empty()) {
          v.first_error.assign(reinterpret_cast<const char*>(f.payload.data()), f.payload.size());
        }
      }
      if (c.closed()) {
        v.closed++;
        v.max_close_ms = std::max(v.max_close_ms, c.closed_ms - since);
      } else {
        v.still_open++;
      }
      bool cok = c.closed() && c.closed_ms - since <= o.close_ms;
      if (!cok && why.empty()) why = "not closed within --close-ms";
      ok = fok && cok;
      what =
          describe_frames(c) + ", then " + (c.closed() ? (c.reset ? "reset" : "closed") : "open");
      if (o.verbose) {
        printf("  connection %d: %s, %s%s%s\n", v.connections, describe_frames(c).c_str(),
               describe_close(c, since).c_str(), ok ? "" : ": ", ok ? "" : why.c_str());
      }
    }
    if (ok) {
      v.ok++;
    } else {
      v.bad++;
      what += " [" + why + "]";
    }
    v.tally.add(what);
  }
}

int run_single(const Options& o) {
  const sockaddr_in to = resolve(o);
  const int64_t start = now_ms();
  Verdict v;
  int rounds = 0;
  do {
    run_batch(o, to, o.connections, v);
    rounds++;
  } while (o.attack->attack != Attack::kIdle && o.attack->attack != Attack::kHalf &&
           now_ms() - start < static_cast<int64_t>(o.seconds * 1000));
  printf("hostile_client: %s: %d connections in %d round(s) over %.1f s:\n", o.attack->name,
         v.connections, rounds, static_cast<double>(now_ms() - start) / 1000);
  v.tally.print("  ");
  if (!v.first_error.empty()) printf("  an error frame said: %s\n", v.first_error.c_str());
  const bool setup_failed = v.connect_failed == v.connections;
  const bool ok = v.bad == 0 && !setup_failed;
  printf(
      "result attack=%s connections=%d ok=%d bad=%d connect_failed=%d closed=%d open=%d "
      "error_frames=%d max_close_ms=%" PRId64 " close_limit_ms=%d verdict=%s\n",
      o.attack->name, v.connections, v.ok, v.bad, v.connect_failed, v.closed, v.still_open,
      v.error_frames, v.max_close_ms, o.close_ms, ok ? "ok" : "fail");
  if (setup_failed) {
    fprintf(stderr, "hostile_client: no connection to %s:%d was accepted\n", o.address.c_str(),
            o.port);
    return kExitSetup;
  }
  return ok ? kExitOk : kExitFail;
}

// --- floods ------------------------------------------------------------------------------

// 2048 frames (64 KiB) of one kind, sent again and again: flood's even connections send
// frames of kind reply (each answered with an error frame by a daemon that does not close
// the connection), its odd ones requests before the handshake; auth-flood's are requests
// of --opcode, after the handshake.
std::vector<std::byte> flood_batch(const Options& o, Kind kind) {
  std::vector<std::byte> batch;
  for (uint64_t i = 0; i < 2048; i++) {
    const uint16_t opcode = kind == Kind::kRequest ? o.opcode : 0;
    std::vector<std::byte> f = frame(k(kind), opcode, 0, {}, i + 1, o.node_id);
    batch.insert(batch.end(), f.begin(), f.end());
  }
  return batch;
}

// Writes as much of the batch (cyclically) as the socket takes.
void write_flood(Conn& c, const std::vector<std::byte>& batch) {
  for (int rounds = 0; rounds < 64; rounds++) {
    ssize_t n =
        send(c.fd, batch.data() + c.out_off, batch.size() - c.out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      c.out_off = (c.out_off + static_cast<size_t>(n)) % batch.size();
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    mark_closed(c, n < 0 && errno == ECONNRESET);
    return;
  }
}

int run_flood(const Options& o) {
  const bool auth = o.attack->attack == Attack::kAuthFlood;
  std::vector<uint8_t> key;
  if (auth) {
    if (o.key_file.empty()) die(kExitUsage, "auth-flood needs --key-file");
    key = read_key(o.key_file);
  }
  const sockaddr_in to = resolve(o);
  const std::vector<std::byte> replies = flood_batch(o, Kind::kReply);
  const std::vector<std::byte> requests = flood_batch(o, Kind::kRequest);
  const int64_t start = now_ms();
  const int64_t stop = start + static_cast<int64_t>(o.seconds * 1000);
  Poller poller;
  std::vector<std::unique_ptr<Conn>> history;  // every connection, for the verdict
  std::vector<Conn*> slot(static_cast<size_t>(o.connections), nullptr);
  std::vector<int64_t> reopen_at(slot.size(), 0);
  constexpr int kTinyRcvbuf = 1;  // the kernel rounds it up to its minimum (~2 KiB)
  const uint32_t kFloodEvents = EPOLLOUT | EPOLLRDHUP;

  auto retire = [&](size_t s) {
    Conn* c = slot[s];
    poller.del(c);
    close(c->fd);
    c->fd = -1;
    slot[s] = nullptr;
    reopen_at[s] = now_ms() + o.reconnect_ms;
  };
  while (now_ms() < stop) {
    for (size_t s = 0; s < slot.size(); s++) {
      if (slot[s] != nullptr || now_ms() < reopen_at[s]) continue;
      history.push_back(start_connect(to, kTinyRcvbuf));
      Conn* c = history.back().get();
      if (c->done) {
        reopen_at[s] = now_ms() + 100;
        continue;
      }
      slot[s] = c;
      poller.add(c, EPOLLOUT | EPOLLIN | EPOLLRDHUP);
    }
    for (const epoll_event& ev : poller.wait(10)) {
      auto* c = static_cast<Conn*>(ev.data.ptr);
      size_t s = std::find(slot.begin(), slot.end(), c) - slot.begin();
      if (c->ready_ms < 0) {
        if (!finish_connect(*c)) {
          retire(s);
          continue;
        }
        if (auth) {
          wire::HelloPayload hello = hello_payload(o.node_id, c->client_nonce);
          send_small(*c, frame(k(Kind::kHello), 0, sizeof(hello), bytes_of(hello), 1, o.node_id));
          poller.mod(c, EPOLLIN | EPOLLRDHUP);
        } else {
          c->writing = true;
          poller.mod(c, kFloodEvents);  // never EPOLLIN: what the daemon sends stays unread
        }
      } else if (auth && !c->writing) {
        // The handshake: read the challenge, prove the key, read the welcome; then never
        // read again.
        std::byte buf[512];
        ssize_t n = recv(c->fd, buf, sizeof(buf), MSG_DONTWAIT);
        if (n <= 0) {
          if (n == 0 || (errno != EAGAIN && errno != EINTR)) mark_closed(*c, n != 0);
        } else {
          c->in.insert(c->in.end(), buf, buf + n);
        }
        while (!c->done && c->in.size() >= sizeof(FrameHeader)) {
          FrameHeader h;
          memcpy(&h, c->in.data(), sizeof(h));
          if (c->in.size() < sizeof(h) + h.length) break;
          std::vector<std::byte> payload(c->in.begin() + sizeof(h),
                                         c->in.begin() + static_cast<long>(sizeof(h) + h.length));
          c->in.erase(c->in.begin(), c->in.begin() + static_cast<long>(sizeof(h) + h.length));
          if (h.kind == k(Kind::kChallenge) && payload.size() == sizeof(wire::ChallengePayload)) {
            wire::ChallengePayload ch;
            memcpy(&ch, payload.data(), sizeof(ch));
            wire::ProofPayload proof{};
            lego::fit::auth::prove(key, lego::fit::auth::Direction::kClientToServer,
                                   c->client_nonce, ch.server_nonce, o.node_id, ch.server_node,
                                   proof.client_proof);
            send_small(*c, frame(k(Kind::kProof), 0, sizeof(proof), bytes_of(proof), 2, o.node_id));
          } else if (h.kind == k(Kind::kWelcome)) {
            c->writing = true;
            c->ready_ms = now_ms();  // the flood starts now
            poller.mod(c, kFloodEvents);
          } else if (h.kind == k(Kind::kError) && h.status != EACCES) {
            mark_closed(*c, false);  // e.g. EAGAIN: over a cap on handshakes; try again
          } else {
            // The key is wrong, or this is not a FIT daemon: nothing to attack with.
            die(kExitSetup, "%s:%d answered the handshake with %s %s: %.*s", o.address.c_str(),
                o.port, wire::kind_name(h.kind),
                h.kind == k(Kind::kError) ? errno_name(h.status) : "",
                static_cast<int>(payload.size()), reinterpret_cast<const char*>(payload.data()));
          }
        }
      }
      if (ev.events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (c->writing || (ev.events & (EPOLLHUP | EPOLLERR))) mark_closed(*c, err != 0);
      }
      if (c->writing && !c->done) write_flood(*c, auth || s % 2 == 1 ? requests : replies);
      if (c->done) retire(s);
    }
    const int64_t now = now_ms();
    for (size_t s = 0; s < slot.size(); s++) {
      Conn* c = slot[s];
      if (c != nullptr && c->ready_ms < 0 && now - c->opened_ms > o.connect_ms) {
        c->connect_error = ETIMEDOUT;
        c->done = true;
        retire(s);
      }
    }
  }

  // The end: stop writing. A connection the daemon closed while our sends were stuck
  // behind a full window may not have shown it yet: read what is queued for up to 2 s.
  const int64_t end = now_ms();
  int draining = 0;
  for (Conn* c : slot) {
    if (c == nullptr || c->ready_ms < 0) continue;
    poller.mod(c, EPOLLIN | EPOLLRDHUP);
    draining++;
  }
  while (draining > 0 && now_ms() - end < 2000) {
    for (const epoll_event& ev : poller.wait(20)) {
      auto* c = static_cast<Conn*>(ev.data.ptr);
      if (c->done) continue;
      read_some(*c, false);
      if (c->done) {
        c->seen_at_drain = true;
        poller.del(c);
        draining--;
      }
    }
  }

  int connected = 0, cut_off = 0, late = 0, open_young = 0, open_old = 0, failed = 0, at_drain = 0;
  int64_t max_cutoff = -1;
  Tally tally;
  for (auto& cp : history) {
    Conn& c = *cp;
    if (c.connect_error != 0 || c.ready_ms < 0) {
      failed++;
      tally.add(std::string("connect failed: ") +
                errno_name(c.connect_error ? c.connect_error : ETIMEDOUT));
      continue;
    }
    connected++;
    if (c.closed()) {
      const int64_t t = c.closed_ms - c.ready_ms;
      cut_off++;
      at_drain += c.seen_at_drain;
      max_cutoff = std::max(max_cutoff, t);
      const bool in_time = t <= o.cutoff_ms;
      late += !in_time;
      tally.add(std::string(c.reset ? "reset" : "closed") +
                (c.seen_at_drain ? " (seen when read at the end)" : "") +
                (in_time ? " within --cutoff-ms" : " LATE"));
      if (o.verbose) printf("  connection: %s\n", describe_close(c, c.ready_ms).c_str());
    } else if (end - c.ready_ms <= o.cutoff_ms) {
      open_young++;
      tally.add("open at the end, younger than --cutoff-ms");
    } else {
      open_old++;
      tally.add("open at the end, older than --cutoff-ms: NOT CUT OFF");
      if (o.verbose) printf("  connection: %s\n", describe_close(c, c.ready_ms).c_str());
    }
  }
  printf("hostile_client: %s: %d connections over %.1f s (%d at once):\n", o.attack->name,
         static_cast<int>(history.size()), static_cast<double>(end - start) / 1000, o.connections);
  tally.print("  ");
  const bool setup_failed = connected == 0;
  const int bad = failed + late + open_old;
  const bool ok = !setup_failed && bad == 0;
  printf(
      "result attack=%s connections=%d ok=%d bad=%d connect_failed=%d cut_off=%d late=%d "
      "seen_at_drain=%d open_young=%d open_old=%d max_cutoff_ms=%" PRId64
      " cutoff_limit_ms=%d verdict=%s\n",
      o.attack->name, static_cast<int>(history.size()), static_cast<int>(history.size()) - bad, bad,
      failed, cut_off, late, at_drain, open_young, open_old, max_cutoff, o.cutoff_ms,
      ok ? "ok" : "fail");
  if (setup_failed) {
    fprintf(stderr, "hostile_client: no connection to %s:%d was accepted\n", o.address.c_str(),
            o.port);
    return kExitSetup;
  }
  return ok ? kExitOk : kExitFail;
}

Options parse(int argc, char** argv) {
  Options o;
  auto ms = [](const char* flag, const char* a, long min) {
    return static_cast<int>(lego::flags::number(flag, a, min, 3600000));
  };
  const std::vector<lego::flags::Flag> table = {
      {"attack", true,
       [&](const char* a) {
         for (const AttackInfo& info : kAttacks) {
           if (strcmp(a, info.name) == 0) o.attack = &info;
         }
         if (o.attack == nullptr) {
           lego::flags::usage_error(std::string("--attack: '") + a +
                                    "' is not an attack (see --help)");
         }
       }},
      {"address", true, [&](const char* a) { o.address = a; }},
      {"port", true,
       [&](const char* a) {
         o.port = static_cast<int>(lego::flags::number("--port", a, 1, 65535));
       }},
      {"connections", true,
       [&](const char* a) {
         o.connections = static_cast<int>(lego::flags::number("--connections", a, 1, 1000000));
       }},
      {"seconds", true,
       [&](const char* a) {
         char* end = nullptr;
         o.seconds = strtod(a, &end);
         if (end == a || *end != '\0' || o.seconds < 0 || o.seconds > 86400) {
           lego::flags::usage_error(std::string("--seconds: '") + a +
                                    "' is not a duration in seconds");
         }
       }},
      {"close-ms", true, [&](const char* a) { o.close_ms = ms("--close-ms", a, 1); }},
      {"cutoff-ms", true, [&](const char* a) { o.cutoff_ms = ms("--cutoff-ms", a, 1); }},
      {"connect-ms", true, [&](const char* a) { o.connect_ms = ms("--connect-ms", a, 1); }},
      {"reconnect-ms", true, [&](const char* a) { o.reconnect_ms = ms("--reconnect-ms", a, 0); }},
      {"opcode", true,
       [&](const char* a) {
         if (strcmp(a, "memory-status") == 0) {
           o.opcode = lego::mem::kStatus;
         } else if (strcmp(a, "storage-status") == 0) {
           o.opcode = lego::stor::kStatus;
         } else {
           o.opcode = static_cast<uint16_t>(lego::flags::number("--opcode", a, 0, 65535));
         }
       }},
      {"node-id", true,
       [&](const char* a) {
         o.node_id = static_cast<uint32_t>(lego::flags::number("--node-id", a, 0, 65535));
       }},
      {"promise", true,
       [&](const char* a) {
         o.promise = static_cast<uint32_t>(lego::flags::number("--promise", a, 1, UINT32_MAX));
       }},
      {"key-file", true, [&](const char* a) { o.key_file = a; }},
      {"verbose", false, [&](const char*) { o.verbose = true; }},
  };
  const int first =
      lego::flags::parse(argc, argv, {"hostile_client", kUsage, kExitUsage, false}, table);
  if (first < argc) die(kExitUsage, "unexpected argument '%s' (see --help)", argv[first]);
  if (o.attack == nullptr) die(kExitUsage, "--attack is required (see --help)");
  if (o.port == 0) die(kExitUsage, "--port is required (see --help)");
  if (o.connections == 0) o.connections = o.attack->connections;
  if (o.close_ms == 0) o.close_ms = o.attack->close_ms;
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  signal(SIGPIPE, SIG_IGN);
  setvbuf(stdout, nullptr, _IOLBF, 0);
  raise_nofile(static_cast<rlim_t>(o.connections) + 64);
  switch (o.attack->attack) {
    case Attack::kFlood:
    case Attack::kAuthFlood:
      return run_flood(o);
    default:
      return run_single(o);
  }
}
