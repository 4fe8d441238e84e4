// libfit's server core, the same for every provider: the dispatch of requests to
// handlers, the handshake state machine (what a peer may send when: admit), rejections,
// the connection counters, and the pace of the server threads (Node::server_stalled,
// for leases). Providers run the loops (Transport::run) and feed it frames (serve).
//
// What a server does with a peer that breaks the rules is listed in fit_wire.h; the
// rules are enforced here (admit, serve) and by the providers' loops (deadline, caps,
// unread replies), each closing a connection in the way its kind allows
// (Transport::reject).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "libfit/node_impl.h"

namespace lego::fit {

using wire::FrameHeader;
using wire::Kind;

bool ThreadPace::turn(int64_t now) {
  const int64_t gap = now - turned_ns.load(std::memory_order_relaxed);
  if (gap <= kThresholdNs) {
    turned_ns.store(now, std::memory_order_relaxed);
    return false;
  }
  seq.fetch_add(1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  stalled_ns.store(stalled_ns.load(std::memory_order_relaxed) + gap - kThresholdNs,
                   std::memory_order_relaxed);
  turned_ns.store(now, std::memory_order_relaxed);
  seq.fetch_add(1, std::memory_order_release);
  return true;
}

int64_t ThreadPace::stalled(int64_t now) const {
  for (;;) {
    const uint64_t s0 = seq.load(std::memory_order_acquire);
    const int64_t t = turned_ns.load(std::memory_order_relaxed);
    const int64_t st = stalled_ns.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if ((s0 & 1) == 0 && seq.load(std::memory_order_relaxed) == s0) {
      return st + std::max<int64_t>(0, now - t - kThresholdNs);
    }
  }
}

Status Node::Impl::start_server() {
  auto threads = transport->listen(&server);
  if (!threads) {
    transport->close_server();
    return threads.status();
  }
  const int n = std::min(threads.value(), max_threads);
  const int64_t now = static_cast<int64_t>(transport::monotonic_ns());
  for (int i = 0; i < n; i++) paces[i].start(now);
  pace_count.store(n, std::memory_order_release);
  for (int i = 0; i < n; i++) {
    server_threads.emplace_back([this, i] {
      paces[i].start(static_cast<int64_t>(transport::monotonic_ns()));
      transport->run(i);
    });
  }
  return Status();
}

void Node::Impl::stop_server() {
  stopping = true;
  for (auto& t : server_threads) {
    if (t.joinable()) t.join();
  }
  server_threads.clear();
  // The threads' stalls stay counted (server_stalled never decreases); a stopped node
  // has no thread to stall.
  if (pace_count.load() > 0) {
    retired_stall_ns.store(stalled_ns());
    pace_count.store(0);
  }
  transport->close_server();
  {
    std::lock_guard<std::mutex> g(peers_mu);
    peers.clear();
  }
  transport->close_domain();
  started = false;
}

int64_t Node::Impl::stalled_ns() const {
  const int64_t now = static_cast<int64_t>(transport::monotonic_ns());
  int64_t sum = retired_stall_ns.load(std::memory_order_acquire);
  const int n = pace_count.load(std::memory_order_acquire);
  for (int i = 0; i < n; i++) sum += paces[i].stalled(now);
  return sum;
}

namespace transport {
namespace {

// Whether `peer`, in its handshake state, may send a frame of kind `kind` (the rules of
// fit_wire.h). The header itself was checked by wire::check_header.
Status admit(const Peer& peer, uint8_t kind, const std::string& who) {
  const auto k = static_cast<Kind>(kind);
  if (peer.authenticated.load(std::memory_order_relaxed)) {
    if (k == Kind::kRequest) return Status();
    return Status(EPROTO, who + " got an unexpected " + wire::kind_name(kind) + " frame");
  }
  if (k == Kind::kHello) {
    return peer.said_hello ? Status(EPROTO, who + " got a second hello") : Status();
  }
  if (k == Kind::kProof && peer.challenged) return Status();
  return Status(EACCES, who + " serves only peers that proved the cluster key (got a " +
                            wire::kind_name(kind) + " frame before the handshake ended)");
}

}  // namespace

Peer::~Peer() {
  if (open_gauge != nullptr) open_gauge->fetch_sub(1, std::memory_order_relaxed);
  if (pending_counted) pending_gauge->fetch_sub(1, std::memory_order_relaxed);
}

void ServerHost::serve(Transport& port, Delivery& d, const RawFrame& raw) {
  Node::Impl& n = *node_;
  const size_t max_payload = n.config.max_message_bytes;
  auto frame = raw.compact ? wire::decode_compact(raw.data, raw.bytes, max_payload, 0)
                           : wire::decode_frame(raw.bytes, max_payload);
  if (!frame) {
    reject(port, d, frame.status().with_context(n.who()), 0, 0);
    return;
  }
  const FrameHeader& h = frame->header;
  n.counters.bytes_received.fetch_add(h.length, std::memory_order_relaxed);
  auto payload = frame->payload;
  const bool is_hello = h.kind == static_cast<uint8_t>(Kind::kHello);
  if (is_hello) {
    wire::HelloPayload hello{};
    const bool whole = payload.size() == sizeof(hello);
    if (whole) memcpy(&hello, payload.data(), sizeof(hello));
    if (!port.on_hello(d, h, whole ? &hello : nullptr)) return;
  }
  if (d.peer == nullptr) {
    // An rdm sender that never said hello: we cannot even address a reply.
    reject(port, d, Status(EACCES, "no hello"), 0, 0);
    return;
  }
  Peer& peer = *d.peer;
  Status admitted = admit(peer, h.kind, n.who());
  if (!admitted) {
    if (!peer.authenticated) {
      log_peer_trouble(n.who() +
                       ": closed a connection that broke the handshake: " + admitted.message());
    }
    reject(port, d, admitted, h.opcode, h.request_id);
    return;
  }
  if (is_hello) {
    answer_hello(port, d, h, payload);
    return;
  }
  if (h.kind == static_cast<uint8_t>(Kind::kProof)) {
    answer_proof(port, d, h, payload);
    return;
  }

  // A request from an authenticated peer (admit() let nothing else through).
  std::span<std::byte> reply = d.answer.first(std::min(max_payload, d.answer.size()));
  const Handler* handler = port.internal_handler(h.opcode);
  const bool internal = handler != nullptr;
  if (!internal) {
    auto it = n.handlers.find(h.opcode);
    if (it == n.handlers.end()) {
      n.counters.requests_rejected.fetch_add(1, std::memory_order_relaxed);
      send_error(
          port, d, h.opcode, h.request_id,
          Status(EOPNOTSUPP, n.who() + " has no handler for opcode " + std::to_string(h.opcode)));
      return;
    }
    handler = &it->second;
  }
  RpcContext ctx{peer.client, h.opcode};
  Result<size_t> r = (*handler)(ctx, payload, reply);
  if (!internal) n.counters.requests_served.fetch_add(1, std::memory_order_relaxed);
  if (!r) {
    send_error(port, d, h.opcode, h.request_id, r.status());
  } else if (r.value() > reply.size()) {
    send_error(port, d, h.opcode, h.request_id,
               Status(EMSGSIZE, "handler for opcode " + std::to_string(h.opcode) +
                                    " returned more than max_message_bytes"));
  } else {
    port.send(d, Kind::kReply, h.opcode, static_cast<uint32_t>(r.value()), 0, h.request_id);
  }
}

Status ServerHost::check_header(const Peer& peer, const FrameHeader& h) const {
  const bool authed = peer.authenticated.load(std::memory_order_relaxed);
  Status st =
      wire::check_header(h, authed ? node_->config.max_message_bytes : wire::kMaxHandshakePayload);
  if (st) st = admit(peer, h.kind, node_->who());
  if (!st && !authed) {
    log_peer_trouble(node_->who() +
                     ": closed a connection that broke the handshake: " + st.message());
  }
  return st;
}

void ServerHost::reject(Transport& port, Delivery& d, const Status& st, uint16_t opcode,
                        uint64_t id) {
  node_->counters.requests_rejected.fetch_add(1, std::memory_order_relaxed);
  port.reject(d, st, opcode, id);
}

void ServerHost::send_error(Transport& port, Delivery& d, uint16_t opcode, uint64_t id,
                            const Status& st) {
  const size_t n = std::min(st.message().size(), d.answer.size());
  memcpy(d.answer.data(), st.message().data(), n);
  port.send(d, Kind::kError, opcode, static_cast<uint32_t>(n), st.code(), id);
}

int64_t ServerHost::turn(int thread) {
  const int64_t now = static_cast<int64_t>(monotonic_ns());
  if (node_->paces[thread].turn(now)) {
    node_->counters.server_stalls.fetch_add(1, std::memory_order_relaxed);
  }
  return now;
}

bool ServerHost::stopping() const {
  return node_->stopping.load(std::memory_order_relaxed);
}

void ServerHost::count_new_connection(Peer& peer, int64_t now_ns) {
  auto& c = node_->counters;
  c.connections_accepted.fetch_add(1, std::memory_order_relaxed);
  c.connections_open.fetch_add(1, std::memory_order_relaxed);
  c.handshakes_pending.fetch_add(1, std::memory_order_relaxed);
  peer.open_gauge = &c.connections_open;
  peer.pending_gauge = &c.handshakes_pending;
  peer.pending_counted = true;
  peer.accepted_ns = now_ns;
}

void ServerHost::count_close(CloseWhy why) {
  auto& c = node_->counters;
  switch (why) {
    case CloseWhy::kPeer:
      return;
    case CloseWhy::kRejected:
      c.closed_rejected.fetch_add(1, std::memory_order_relaxed);
      return;
    case CloseWhy::kHandshakeTimeout:
      c.closed_handshake_timeout.fetch_add(1, std::memory_order_relaxed);
      return;
    case CloseWhy::kCap:
      c.closed_handshake_cap.fetch_add(1, std::memory_order_relaxed);
      return;
    case CloseWhy::kStalledReader:
      c.closed_stalled_reader.fetch_add(1, std::memory_order_relaxed);
      return;
  }
}

Counters& ServerHost::counters() const {
  return node_->counters;
}

int64_t ServerHost::handshake_deadline_ns() const {
  const int64_t timeout_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(node_->config.timeout).count();
  return std::min(timeout_ns, kHandshakeDeadlineNs);
}

const ClusterConfig& ServerHost::config() const {
  return node_->config;
}

const std::string& ServerHost::who() const {
  return node_->who();
}

bool evict_first(const Peer& a, const Peer& b) {
  if (a.said_hello != b.said_hello) return !a.said_hello;
  return a.accepted_ns < b.accepted_ns;
}

void log_peer_trouble(const std::string& line) {
  static std::mutex mu;
  static int64_t last_ns = 0;
  static uint64_t held_back = 0;
  const int64_t now = static_cast<int64_t>(monotonic_ns());
  std::lock_guard<std::mutex> g(mu);
  if (last_ns != 0 && now - last_ns < 1'000'000'000) {
    held_back++;
    return;
  }
  last_ns = now;
  if (held_back > 0) {
    fprintf(stderr, "lego-fit: %s (and %llu more such lines held back)\n", line.c_str(),
            static_cast<unsigned long long>(held_back));
  } else {
    fprintf(stderr, "lego-fit: %s\n", line.c_str());
  }
  held_back = 0;
}

}  // namespace transport
}  // namespace lego::fit
