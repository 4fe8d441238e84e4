// The libfabric msg-endpoint provider: "ofi_tcp" (libfabric's tcp provider) and "verbs"
// (an RDMA NIC). Connection-oriented: a client channel is one endpoint connected to the
// server's passive endpoint; the server accepts each connection on its thread 0 (the
// event queue) and spreads them over its threads' completion queues. Closing a connection
// closes its endpoint, which the peer sees. Shared libfabric mechanics:
// ofi_transport.h.
#include <infiniband/verbs.h>
#include <netinet/in.h>

#include <algorithm>
#include <atomic>

#include "libfit/ofi_transport.h"

namespace lego::fit::transport {
namespace ofi_common {
namespace {

class MsgConnection final : public OfiConnection {
 public:
  explicit MsgConnection(const Context& ctx) : OfiConnection(ctx, /*compact=*/false) {}

  Status open(const NodeConfig& peer, ClientHost* host) override {
    host_ = host;
    peer_ = peer.id;
    provider_ = peer.provider;
    auto info = ofi::get_info(peer.provider, peer.address, std::to_string(peer.port), false);
    if (!info) return info.status();
    fi_info* fi = info->get();
    auto dom = ofi::Domain::open(ofi::InfoPtr(fi_dupinfo(fi)));
    if (!dom) return dom.status();
    own_domain_ = std::move(dom.value());
    domain_ = own_domain_.get();
    fi_eq_attr eq_attr{};
    eq_attr.wait_obj = FI_WAIT_UNSPEC;
    int ret = fi_eq_open(domain_->fabric.get(), &eq_attr, eq_.out(), nullptr);
    if (ret != 0) return ofi::error(ret, "fi_eq_open");
    LEGO_RETURN_IF_ERROR(open_cq(*domain_, ctx_.blocking, true, 4 * kWindow, cq_, &waitable_));
    ret = fi_endpoint(domain_->domain.get(), fi, ep_.out(), nullptr);
    if (ret == 0) ret = fi_ep_bind(ep_.get(), &eq_.get()->fid, 0);
    if (ret == 0) ret = fi_ep_bind(ep_.get(), &cq_.get()->fid, FI_TRANSMIT | FI_RECV);
    if (ret == 0) ret = fi_enable(ep_.get());
    if (ret != 0) return ofi::error(ret, "opening an endpoint");
    const size_t max = ctx_.config->max_message_bytes;
    LEGO_RETURN_IF_ERROR(register_slots(bufs_, *domain_, max, max, 2 * kWindow));
    LEGO_RETURN_IF_ERROR(post_receives());
    ret = fi_connect(ep_.get(), fi->dest_addr, nullptr, 0);
    if (ret != 0) return ofi::error(ret, "fi_connect");
    fi_eq_cm_entry entry{};
    uint32_t event = 0;
    ssize_t r = fi_eq_sread(eq_.get(), &event, &entry, sizeof(entry),
                            static_cast<int>(ctx_.config->timeout.count()), 0);
    if (r == -FI_EAVAIL) {
      fi_eq_err_entry err{};
      fi_eq_readerr(eq_.get(), &err, 0);
      int code = err.err == FI_ECONNREFUSED || err.err == ECONNREFUSED ? ECONNREFUSED
                                                                       : (err.err ? err.err : EIO);
      return Status(code, std::string("connection refused or failed: ") + fi_strerror(err.err));
    }
    if (r == -FI_EAGAIN || r == -FI_ETIMEDOUT) return Status(ETIMEDOUT, "no answer to connect");
    if (r < 0) return ofi::error(r, "waiting for the connection");
    if (event != FI_CONNECTED) return Status(ECONNREFUSED, "connection not established");
    return Status();
  }

 private:
  Provider provider_ = Provider::kOfiTcp;

  // An RC queue pair moves to the error state on a failed op (a remote access error
  // included), and libfabric's tcp provider closes the connection.
  bool rma_error_breaks_connection() const override { return true; }
  // libfabric's verbs provider reports every failed work request as FI_EIO, with the
  // verbs status in prov_errno: a remote access error is the peer refusing the key or
  // range. (libfabric's tcp provider just closes the connection: FI_ECANCELED, EIO here.)
  // libfabric's tcp provider completes a write once it is sent (transmit complete): a
  // write the peer refuses would report success. Delivery complete waits for the peer
  // to have placed it. (An RC write on verbs completes on the responder's ack already.)
  uint64_t write_flags() const override {
    return provider_ == Provider::kVerbs ? 0 : FI_DELIVERY_COMPLETE;
  }
  int rma_error_code(const fi_cq_err_entry& err) const override {
    if (provider_ == Provider::kVerbs && err.prov_errno == IBV_WC_REM_ACCESS_ERR) {
      return EACCES;
    }
    return OfiConnection::rma_error_code(err);
  }

  // The connection's events say when the peer closed it.
  Status check_peer() override {
    fi_eq_cm_entry entry{};
    uint32_t event = 0;
    ssize_t r = fi_eq_read(eq_.get(), &event, &entry, sizeof(entry), 0);
    if ((r >= 0 && event == FI_SHUTDOWN) || r == -FI_EAVAIL) {
      if (r == -FI_EAVAIL) {
        fi_eq_err_entry err{};
        fi_eq_readerr(eq_.get(), &err, 0);
      }
      return Status(ECONNRESET, ctx_.who + ": " + peer_name() + " went away (connection closed)");
    }
    return Status();
  }
};

class MsgServer final : public OfiServer {
 public:
  explicit MsgServer(const Context& ctx) : OfiServer(ctx, /*rdm=*/false) {}

  std::unique_ptr<ClientConnection> new_connection() override {
    return std::make_unique<MsgConnection>(ctx_);
  }
  Result<int> listen(ServerHost* host) override;
  void close_server() override;
  void reject(Delivery& d, const Status& st, uint16_t opcode, uint64_t id) override;

 private:
  OfiPeer* sender(OfiPeer& conn, fi_addr_t) override { return &conn; }
  void on_failed_op(OfiThread&, OfiPeer& conn, int) override { conn.dead = true; }
  void housekeeping(OfiThread& t, Clock::time_point) override {
    if (t.index == 0) handle_eq(t);
    reap_closed(t);
  }
  void handle_eq(OfiThread& t0);
  void reap_closed(OfiThread& t);
  void enforce_caps(uint32_t source);

  ofi::Fid<fid_eq> eq_;    // thread 0's: connection requests and shutdowns
  ofi::Fid<fid_pep> pep_;  // the passive endpoint
  std::atomic<unsigned> next_owner_{0};
};

Result<int> MsgServer::listen(ServerHost* host) {
  const NodeConfig& self = *ctx_.self;
  const std::string service = self.port ? std::to_string(self.port) : "";
  const int threads = std::max(1, self.server_threads);
  LEGO_RETURN_IF_ERROR(open_server(host, service, threads, true));
  ofi::Domain& d = *server_domain_;
  fi_eq_attr eq_attr{};
  eq_attr.wait_obj = FI_WAIT_NONE;
  int ret = fi_eq_open(d.fabric.get(), &eq_attr, eq_.out(), nullptr);
  if (ret != 0) return ofi::error(ret, ctx_.who + ": fi_eq_open");
  ret = fi_passive_ep(d.fabric.get(), d.info.get(), pep_.out(), nullptr);
  if (ret != 0) return ofi::error(ret, ctx_.who + ": fi_passive_ep");
  ret = fi_pep_bind(pep_.get(), &eq_.get()->fid, 0);
  if (ret != 0) return ofi::error(ret, ctx_.who + ": fi_pep_bind");
  ret = fi_listen(pep_.get());
  if (ret != 0) return ofi::error(ret, ctx_.who + ": listen on " + self.address + ":" + service);
  return threads;
}

// Accepted endpoints are bound to thread 0's event queue and to their thread's completion
// queue: the last thread goes first, then thread 0's connections, the listener and the
// event queue, then thread 0.
void MsgServer::close_server() {
  while (threads_.size() > 1) threads_.pop_back();
  if (!threads_.empty()) threads_[0]->conns.clear();
  pep_.reset();
  eq_.reset();
  threads_.clear();
}

void MsgServer::reject(Delivery& d0, const Status& st, uint16_t opcode, uint64_t id) {
  auto& d = static_cast<OfiDelivery&>(d0);
  auto* peer = static_cast<OfiPeer*>(d.peer);
  host_->count_close(CloseWhy::kRejected);
  // Closed when the error's send completes (handle_completion), or after a second if a
  // peer that does not read keeps it from completing (reap_closed).
  peer->close_after_send = true;
  peer->close_by_ns = d.thread->now_ns + 1'000'000'000;
  host_->send_error(*this, d, opcode, id, st);
}

// The caps on connections awaiting the handshake: over one, the oldest such (evict_first)
// is closed (marked dead; its owner thread closes it). `source`: the newcomer's IPv4
// address, 0 when unknown. Connections are spread over the threads when they connect, so
// this looks at every thread's (under each one's mu). No error frame: the owner's send
// slots are not ours to use.
void MsgServer::enforce_caps(uint32_t source) {
  for (;;) {
    OfiPeer* oldest = nullptr;
    OfiPeer* oldest_same = nullptr;
    OfiThread* oldest_owner = nullptr;
    OfiThread* oldest_same_owner = nullptr;
    size_t total = 0, same = 0;
    for (auto& t : threads_) {
      std::lock_guard<std::mutex> g(t->mu);
      for (auto& c : t->conns) {
        if (c->dead || c->authenticated.load(std::memory_order_relaxed)) continue;
        total++;
        if (oldest == nullptr || evict_first(*c, *oldest)) {
          oldest = c.get();
          oldest_owner = t.get();
        }
        if (source != 0 && c->source == source) {
          same++;
          if (oldest_same == nullptr || evict_first(*c, *oldest_same)) {
            oldest_same = c.get();
            oldest_same_owner = t.get();
          }
        }
      }
    }
    OfiPeer* victim = nullptr;
    OfiThread* owner = nullptr;
    if (same > kMaxPendingPerSource) {
      victim = oldest_same;
      owner = oldest_same_owner;
    } else if (total > kMaxPendingHandshakes) {
      victim = oldest;
      owner = oldest_owner;
    }
    if (victim == nullptr) return;
    // Its owner may have closed and freed it since we looked: only a connection still in
    // its list may be touched. (No other thread creates connections, so a pointer found
    // there is the one we chose.)
    std::lock_guard<std::mutex> g(owner->mu);
    auto& list = owner->conns;
    if (std::none_of(list.begin(), list.end(),
                     [victim](const std::unique_ptr<OfiPeer>& c) { return c.get() == victim; })) {
      continue;
    }
    victim->dead = true;
    owner->closing.push_back(victim);
    host_->count_close(CloseWhy::kCap);
  }
}

void MsgServer::handle_eq(OfiThread& t0) {
  fi_eq_cm_entry entry{};
  uint32_t event = 0;
  ssize_t r = fi_eq_read(eq_.get(), &event, &entry, sizeof(entry), 0);
  if (r == -FI_EAGAIN) return;
  if (r == -FI_EAVAIL) {
    fi_eq_err_entry err{};
    fi_eq_readerr(eq_.get(), &err, 0);
    return;  // a connection attempt that failed; nothing was set up for it
  }
  if (r < 0) return;
  if (event == FI_CONNREQ) {
    ofi::InfoPtr info(entry.info);
    auto conn = std::make_unique<OfiPeer>();
    // Spread connections over the server threads.
    OfiThread& owner = *threads_[next_owner_++ % threads_.size()];
    ofi::Domain& d = *server_domain_;
    int ret = fi_endpoint(d.domain.get(), info.get(), conn->owned_ep.out(), nullptr);
    if (ret == 0) ret = fi_ep_bind(conn->owned_ep.get(), &eq_.get()->fid, 0);
    if (ret == 0) {
      ret = fi_ep_bind(conn->owned_ep.get(), &owner.cq.get()->fid, FI_TRANSMIT | FI_RECV);
    }
    if (ret == 0) ret = fi_enable(conn->owned_ep.get());
    conn->ep = conn->owned_ep.get();
    // Full-size receive buffers before the handshake: receives must be posted before
    // fi_accept, and replacing posted buffers afterwards would mean cancelling receives
    // in flight. The caps bound what unauthenticated connections hold (256 x 4.4 MiB of
    // address space; resident only as touched, except where the provider pins: verbs).
    conn->own_bufs = std::make_unique<SlotBuffers>();
    Status st = ret == 0 ? register_slots(*conn->own_bufs, d, ctx_.config->max_message_bytes, 0,
                                          2 * kWindow)
                         : ofi::error(ret, "setting up an accepted endpoint");
    if (!st) {
      fprintf(stderr, "lego-fit: %s: %s\n", ctx_.who.c_str(), st.message().c_str());
      fi_reject(pep_.get(), info->handle, nullptr, 0);
      host_->counters().accept_errors.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    conn->bufs = conn->own_bufs.get();
    conn->init_contexts();
    if (info->dest_addr != nullptr && info->addr_format == FI_SOCKADDR_IN) {
      conn->source = static_cast<const sockaddr_in*>(info->dest_addr)->sin_addr.s_addr;
    }
    host_->count_new_connection(*conn, t0.now_ns);
    OfiPeer* raw = conn.get();
    const uint32_t source = conn->source;
    {
      std::lock_guard<std::mutex> g(owner.mu);
      owner.conns.push_back(std::move(conn));
    }
    // Receives go up before accept so the client's hello always finds one. Posting from
    // this thread is safe: the endpoint is FI_THREAD_SAFE and nothing else uses it yet.
    for (int i = 0; i < kWindow; i++) {
      ssize_t pr = fi_recv(raw->ep, raw->bufs->slot(kWindow + i), raw->bufs->slot_bytes,
                           raw->bufs->desc, FI_ADDR_UNSPEC, &raw->recv_ctx[i].fi);
      if (pr != 0) raw->dead = true;
    }
    if (fi_accept(raw->ep, nullptr, 0) != 0) raw->dead = true;
    if (raw->dead) {
      std::lock_guard<std::mutex> g(owner.mu);
      owner.closing.push_back(raw);
    }
    enforce_caps(source);
  } else if (event == FI_SHUTDOWN) {
    for (auto& t : threads_) {
      std::lock_guard<std::mutex> g(t->mu);
      for (auto& c : t->conns) {
        if (!c->dead && c->ep != nullptr && &c->ep->fid == entry.fid) {
          c->dead = true;
          t->closing.push_back(c.get());
        }
      }
    }
  }
}

void MsgServer::reap_closed(OfiThread& t) {
  std::vector<OfiPeer*> doomed;
  const int64_t deadline = host_->handshake_deadline_ns();
  {
    std::lock_guard<std::mutex> g(t.mu);
    for (auto& c : t.conns) {
      if (!c->dead && !c->authenticated.load(std::memory_order_relaxed) &&
          t.now_ns - c->accepted_ns > deadline) {
        host_->count_close(CloseWhy::kHandshakeTimeout);
        c->dead = true;
      }
      if (!c->dead && c->close_after_send && t.now_ns > c->close_by_ns) c->dead = true;
      if (c->dead && std::find(t.closing.begin(), t.closing.end(), c.get()) == t.closing.end()) {
        t.closing.push_back(c.get());  // refused or failed by this thread
      }
    }
    doomed.swap(t.closing);
  }
  if (doomed.empty()) return;
  for (OfiPeer* c : doomed) {
    c->dead = true;
    c->owned_ep.reset();
  }
  // Completions already queued may still name the closed connections: serve the queue
  // dry (handle_completion skips dead connections) before freeing them.
  fi_cq_data_entry e[16];
  for (;;) {
    ssize_t n = read_cq(t.cq.get(), e, 16, false, 0);
    if (n == -FI_EAVAIL) {
      fi_cq_err_entry err{};
      fi_cq_readerr(t.cq.get(), &err, 0);
      continue;
    }
    if (n <= 0) break;
    for (ssize_t k = 0; k < n; k++) handle_completion(t, e[k], FI_ADDR_UNSPEC);
  }
  std::lock_guard<std::mutex> g(t.mu);
  t.conns.erase(std::remove_if(t.conns.begin(), t.conns.end(),
                               [&](const std::unique_ptr<OfiPeer>& c) {
                                 return std::find(doomed.begin(), doomed.end(), c.get()) !=
                                        doomed.end();
                               }),
                t.conns.end());
}

}  // namespace
}  // namespace ofi_common

std::unique_ptr<Transport> make_ofi_msg(const Context& ctx) {
  return std::make_unique<ofi_common::MsgServer>(ctx);
}

}  // namespace lego::fit::transport
