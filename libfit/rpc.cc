// libfit's RPC core, client side: channels, request slots, calls, futures and PendingCall,
// and what a channel does with each frame its connection receives (replies are matched to
// calls by request id; a reply nobody waits for is dropped). The same for every provider.
#include <algorithm>
#include <cstring>

#include "libfit/node_impl.h"

namespace lego::fit {

using wire::FrameHeader;
using wire::Kind;

Result<ClientChannel*> Node::Impl::channel_for(NodeId peer, std::unique_lock<std::mutex>& lock) {
  std::vector<std::unique_ptr<ClientChannel>>* chans;
  {
    std::lock_guard<std::mutex> g(peers_mu);
    auto it = peers.find(peer);
    if (it == peers.end()) {
      if (find_peer(peer) == nullptr) {
        return Status(EHOSTUNREACH, who() + ": node " + std::to_string(peer) +
                                        " is not in the cluster file " + config.origin +
                                        " (nor a peer learned since)");
      }
      auto& v = peers[peer];
      for (int i = 0; i < config.channels_per_peer; i++) {
        auto ch = std::make_unique<ClientChannel>();
        ch->node = this;
        ch->peer = peer;
        ch->index = i;
        v.push_back(std::move(ch));
      }
      it = peers.find(peer);
    }
    chans = &it->second;
  }
  // A thread keeps to one channel; if another thread holds it, take any free one, a
  // connected one first: a caller that connected one channel (connect_one) and left the
  // rest for later, or for another thread (Node::connect), has its calls share that one
  // rather than each connecting its own (over shm, ~4 ms each).
  static std::atomic<unsigned> next_hint{0};
  thread_local unsigned hint = next_hint++;
  size_t n = chans->size();
  for (int pass = 0; pass < 2; pass++) {
    for (size_t k = 0; k < n; k++) {
      ClientChannel* ch = (*chans)[(hint + k) % n].get();
      std::unique_lock<std::mutex> l(ch->mu, std::try_to_lock);
      if (l.owns_lock() && (pass == 1 || ch->connected)) {
        lock = std::move(l);
        return ch;
      }
    }
  }
  ClientChannel* ch = (*chans)[hint % n].get();
  lock = std::unique_lock<std::mutex>(ch->mu);
  return ch;
}

void Node::Impl::fail_channel(ClientChannel& ch, Status why) {
  if (ch.broken.is_ok()) ch.broken = why;
  for (auto& s : ch.slots) {
    if (s.in_use && !s.done) {
      s.done = true;
      s.status = why;
    }
  }
}

Status Node::Impl::progress(ClientChannel& ch, int wait_ms) {
  if (!ch.broken.is_ok()) return ch.broken;
  Status st = ch.conn->poll(wait_ms);
  if (!st) fail_channel(ch, st);
  return ch.broken;
}

Status Node::Impl::post_frame(ClientChannel& ch, int slot, Kind kind, uint16_t opcode,
                              std::span<const std::byte> payload, uint64_t id, bool caller_keeps) {
  bool in_flight = false;
  Status st = ch.conn->send(slot, kind, opcode, payload, id, caller_keeps, &in_flight);
  if (!st) {
    fail_channel(ch, st);
    return st;
  }
  ch.slots[slot].send_pending = in_flight;
  counters.bytes_sent.fetch_add(payload.size(), std::memory_order_relaxed);
  return Status();
}

bool ClientChannel::on_frame(const transport::RawFrame& raw) {
  Node::Impl& n = *node;
  const size_t max = n.config.max_message_bytes;
  auto frame = raw.compact ? wire::decode_compact(raw.data, raw.bytes, max, peer)
                           : wire::decode_frame(raw.bytes, max);
  if (!frame) {
    n.fail_channel(
        *this, frame.status().with_context(n.who() + ": reply from node " + std::to_string(peer)));
    return false;
  }
  const FrameHeader& h = frame->header;
  n.counters.bytes_received.fetch_add(h.length, std::memory_order_relaxed);
  auto kind = static_cast<Kind>(h.kind);
  if (!connected) {
    have_control = true;
    control_header = h;
    control_payload.assign(frame->payload.begin(), frame->payload.end());
  } else if (kind == Kind::kReply || kind == Kind::kError) {
    for (auto& s : slots) {
      // Compact frames carry the low 32 bits of the id; 16 calls in flight never wrap.
      if (!s.in_use || s.done ||
          static_cast<uint32_t>(s.id) != static_cast<uint32_t>(h.request_id)) {
        continue;
      }
      if (kind == Kind::kError) {
        std::string msg(reinterpret_cast<const char*>(frame->payload.data()),
                        frame->payload.size());
        int code = h.status > 0 ? h.status : EPROTO;
        s.status = Status(code, "node " + std::to_string(peer) + ": " + msg);
      } else if (frame->payload.size() > s.reply.size()) {
        s.status =
            Status(EMSGSIZE, "reply of " + std::to_string(frame->payload.size()) +
                                 " bytes from node " + std::to_string(peer) + " does not fit the " +
                                 std::to_string(s.reply.size()) + "-byte reply buffer");
      } else {
        if (!frame->payload.empty()) {
          memcpy(s.reply.data(), frame->payload.data(), frame->payload.size());
        }
        s.reply_len = frame->payload.size();
      }
      s.done = true;
      break;
    }
    // No slot: the reply of a call that timed out and was abandoned. Dropped.
  } else if (kind == Kind::kError) {
    // An error outside any call (e.g. our key was refused after welcome): fatal.
    n.fail_channel(*this, Status(h.status > 0 ? h.status : EPROTO,
                                 "node " + std::to_string(peer) + " closed the connection"));
  }
  return broken.is_ok();
}

void ClientChannel::on_sent(int slot) {
  auto& s = slots[slot];
  s.send_pending = false;
  if (s.abandoned) s.in_use = s.abandoned = false;
}

void ClientChannel::fail(const Status& why) {
  node->fail_channel(*this, why);
}

Result<size_t> ClientChannel::call(uint16_t opcode, std::span<const std::byte> request,
                                   std::span<std::byte> reply) {
  // Never reconnects: the connection asking is the channel's, and would be replaced.
  if (!broken.is_ok()) return broken;
  Node::Impl& n = *node;
  auto deadline = Clock::now() + n.config.timeout;
  auto slot = n.start_call(*this, opcode, request, reply, deadline);
  if (!slot) {
    n.counters.calls_failed.fetch_add(1, std::memory_order_relaxed);
    return slot.status();
  }
  return n.finish_call(*this, slot.value(), deadline);
}

Result<int> Node::Impl::start_call(ClientChannel& ch, uint16_t opcode,
                                   std::span<const std::byte> request, std::span<std::byte> reply,
                                   Clock::time_point deadline, bool caller_keeps) {
  if (request.size() > config.max_message_bytes) {
    return Status(EMSGSIZE, who() + ": request of " + std::to_string(request.size()) +
                                " bytes for opcode " + std::to_string(opcode) +
                                " exceeds max_message_bytes " +
                                std::to_string(config.max_message_bytes));
  }
  if (!ch.connected || !ch.broken.is_ok()) {
    // Drain what a previous connection still owns before reusing the channel.
    LEGO_RETURN_IF_ERROR(connect(ch));
  }
  for (;;) {
    for (int i = 0; i < kWindow; i++) {
      auto& s = ch.slots[i];
      if (s.in_use || s.send_pending) continue;
      s = ClientChannel::Slot();
      s.in_use = true;
      s.id = ch.next_id++;
      s.reply = reply;
      s.deadline = deadline;
      s.opcode = opcode;
      Status st = post_frame(ch, i, Kind::kRequest, opcode, request, s.id, caller_keeps);
      if (!st) {
        s.in_use = false;
        return st;
      }
      counters.calls_sent.fetch_add(1, std::memory_order_relaxed);
      return i;
    }
    if (Clock::now() > deadline) {
      return Status(ETIMEDOUT, who() + ": all " + std::to_string(kWindow) +
                                   " request slots to node " + std::to_string(ch.peer) +
                                   " stayed busy");
    }
    LEGO_RETURN_IF_ERROR(progress(ch, transport::kBlockingSliceMs));
  }
}

Result<size_t> Node::Impl::finish_call(ClientChannel& ch, int slot, Clock::time_point deadline) {
  auto& s = ch.slots[slot];
  // The deadline is checked every 16 polls: reading the clock costs as much as a poll.
  for (uint32_t polls = 0; !s.done; ++polls) {
    if ((polls & 15) == 15 && Clock::now() > deadline) {
      s.abandoned = s.send_pending;
      s.in_use = s.send_pending;
      counters.calls_timed_out.fetch_add(1, std::memory_order_relaxed);
      counters.calls_failed.fetch_add(1, std::memory_order_relaxed);
      return Status(ETIMEDOUT, who() + ": node " + std::to_string(ch.peer) +
                                   " did not answer opcode " + std::to_string(s.opcode) +
                                   " in time");
    }
    Status st = progress(ch, transport::kBlockingSliceMs);
    if (!st && !s.done) {
      s.done = true;
      s.status = st;
    }
  }
  Result<size_t> r = s.status.is_ok() ? Result<size_t>(s.reply_len) : Result<size_t>(s.status);
  if (!s.status.is_ok()) counters.calls_failed.fetch_add(1, std::memory_order_relaxed);
  s.in_use = s.send_pending;
  s.abandoned = s.send_pending;
  return r;
}

Result<size_t> Node::Impl::call(NodeId peer, uint16_t opcode, std::span<const std::byte> request,
                                std::span<std::byte> reply, Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock;
  auto ch = channel_for(peer, lock);
  if (!ch) return ch.status();
  auto slot = start_call(*ch.value(), opcode, request, reply, deadline);
  if (!slot) {
    counters.calls_failed.fetch_add(1, std::memory_order_relaxed);
    return slot.status();
  }
  return finish_call(*ch.value(), slot.value(), deadline);
}

// ---------------------------------------------------------------------------------------
// Node's calls

Status Node::connect(NodeId peer) {
  std::unique_lock<std::mutex> lock;
  auto first = impl_->channel_for(peer, lock);
  if (!first) return first.status();
  lock.unlock();
  std::vector<ClientChannel*> chans;
  {
    std::lock_guard<std::mutex> g(impl_->peers_mu);
    for (auto& ch : impl_->peers[peer]) chans.push_back(ch.get());
  }
  for (ClientChannel* ch : chans) {
    std::lock_guard<std::mutex> g(ch->mu);
    if (!ch->connected || !ch->broken.is_ok()) LEGO_RETURN_IF_ERROR(impl_->connect(*ch));
  }
  return Status();
}

Status Node::connect_one(NodeId peer) {
  std::unique_lock<std::mutex> lock;
  auto ch = impl_->channel_for(peer, lock);
  if (!ch) return ch.status();
  if (!ch.value()->connected || !ch.value()->broken.is_ok()) {
    return impl_->connect(*ch.value());
  }
  return Status();
}

void Node::drain(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + (timeout.count() > 0 ? timeout : impl_->config.timeout);
  std::vector<ClientChannel*> chans;
  {
    std::lock_guard<std::mutex> g(impl_->peers_mu);
    for (auto& [peer, v] : impl_->peers) {
      for (auto& ch : v) chans.push_back(ch.get());
    }
  }
  for (ClientChannel* ch : chans) {
    std::lock_guard<std::mutex> g(ch->mu);
    auto answered = [ch] {
      for (const auto& s : ch->slots) {
        if (s.in_use && !s.done && !s.abandoned) return false;
      }
      return true;
    };
    while (ch->connected && ch->broken.is_ok() && !answered() && Clock::now() < deadline) {
      (void)impl_->progress(*ch, transport::kBlockingSliceMs);
    }
  }
}

Result<size_t> Node::send_reply(NodeId peer, uint16_t opcode, std::span<const std::byte> request,
                                std::span<std::byte> reply, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + (timeout.count() > 0 ? timeout : impl_->config.timeout);
  return impl_->call(peer, opcode, request, reply, deadline);
}

Status Node::start_call(PendingCall* call, NodeId peer, uint16_t opcode,
                        std::span<const std::byte> request, std::span<std::byte> reply,
                        std::chrono::milliseconds timeout) {
  call->channel = nullptr;
  call->request_busy = false;
  call->deadline = Clock::now() + (timeout.count() > 0 ? timeout : impl_->config.timeout);
  std::unique_lock<std::mutex> lock;
  auto ch = impl_->channel_for(peer, lock);
  if (!ch) return ch.status();
  auto slot =
      impl_->start_call(*ch.value(), opcode, request, reply, call->deadline, call->zero_copy);
  if (!slot) {
    impl_->counters.calls_failed.fetch_add(1, std::memory_order_relaxed);
    return slot.status();
  }
  call->channel = ch.value();
  call->slot = slot.value();
  call->id = ch.value()->slots[slot.value()].id;
  return Status();
}

Result<size_t> Node::finish_call(PendingCall* call) {
  auto* ch = static_cast<ClientChannel*>(call->channel);
  if (ch == nullptr) return Status(EINVAL, "finish_call of a call that was not started");
  call->channel = nullptr;
  std::lock_guard<std::mutex> g(ch->mu);
  auto& s = ch->slots[call->slot];
  if (s.id != call->id || !s.in_use) {
    // Reset under us: whether the provider is done with the request is unknown.
    call->request_busy = call->zero_copy;
    return Status(ECONNRESET, "the connection was reset");
  }
  Result<size_t> r = impl_->finish_call(*ch, call->slot, call->deadline);
  // A reply means the peer has read the whole request; without one (a timeout, a lost
  // connection) a send still pending may read it later.
  call->request_busy = call->zero_copy && !r.is_ok() && s.send_pending;
  return r;
}

bool Node::call_done(PendingCall* call) {
  auto* ch = static_cast<ClientChannel*>(call->channel);
  if (ch == nullptr) return true;  // finish_call reports it
  std::unique_lock<std::mutex> lock(ch->mu, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  auto& s = ch->slots[call->slot];
  if (s.id != call->id || !s.in_use || s.done) return true;
  if (!impl_->progress(*ch, 0).is_ok()) return true;  // broken: the slot failed with it
  return s.done || Clock::now() > call->deadline;
}

struct RpcFuture::State {
  Node::Impl* node = nullptr;
  ClientChannel* ch = nullptr;
  int slot = -1;
  uint64_t id = 0;
  Clock::time_point deadline;
  std::optional<Result<size_t>> result;
};

RpcFuture Node::send_reply_async(NodeId peer, uint16_t opcode, std::span<const std::byte> request,
                                 std::span<std::byte> reply, std::chrono::milliseconds timeout) {
  RpcFuture f;
  f.state_ = std::make_unique<RpcFuture::State>();
  auto& s = *f.state_;
  s.node = impl_.get();
  s.deadline = Clock::now() + (timeout.count() > 0 ? timeout : impl_->config.timeout);
  std::unique_lock<std::mutex> lock;
  auto ch = impl_->channel_for(peer, lock);
  if (!ch) {
    s.result = Result<size_t>(ch.status());
    return f;
  }
  auto slot = impl_->start_call(*ch.value(), opcode, request, reply, s.deadline);
  if (!slot) {
    impl_->counters.calls_failed.fetch_add(1, std::memory_order_relaxed);
    s.result = Result<size_t>(slot.status());
    return f;
  }
  s.ch = ch.value();
  s.slot = slot.value();
  s.id = s.ch->slots[s.slot].id;
  return f;
}

RpcFuture::RpcFuture() = default;
RpcFuture::RpcFuture(RpcFuture&&) noexcept = default;
RpcFuture& RpcFuture::operator=(RpcFuture&&) noexcept = default;

RpcFuture::~RpcFuture() {
  if (!state_ || state_->result || state_->ch == nullptr) return;
  // Abandon: free the slot once its send completes; a late reply is dropped.
  std::lock_guard<std::mutex> g(state_->ch->mu);
  auto& s = state_->ch->slots[state_->slot];
  if (s.in_use && s.id == state_->id) {
    s.abandoned = s.send_pending;
    s.in_use = s.send_pending;
  }
}

bool RpcFuture::ready() {
  if (!state_) return true;
  if (state_->result) return true;
  std::lock_guard<std::mutex> g(state_->ch->mu);
  auto& s = state_->ch->slots[state_->slot];
  if (!s.done && s.id == state_->id) (void)state_->node->progress(*state_->ch, 0);
  return s.done || s.id != state_->id || Clock::now() > state_->deadline;
}

Result<size_t> RpcFuture::wait() {
  if (!state_) return Status(EINVAL, "wait() on an empty RpcFuture");
  if (state_->result) return *state_->result;
  std::lock_guard<std::mutex> g(state_->ch->mu);
  auto& s = state_->ch->slots[state_->slot];
  if (s.id != state_->id || !s.in_use) {
    state_->result = Result<size_t>(Status(ECONNRESET, "the connection was reset"));
  } else {
    state_->result = state_->node->finish_call(*state_->ch, state_->slot, state_->deadline);
  }
  return *state_->result;
}

}  // namespace lego::fit
