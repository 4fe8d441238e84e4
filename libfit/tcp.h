// The tcp provider: libfit's own transport over kernel sockets, busy-polled. Frames are
// length-prefixed on a byte stream; one-sided ops are requests served by the owner's
// libfit server thread (as libfabric's tcp provider serves them in software too).
// tcp.cc: the client side and the provider object; tcp_server.cc: the server's threads.
// Internal to libfit.
//
// The server never waits for a peer: thread 0 accepts and runs every handshake in one
// page of buffers per connection; a welcomed connection gets a stream buffer and one send
// slot (mmap'd) and moves to its serving thread. A reply the socket cannot take stays in
// the send slot and the connection reads nothing more until it is out (flow control); one
// left unread for timeout_ms is cut off. fit_wire.h lists what closes a connection.
//
// Threads: a TcpThread's state is its own; mu guards adding and removing connections
// (thread 0 hands authenticated ones to the others). Never held with another lock.
#pragma once

#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "libfit/served_rma.h"
#include "libfit/slot_buffers.h"
#include "libfit/transport.h"

namespace lego::fit::transport::tcp {

// Frames served from one connection per turn of a server loop, and connections accepted
// per turn: a flooding peer cannot monopolise the thread (epoll is level-triggered, so
// what is left is reported again next turn).
inline constexpr int kFramesPerTurn = 16;
inline constexpr int kAcceptsPerTurn = 64;
// After accept() fails for want of descriptors or memory, the listener is not polled for
// this long: retrying at once would spin the thread (measured ~80% of a vCPU).
inline constexpr int64_t kAcceptPauseNs = 100'000'000;
// Buffers before authentication: the largest handshake frame (hello, or an error message
// the server sends) in each direction.
inline constexpr size_t kHandshakeSlotPayload = 448;
static_assert(kHandshakeSlotPayload >= wire::kMaxHandshakePayload);

// A stream: bytes received but not yet framed, in [head, len) of storage owned elsewhere.
// Frames are served where they lie and consumed by moving head; the unframed rest moves
// to the front only before the next read (once per read, not once per frame: a peer
// sending many small frames must not cost a copy of the buffer each).
struct StreamBuffer {
  std::byte* data = nullptr;
  size_t cap = 0;
  size_t head = 0;
  size_t len = 0;

  size_t buffered() const { return len - head; }
  const std::byte* front() const { return data + head; }
  void reset(std::byte* storage, size_t capacity) {
    data = storage;
    cap = capacity;
    head = len = 0;
  }
};

// Reads what is available, first moving the unframed rest to the front. Returns bytes
// read (> 0), 0 when nothing is available or there is no room, or -errno (-ECONNRESET
// when the peer closed the connection).
ssize_t recv_some(int fd, StreamBuffer& in);

// One accepted connection. Before authentication `bufs` is handshake-sized (one page);
// after, its send slot 0 holds a full reply and its scratch area is the stream buffer.
struct Conn : Peer {
  int fd = -1;
  std::unique_ptr<SlotBuffers> bufs;
  StreamBuffer in;
  bool in_pending_list = false;  // thread 0's list of connections awaiting the handshake
  bool want_write = false;       // epoll waits for room to write instead of for input
  // A reply the socket has not taken all of: [out + out_done, out + out_len). While one is
  // pending the connection reads no further frame (its send slot is busy).
  const std::byte* out = nullptr;
  size_t out_len = 0;
  size_t out_done = 0;
  int64_t out_since_ns = 0;  // when the socket last took some of it

  ~Conn() override;
};

class TcpTransport;

// One server thread: its epoll set and connections; thread 0 also owns the listening
// socket and every connection until it authenticates.
struct Thread {
  TcpTransport* t = nullptr;
  ServerHost* host = nullptr;
  int index = 0;
  int64_t now_ns = 0;  // this turn's clock
  std::mutex mu;
  std::vector<std::unique_ptr<Conn>> conns;
  int epfd = -1;
  int listen_fd = -1;
  int64_t listen_paused_until = 0;  // 0: the listener is polled
  std::vector<Conn*> backlog;       // frames left after their turn's budget
  std::vector<Conn*> backlog_now;   // last turn's backlog, being served
  std::deque<Conn*> pending;        // thread 0: awaiting the handshake, oldest first
  std::unordered_map<uint32_t, uint32_t> pending_by_source;  // thread 0: their sources
  bool any_closed = false;    // a connection was closed this turn: reap
  int64_t next_sweep_ns = 0;  // next look for replies nobody reads

  ~Thread();
  void run();
  void accept();
  void read(Conn& conn);
  // Writes what the socket takes of the pending reply. True when all of it is out; false
  // while some waits (epoll then reports room) or when the connection failed (closed).
  bool flush(Conn& conn);
  void close(Conn& conn, CloseWhy why);
  // Sends kError(st) once, without waiting, and closes.
  void refuse(Conn& conn, const Status& st, uint16_t opcode, uint64_t id, CloseWhy why);
  bool upgrade(Conn& conn);
  void drop_pending(Conn& conn);
  void enforce_pending_caps(uint32_t source);
  Conn* cap_victim(uint32_t source);
  void sweep();
  void reap();
  void set_events(Conn& conn, uint32_t events);
};

// A frame of `conn` being served by `thread`.
struct TcpDelivery : Delivery {
  Thread* thread = nullptr;
  Conn* conn = nullptr;
};

class TcpTransport final : public Transport {
 public:
  explicit TcpTransport(const Context& ctx);

  std::unique_ptr<ClientConnection> new_connection() override;
  Result<int> listen(ServerHost* host) override;
  void run(int thread) override;
  void close_server() override;
  void send(Delivery& d, wire::Kind kind, uint16_t opcode, uint32_t length, int32_t status,
            uint64_t id) override;
  void reject(Delivery& d, const Status& st, uint16_t opcode, uint64_t id) override;
  const Handler* internal_handler(uint16_t opcode) const override;
  Result<std::unique_ptr<Registration>> register_memory(void* data, size_t size, bool remote_write,
                                                        RemoteRegion* remote) override;

  const Context& context() const { return ctx_; }
  // The serving thread of a connection just welcomed (round robin).
  Thread& next_owner() { return *threads_[next_owner_++ % threads_.size()]; }

 private:
  Context ctx_;
  std::vector<std::unique_ptr<Thread>> threads_;
  std::atomic<unsigned> next_owner_{0};
  bool listening_ = false;
  served_rma::Registry regions_{ctx_};  // what peers may read and write (one-sided ops)
};

}  // namespace lego::fit::transport::tcp
