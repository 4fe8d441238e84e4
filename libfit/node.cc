// libfit's Node: what a node is (create, start, stop), its counters, and the lease clock.
// The rest of the core: rpc.cc (calls), handshake.cc, server.cc, rma.cc; the providers
// behind transport.h. node_impl.h describes the structure and the lock order.
#include <algorithm>

#include "libfit/node_impl.h"

namespace lego::fit {

Node::Node(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Node::~Node() {
  stop();
}

Result<std::unique_ptr<Node>> Node::create(const ClusterConfig& config, NodeId self) {
  const NodeConfig* me = config.find(self);
  if (me == nullptr) {
    return Status(EINVAL,
                  "node " + std::to_string(self) + " is not in the cluster file " + config.origin);
  }
  if (config.key.size() != 32) return Status(EINVAL, "the cluster key must be 32 bytes");
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  impl->self = *me;
  impl->blocking = me->progress == Progress::kBlocking;
  impl->name = "node " + std::to_string(me->id);
  impl->max_threads = std::max(1, me->server_threads);
  impl->paces = std::make_unique<ThreadPace[]>(static_cast<size_t>(impl->max_threads));
  impl->context.config = &impl->config;
  impl->context.self = &impl->self;
  impl->context.blocking = impl->blocking;
  impl->context.counters = &impl->counters;
  impl->context.who = impl->name;
  // The one place a provider is chosen.
  impl->transport = transport::make_transport(impl->context);
  return std::unique_ptr<Node>(new Node(std::move(impl)));
}

void Node::handle(uint16_t opcode, Handler handler) {
  impl_->handlers[opcode] = std::move(handler);
}

Status Node::start() {
  if (impl_->started) return Status(EALREADY, impl_->who() + " is already serving");
  LEGO_RETURN_IF_ERROR(impl_->start_server());
  impl_->started = true;
  return Status();
}

void Node::stop() {
  if (!impl_) return;
  impl_->stop_server();
}

const NodeConfig* Node::Impl::find_peer(NodeId id) const {
  if (const NodeConfig* n = config.find(id)) return n;
  std::lock_guard<std::mutex> g(learned_mu);
  for (const NodeConfig& n : learned) {
    if (n.id == id) return &n;
  }
  return nullptr;
}

Status Node::add_peer(const NodeConfig& peer) {
  const std::string name = "node " + std::to_string(peer.id);
  if (peer.id == impl_->self.id) {
    return Status(EEXIST, impl_->who() + ": cannot add " + name + " as a peer: it is this node");
  }
  if (peer.address.empty()) return Status(EINVAL, "cannot add " + name + ": no address");
  if (peer.provider != Provider::kShm && peer.port == 0) {
    return Status(EINVAL, "cannot add " + name + ": no port");
  }
  if (peer.provider != impl_->self.provider) {
    return Status(EINVAL, "cannot add " + name + ": it speaks " + provider_name(peer.provider) +
                              ", this cluster " + provider_name(impl_->self.provider));
  }
  auto same = [&](const NodeConfig& known) -> Status {
    if (known.address == peer.address && known.port == peer.port &&
        known.provider == peer.provider) {
      return Status();
    }
    return Status(EEXIST, impl_->who() + ": " + name + " is known at " + known.address + ":" +
                              std::to_string(known.port) + ", not at " + peer.address + ":" +
                              std::to_string(peer.port) + " as now claimed");
  };
  if (const NodeConfig* n = impl_->config.find(peer.id)) return same(*n);
  std::lock_guard<std::mutex> g(impl_->learned_mu);
  for (const NodeConfig& n : impl_->learned) {
    if (n.id == peer.id) return same(n);
  }
  NodeConfig added = peer;
  added.line = 0;  // not from the file
  impl_->learned.push_back(added);
  return Status();
}

std::optional<NodeConfig> Node::peer(NodeId id) const {
  const NodeConfig* n = impl_->find_peer(id);
  if (n == nullptr) return std::nullopt;
  return *n;
}

NodeId Node::id() const {
  return impl_->self.id;
}
const ClusterConfig& Node::config() const {
  return impl_->config;
}

FitStats Node::stats() const {
  auto& c = impl_->counters;
  FitStats s;
  s.calls_sent = c.calls_sent.load();
  s.calls_failed = c.calls_failed.load();
  s.calls_timed_out = c.calls_timed_out.load();
  s.requests_served = c.requests_served.load();
  s.requests_rejected = c.requests_rejected.load();
  s.auth_failures = c.auth_failures.load();
  s.bytes_sent = c.bytes_sent.load();
  s.bytes_received = c.bytes_received.load();
  s.rma_reads = c.rma_reads.load();
  s.rma_writes = c.rma_writes.load();
  s.connections_accepted = c.connections_accepted.load();
  s.connections_authenticated = c.connections_authenticated.load();
  s.connections_open = c.connections_open.load();
  s.handshakes_pending = c.handshakes_pending.load();
  s.closed_handshake_timeout = c.closed_handshake_timeout.load();
  s.closed_handshake_cap = c.closed_handshake_cap.load();
  s.closed_rejected = c.closed_rejected.load();
  s.closed_stalled_reader = c.closed_stalled_reader.load();
  s.accept_errors = c.accept_errors.load();
  s.server_stalls = c.server_stalls.load();
  return s;
}

std::chrono::nanoseconds Node::server_stalled() const {
  return std::chrono::nanoseconds(impl_->stalled_ns());
}

std::string stats_text(const FitStats& s) {
  std::string out;
#define LEGO_FIT_LINE(name, type, doc) out += #name " " + std::to_string(s.name) + "\n";
  LEGO_FIT_COUNTERS(LEGO_FIT_LINE)
#undef LEGO_FIT_LINE
  return out;
}

// ---------------------------------------------------------------------------------------
// LeaseClock

LeaseClock::LeaseClock() {
  steady_at_last_ = static_cast<Nanos>(transport::monotonic_ns());
  offset_.store(steady_at_last_, std::memory_order_relaxed);  // lease time starts at 0
}

void LeaseClock::follow(const Node* node) {
  std::lock_guard<std::mutex> g(mu_);
  node_ = node;
  stalled_at_last_ = node != nullptr ? node->server_stalled().count() : 0;
}

LeaseClock::Nanos LeaseClock::now() const {
  return static_cast<Nanos>(transport::monotonic_ns()) - offset_.load(std::memory_order_acquire);
}

LeaseClock::Nanos LeaseClock::advance() {
  std::lock_guard<std::mutex> g(mu_);
  const Nanos steady = static_cast<Nanos>(transport::monotonic_ns());
  const Nanos stalled = node_ != nullptr ? node_->server_stalled().count() : 0;
  const Nanos elapsed = steady - steady_at_last_;
  const Nanos lost = std::clamp<Nanos>(stalled - stalled_at_last_, 0, elapsed);
  lease_at_last_ += elapsed - lost;
  steady_at_last_ = steady;
  stalled_at_last_ = stalled;
  offset_.store(steady - lease_at_last_, std::memory_order_release);
  return lease_at_last_;
}

}  // namespace lego::fit
