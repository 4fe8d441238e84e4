// The connection handshake, both ends (fit_wire.h): before a connection carries any
// request, each side proves it holds the cluster key with an HMAC challenge over fresh
// nonces and both node ids (auth.h).
//   client -> server  hello      (client node id, nonce; rdm: endpoint name and pid)
//   server -> client  challenge  (server nonce, the server's proof)
//   client -> server  proof      (the client's proof)
//   server -> client  welcome    (or kError(EACCES), then close)
// The client side runs on the calling thread (connect, connect_once); the server side is
// called by ServerHost::serve for the hello and proof frames it admitted.
#include <unistd.h>

#include <cstring>
#include <thread>

#include "libfit/auth.h"
#include "libfit/node_impl.h"

namespace lego::fit {

using wire::Kind;

// A server over its cap on connections awaiting the handshake closes the oldest with
// EAGAIN (fit_wire.h), which may be ours when another process of this host holds many
// (it shares our address): such a handshake is tried again, after a short pause, for up
// to the timeout. So is one the server reset mid-handshake (it may have just restarted).
Status Node::Impl::connect(ClientChannel& ch) {
  const auto deadline = Clock::now() + config.timeout;
  for (int attempt = 1;; attempt++) {
    Status st = connect_once(ch);
    const bool again = st.code() == EAGAIN || st.code() == ECONNRESET;
    if (st || !again || Clock::now() + std::chrono::milliseconds(10 * attempt) > deadline) {
      return st;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10 * std::min(attempt, 10)));
  }
}

Status Node::Impl::connect_once(ClientChannel& ch) {
  const NodeConfig* peer = find_peer(ch.peer);
  // Start from nothing: a broken channel's old connection (endpoint, buffers) goes away.
  ch.conn.reset();
  ch.broken = Status();
  ch.connected = false;
  ch.have_control = false;
  for (auto& s : ch.slots) s = ClientChannel::Slot();

  std::string where = who() + ": connecting to node " + std::to_string(peer->id) + " at " +
                      peer->address + ":" + std::to_string(peer->port) + " (" +
                      provider_name(peer->provider) + ")";
  ch.conn = transport->new_connection();
  Status st = ch.conn->open(*peer, &ch);
  if (!st) return st.with_context(where);

  // Handshake: hello -> challenge (server proves the key) -> proof -> welcome.
  auto deadline = Clock::now() + config.timeout;
  wire::HelloPayload hello{};
  hello.client_node = self.id;
  hello.window = kWindow;
  auth::make_nonce(hello.client_nonce);
  st = ch.conn->fill_hello(hello);
  if (!st) return st.with_context(where);
  auto bytes = [](const auto& v) {
    return std::span<const std::byte>(reinterpret_cast<const std::byte*>(&v), sizeof(v));
  };
  st = post_frame(ch, 0, Kind::kHello, 0, bytes(hello), 0);
  if (st) st = wait_control(ch, Kind::kChallenge, deadline);
  if (!st) return st.with_context(where);
  wire::ChallengePayload challenge{};
  if (ch.control_payload.size() != sizeof(challenge)) {
    return Status(EPROTO, where + ": malformed challenge");
  }
  memcpy(&challenge, ch.control_payload.data(), sizeof(challenge));
  if (challenge.server_node != peer->id ||
      !auth::verify(config.key, auth::Direction::kServerToClient, hello.client_nonce,
                    challenge.server_nonce, self.id, peer->id, challenge.server_proof)) {
    counters.auth_failures.fetch_add(1, std::memory_order_relaxed);
    return Status(EACCES, where + ": the peer could not prove it holds the cluster key");
  }
  ch.conn->on_challenge(challenge);
  wire::ProofPayload proof{};
  auth::prove(config.key, auth::Direction::kClientToServer, hello.client_nonce,
              challenge.server_nonce, self.id, peer->id, proof.client_proof);
  // Slot 0's hello send may still be pending; use slot 1 for the proof.
  st = post_frame(ch, 1, Kind::kProof, 0, bytes(proof), 0);
  if (st) st = wait_control(ch, Kind::kWelcome, deadline);
  if (!st) {
    if (st.code() == EACCES) counters.auth_failures.fetch_add(1, std::memory_order_relaxed);
    return st.with_context(where);
  }
  ch.connected = true;
  return Status();
}

Status Node::Impl::wait_control(ClientChannel& ch, Kind want, Clock::time_point deadline) {
  while (!ch.have_control) {
    if (Clock::now() > deadline) {
      return Status(ETIMEDOUT, who() + ": node " + std::to_string(ch.peer) +
                                   " did not answer the connection handshake");
    }
    LEGO_RETURN_IF_ERROR(progress(ch, transport::kBlockingSliceMs));
  }
  ch.have_control = false;
  auto kind = static_cast<Kind>(ch.control_header.kind);
  if (kind == Kind::kError) {
    std::string msg(reinterpret_cast<const char*>(ch.control_payload.data()),
                    ch.control_payload.size());
    int code = ch.control_header.status > 0 ? ch.control_header.status : EPROTO;
    return Status(code, "node " + std::to_string(ch.peer) + ": " + msg);
  }
  if (kind != want) {
    return Status(EPROTO, who() + ": node " + std::to_string(ch.peer) + " sent a " +
                              wire::kind_name(ch.control_header.kind) + " frame during set-up");
  }
  return Status();
}

// ---------------------------------------------------------------------------------------
// Server side

namespace transport {

void ServerHost::answer_hello(Transport& port, Delivery& d, const wire::FrameHeader& h,
                              std::span<const std::byte> payload) {
  Node::Impl& n = *node_;
  wire::HelloPayload hello{};
  if (payload.size() != sizeof(hello)) {
    reject(port, d, Status(EPROTO, n.who() + ": bad hello"), 0, h.request_id);
    return;
  }
  memcpy(&hello, payload.data(), sizeof(hello));
  Peer& peer = *d.peer;
  peer.said_hello = true;
  peer.client = hello.client_node;
  peer.pid = static_cast<pid_t>(hello.pid);
  memcpy(peer.client_nonce, hello.client_nonce, wire::kNonceBytes);
  auth::make_nonce(peer.server_nonce);
  peer.challenged = true;
  wire::ChallengePayload ch{};
  ch.server_node = n.self.id;
  ch.pid = static_cast<uint32_t>(getpid());
  memcpy(ch.server_nonce, peer.server_nonce, wire::kNonceBytes);
  auth::prove(n.config.key, auth::Direction::kServerToClient, peer.client_nonce, peer.server_nonce,
              peer.client, n.self.id, ch.server_proof);
  memcpy(d.answer.data(), &ch, sizeof(ch));
  port.send(d, Kind::kChallenge, 0, sizeof(ch), 0, h.request_id);
}

void ServerHost::answer_proof(Transport& port, Delivery& d, const wire::FrameHeader& h,
                              std::span<const std::byte> payload) {
  Node::Impl& n = *node_;
  Peer& peer = *d.peer;
  wire::ProofPayload proof{};
  bool ok = payload.size() == sizeof(proof);
  if (ok) {
    memcpy(&proof, payload.data(), sizeof(proof));
    ok = auth::verify(n.config.key, auth::Direction::kClientToServer, peer.client_nonce,
                      peer.server_nonce, peer.client, n.self.id, proof.client_proof);
  }
  peer.challenged = false;
  if (!ok) {
    n.counters.auth_failures.fetch_add(1, std::memory_order_relaxed);
    log_peer_trouble(n.who() + ": refused node " + std::to_string(peer.client) +
                     ": it does not hold the cluster key");
    reject(port, d, Status(EACCES, n.who() + " refused the connection: wrong cluster key"), 0,
           h.request_id);
    return;
  }
  peer.authenticated = true;
  n.counters.connections_authenticated.fetch_add(1, std::memory_order_relaxed);
  if (peer.pending_counted) {
    peer.pending_counted = false;
    peer.pending_gauge->fetch_sub(1, std::memory_order_relaxed);
  }
  peer.just_authenticated = true;
  port.send(d, Kind::kWelcome, 0, 0, 0, h.request_id);
}

}  // namespace transport
}  // namespace lego::fit
