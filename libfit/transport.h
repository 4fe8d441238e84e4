// libfit's provider API: what a transport implements to carry FIT frames. This is the
// backend writers' header (as rdma-core's driver.h is to verbs.h); users of libfit see
// only include/lego/fit.h. Internal to libfit.
//
// A Node speaks one provider, chosen once from NodeConfig::provider (make_transport,
// node.cc). libfit's core does everything FIT means above moving bytes, the same for every
// provider:
//   rpc.cc        channels, request slots, calls, futures, PendingCall; the client's
//                 handling of received frames (replies matched to calls by id)
//   handshake.cc  both ends of the key challenge (hello, challenge, proof, welcome)
//   server.cc     the server's dispatch to handlers, its handshake state machine, the
//                 hostile-peer rules (fit_wire.h) and the pace of its threads (leases)
//   rma.cc        one-sided reads and writes, memory registration
// A provider moves frames:
//   - client side, a ClientConnection per channel: open it to a peer, send a frame from
//     one of kWindow slots, poll for what arrived (handed to the ClientHost: the channel)
//     and for completed sends, run one-sided ops;
//   - server side, its Transport: listen, run each server thread's loop, hand every frame
//     received to ServerHost::serve with a Delivery (who sent it, where its answer goes),
//     send the answers serve() makes, and close a peer the host rejects, by the rules of
//     fit_wire.h for its kind of connection.
// Providers: tcp.cc and tcp_server.cc (libfit's busy-polled sockets), ofi_msg.cc (libfabric
// msg endpoints: ofi_tcp, verbs), ofi_rdm.cc (libfabric rdm endpoints: shm), over what the
// two libfabric ones share (ofi_transport.h). fault_injection.h wraps any of them for tests.
//
// Threads: a ClientConnection is used by one thread at a time (its channel's lock holder).
// A Transport's server side runs on the threads the core starts, one run(i) each; its
// send/reject/on_hello are called from inside serve(), on the thread that called it.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "lego/fit.h"
#include "lego/fit_wire.h"

namespace lego::fit::transport {

using Clock = std::chrono::steady_clock;

// Requests a client may have outstanding per connection: the slots of a connection.
inline constexpr int kWindow = Node::max_outstanding();
inline constexpr size_t kHeader = sizeof(wire::FrameHeader);
// How long a blocking-mode wait sleeps before re-checking deadlines and peer liveness.
inline constexpr int kBlockingSliceMs = 5;

// The node's counters (FitStats says what each counts): relaxed atomics, summed by
// Node::stats(). Providers count what only they see (a server's bytes sent, accept
// errors); the core the rest.
struct Counters {
  std::atomic<uint64_t> calls_sent{0}, calls_failed{0}, calls_timed_out{0}, requests_served{0},
      requests_rejected{0}, auth_failures{0}, bytes_sent{0}, bytes_received{0}, rma_reads{0},
      rma_writes{0}, connections_accepted{0}, connections_authenticated{0}, connections_open{0},
      handshakes_pending{0}, closed_handshake_timeout{0}, closed_handshake_cap{0},
      closed_rejected{0}, closed_stalled_reader{0}, accept_errors{0}, server_stalls{0};
};

// What every provider needs to know of its node.
struct Context {
  const ClusterConfig* config = nullptr;
  const NodeConfig* self = nullptr;
  bool blocking = false;  // Progress::kBlocking
  Counters* counters = nullptr;
  std::string who;  // "node 3", for messages
};

// A frame as it arrived: `bytes` exactly as received (a whole frame; for a compact frame,
// fit_wire.h, the bare payload, with `data` its 64-bit CQ data). The core decodes it: a
// provider never trusts a received byte.
struct RawFrame {
  std::span<const std::byte> bytes;
  bool compact = false;
  uint64_t data = 0;
};

// ---------------------------------------------------------------------------------------
// Client side

// What a ClientConnection reports to, and may ask of, the channel it serves (rpc.cc).
class ClientHost {
 public:
  // A frame arrived; `frame` is valid during the call only. False: the channel failed on
  // it (a malformed frame) and frames after it no longer matter.
  virtual bool on_frame(const RawFrame& frame) = 0;
  // The send from `slot` completed: the provider no longer reads its buffer (for sends
  // that set *in_flight).
  virtual void on_sent(int slot) = 0;
  // The connection broke: every call on the channel fails with `why` (the first failure
  // sticks), and the next call opens a new connection.
  virtual void fail(const Status& why) = 0;
  // The channel's failure; ok while it works. A provider's internal waits stop on it.
  virtual const Status& failure() const = 0;
  // A request on this channel, for providers that serve one-sided ops as requests (tcp):
  // waits for the reply within the cluster's timeout. Never reconnects: a broken channel
  // fails it at once.
  virtual Result<size_t> call(uint16_t opcode, std::span<const std::byte> request,
                              std::span<std::byte> reply) = 0;

 protected:
  ~ClientHost() = default;
};

// One channel's connection to a peer. Made unopened by Transport::new_connection; the
// core opens a fresh one for every (re)connection and destroys it to close it. Errors are
// errno Statuses (fit.h's list); the core adds which node and where.
class ClientConnection {
 public:
  virtual ~ClientConnection() = default;

  // Connects to `peer` (no frame exchanged yet). `host` outlives the connection.
  virtual Status open(const NodeConfig& peer, ClientHost* host) = 0;
  // What this provider's server must know of us beyond the hello's common fields (rdm:
  // our endpoint name and pid).
  virtual Status fill_hello(wire::HelloPayload& hello) {
    (void)hello;
    return Status();
  }
  // The peer's challenge proved the key (rdm: keep its pid, to notice when it dies).
  virtual void on_challenge(const wire::ChallengePayload& challenge) { (void)challenge; }

  // Sends one frame (header: kind, opcode, payload size, status 0, id, our node id; then
  // `payload`) using slot `slot` (0..kWindow-1) of the connection's buffers. Sets
  // *in_flight when the provider still reads the slot or the payload after returning
  // (ClientHost::on_sent follows); otherwise everything was taken. `caller_keeps`: the
  // payload stays valid and unchanged until on_sent (PendingCall::zero_copy), so it may
  // be sent from where it is. Errors: ECONNRESET (the peer closed the connection),
  // ETIMEDOUT (it took nothing for the timeout), or the provider's own.
  virtual Status send(int slot, wire::Kind kind, uint16_t opcode,
                      std::span<const std::byte> payload, uint64_t id, bool caller_keeps,
                      bool* in_flight) = 0;
  // Hands every frame that arrived to ClientHost::on_frame and every completed send to
  // on_sent. Polling mode never blocks (it naps once idle for long, IdlePoll); blocking
  // mode waits up to wait_ms for something to happen. An error means the connection is
  // broken (ECONNRESET: the peer went away; EPROTO: not a FIT stream), and the provider
  // has told the host (fail).
  virtual Status poll(int wait_ms) = 0;
  // Reads (or writes) `len` bytes at `addr` of the peer's region `key` (RemoteRegion's
  // base + offset) into (from) `local`, in as many operations as the provider needs,
  // within the cluster's timeout (libfabric: all of them; tcp: each request). A failure
  // that leaves the connection unusable (an operation still owns its buffer) fails it.
  virtual Status rma(bool write, uint64_t key, uint64_t addr, std::byte* local, size_t len) = 0;
};

// ---------------------------------------------------------------------------------------
// Server side

// A peer as the server core sees it: its handshake state and what the hostile-peer rules
// need. A provider's per-connection (rdm: per-address) state derives from it.
struct Peer {
  Peer() = default;
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;
  virtual ~Peer();  // takes it off the gauges it is on

  // Written by the owning thread; read by other threads too (the libfabric caps).
  std::atomic<bool> authenticated{false};
  std::atomic<bool> dead{false};  // closed or to be closed; its owner frees it
  bool said_hello = false;
  bool challenged = false;
  // Welcomed by this delivery: a provider that gives authenticated connections other
  // buffers (tcp) does so now and clears it; the others ignore it.
  bool just_authenticated = false;
  NodeId client = 0;
  pid_t pid = 0;  // rdm: the client's pid, so the server can tell when it is gone
  uint8_t client_nonce[wire::kNonceBytes] = {};
  uint8_t server_nonce[wire::kNonceBytes] = {};
  int64_t accepted_ns = 0;  // when it connected: the handshake deadline, oldest-first caps
  uint32_t source = 0;      // the peer's IPv4 address (network order); 0 when unknown
  // Gauges it is counted in (ServerHost::count_new_connection).
  std::atomic<uint64_t>* open_gauge = nullptr;
  std::atomic<uint64_t>* pending_gauge = nullptr;
  bool pending_counted = false;
};

// One received frame being served. A provider fills it in (deriving its own type to add
// which connection, slot and address) and gets it back in Transport::send and reject.
struct Delivery {
  Peer* peer = nullptr;  // the sender; null for an rdm sender not known (yet)
  // Where the answer's payload goes: the send slot paired with the receive, after room
  // for its header. Handlers get the first max_message_bytes of it.
  std::span<std::byte> answer;
};

// Why a server closed a connection: each has a counter (FitStats).
enum class CloseWhy : uint8_t { kPeer, kRejected, kHandshakeTimeout, kCap, kStalledReader };

class Transport;

// The server core a provider's threads feed (server.cc).
class ServerHost {
 public:
  explicit ServerHost(Node::Impl* node) : node_(node) {}

  // Serves one received frame: decodes it; before the welcome runs the handshake (the
  // rules of fit_wire.h: admit, hello, proof), after it dispatches the request to its
  // handler; answers through port.send, or port.reject for a peer that broke a rule.
  // The answer is written into d.answer.
  void serve(Transport& port, Delivery& d, const RawFrame& frame);
  // Judges a header alone, before its payload arrived (tcp): magic, version, kind and
  // length (wire::check_header), then whether `peer` may send that kind now. An error is
  // what the peer is rejected with (logged when it broke the handshake).
  Status check_header(const Peer& peer, const wire::FrameHeader& h) const;
  // Counts a rejection and has the provider close the peer (Transport::reject).
  void reject(Transport& port, Delivery& d, const Status& st, uint16_t opcode, uint64_t id);
  // Writes st's message into d.answer and sends it as kError (truncated to the room).
  void send_error(Transport& port, Delivery& d, uint16_t opcode, uint64_t id, const Status& st);

  // Marks a turn of server thread `thread`'s loop (its pace, Node::server_stalled) and
  // returns the time now (CLOCK_MONOTONIC ns). Call at every turn.
  int64_t turn(int thread);
  bool stopping() const;

  // A connection (rdm: a first hello) was accepted now: counted, on the gauges.
  void count_new_connection(Peer& peer, int64_t now_ns);
  void count_close(CloseWhy why);
  Counters& counters() const;
  // min(timeout_ms, kHandshakeDeadlineNs): when an unauthenticated connection is closed.
  int64_t handshake_deadline_ns() const;
  const ClusterConfig& config() const;
  const std::string& who() const;

 private:
  // The server's half of the key challenge (handshake.cc): a hello is answered with a
  // challenge, a proof with a welcome or a rejection.
  void answer_hello(Transport& port, Delivery& d, const wire::FrameHeader& h,
                    std::span<const std::byte> payload);
  void answer_proof(Transport& port, Delivery& d, const wire::FrameHeader& h,
                    std::span<const std::byte> payload);

  Node::Impl* node_;
};

// A registration of memory for one-sided access; unregisters when destroyed.
struct Registration {
  virtual ~Registration() = default;
};

// A provider, one per Node. The client side makes connections; the server side listens
// and runs the server threads.
class Transport {
 public:
  virtual ~Transport() = default;

  // A new, unopened connection for one channel.
  virtual std::unique_ptr<ClientConnection> new_connection() = 0;

  // Listens on the node's address and prepares the server threads; returns how many to
  // run. On an error nothing is left listening (close_server cleans up the rest).
  virtual Result<int> listen(ServerHost* host) = 0;
  // Server thread `thread`'s loop: serves until host->stopping().
  virtual void run(int thread) = 0;
  // After the threads ended: closes every connection, queue and listener (last thread
  // first). The node may listen() again later.
  virtual void close_server() = 0;
  // After the client channels closed too: what they shared with the server (rdm: its
  // domain).
  virtual void close_domain() {}

  // From inside ServerHost::serve: sends the answer now in d.answer[0..length) as a frame
  // of `kind` (status: kError's errno), without waiting for a peer that does not read.
  virtual void send(Delivery& d, wire::Kind kind, uint16_t opcode, uint32_t length, int32_t status,
                    uint64_t id) = 0;
  // The peer broke a rule of fit_wire.h: answer kError(st) if this kind of connection
  // allows (ServerHost::send_error), count the close (kRejected) and close it. d.peer null
  // (an rdm sender that never said hello): nobody can be answered; the frame is dropped.
  virtual void reject(Delivery& d, const Status& st, uint16_t opcode, uint64_t id) = 0;
  // A hello arrived, before it is admitted. Providers that know peers by address only
  // (rdm, on a shared endpoint) make the sender's state from it here (a hello restarts a
  // reconnecting client's) and set d.peer; `hello` is null when the payload is not a
  // HelloPayload. False: the frame was dealt with (refused or dropped).
  virtual bool on_hello(Delivery& d, const wire::FrameHeader& h, const wire::HelloPayload* hello) {
    (void)d;
    (void)h;
    (void)hello;
    return true;
  }
  // Requests libfit serves itself on this provider (tcp: its one-sided ops), before the
  // user's handlers; nullptr for an opcode of the user's.
  virtual const Handler* internal_handler(uint16_t opcode) const {
    (void)opcode;
    return nullptr;
  }

  // Registers [data, data+size) for one-sided access by peers; fills `remote`'s key and
  // base. The node must be serving (start()).
  virtual Result<std::unique_ptr<Registration>> register_memory(void* data, size_t size,
                                                                bool remote_write,
                                                                RemoteRegion* remote) = 0;
};

// The provider for ctx.self->provider.
std::unique_ptr<Transport> make_transport(const Context& ctx);

// ---------------------------------------------------------------------------------------
// The hostile-peer rules every provider applies (fit_wire.h lists them).

// The handshake deadline: min(timeout_ms, 3 s) from accept. An honest handshake is two
// round trips, well under a millisecond on a LAN and far below timeout_ms (after which
// the client gives up anyway); 3 s bounds how long a connection that never authenticates
// holds a descriptor and a handshake slot, yet leaves a slow link room for a retransmit.
inline constexpr int64_t kHandshakeDeadlineNs = 3'000'000'000;
// Connections awaiting the handshake, per node and per source address. Each costs a
// descriptor and buffers; honest ones finish within a round trip, so 256 slots take 256
// clients connecting in the same instant. When a cap is passed, the *oldest* such
// connection is closed, not the newcomer: a peer that holds slots cannot lock honest
// clients out, because their handshakes finish long before they become the oldest.
inline constexpr size_t kMaxPendingHandshakes = 256;
inline constexpr size_t kMaxPendingPerSource = 32;

// Which of two connections awaiting the handshake a cap closes first: one that has not
// said hello before one that has (an honest client says hello the moment it connects),
// then the older.
bool evict_first(const Peer& a, const Peer& b);

// A line about a peer's misbehaviour on stderr (the journal, under systemd), at most one
// a second: a peer opening thousands of bad connections must not flood the log. The next
// line says how many were held back; the counters in --status count them all.
void log_peer_trouble(const std::string& line);

// ---------------------------------------------------------------------------------------
// Helpers for providers' polling loops.

uint64_t monotonic_ns();

// Polling mode's back-off, per poller. A poller spins while a reply (or, for a server,
// the next request) may come soon, yielding the CPU every 16 empty polls (when more
// pollers than vCPUs are runnable -- a program's threads, the ExCache's handler and a
// memory node on 2 vCPUs -- a poller whose reply is in then waits ~16 polls of another,
// not 1024, for its turn; alone, a yield is a cheap syscall). One that has
// found nothing for kSpinNs sleeps in the kernel until work arrives (poll/epoll on
// sockets, short naps on queues without wait objects), so an idle node costs no CPU. The
// budget is long on purpose: on these VMs a thread that sleeps while the other vCPU is
// busy waits ~0.5 ms to run again (measured: a Zipf miss went from 33 µs to 520 µs p50
// with a 100 µs budget), so a poller sleeps only when its peer is idle, not merely slow.
struct IdlePoll {
  uint32_t empty = 0;
  uint64_t idle_since_ns = 0;  // 0: work seen since the last check

  void busy() {
    empty = 0;
    idle_since_ns = 0;
  }
  // After an empty poll: true when the caller should sleep instead of polling again.
  bool should_sleep(uint64_t budget_ns);
};
inline constexpr uint64_t kSpinNs = 20'000'000;
// A server thread sleeps sooner: an idle memory node otherwise burns most of a vCPU that
// a file-only run (lego-fs, lego-stord) needs (measured ~75%).
inline constexpr uint64_t kServerSpinNs = 2'000'000;

// Called after each poll that found nothing. Blocking mode without a wait object naps;
// polling mode spins, then naps once idle past `budget_ns` (IdlePoll).
void nap_if_needed(bool blocking, bool waitable, IdlePoll& idle, uint64_t budget_ns);

// Whether process `pid` is gone (rdm peers are noticed dead through their pid).
bool pid_gone(pid_t pid);

}  // namespace lego::fit::transport
