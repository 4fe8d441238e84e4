// The libfabric rdm-endpoint provider: "shm", between processes of one host.
// Connectionless: the server has one endpoint (on its thread 0) shared by every client,
// and knows a peer by its address, learned from its hello (which carries the client's
// endpoint name and pid); a client channel is an endpoint of its own with the server in
// its address vector. "Closing" a peer forgets its address and state; a peer whose
// process is gone is noticed through its pid, both ways. After the handshake requests and
// replies are compact frames (fit_wire.h). One-sided ops are requests served by the
// owner's libfit (served_rma.h says why, not shm's own RMA). Shared libfabric mechanics:
// ofi_transport.h. An idle server thread sleeps until a client rings its doorbell
// (doorbell.h).
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <mutex>
#include <string_view>
#include <unordered_map>

#include "libfit/ofi_transport.h"
#include "libfit/served_rma.h"

namespace lego::fit::transport {
namespace ofi_common {
namespace {

// "lego-<pid>-<random>": the same for every endpoint of this process image (shm appends
// ":<uid>:<endpoint number>"), different after an exec() or in a forked child.
std::string shm_source_name() {
  static std::mutex mu;
  static pid_t pid = 0;
  static std::string name;
  std::lock_guard<std::mutex> g(mu);
  if (pid != getpid()) {
    pid = getpid();
    uint32_t nonce = 0;
    if (getrandom(&nonce, sizeof nonce, GRND_NONBLOCK) != sizeof nonce)
      nonce = static_cast<uint32_t>(Clock::now().time_since_epoch().count());
    char buf[48];
    snprintf(buf, sizeof buf, "lego-%d-%08x", static_cast<int>(pid), nonce);
    name = buf;
  }
  return name;
}

class RdmServer;

class RdmConnection final : public OfiConnection {
 public:
  RdmConnection(const Context& ctx, RdmServer* server)
      : OfiConnection(ctx, /*compact=*/true), server_(server) {}

  Status open(const NodeConfig& peer, ClientHost* host) override;
  Status fill_hello(wire::HelloPayload& hello) override {
    size_t len = sizeof(hello.name);
    int ret = fi_getname(&ep_.get()->fid, hello.name, &len);
    if (ret != 0) return ofi::error(ret, "fi_getname");
    hello.name_length = static_cast<uint32_t>(len);
    hello.pid = static_cast<uint32_t>(getpid());
    return Status();
  }
  void on_challenge(const wire::ChallengePayload& challenge) override {
    peer_pid_ = static_cast<pid_t>(challenge.pid);
  }
  Status rma(bool write, uint64_t key, uint64_t addr, std::byte* local, size_t len) override {
    return served_rma::call(ctx_, host_, write, key, addr, local, len);
  }

 private:
  // A peer gone is a process gone.
  Status check_peer() override {
    if (pid_gone(peer_pid_)) {
      return Status(ECONNRESET, ctx_.who + ": " + peer_name() + " (pid " +
                                    std::to_string(peer_pid_) + ") went away");
    }
    return Status();
  }

  RdmServer* server_;
  pid_t peer_pid_ = 0;
};

class RdmServer final : public OfiServer {
 public:
  explicit RdmServer(const Context& ctx) : OfiServer(ctx, /*rdm=*/true) {}

  std::unique_ptr<ClientConnection> new_connection() override {
    return std::make_unique<RdmConnection>(ctx_, this);
  }
  Result<int> listen(ServerHost* host) override;
  void close_server() override;
  void reject(Delivery& d, const Status& st, uint16_t opcode, uint64_t id) override;
  bool on_hello(Delivery& d, const wire::FrameHeader& h, const wire::HelloPayload* hello) override;
  const Handler* internal_handler(uint16_t opcode) const override {
    return regions_.handler(opcode);
  }
  Result<std::unique_ptr<Registration>> register_memory(void* data, size_t size, bool remote_write,
                                                        RemoteRegion* remote) override {
    if (!server_domain_) {
      return Status(EINVAL, ctx_.who + ": start() the node before registering memory");
    }
    return regions_.add(data, size, remote_write, remote);
  }

  // The domain client endpoints share with the server, once it listens; else null.
  ofi::Domain* domain() const { return server_domain_.get(); }

 private:
  OfiPeer* sender(OfiPeer&, fi_addr_t src) override {
    // A hello may come from an address we have not inserted yet (FI_ADDR_NOTAVAIL).
    auto it = peers_.find(src);
    return it == peers_.end() ? nullptr : it->second.get();
  }
  void on_failed_op(OfiThread& t, OfiPeer& conn, int index) override {
    post_recv(t, conn, index);  // the slot pair is free again
  }
  void housekeeping(OfiThread& t, Clock::time_point now) override {
    if (now - last_reap_ > std::chrono::milliseconds(500)) {
      reap_dead_peers(t);
      last_reap_ = now;
    }
  }
  Doorbell* doorbell(OfiThread&) override { return bell_.get(); }
  void reap_dead_peers(OfiThread& t);
  static void remove_region_of_gone(const OfiPeer& p);
  void enforce_caps();

  std::unique_ptr<Doorbell> bell_;  // clients ring it after each send (doorbell.h); or null

  // Thread 0's (the only thread): the endpoint, its slots, and the peers by address.
  ofi::Fid<fid_av> av_;
  ofi::Fid<fid_ep> ep_;
  std::unique_ptr<SlotBuffers> bufs_;
  // The slots are shared by all peers: which peer each receive's request came from is
  // found by address.
  std::unordered_map<fi_addr_t, std::unique_ptr<OfiPeer>> peers_;
  OfiPeer any_;                         // owner of the shared endpoint's contexts
  served_rma::Registry regions_{ctx_};  // what peers may read and write (one-sided ops)
  Clock::time_point last_reap_ = Clock::now();
};

Status RdmConnection::open(const NodeConfig& peer, ClientHost* host) {
  host_ = host;
  peer_ = peer.id;
  if (server_->domain() == nullptr) {
    // A client-only node still needs a domain of its provider for its endpoints.
    auto info = ofi::get_info(ctx_.self->provider, "", "", false);
    if (!info) return info.status();
    auto dom = ofi::Domain::open(std::move(info.value()));
    if (!dom) return dom.status();
    own_domain_ = std::move(dom.value());
    domain_ = own_domain_.get();
  } else {
    domain_ = server_->domain();
  }
  std::string service = peer.port ? std::to_string(peer.port) : "0";
  auto info = ofi::get_info(peer.provider, peer.address, service, false);
  if (!info) return info.status();
  fi_av_attr av_attr{};
  av_attr.type = FI_AV_MAP;
  int ret = fi_av_open(domain_->domain.get(), &av_attr, av_.out(), nullptr);
  if (ret != 0) return ofi::error(ret, "fi_av_open");
  // shm's "wait" spins in sched_yield and ignores the timeout (libfabric 1.17), so for it
  // blocking mode naps between non-blocking polls instead.
  LEGO_RETURN_IF_ERROR(open_cq(*domain_, ctx_.blocking, false, 4 * kWindow, cq_, &waitable_));
  // shm names an endpoint's region in /dev/shm after its source address, by default
  // "<pid>:<uid>:<n>": an image that exec() replaced never closed its endpoints, so the new
  // image's names would collide with the old ones (EBUSY), or, were those removed, be
  // confused with them by the peers that mapped them. A source address unique to this
  // image makes names that never repeat.
  ofi::InfoPtr ep_info(fi_dupinfo(domain_->info.get()));
  if (!ep_info) return Status(ENOMEM, "fi_dupinfo");
  std::string name = "fi_shm://" + shm_source_name();
  free(ep_info->src_addr);
  ep_info->src_addr = strdup(name.c_str());
  ep_info->src_addrlen = name.size() + 1;
  ep_info->addr_format = FI_ADDR_STR;
  ret = fi_endpoint(domain_->domain.get(), ep_info.get(), ep_.out(), nullptr);
  if (ret == 0) ret = fi_ep_bind(ep_.get(), &av_.get()->fid, 0);
  if (ret == 0) ret = fi_ep_bind(ep_.get(), &cq_.get()->fid, FI_TRANSMIT | FI_RECV);
  if (ret == 0) ret = fi_enable(ep_.get());
  if (ret != 0) return ofi::error(ret, "opening an shm endpoint");
  if (fi_av_insert(av_.get(), info.value()->dest_addr, 1, &dest_, 0, nullptr) != 1) {
    return Status(EHOSTUNREACH,
                  "cannot resolve the shm address of node " + std::to_string(peer.id));
  }
  bell_ = Doorbell::open(peer.address, peer.port);  // none: the server's sleeps are bounded anyway
  const size_t max = ctx_.config->max_message_bytes;
  // No bounce buffer: one-sided ops are requests, received into the slots.
  LEGO_RETURN_IF_ERROR(register_slots(bufs_, *domain_, max, 0, 2 * kWindow));
  return post_receives();
}

Result<int> RdmServer::listen(ServerHost* host) {
  const NodeConfig& self = *ctx_.self;
  LEGO_RETURN_IF_ERROR(open_server(host, self.port ? std::to_string(self.port) : "0", 1, false));
  ofi::Domain& d = *server_domain_;
  OfiThread& t0 = *threads_[0];
  fi_av_attr av_attr{};
  av_attr.type = FI_AV_MAP;
  int ret = fi_av_open(d.domain.get(), &av_attr, av_.out(), nullptr);
  if (ret != 0) return ofi::error(ret, ctx_.who + ": fi_av_open");
  ret = fi_endpoint(d.domain.get(), d.info.get(), ep_.out(), nullptr);
  if (ret == 0) ret = fi_ep_bind(ep_.get(), &av_.get()->fid, 0);
  if (ret == 0) ret = fi_ep_bind(ep_.get(), &t0.cq.get()->fid, FI_TRANSMIT | FI_RECV);
  if (ret == 0) ret = fi_enable(ep_.get());
  if (ret != 0) return ofi::error(ret, ctx_.who + ": opening the shm endpoint");
  bufs_ = std::make_unique<SlotBuffers>();
  LEGO_RETURN_IF_ERROR(register_slots(*bufs_, d, ctx_.config->max_message_bytes, 0, 2 * kWindow));
  any_.ep = ep_.get();
  any_.bufs = bufs_.get();
  any_.init_contexts();
  for (int i = 0; i < kWindow; i++) post_recv(t0, any_, i);
  last_reap_ = Clock::now();
  // Without a bell the thread naps between polls when idle, as it did before bells.
  auto bell = Doorbell::create(self.address, self.port);
  if (bell) {
    bell_ = std::move(bell.value());
  } else {
    fprintf(stderr, "lego-fit: %s: %s; idle polling naps instead\n", ctx_.who.c_str(),
            bell.status().message().c_str());
  }
  return 1;
}

// The peers first, then the endpoint's slots, the endpoint and the address vector, then
// the thread's completion queue.
void RdmServer::close_server() {
  bell_.reset();
  peers_.clear();
  bufs_.reset();
  ep_.reset();
  av_.reset();
  threads_.clear();
}

void RdmServer::reject(Delivery& d0, const Status& st, uint16_t opcode, uint64_t id) {
  auto& d = static_cast<OfiDelivery&>(d0);
  if (d.peer == nullptr || d.to == FI_ADDR_NOTAVAIL) {
    post_recv(*d.thread, *d.conn, d.slot);  // a sender that never said hello cannot be answered
    return;
  }
  host_->count_close(CloseWhy::kRejected);
  host_->send_error(*this, d, opcode, id, st);
  d.peer->dead = true;  // forgotten by reap_dead_peers
}

// A hello (re)starts the state kept for its sender's address: a client that reconnects
// starts over.
bool RdmServer::on_hello(Delivery& d0, const wire::FrameHeader& h,
                         const wire::HelloPayload* hello) {
  auto& d = static_cast<OfiDelivery&>(d0);
  if (hello == nullptr || hello->name_length == 0 || hello->name_length > wire::kMaxShmName) {
    host_->reject(*this, d, Status(EPROTO, ctx_.who + ": bad hello"), 0, h.request_id);
    return false;
  }
  fi_addr_t addr = FI_ADDR_NOTAVAIL;
  int r = fi_av_insert(av_.get(), hello->name, 1, &addr, 0, nullptr);
  if (r != 1) {
    post_recv(*d.thread, *d.conn, d.slot);
    return false;
  }
  auto& p = peers_[addr];
  p = std::make_unique<OfiPeer>();
  p->region.assign(reinterpret_cast<const char*>(hello->name),
                   strnlen(reinterpret_cast<const char*>(hello->name), hello->name_length));
  p->ep = ep_.get();
  p->addr = addr;
  p->bufs = bufs_.get();
  host_->count_new_connection(*p, d.thread->now_ns);
  d.peer = p.get();
  d.to = addr;
  enforce_caps();
  return true;
}

// The cap on peers awaiting the handshake (rdm peers carry no source address): over it,
// the oldest such (evict_first) is forgotten at the next reap.
void RdmServer::enforce_caps() {
  for (;;) {
    OfiPeer* oldest = nullptr;
    size_t total = 0;
    for (auto& [a, c] : peers_) {
      if (c->dead || c->authenticated.load(std::memory_order_relaxed)) continue;
      total++;
      if (oldest == nullptr || evict_first(*c, *oldest)) oldest = c.get();
    }
    if (total <= kMaxPendingHandshakes) return;
    oldest->dead = true;
    host_->count_close(CloseWhy::kCap);
  }
}

// A client's endpoint region in /dev/shm is unlinked by libfabric when the endpoint
// closes; one killed (SIGKILL) leaves it, 16 MiB or more of shared memory that nothing
// else removes. Once its process is gone the server does: only a name our clients use
// (shm_source_name: "lego-<its pid>-..."), so a hello cannot name another file.
void RdmServer::remove_region_of_gone(const OfiPeer& p) {
  std::string_view name = p.region;
  if (name.starts_with("fi_shm://")) name.remove_prefix(strlen("fi_shm://"));
  const std::string ours = "lego-" + std::to_string(p.pid) + "-";
  if (p.pid <= 0 || !name.starts_with(ours) || name.find('/') != std::string_view::npos) return;
  shm_unlink(std::string(name).c_str());  // ENOENT: it closed its endpoint after all
}

void RdmServer::reap_dead_peers(OfiThread& t) {
  const int64_t deadline = host_->handshake_deadline_ns();
  for (auto it = peers_.begin(); it != peers_.end();) {
    OfiPeer& p = *it->second;
    if (!p.dead && !p.authenticated.load(std::memory_order_relaxed) &&
        t.now_ns - p.accepted_ns > deadline) {
      host_->count_close(CloseWhy::kHandshakeTimeout);
      p.dead = true;
    }
    const bool gone = pid_gone(p.pid);
    if (gone) remove_region_of_gone(p);
    if (p.dead || gone) {
      fi_addr_t a = it->first;
      fi_av_remove(av_.get(), &a, 1, 0);
      it = peers_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace
}  // namespace ofi_common

std::unique_ptr<Transport> make_ofi_rdm(const Context& ctx) {
  return std::make_unique<ofi_common::RdmServer>(ctx);
}

}  // namespace lego::fit::transport
