// FaultyTransport: a provider that decorates a Node's real one (fault_injection.h). Its
// client connections wrap the real ones, standing between them and the channel: frames
// sent go through send(), frames received through on_frame() (the wrapped connection's
// host is this one), and a FaultPlan decides what happens to each. The server side is the
// real provider's, untouched.
#include "libfit/fault_injection.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <thread>

#include "libfit/node_impl.h"

namespace lego::testing {

using fit::transport::ClientConnection;
using fit::transport::ClientHost;
using fit::transport::Clock;
using fit::transport::RawFrame;
using fit::wire::FrameHeader;
using fit::wire::Kind;

// The friend of fit::Node that reaches its provider.
struct FitNodeAccess {
  static fit::Node::Impl& impl(fit::Node& node) { return *node.impl_; }
};

FaultRule fault_on(Way way, Kind kind, Fault fault, std::optional<uint16_t> opcode, int count,
                   int skip) {
  FaultRule r;
  r.way = way;
  r.kind = kind;
  r.opcode = opcode;
  r.fault = fault;
  r.count = count;
  r.skip = skip;
  return r;
}

size_t FaultPlan::add(const FaultRule& rule) {
  const bool receive_only = rule.fault == Fault::kDuplicate || rule.fault == Fault::kReorder ||
                            rule.fault == Fault::kTruncate;
  if (receive_only && rule.way == Way::kSend) {
    fprintf(stderr, "FaultPlan: duplicate, reorder and truncate act on received frames only\n");
    abort();
  }
  std::lock_guard<std::mutex> g(mu_);
  rules_.push_back(Entry{rule, 0, 0});
  return rules_.size() - 1;
}

int FaultPlan::fired(size_t index) const {
  std::lock_guard<std::mutex> g(mu_);
  return index < rules_.size() ? rules_[index].fired : 0;
}

void FaultPlan::clear() {
  std::lock_guard<std::mutex> g(mu_);
  rules_.clear();
}

std::optional<FaultRule> FaultPlan::decide(Way way, fit::NodeId peer, uint8_t kind,
                                           uint16_t opcode) {
  std::lock_guard<std::mutex> g(mu_);
  for (Entry& e : rules_) {
    const FaultRule& r = e.rule;
    if (r.way != way || (r.kind && static_cast<uint8_t>(*r.kind) != kind) ||
        (r.opcode && *r.opcode != opcode) || (r.peer && *r.peer != peer)) {
      continue;
    }
    if (e.seen++ < r.skip) return std::nullopt;
    if (r.count >= 0 && e.fired >= r.count) continue;
    e.fired++;
    return r;
  }
  return std::nullopt;
}

namespace {

// A frame's kind and opcode as far as its bytes tell (a truncated or garbled frame may
// tell nothing: kind 0).
void kind_of(const RawFrame& f, uint8_t* kind, uint16_t* opcode) {
  *kind = 0;
  *opcode = 0;
  if (f.compact) {
    if ((f.data & 0xff) != fit::wire::kCompactMarker) return;
    *kind = static_cast<uint8_t>(f.data >> 8);
    *opcode = static_cast<uint16_t>(f.data >> 16);
    return;
  }
  if (f.bytes.size() < sizeof(FrameHeader)) return;
  FrameHeader h;
  memcpy(&h, f.bytes.data(), sizeof(h));
  *kind = h.kind;
  *opcode = h.opcode;
}

class FaultyConnection final : public ClientConnection, private ClientHost {
 public:
  FaultyConnection(std::unique_ptr<ClientConnection> inner, std::shared_ptr<FaultPlan> plan)
      : inner_(std::move(inner)), plan_(std::move(plan)) {}

  Status open(const fit::NodeConfig& peer, ClientHost* host) override {
    host_ = host;
    peer_ = peer.id;
    return inner_->open(peer, this);
  }
  Status fill_hello(fit::wire::HelloPayload& hello) override { return inner_->fill_hello(hello); }
  void on_challenge(const fit::wire::ChallengePayload& c) override { inner_->on_challenge(c); }

  Status send(int slot, Kind kind, uint16_t opcode, std::span<const std::byte> payload, uint64_t id,
              bool caller_keeps, bool* in_flight) override {
    *in_flight = false;
    if (!reset_.is_ok()) return reset_;
    auto rule = plan_->decide(Way::kSend, peer_, static_cast<uint8_t>(kind), opcode);
    if (rule) {
      switch (rule->fault) {
        case Fault::kDrop:
          return Status();  // gone on the way
        case Fault::kDelay:
          std::this_thread::sleep_for(rule->delay);
          break;
        case Fault::kReset:
          return reset_now();
        default:
          break;  // receive-only faults (FaultPlan::add refuses them here)
      }
    }
    return inner_->send(slot, kind, opcode, payload, id, caller_keeps, in_flight);
  }

  Status poll(int wait_ms) override {
    if (!reset_.is_ok()) return reset_;
    release_held(/*next_delivered=*/false);
    if (!host_->failure().is_ok()) return host_->failure();
    Status st = inner_->poll(wait_ms);
    if (reset_pending_) return reset_now();
    return st;
  }

  Status rma(bool write, uint64_t key, uint64_t addr, std::byte* local, size_t len) override {
    if (!reset_.is_ok()) return reset_;
    Status st = inner_->rma(write, key, addr, local, len);
    if (reset_pending_) return reset_now();
    return st;
  }

 private:
  // ClientHost, for the wrapped connection: received frames meet the plan here.
  bool on_frame(const RawFrame& f) override {
    if (reset_pending_) return false;  // the connection is closing: nothing more arrives
    uint8_t kind;
    uint16_t opcode;
    kind_of(f, &kind, &opcode);
    auto rule = plan_->decide(Way::kReceive, peer_, kind, opcode);
    if (!rule) {
      const bool ok = host_->on_frame(f);
      release_held(/*next_delivered=*/true);
      return ok;
    }
    switch (rule->fault) {
      case Fault::kDrop:
        return true;
      case Fault::kDuplicate:
        if (rule->delay.count() == 0) return host_->on_frame(f) && host_->on_frame(f);
        hold(f, Clock::now() + rule->delay, false);
        return host_->on_frame(f);
      case Fault::kTruncate:
        return host_->on_frame(
            RawFrame{f.bytes.first(std::min(rule->keep_bytes, f.bytes.size())), f.compact, f.data});
      case Fault::kDelay:
        hold(f, Clock::now() + rule->delay, false);
        return true;
      case Fault::kReorder:
        hold(f, rule->delay.count() > 0 ? Clock::now() + rule->delay : Clock::time_point::max(),
             true);
        return true;
      case Fault::kReset:
        reset_pending_ = true;
        return false;
    }
    return true;
  }
  void on_sent(int slot) override { host_->on_sent(slot); }
  void fail(const Status& why) override { host_->fail(why); }
  const Status& failure() const override {
    return reset_pending_ || !reset_.is_ok() ? reset_status() : host_->failure();
  }
  Result<size_t> call(uint16_t opcode, std::span<const std::byte> request,
                      std::span<std::byte> reply) override {
    return host_->call(opcode, request, reply);
  }

  // Keeps a copy of `f` to deliver at `at`, or (`after_next`) once a later frame was.
  void hold(const RawFrame& f, Clock::time_point at, bool after_next) {
    Held h;
    h.bytes.assign(f.bytes.begin(), f.bytes.end());
    h.compact = f.compact;
    h.data = f.data;
    h.after_next = after_next;
    h.at = at;
    held_.push_back(std::move(h));
  }

  // Delivers held frames that are due: delayed ones whose time came, reordered ones once
  // a frame after them was delivered.
  void release_held(bool next_delivered) {
    if (held_.empty()) return;
    const auto now = Clock::now();
    for (auto it = held_.begin(); it != held_.end();) {
      if ((it->after_next && next_delivered) || now >= it->at) {
        Held h = std::move(*it);
        it = held_.erase(it);
        host_->on_frame(RawFrame{{h.bytes.data(), h.bytes.size()}, h.compact, h.data});
      } else {
        ++it;
      }
    }
  }

  const Status& reset_status() const {
    static const Status kReset(ECONNRESET, "the connection was reset by a fault plan");
    return reset_.is_ok() ? kReset : reset_;
  }

  // Closes the real connection (the peer sees it close) and fails the channel.
  Status reset_now() {
    reset_pending_ = false;
    reset_ = Status(ECONNRESET,
                    "node " + std::to_string(peer_) + ": the connection was reset by a fault plan");
    inner_.reset();
    held_.clear();
    host_->fail(reset_);
    return reset_;
  }

  struct Held {
    std::vector<std::byte> bytes;
    bool compact = false;
    uint64_t data = 0;
    bool after_next = false;  // kReorder: due once the next frame was delivered
    Clock::time_point at;     // due then
  };

  std::unique_ptr<ClientConnection> inner_;
  std::shared_ptr<FaultPlan> plan_;
  ClientHost* host_ = nullptr;
  fit::NodeId peer_ = 0;
  std::deque<Held> held_;
  bool reset_pending_ = false;  // a received frame asked for a reset: done after the poll
  Status reset_;                // set once reset: every call fails with it
};

class FaultyTransport final : public fit::transport::Transport {
 public:
  FaultyTransport(std::unique_ptr<Transport> inner, std::shared_ptr<FaultPlan> plan)
      : inner_(std::move(inner)), plan_(std::move(plan)) {}

  std::unique_ptr<ClientConnection> new_connection() override {
    return std::make_unique<FaultyConnection>(inner_->new_connection(), plan_);
  }
  // The server side is the real provider's.
  Result<int> listen(fit::transport::ServerHost* host) override { return inner_->listen(host); }
  void run(int thread) override { inner_->run(thread); }
  void close_server() override { inner_->close_server(); }
  void close_domain() override { inner_->close_domain(); }
  void send(fit::transport::Delivery& d, Kind kind, uint16_t opcode, uint32_t length,
            int32_t status, uint64_t id) override {
    inner_->send(d, kind, opcode, length, status, id);
  }
  void reject(fit::transport::Delivery& d, const Status& st, uint16_t opcode,
              uint64_t id) override {
    inner_->reject(d, st, opcode, id);
  }
  bool on_hello(fit::transport::Delivery& d, const FrameHeader& h,
                const fit::wire::HelloPayload* hello) override {
    return inner_->on_hello(d, h, hello);
  }
  const fit::Handler* internal_handler(uint16_t opcode) const override {
    return inner_->internal_handler(opcode);
  }
  Result<std::unique_ptr<fit::transport::Registration>> register_memory(
      void* data, size_t size, bool remote_write, fit::RemoteRegion* remote) override {
    return inner_->register_memory(data, size, remote_write, remote);
  }

 private:
  std::unique_ptr<Transport> inner_;
  std::shared_ptr<FaultPlan> plan_;
};

}  // namespace

void inject_faults(fit::Node& node, std::shared_ptr<FaultPlan> plan) {
  fit::Node::Impl& impl = FitNodeAccess::impl(node);
  impl.transport = std::make_unique<FaultyTransport>(std::move(impl.transport), std::move(plan));
}

}  // namespace lego::testing
