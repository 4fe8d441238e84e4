// What libfit's libfabric providers share (ofi_transport.h): completion queues, registered
// slots, the client connection's sends, polling and one-sided ops, and the server threads'
// loop.
#include "libfit/ofi_transport.h"

#include <sched.h>

#include <algorithm>
#include <cstring>

namespace lego::fit::transport::ofi_common {

using wire::Kind;

ssize_t read_cq(fid_cq* cq, fi_cq_data_entry* entries, size_t n, bool blocking, int wait_ms,
                fi_addr_t* src) {
  ssize_t ret;
  if (blocking && wait_ms > 0) {
    ret = src ? fi_cq_sreadfrom(cq, entries, n, src, nullptr, wait_ms)
              : fi_cq_sread(cq, entries, n, nullptr, wait_ms);
  } else {
    ret = src ? fi_cq_readfrom(cq, entries, n, src) : fi_cq_read(cq, entries, n);
  }
  if (ret == -FI_EAGAIN) return 0;
  return ret;
}

Status open_cq(ofi::Domain& d, bool blocking, bool wait_objects, size_t size, ofi::Fid<fid_cq>& cq,
               bool* waitable) {
  fi_cq_attr attr{};
  attr.size = size;
  attr.format = FI_CQ_FORMAT_DATA;
  bool use_wait = blocking && wait_objects;
  attr.wait_obj = use_wait ? FI_WAIT_UNSPEC : FI_WAIT_NONE;
  int ret = fi_cq_open(d.domain.get(), &attr, cq.out(), nullptr);
  if (ret != 0 && use_wait) {
    // A provider without wait objects: blocking mode naps between polls.
    attr.wait_obj = FI_WAIT_NONE;
    ret = fi_cq_open(d.domain.get(), &attr, cq.out(), nullptr);
    *waitable = false;
  } else {
    *waitable = use_wait;
  }
  if (ret != 0) return ofi::error(ret, "fi_cq_open");
  return Status();
}

Status register_slots(SlotBuffers& bufs, ofi::Domain& d, size_t max_payload, size_t rma,
                      int slots) {
  LEGO_RETURN_IF_ERROR(bufs.init(max_payload, rma, slots));
  auto r = ofi::register_buffer(d, bufs.base, bufs.total, FI_SEND | FI_RECV | FI_READ | FI_WRITE);
  if (!r) return r.status();
  bufs.desc = r.value()->desc;
  bufs.reg = std::move(r.value());
  return Status();
}

// ---------------------------------------------------------------------------------------
// Client connections

Status OfiConnection::post_receives() {
  for (int i = 0; i < kWindow; i++) {
    send_ctx_[i] = OpCtx{{}, this, OpType::kSend, static_cast<uint16_t>(i)};
    recv_ctx_[i] = OpCtx{{}, this, OpType::kRecv, static_cast<uint16_t>(i)};
  }
  rma_ctx_ = OpCtx{{}, this, OpType::kRma, 0};
  // Pages are touched only by replies that come in parts.
  if (compact_) LEGO_RETURN_IF_ERROR(parts_.map(ctx_.config->max_message_bytes));
  for (int i = 0; i < kWindow; i++) LEGO_RETURN_IF_ERROR(post_recv(i));
  return Status();
}

Status OfiConnection::post_recv(int i) {
  for (;;) {
    ssize_t r = fi_recv(ep_.get(), bufs_.slot(kWindow + i), bufs_.slot_bytes, bufs_.desc, dest_,
                        &recv_ctx_[i].fi);
    if (r == 0) return Status();
    if (r != -FI_EAGAIN) return ofi::error(r, ctx_.who + ": posting a receive");
    LEGO_RETURN_IF_ERROR(poll(0));
  }
}

Status OfiConnection::send(int slot, Kind kind, uint16_t opcode, std::span<const std::byte> payload,
                           uint64_t id, bool caller_keeps, bool* in_flight) {
  std::byte* buf = bufs_.slot(slot);
  bool compact = compact_ && kind == Kind::kRequest;
  if (!compact) {
    wire::encode_header({buf, kHeader}, kind, opcode, static_cast<uint32_t>(payload.size()), 0, id,
                        ctx_.self->id);
  }
  // A compact frame no larger than the provider's inject size is copied by the provider
  // when posted, so it can go straight from the caller's buffer (one 4 KiB copy less); so
  // can a larger one whose caller keeps it until the send completes (PendingCall::zero_copy).
  const bool from_caller = compact && !domain_->local_mr && !payload.empty() &&
                           (caller_keeps || payload.size() <= domain_->info->tx_attr->inject_size);
  if (!payload.empty() && !from_caller) memcpy(buf + kHeader, payload.data(), payload.size());
  for (;;) {
    ssize_t r =
        compact ? fi_senddata(ep_.get(),
                              from_caller ? const_cast<std::byte*>(payload.data()) : buf + kHeader,
                              payload.size(), from_caller ? nullptr : bufs_.desc,
                              wire::compact_data(kind, opcode, id), dest_, &send_ctx_[slot].fi)
                : fi_send(ep_.get(), buf, kHeader + payload.size(), bufs_.desc, dest_,
                          &send_ctx_[slot].fi);
    if (r == 0) break;
    if (r != -FI_EAGAIN) {
      Status st = ofi::error(r, ctx_.who + ": sending to " + peer_name());
      if (r == -FI_ENOTCONN || r == -FI_ECONNRESET || r == -EPIPE) {
        st = Status(ECONNRESET, ctx_.who + ": " + peer_name() + " closed the connection");
      }
      return st;
    }
    LEGO_RETURN_IF_ERROR(poll(0));
  }
  *in_flight = true;
  if (bell_) bell_->ring();
  return Status();
}

Status OfiConnection::poll(int wait_ms) {
  if (!host_->failure().is_ok()) return host_->failure();
  fi_cq_data_entry e[8];
  ssize_t n = read_cq(cq_.get(), e, 8, ctx_.blocking && waitable_, wait_ms);
  if (n > 0) {
    idle_.busy();
    for (ssize_t k = 0; k < n; k++) {
      auto* c = static_cast<OpCtx*>(e[k].op_context);
      if (c->type == OpType::kRecv) {
        const bool compact = compact_ && (e[k].flags & FI_REMOTE_CQ_DATA) != 0;
        std::span<const std::byte> bytes{bufs_.slot(kWindow + c->index), e[k].len};
        if (compact && (wire::is_compact_part(e[k].data) || parts_len_ > 0)) {
          Status st = take_part(bytes, e[k].data);
          if (!st) host_->fail(st);
        } else {
          host_->on_frame(RawFrame{bytes, compact, e[k].data});
        }
        Status st = post_recv(c->index);
        if (!st) host_->fail(st);
      } else if (c->type == OpType::kSend) {
        host_->on_sent(c->index);
      } else {
        rma_done_ = true;
      }
    }
    return host_->failure();
  }
  if (n == -FI_EAVAIL) {
    fi_cq_err_entry err{};
    fi_cq_readerr(cq_.get(), &err, 0);
    if (err.op_context == &rma_ctx_.fi) {
      rma_done_ = true;
      rma_status_ = Status(rma_error_code(err), ctx_.who + ": one-sided access to " + peer_name() +
                                                    " failed: " + fi_strerror(err.err));
      if (rma_error_breaks_connection()) {
        // The connection died with the op (a queue pair in the error state; libfabric's
        // tcp provider closes the socket over a key it does not hold): the next call must
        // connect again rather than find out by failing too.
        host_->fail(Status(ECONNRESET, ctx_.who + ": connection to " + peer_name() +
                                           " closed by a failed one-sided op (" +
                                           rma_status_.message() + ")"));
      }
      return Status();
    }
    Status st(ECONNRESET,
              ctx_.who + ": connection to " + peer_name() + " failed: " + fi_strerror(err.err));
    host_->fail(st);
    return st;
  }
  if (n < 0) {
    Status st = ofi::error(n, ctx_.who + ": polling " + peer_name());
    host_->fail(st);
    return st;
  }
  nap_if_needed(ctx_.blocking, waitable_, idle_, kSpinNs);
  // Nothing arrived: now and then, check whether the peer is still there.
  if (ctx_.blocking || (++polls_ & 1023) == 0) {
    Status st = check_peer();
    if (!st) {
      host_->fail(st);
      return st;
    }
  }
  return Status();
}

// A part of a compact reply sent in parts (fit_wire.h), or the last one: the parts are
// joined, and the whole handed on with the last part's CQ data. A channel has one sender
// and shm keeps its order, so the parts of one reply arrive back to back.
Status OfiConnection::take_part(std::span<const std::byte> bytes, uint64_t data) {
  const bool last = !wire::is_compact_part(data);
  if (parts_len_ > 0 && wire::compact_part_data(data) != parts_data_) {
    parts_len_ = 0;
    return Status(EPROTO, ctx_.who + ": " + peer_name() +
                              " sent a compact frame amid the parts of another reply");
  }
  if (parts_len_ + bytes.size() > parts_.size) {
    parts_len_ = 0;
    return Status(EMSGSIZE, ctx_.who + ": a reply in parts from " + peer_name() +
                                " exceeds the limit of " + std::to_string(parts_.size) + " bytes");
  }
  if (parts_len_ == 0) parts_data_ = wire::compact_part_data(data);
  if (!bytes.empty()) memcpy(parts_.data + parts_len_, bytes.data(), bytes.size());
  parts_len_ += bytes.size();
  if (last) {
    host_->on_frame(RawFrame{{parts_.data, parts_len_}, true, data});
    parts_len_ = 0;
  }
  return Status();
}

Status OfiConnection::rma(bool write, uint64_t key, uint64_t addr, std::byte* local, size_t len) {
  auto deadline = Clock::now() + ctx_.config->timeout;
  size_t done = 0;
  while (done < len) {
    size_t n = std::min(len - done, bufs_.rma_bytes);
    if (write) memcpy(bufs_.rma(), local + done, n);
    rma_done_ = false;
    rma_status_ = Status();
    uint64_t at = addr + done;
    ssize_t r;
    do {
      if (write && write_flags() != 0) {
        iovec iov{bufs_.rma(), n};
        void* desc = bufs_.desc;
        fi_rma_iov rma_iov{at, n, key};
        fi_msg_rma msg{&iov, &desc, 1, dest_, &rma_iov, 1, &rma_ctx_.fi, 0};
        r = fi_writemsg(ep_.get(), &msg, FI_COMPLETION | write_flags());
      } else if (write) {
        r = fi_write(ep_.get(), bufs_.rma(), n, bufs_.desc, dest_, at, key, &rma_ctx_.fi);
      } else {
        r = fi_read(ep_.get(), bufs_.rma(), n, bufs_.desc, dest_, at, key, &rma_ctx_.fi);
      }
      if (r == -FI_EAGAIN) LEGO_RETURN_IF_ERROR(poll(0));
    } while (r == -FI_EAGAIN);
    if (r != 0) return ofi::error(r, ctx_.who + ": posting a one-sided op to " + peer_name());
    while (!rma_done_) {
      if (Clock::now() > deadline) {
        // The op still owns the bounce buffer: the connection cannot be reused safely.
        Status st(ETIMEDOUT, ctx_.who + ": one-sided op to " + peer_name() + " did not complete");
        host_->fail(st);
        return st;
      }
      LEGO_RETURN_IF_ERROR(poll(kBlockingSliceMs));
    }
    LEGO_RETURN_IF_ERROR(rma_status_);
    if (!write) memcpy(local + done, bufs_.rma(), n);
    done += n;
  }
  return Status();
}

// ---------------------------------------------------------------------------------------
// Server

void OfiPeer::init_contexts() {
  for (int i = 0; i < kWindow; i++) {
    send_ctx[i] = OpCtx{{}, this, OpType::kSend, static_cast<uint16_t>(i)};
    recv_ctx[i] = OpCtx{{}, this, OpType::kRecv, static_cast<uint16_t>(i)};
  }
}

Status OfiServer::open_server(ServerHost* host, const std::string& service, int threads,
                              bool wait_objects) {
  host_ = host;
  const NodeConfig& self = *ctx_.self;
  auto info = ofi::get_info(self.provider, self.address, service, true);
  if (!info) return info.status().with_context(ctx_.who + ": listen");
  auto dom = ofi::Domain::open(std::move(info.value()));
  if (!dom) return dom.status().with_context(ctx_.who + ": listen");
  server_domain_ = std::move(dom.value());
  for (int i = 0; i < threads; i++) {
    auto t = std::make_unique<OfiThread>();
    t->index = i;
    LEGO_RETURN_IF_ERROR(open_cq(*server_domain_, ctx_.blocking, wait_objects, 4 * kWindow * 64,
                                 t->cq, &t->waitable));
    threads_.push_back(std::move(t));
  }
  return Status();
}

void OfiServer::post_recv(OfiThread& t, OfiPeer& conn, int slot) {
  OpCtx& c = conn.recv_ctx[slot];
  std::byte* buf = conn.bufs->slot(kWindow + slot);
  for (;;) {
    ssize_t r =
        fi_recv(conn.ep, buf, conn.bufs->slot_bytes, conn.bufs->desc, FI_ADDR_UNSPEC, &c.fi);
    if (r != -FI_EAGAIN) {
      if (r != 0) {
        fprintf(stderr, "lego-fit: %s: posting a receive failed: %s\n", ctx_.who.c_str(),
                fi_strerror(static_cast<int>(-r)));
        conn.dead = true;
      }
      return;
    }
    fi_cq_data_entry e[8];
    ssize_t n = read_cq(t.cq.get(), e, 8, false, 0);
    for (ssize_t k = 0; k < n; k++) handle_completion(t, e[k], FI_ADDR_NOTAVAIL);
  }
}

void OfiServer::send(Delivery& d0, Kind kind, uint16_t opcode, uint32_t length, int32_t status,
                     uint64_t id) {
  auto& d = static_cast<OfiDelivery&>(d0);
  OfiPeer& conn = *d.conn;
  std::byte* buf = conn.bufs->slot(d.slot);
  if (rdm_ && kind == Kind::kReply) {  // compact
    send_in_parts(d, buf + kHeader, length, wire::compact_data(kind, opcode, id));
    return;
  }
  wire::encode_header({buf, kHeader}, kind, opcode, length, status, id, ctx_.self->id);
  OpCtx& c = conn.send_ctx[d.slot];
  for (;;) {
    ssize_t r = fi_send(conn.ep, buf, kHeader + length, conn.bufs->desc, d.to, &c.fi);
    if (r == 0) {
      ctx_.counters->bytes_sent.fetch_add(length, std::memory_order_relaxed);
      d.thread->sends_in_flight++;
      return;
    }
    if (r != -FI_EAGAIN) {
      // The connection is going away; the receive slot is reposted by nobody, which is
      // right for a dead connection.
      conn.dead = true;
      return;
    }
    fi_cq_data_entry e[8];
    ssize_t n = read_cq(d.thread->cq.get(), e, 8, false, 0);
    for (ssize_t k = 0; k < n; k++) handle_completion(*d.thread, e[k], FI_ADDR_NOTAVAIL);
  }
}

// A compact reply (rdm: shm), in parts within the inject size (fit_wire.h says why; most
// replies, a line and less, are one part): all but the last injected (no completion; the buffer is
// ours again on return), the last sent with the slot's context, which frees the slot pair as any
// reply's does. Every part completes at once, whatever becomes of the receiver. The parts of one
// reply go out back to back: nothing else is served meanwhile, so no other reply to the same client
// can come between them.
//
// A client's queue holds every part of its kWindow replies, so only a client that stopped
// taking them in (stopped, or hostile) makes a part wait: after kPartWait it is
// forgotten, and its receive slot posted again, rather than stall the others. (Its own
// completions cannot free room in a client's queue: they are not read meanwhile, so no
// request is served amid a reply's parts either.)
void OfiServer::send_in_parts(OfiDelivery& d, const std::byte* payload, uint32_t length,
                              uint64_t data) {
  OfiPeer& conn = *d.conn;
  const size_t inject = server_domain_->info->tx_attr->inject_size;
  const size_t part = inject > 0 ? inject : length;
  Clock::time_point waiting_since{};  // of the part that found the queue full; or epoch
  size_t off = 0;
  for (;;) {  // a reply of 0 bytes is one (last) part too
    const size_t n = std::min<size_t>(part, length - off);
    const bool last = off + n == length;
    void* from = const_cast<std::byte*>(payload + off);
    ssize_t r =
        last ? fi_senddata(conn.ep, from, n, conn.bufs->desc, data, d.to, &conn.send_ctx[d.slot].fi)
             : fi_injectdata(conn.ep, from, n, wire::compact_part_data(data), d.to);
    if (r == 0) {
      if (last) break;
      off += n;
      waiting_since = {};
      continue;
    }
    const auto now = Clock::now();
    if (r == -FI_EAGAIN && waiting_since == Clock::time_point{}) waiting_since = now;
    if (r != -FI_EAGAIN || now - waiting_since > kPartWait) {
      fprintf(stderr,
              "lego-fit: %s: a client (pid %d) is not taking in its replies (%s); "
              "forgetting it\n",
              ctx_.who.c_str(), d.peer ? static_cast<int>(d.peer->pid) : 0,
              r == -FI_EAGAIN ? "its queue stayed full" : fi_strerror(static_cast<int>(-r)));
      if (d.peer != nullptr) d.peer->dead = true;
      post_recv(*d.thread, conn, d.slot);
      return;
    }
    sched_yield();
  }
  ctx_.counters->bytes_sent.fetch_add(length, std::memory_order_relaxed);
  d.thread->sends_in_flight++;
}

void OfiServer::serve(OfiThread& t, OfiPeer& conn, int slot, const fi_cq_data_entry& e,
                      fi_addr_t src) {
  OfiPeer* peer = sender(conn, src);
  if (peer != nullptr && peer->dead) {
    post_recv(t, conn, slot);  // refused or evicted: forgotten at the next reap
    return;
  }
  OfiDelivery d;
  d.peer = peer;
  d.answer = {conn.bufs->slot(slot) + kHeader, conn.bufs->slot_bytes - kHeader};
  d.thread = &t;
  d.conn = &conn;
  d.slot = slot;
  d.to = rdm_ ? src : FI_ADDR_UNSPEC;
  const bool compact = rdm_ && (e.flags & FI_REMOTE_CQ_DATA) != 0;
  host_->serve(*this, d, RawFrame{{conn.bufs->slot(kWindow + slot), e.len}, compact, e.data});
}

void OfiServer::handle_completion(OfiThread& t, const fi_cq_data_entry& e, fi_addr_t src) {
  auto* c = static_cast<OpCtx*>(e.op_context);
  auto* conn = static_cast<OfiPeer*>(c->owner);
  if (c->type == OpType::kSend && t.sends_in_flight > 0) t.sends_in_flight--;
  if (conn->dead && !rdm_) return;  // reaped soon; nothing to do for it
  if (c->type == OpType::kRecv) {
    serve(t, *conn, c->index, e, src);
  } else if (c->type == OpType::kSend) {
    if (conn->close_after_send) {
      conn->dead = true;
      return;
    }
    post_recv(t, *conn, c->index);  // the pair's send buffer is free again
  }
}

// With a doorbell, an idle thread sleeps until a client rings: in blocking mode at once
// (where it napped), in polling mode once idle for kServerSpinNs (polling's budget). The
// round that arms polls once more; the next empty round sleeps. Without one, or while a
// reply is still moving, it naps as before.
bool OfiServer::idle_round(OfiThread& t, IdlePoll& idle) {
  Doorbell* bell = doorbell(t);
  const bool blocking = ctx_.blocking;
  if (bell == nullptr || t.sends_in_flight > 0) {
    if (bell != nullptr && bell->armed()) bell->disarm();
    nap_if_needed(blocking, t.waitable, idle, kServerSpinNs);
    return false;
  }
  if (bell->armed()) {
    bell->wait(kBlockingSliceMs);
    return true;
  }
  if (blocking || idle.should_sleep(kServerSpinNs)) bell->arm();
  return false;
}

void OfiServer::run(int thread) {
  OfiThread& t = *threads_[thread];
  fi_cq_data_entry e[16];
  fi_addr_t src[16];
  auto last_events = Clock::now();
  uint64_t spins = 0;
  IdlePoll idle;
  const bool blocking = ctx_.blocking;
  while (!host_->stopping()) {
    bool slept = false;
    ssize_t n =
        read_cq(t.cq.get(), e, 16, blocking && t.waitable, kBlockingSliceMs, rdm_ ? src : nullptr);
    if (n == -FI_EAVAIL) {
      fi_cq_err_entry err{};
      fi_cq_readerr(t.cq.get(), &err, 0);
      // A failed op belongs to a connection that is going away (msg), or to a client
      // that vanished (rdm); mark it so its slot is not reused blindly.
      if (err.op_context != nullptr) {
        auto* c = static_cast<OpCtx*>(err.op_context);
        if (c->type == OpType::kSend && t.sends_in_flight > 0) t.sends_in_flight--;
        on_failed_op(t, *static_cast<OfiPeer*>(c->owner), c->index);
      }
    } else if (n > 0) {
      if (Doorbell* bell = doorbell(t); bell != nullptr && bell->armed()) bell->disarm();
      for (ssize_t k = 0; k < n; k++) handle_completion(t, e[k], rdm_ ? src[k] : FI_ADDR_UNSPEC);
      idle.busy();
    } else {
      slept = idle_round(t, idle);
    }
    // Connection events and reaping every 256 rounds or 5 ms, busy or not: a loaded
    // server must still accept new clients.
    // The clock is read every 16 rounds (as costly as a poll): a busy loop needs no more.
    // A blocking round may have waited kBlockingSliceMs: read it every round then, so the
    // pace (server_stalled) sees the loop turn.
    // So is a round that slept on the doorbell.
    if ((++spins & 15) != 0 && n <= 0 && !blocking && !slept) continue;
    t.now_ns = host_->turn(thread);
    auto now = Clock::now();
    if ((spins & 255) == 0 || now - last_events > std::chrono::milliseconds(kBlockingSliceMs)) {
      last_events = now;
      housekeeping(t, now);
    }
  }
}

Result<std::unique_ptr<Registration>> OfiServer::register_memory(void* data, size_t size,
                                                                 bool remote_write,
                                                                 RemoteRegion* remote) {
  if (!server_domain_) {
    return Status(EINVAL, ctx_.who + ": start() the node before registering memory");
  }
  uint64_t access = FI_REMOTE_READ | FI_READ | FI_WRITE | (remote_write ? FI_REMOTE_WRITE : 0);
  auto reg = ofi::register_buffer(*server_domain_, data, size, access);
  if (!reg) return reg.status().with_context(ctx_.who);
  remote->key = reg.value()->key;
  remote->base = server_domain_->virt_addr ? reinterpret_cast<uint64_t>(data) : 0;
  return std::unique_ptr<Registration>(std::move(reg.value()));
}

}  // namespace lego::fit::transport::ofi_common
