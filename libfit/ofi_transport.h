// What libfit's two libfabric providers share (ofi_transport.cc): ofi_msg.cc (msg
// endpoints: ofi_tcp, verbs) and ofi_rdm.cc (rdm endpoints: shm). Internal to libfit.
//
// Buffers: every endpoint owns 2*kWindow slots of (header + max payload) bytes,
// registered once: slot i sends, slot kWindow+i receives. A server pairs receive slot i
// with send slot i and reposts the receive only when that reply's send completed, which
// bounds a client to kWindow outstanding requests per connection. Each client connection
// has its own completion queue, polled by the calling thread; each server thread its own.
//
// Compact frames (rdm, after the handshake): requests and replies carry their header in
// the 64-bit CQ data (fit_wire.h), so a 4 KiB payload stays within shm's inject size; a
// larger reply travels in parts within it (OfiServer::send_in_parts).
//
// Threads: a server thread's connections are guarded by its mu (the msg event-queue
// thread adds them and marks them closed); otherwise a thread's state is its own. Never
// held with another lock.
#pragma once

#include <mutex>
#include <vector>

#include "libfit/doorbell.h"
#include "libfit/ofi.h"
#include "libfit/slot_buffers.h"
#include "libfit/transport.h"

namespace lego::fit::transport::ofi_common {

enum class OpType : uint8_t { kSend, kRecv, kRma };

// Completion context: libfabric hands it back with each completion.
struct OpCtx {
  fi_context2 fi;  // must be first: libfabric owns it while the op is in flight
  void* owner = nullptr;
  OpType type = OpType::kSend;
  uint16_t index = 0;
};

// Reads completions; returns count (>0), 0 when none, or a negative fi error. In blocking
// mode waits up to `wait_ms` for the first one.
ssize_t read_cq(fid_cq* cq, fi_cq_data_entry* entries, size_t n, bool blocking, int wait_ms,
                fi_addr_t* src = nullptr);
// A completion queue; blocking mode asks for a wait object when `wait_objects` (the
// provider's wait works) and the domain has one: *waitable says whether it got one.
Status open_cq(ofi::Domain& d, bool blocking, bool wait_objects, size_t size, ofi::Fid<fid_cq>& cq,
               bool* waitable);
// Maps `bufs` and registers them with `d` for sends, receives and one-sided ops.
Status register_slots(SlotBuffers& bufs, ofi::Domain& d, size_t max_payload, size_t rma, int slots);

// A client connection on a libfabric endpoint with its own completion queue: kWindow
// receives posted, sends from the slots (compact for rdm requests), one-sided ops through
// the bounce buffer (rdm serves them as requests instead: served_rma.h). Subclasses open
// the endpoint and say how a dead peer is noticed.
class OfiConnection : public ClientConnection {
 public:
  OfiConnection(const Context& ctx, bool compact) : ctx_(ctx), compact_(compact) {}

  Status send(int slot, wire::Kind kind, uint16_t opcode, std::span<const std::byte> payload,
              uint64_t id, bool caller_keeps, bool* in_flight) override;
  Status poll(int wait_ms) override;
  Status rma(bool write, uint64_t key, uint64_t addr, std::byte* local, size_t len) override;

 protected:
  // The common end of opening: buffers, contexts and the receives posted.
  Status post_receives();
  Status post_recv(int i);
  // Called now and then while nothing arrives: an error (ECONNRESET) when the peer is
  // known to be gone (msg: the connection's events; rdm: its pid).
  virtual Status check_peer() = 0;
  // Whether a one-sided op that completes in error leaves the connection unusable:
  // connection-oriented endpoints (msg) go with it, rdm ones do not.
  virtual bool rma_error_breaks_connection() const { return false; }
  // The errno a failed one-sided op reports: EACCES when the peer refused the key or range
  // (as far as the provider says), else EIO.
  // Flags for one-sided writes beyond FI_COMPLETION (0: a plain fi_write).
  virtual uint64_t write_flags() const { return 0; }
  virtual int rma_error_code(const fi_cq_err_entry& err) const {
    return err.err == FI_EACCES || err.err == EACCES ? EACCES : EIO;
  }
  std::string peer_name() const { return "node " + std::to_string(peer_); }

  Context ctx_;
  ClientHost* host_ = nullptr;
  NodeId peer_ = 0;
  ofi::Domain* domain_ = nullptr;
  std::unique_ptr<ofi::Domain> own_domain_;  // msg: one per channel (the peer's fabric)
  ofi::Fid<fid_eq> eq_;
  ofi::Fid<fid_av> av_;
  ofi::Fid<fid_cq> cq_;
  ofi::Fid<fid_ep> ep_;
  bool waitable_ = false;
  fi_addr_t dest_ = FI_ADDR_UNSPEC;
  SlotBuffers bufs_;
  OpCtx send_ctx_[kWindow];
  OpCtx recv_ctx_[kWindow];
  OpCtx rma_ctx_;
  bool rma_done_ = false;
  Status rma_status_;
  uint64_t polls_ = 0;
  IdlePoll idle_;
  std::unique_ptr<Doorbell> bell_;  // rdm (shm): the server's, rung after each send; or null

 private:
  Status take_part(std::span<const std::byte> bytes, uint64_t data);

  const bool compact_;  // requests travel as compact frames (rdm)
  // A compact reply arriving in parts (fit_wire.h): the parts so far (parts_len_ bytes of
  // parts_, mapped when the connection opens), and their CQ data.
  MappedBytes parts_;
  size_t parts_len_ = 0;
  uint64_t parts_data_ = 0;
};

// One accepted connection (msg) or one rdm peer's state.
struct OfiPeer : Peer {
  fid_ep* ep = nullptr;  // msg: owned (closed by the server thread); rdm: shared endpoint
  ofi::Fid<fid_ep> owned_ep;
  fi_addr_t addr = FI_ADDR_UNSPEC;  // rdm: the client's address
  std::string region;               // rdm: the client's endpoint name, from its hello
  SlotBuffers* bufs = nullptr;      // msg: own_bufs; rdm: the shared endpoint's
  std::unique_ptr<SlotBuffers> own_bufs;
  OpCtx send_ctx[kWindow];
  OpCtx recv_ctx[kWindow];
  bool close_after_send = false;  // msg: refused: close once the error reply is out
  int64_t close_by_ns = 0;        // msg: refused; closed by then even if the error is not out

  void init_contexts();
};

// One server thread: its completion queue and (msg) the connections bound to it.
struct OfiThread {
  int index = 0;
  int64_t now_ns = 0;  // this turn's clock
  // Replies posted whose completion has not come back: while any is, the thread does not
  // sleep on its doorbell (a large reply moves only as both ends make progress).
  uint32_t sends_in_flight = 0;
  ofi::Fid<fid_cq> cq;
  bool waitable = false;
  // msg: connections whose CQ is this thread's. Guarded by mu (the EQ thread adds).
  std::mutex mu;
  std::vector<std::unique_ptr<OfiPeer>> conns;
  std::vector<OfiPeer*> closing;  // shut down by the peer; closed by this thread

  // Accepted endpoints are bound to our completion queue: close them first.
  ~OfiThread() { conns.clear(); }
};

// A frame received on `conn`'s receive slot `slot`, served by `thread`.
struct OfiDelivery : Delivery {
  OfiThread* thread = nullptr;
  OfiPeer* conn = nullptr;  // whose slots and endpoint (rdm: the shared one)
  int slot = 0;
  fi_addr_t to = FI_ADDR_UNSPEC;  // msg: unspecified; rdm: the sender's address
};

// The server both share: each thread polls its completion queue and serves what arrives.
class OfiServer : public Transport {
 public:
  OfiServer(const Context& ctx, bool rdm) : ctx_(ctx), rdm_(rdm) {}

  void run(int thread) override;
  void send(Delivery& d, wire::Kind kind, uint16_t opcode, uint32_t length, int32_t status,
            uint64_t id) override;
  Result<std::unique_ptr<Registration>> register_memory(void* data, size_t size, bool remote_write,
                                                        RemoteRegion* remote) override;
  void close_domain() override { server_domain_.reset(); }

 protected:
  void post_recv(OfiThread& t, OfiPeer& conn, int slot);
  void handle_completion(OfiThread& t, const fi_cq_data_entry& e, fi_addr_t src);
  // The start of listen(): the server's domain, for the node's address and `service`,
  // and `threads` threads' completion queues (with wait objects in blocking mode when
  // `wait_objects`: the provider's wait works).
  Status open_server(ServerHost* host, const std::string& service, int threads, bool wait_objects);

  // Whose state a frame received on `conn` from `src` belongs to (msg: the connection's;
  // rdm: the sender's, by address), or null.
  virtual OfiPeer* sender(OfiPeer& conn, fi_addr_t src) = 0;
  // An operation of `conn`'s on slot `index` failed.
  virtual void on_failed_op(OfiThread& t, OfiPeer& conn, int index) = 0;
  // Every 256 turns or 5 ms, busy or not: connection events, closing, deadlines.
  virtual void housekeeping(OfiThread& t, Clock::time_point now) = 0;
  // The bell clients ring to wake thread `t` (rdm: shm has no wait object), or null.
  virtual Doorbell* doorbell(OfiThread& /*t*/) { return nullptr; }

  Context ctx_;
  ServerHost* host_ = nullptr;
  std::unique_ptr<ofi::Domain> server_domain_;
  std::vector<std::unique_ptr<OfiThread>> threads_;

 private:
  void serve(OfiThread& t, OfiPeer& conn, int slot, const fi_cq_data_entry& e, fi_addr_t src);
  void send_in_parts(OfiDelivery& d, const std::byte* payload, uint32_t length, uint64_t data);
  // How long one part of a reply may wait for room in its client's queue.
  static constexpr std::chrono::milliseconds kPartWait{2};
  // After a poll that found nothing; true when it slept on the doorbell.
  bool idle_round(OfiThread& t, IdlePoll& idle);

  const bool rdm_;  // completions carry their source; replies travel as compact frames
};

}  // namespace lego::fit::transport::ofi_common
