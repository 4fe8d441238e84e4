// libfit's Node: connections, the RPC protocol and one-sided RMA over libfabric.
//
// Structure:
//   - ClientChannel: one outgoing connection (msg endpoint, or an rdm endpoint with the
//     peer in its address vector) with its own completion queue. The calling thread
//     polls that queue itself, so a reply never needs a cross-thread wake-up.
//     channels_per_peer channels per peer; a thread sticks to one (thread-local hint).
//   - Server: a passive endpoint (msg) or one rdm endpoint, served by server_threads
//     threads, each polling its own completion queue. Handlers run inline.
//   - Buffers: every endpoint owns 2*kWindow slots of (header + max payload) bytes,
//     registered once: slot i sends, slot kWindow+i receives. A server pairs receive slot
//     i with send slot i and reposts the receive only when that reply's send completed,
//     which bounds a client to kWindow outstanding requests per connection.
//   - The socket transport ("tcp") frames a byte stream instead. Its server never waits
//     for a peer: thread 0 accepts and runs every handshake in one page of buffers per
//     connection; a welcomed connection gets a stream buffer and one send slot (mmap'd)
//     and moves to its serving thread. A reply the socket cannot take stays in the send
//     slot and the connection reads nothing more until it is out (flow control); one left
//     unread for timeout_ms is cut off. fit_wire.h lists what closes a connection.
//   - Leases: each server thread records the pauses of its loop (ThreadPace), which
//     Node::server_stalled() sums for LeaseClock.
//
// Lock order: ClientChannel::mu before Impl::peers_mu. A ServerThread::mu is never held
// with another lock. Server state is owned by its thread; cross-thread hand-offs go
// through ServerThread::mu.
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "lego/fit.h"
#include "lego/fit_wire.h"
#include "libfit/auth.h"
#include "libfit/ofi.h"

namespace lego::fit {
namespace {

using Clock = std::chrono::steady_clock;
using wire::FrameHeader;
using wire::Kind;

constexpr int kWindow = Node::max_outstanding();
constexpr size_t kHeader = sizeof(FrameHeader);
// How long a blocking-mode wait sleeps before re-checking deadlines and peer liveness.
constexpr int kBlockingSliceMs = 5;

enum class OpType : uint8_t { kSend, kRecv, kRma };

// Completion context: libfabric hands it back with each completion.
struct OpCtx {
  fi_context2 fi;  // must be first: libfabric owns it while the op is in flight
  void* owner = nullptr;
  OpType type = OpType::kSend;
  uint16_t index = 0;
};

// 2*kWindow message slots plus an RMA bounce area, in one mmap'd, registered block.
struct SlotBuffers {
  size_t slot_bytes = 0;
  size_t rma_bytes = 0;
  std::byte* base = nullptr;
  size_t total = 0;
  std::unique_ptr<ofi::Registration> reg;

  SlotBuffers() = default;
  SlotBuffers(const SlotBuffers&) = delete;
  ~SlotBuffers() {
    reg.reset();
    if (base != nullptr) munmap(base, total);
  }
  Status init(ofi::Domain& d, size_t max_payload, size_t rma, int slots) {
    slot_bytes = (kHeader + max_payload + 63) & ~size_t{63};
    rma_bytes = rma;
    total = slot_bytes * slots + rma_bytes;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return Status::from_errno(errno, "mmap of FIT buffers");
    base = static_cast<std::byte*>(p);
    auto r = ofi::register_buffer(d, base, total, FI_SEND | FI_RECV | FI_READ | FI_WRITE);
    if (!r) return r.status();
    reg = std::move(r.value());
    return Status();
  }
  // For the socket transport: the same layout, not registered with any domain.
  Status init_plain(size_t max_payload, size_t rma, int slots) {
    slot_bytes = (kHeader + max_payload + 63) & ~size_t{63};
    rma_bytes = rma;
    total = slot_bytes * slots + rma_bytes;
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return Status::from_errno(errno, "mmap of FIT buffers");
    base = static_cast<std::byte*>(p);
    return Status();
  }
  std::byte* slot(int i) const { return base + slot_bytes * i; }
  std::byte* rma() const { return base + total - rma_bytes; }
  void* desc() const { return reg ? reg->desc : nullptr; }
};

bool pid_gone(pid_t pid) {
  return pid > 0 && kill(pid, 0) != 0 && errno == ESRCH;
}

// Reads completions; returns count (>0), 0 when none, or a negative fi error. In blocking
// mode waits up to `wait_ms` for the first one.
ssize_t read_cq(fid_cq* cq, fi_cq_data_entry* entries, size_t n, bool blocking, int wait_ms,
                fi_addr_t* src = nullptr) {
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

Status open_cq(ofi::Domain& d, bool blocking, size_t size, ofi::Fid<fid_cq>& cq, bool* waitable) {
  fi_cq_attr attr{};
  attr.size = size;
  attr.format = FI_CQ_FORMAT_DATA;
  // shm's "wait" spins in sched_yield and ignores the timeout (libfabric 1.17), so for it
  // blocking mode naps between non-blocking polls instead.
  bool use_wait = blocking && strcmp(d.info->fabric_attr->prov_name, "shm") != 0;
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

uint64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

// A line about a peer's misbehaviour on stderr (the journal, under systemd), at most one a
// second: a peer opening thousands of bad connections must not flood the log. The next line
// says how many were held back; the counters in --status count them all.
void log_peer_trouble(const std::string& line) {
  static std::mutex mu;
  static int64_t last_ns = 0;
  static uint64_t held_back = 0;
  const int64_t now = static_cast<int64_t>(monotonic_ns());
  std::lock_guard<std::mutex> g(mu);
  if (last_ns != 0 && now - last_ns < 1'000'000'000) {
    held_back++;
    return;
  }
  last_ns = now;
  if (held_back > 0) {
    fprintf(stderr, "lego-fit: %s (and %llu more such lines held back)\n", line.c_str(),
            static_cast<unsigned long long>(held_back));
  } else {
    fprintf(stderr, "lego-fit: %s\n", line.c_str());
  }
  held_back = 0;
}

// Polling mode's back-off, per poller. A poller spins while a reply (or, for a server, the
// next request) may come soon, yielding the CPU every 1024 empty polls. One that has found
// nothing for kSpinNs sleeps in the kernel until work arrives (poll/epoll on sockets, short
// naps on queues without wait objects), so an idle node costs no CPU. The budget is long
// on purpose: on these VMs a thread that sleeps while the other vCPU is busy waits ~0.5 ms
// to run again (measured: a Zipf miss went from 33 µs to 520 µs p50 with a 100 µs budget),
// so a poller sleeps only when its peer is idle, not merely slow.
struct IdlePoll {
  uint32_t empty = 0;
  uint64_t idle_since_ns = 0;  // 0: work seen since the last check

  void busy() {
    empty = 0;
    idle_since_ns = 0;
  }
  // After an empty poll: true when the caller should sleep instead of polling again.
  bool should_sleep(uint64_t budget_ns) {
    if ((++empty & 63) != 0) return false;
    if ((empty & 1023) == 0) sched_yield();
    const uint64_t now = monotonic_ns();
    if (idle_since_ns == 0) {
      idle_since_ns = now;
      return false;
    }
    return now - idle_since_ns > budget_ns;
  }
};
constexpr uint64_t kSpinNs = 20'000'000;
// A socket server thread sleeps in epoll_wait sooner: an idle memory node otherwise burns
// most of a vCPU that a file-only run (lego-fs, lego-stord) needs (measured ~75%).
constexpr uint64_t kServerSpinNs = 2'000'000;
// How long a sleeping poller naps on a queue without a wait object (shm).
constexpr useconds_t kNapUs = 200;

// Called after each poll that found nothing. Blocking mode without a wait object naps;
// polling mode spins, then naps once idle past `budget_ns` (IdlePoll).
void nap_if_needed(bool blocking, bool waitable, IdlePoll& idle, uint64_t budget_ns) {
  if (blocking && !waitable) {
    usleep(50);
  } else if (!blocking && idle.should_sleep(budget_ns)) {
    usleep(kNapUs);
  }
}

// Bytes in an anonymous mapping, returned to the kernel (munmap) when destroyed. The
// socket transport's per-connection buffers use it rather than malloc: glibc keeps large
// freed blocks in its heap once its dynamic mmap threshold has risen (it does after the
// first such block is freed), so a daemon that served thousands of connections would
// stay at its peak size. The pages are touched, and so resident, only as used.
struct MappedBytes {
  std::byte* data = nullptr;
  size_t size = 0;

  MappedBytes() = default;
  MappedBytes(const MappedBytes&) = delete;
  MappedBytes& operator=(const MappedBytes&) = delete;
  ~MappedBytes() { reset(); }
  void reset() {
    if (data != nullptr) munmap(data, size);
    data = nullptr;
    size = 0;
  }
  Status map(size_t bytes) {
    reset();
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return Status::from_errno(errno, "mmap of a FIT stream buffer");
    data = static_cast<std::byte*>(p);
    size = bytes;
    return Status();
  }
};

// The socket transport's stream: bytes received but not yet framed, in [head, len) of
// storage owned elsewhere. Frames are served where they lie and consumed by moving head;
// the unframed rest moves to the front only before the next read (once per read, not
// once per frame: a peer sending many small frames must not cost a copy of the buffer
// each).
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

// Writes all of [head, head+head_len) and then [payload, payload+payload_len) to a
// non-blocking socket with sendmsg (a frame's header and payload need not be copied into
// one buffer), waiting for room up to timeout_ms. Returns 0 or an errno. Clients only: a
// server never waits for a peer (ServerThread::flush_sock).
int send_all2(int fd, const std::byte* head, size_t head_len, const std::byte* payload,
              size_t payload_len, int timeout_ms) {
  size_t done = 0;
  const size_t len = head_len + payload_len;
  while (done < len) {
    iovec iov[2];
    int n_iov = 0;
    if (done < head_len) {
      iov[n_iov++] = {const_cast<std::byte*>(head + done), head_len - done};
      if (payload_len > 0) iov[n_iov++] = {const_cast<std::byte*>(payload), payload_len};
    } else {
      iov[n_iov++] = {const_cast<std::byte*>(payload + (done - head_len)), len - done};
    }
    msghdr m{};
    m.msg_iov = iov;
    m.msg_iovlen = static_cast<size_t>(n_iov);
    ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd, POLLOUT, 0};
      if (poll(&p, 1, timeout_ms) == 0) return ETIMEDOUT;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      return n == 0 ? ECONNRESET : errno;
    }
  }
  return 0;
}

// Reads what is available, first moving the unframed rest to the front. Returns bytes
// read (> 0), 0 when nothing is available or there is no room, or -errno (-ECONNRESET
// when the peer closed the connection).
ssize_t recv_some(int fd, StreamBuffer& in) {
  if (in.head > 0) {
    memmove(in.data, in.data + in.head, in.len - in.head);
    in.len -= in.head;
    in.head = 0;
  }
  if (in.len == in.cap) return 0;  // full: frame what we have first
  ssize_t n = recv(fd, in.data + in.len, in.cap - in.len, MSG_DONTWAIT);
  if (n > 0) {
    in.len += static_cast<size_t>(n);
    return n;
  }
  if (n == 0) return -ECONNRESET;
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
  return -errno;
}

// The length of the complete frame at the front of `in`, 0 if it is not all there yet, or
// -EPROTO when the stream cannot be a FIT stream (a length no frame may have).
ssize_t next_frame(const StreamBuffer& in, size_t max_payload) {
  if (in.buffered() < kHeader) return 0;
  uint32_t length;
  memcpy(&length, in.front() + offsetof(FrameHeader, length), sizeof(length));
  if (length > max_payload) return -EPROTO;
  size_t total = kHeader + length;
  return in.buffered() >= total ? static_cast<ssize_t>(total) : 0;
}

// --- Hostile and slow peers (the rules are listed in fit_wire.h) ---
//
// The handshake deadline: min(timeout_ms, 3 s) from accept. An honest handshake is two
// round trips, well under a millisecond on a LAN and far below timeout_ms (after which
// the client gives up anyway); 3 s bounds how long a connection that never authenticates
// holds a descriptor and a handshake slot, yet leaves a slow link room for a retransmit.
constexpr int64_t kHandshakeDeadlineNs = 3'000'000'000;
// Connections awaiting the handshake, per node and per source address. Each costs a
// descriptor and a page; honest ones finish within a round trip, so 256 slots take 256
// clients connecting in the same instant. When a cap is passed, the *oldest* such
// connection is closed, not the newcomer: a peer that holds slots cannot lock honest
// clients out, because their handshakes finish long before they become the oldest.
constexpr size_t kMaxPendingHandshakes = 256;
constexpr size_t kMaxPendingPerSource = 32;
// Frames served from one connection per turn of a server loop, and connections accepted
// per turn: a flooding peer cannot monopolise the thread (epoll is level-triggered, so
// what is left is reported again next turn).
constexpr int kFramesPerTurn = 16;
constexpr int kAcceptsPerTurn = 64;
// After accept() fails for want of descriptors or memory, the listener is not polled for
// this long: retrying at once would spin the thread (measured ~80% of a vCPU).
constexpr int64_t kAcceptPauseNs = 100'000'000;
// The socket transport's buffers before authentication: the largest handshake frame
// (hello, or an error message the server sends) in each direction.
constexpr size_t kHandshakeSlotPayload = 448;
static_assert(kHandshakeSlotPayload >= wire::kMaxHandshakePayload);

int64_t handshake_deadline_ns(const ClusterConfig& c) {
  const int64_t timeout_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(c.timeout).count();
  return std::min(timeout_ns, kHandshakeDeadlineNs);
}

// One server thread's pace, for Node::server_stalled(): when its loop last turned and the
// pauses beyond the threshold it has had. Written by its thread only, read by any: the
// rare update of both fields is bracketed by an odd sequence number (a seqlock), the
// common one (no stall) writes turned_ns alone, which is consistent either way.
struct ThreadPace {
  static constexpr int64_t kThresholdNs =
      std::chrono::duration_cast<std::chrono::nanoseconds>(Node::kStallThreshold).count();
  std::atomic<uint64_t> seq{0};
  std::atomic<int64_t> turned_ns{0};
  std::atomic<int64_t> stalled_ns{0};

  void start(int64_t now) { turned_ns.store(now, std::memory_order_relaxed); }
  // At each turn of the loop. True when the pause since the last turn was a stall.
  bool turn(int64_t now) {
    const int64_t gap = now - turned_ns.load(std::memory_order_relaxed);
    if (gap <= kThresholdNs) {
      turned_ns.store(now, std::memory_order_relaxed);
      return false;
    }
    seq.fetch_add(1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    stalled_ns.store(stalled_ns.load(std::memory_order_relaxed) + gap - kThresholdNs,
                     std::memory_order_relaxed);
    turned_ns.store(now, std::memory_order_relaxed);
    seq.fetch_add(1, std::memory_order_release);
    return true;
  }
  // Stall time up to `now`, a pause still going on included.
  int64_t stalled(int64_t now) const {
    for (;;) {
      const uint64_t s0 = seq.load(std::memory_order_acquire);
      const int64_t t = turned_ns.load(std::memory_order_relaxed);
      const int64_t st = stalled_ns.load(std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_acquire);
      if ((s0 & 1) == 0 && seq.load(std::memory_order_relaxed) == s0) {
        return st + std::max<int64_t>(0, now - t - kThresholdNs);
      }
    }
  }
};

// Internal opcodes of the socket transport's one-sided ops, served by libfit itself.
constexpr uint16_t kSockRmaRead = 0xfffe;
constexpr uint16_t kSockRmaWrite = 0xfffd;
struct SockRmaRequest {
  uint64_t key;
  uint64_t addr;
  uint64_t length;
};

}  // namespace

// ---------------------------------------------------------------------------------------
// MemoryRegion

struct MemoryRegion::Impl {
  std::unique_ptr<ofi::Registration> reg;
  std::function<void()> release;  // the socket transport's registry entry
  ~Impl() {
    if (release) release();
  }
};
MemoryRegion::MemoryRegion() = default;
MemoryRegion::MemoryRegion(MemoryRegion&&) noexcept = default;
MemoryRegion& MemoryRegion::operator=(MemoryRegion&&) noexcept = default;
MemoryRegion::~MemoryRegion() = default;

// ---------------------------------------------------------------------------------------
// Client side

struct ClientChannel {
  struct Slot {
    bool in_use = false;        // a call owns it (or abandoned it while its send is pending)
    bool send_pending = false;  // the provider still owns the send buffer
    bool done = false;
    bool abandoned = false;
    uint64_t id = 0;
    std::span<std::byte> reply;
    size_t reply_len = 0;
    Status status;
    Clock::time_point deadline;
    uint16_t opcode = 0;
  };

  NodeId peer = 0;
  int index = 0;
  std::mutex mu;  // held by the thread posting to or polling this channel
  ofi::Domain* domain = nullptr;
  std::unique_ptr<ofi::Domain> own_domain;  // msg: one per channel (the peer's fabric)
  ofi::Fid<fid_eq> eq;
  ofi::Fid<fid_av> av;
  ofi::Fid<fid_cq> cq;
  ofi::Fid<fid_ep> ep;
  bool waitable = false;
  fi_addr_t dest = FI_ADDR_UNSPEC;
  SlotBuffers bufs;
  OpCtx send_ctx[kWindow];
  OpCtx recv_ctx[kWindow];
  OpCtx rma_ctx;
  bool rma_done = false;
  Status rma_status;
  Slot slots[kWindow];
  bool connected = false;
  int fd = -1;  // socket transport
  MappedBytes in_storage;
  StreamBuffer in;
  Status broken;  // set when the connection failed; calls then fail with it
  pid_t peer_pid = 0;
  uint64_t next_id = 1;
  uint64_t polls = 0;
  IdlePoll idle;
  // Handshake: the last control frame received while connecting.
  bool have_control = false;
  FrameHeader control_header{};
  std::vector<std::byte> control_payload;

  ~ClientChannel() {
    if (fd >= 0) close(fd);
  }
};

struct Node::Impl {
  ClusterConfig config;
  NodeConfig self;
  bool msg = true;
  bool sock = false;  // "tcp": libfit's own socket transport (msg is true too)
  bool blocking = false;
  std::map<uint16_t, Handler> handlers;

  // Server.
  std::unique_ptr<ofi::Domain> server_domain;
  struct ServerThread;
  std::vector<std::unique_ptr<ServerThread>> server_threads;
  std::atomic<bool> stopping{false};
  bool started = false;

  // Client.
  std::mutex peers_mu;
  std::unordered_map<NodeId, std::vector<std::unique_ptr<ClientChannel>>> peers;

  // Counters: relaxed atomics; read by stats(). FitStats says what each counts.
  struct Counters {
    std::atomic<uint64_t> calls_sent{0}, calls_failed{0}, calls_timed_out{0}, requests_served{0},
        requests_rejected{0}, auth_failures{0}, bytes_sent{0}, bytes_received{0}, rma_reads{0},
        rma_writes{0}, connections_accepted{0}, connections_authenticated{0}, connections_open{0},
        handshakes_pending{0}, closed_handshake_timeout{0}, closed_handshake_cap{0},
        closed_rejected{0}, closed_stalled_reader{0}, accept_errors{0}, server_stalls{0};
  } counters;

  // The server threads' paces (Node::server_stalled). Allocated once, for as many threads
  // as the node may start, and never freed before the node: server_stalled() may read
  // them from any thread while the node starts or stops.
  std::unique_ptr<ThreadPace[]> paces;
  std::atomic<int> pace_count{0};
  std::atomic<int64_t> retired_stall_ns{0};  // stalls of threads a stop() ended

  std::string who() const { return "node " + std::to_string(self.id); }

  // --- client
  Result<ClientChannel*> channel_for(NodeId peer, std::unique_lock<std::mutex>& lock);
  Status connect(ClientChannel& ch);
  Status connect_once(ClientChannel& ch);
  Status connect_msg(ClientChannel& ch, const NodeConfig& peer);
  Status connect_rdm(ClientChannel& ch, const NodeConfig& peer);
  Status connect_sock(ClientChannel& ch, const NodeConfig& peer);
  Status progress_sock(ClientChannel& ch, int wait_ms);

  // Socket transport: regions peers may read and write, by key.
  struct SockRegion {
    std::byte* data;
    size_t size;
    bool writable;
  };
  std::mutex regions_mu;
  std::unordered_map<uint64_t, SockRegion> sock_regions;  // guarded by regions_mu
  Result<size_t> serve_sock_rma(uint16_t opcode, std::span<const std::byte> req,
                                std::span<std::byte> reply);
  Status post_recv(ClientChannel& ch, int i);
  // `caller_keeps`: the payload stays valid and unchanged until the send completes, so it
  // may be sent from where it is (PendingCall::zero_copy).
  Status post_frame(ClientChannel& ch, int slot, Kind kind, uint16_t opcode,
                    std::span<const std::byte> payload, uint64_t id, bool caller_keeps = false);
  Status progress(ClientChannel& ch, int wait_ms);
  // `frame`: the received frame; null for receive slot i's buffer.
  void on_client_recv(ClientChannel& ch, const fi_cq_data_entry& e, int i,
                      std::byte* frame = nullptr);
  Status wait_control(ClientChannel& ch, Kind want, Clock::time_point deadline);
  void fail_channel(ClientChannel& ch, Status why);
  Result<int> start_call(ClientChannel& ch, uint16_t opcode, std::span<const std::byte> request,
                         std::span<std::byte> reply, Clock::time_point deadline,
                         bool caller_keeps = false);
  Result<size_t> finish_call(ClientChannel& ch, int slot, Clock::time_point deadline);
  Status rma(const RemoteRegion& region, uint64_t offset, std::byte* local, size_t len, bool write);
  // send_reply's body with the cluster's timeout, for use inside Impl.
  Result<size_t> node_send_reply(NodeId peer, uint16_t opcode, std::span<const std::byte> request,
                                 std::span<std::byte> reply);

  // --- server
  Status listen();
  void start_server_threads();
  int64_t stalled_ns() const;  // Node::server_stalled
};

// ---------------------------------------------------------------------------------------
// Server

namespace {

// One accepted connection (msg) or one rdm peer's state.
struct ServerConn {
  fid_ep* ep = nullptr;  // msg: owned (closed by the server thread); rdm: shared endpoint
  ofi::Fid<fid_ep> owned_ep;
  fi_addr_t addr = FI_ADDR_UNSPEC;  // rdm: the client's address
  SlotBuffers* bufs = nullptr;      // msg: own_bufs; rdm: the shared endpoint's
  std::unique_ptr<SlotBuffers> own_bufs;
  OpCtx send_ctx[kWindow];
  OpCtx recv_ctx[kWindow];
  // Written by the owning thread; read by thread 0 too (the libfabric transports' caps).
  std::atomic<bool> authenticated{false};
  bool said_hello = false;
  bool challenged = false;
  bool close_after_send = false;  // refused: close once the error reply is out
  std::atomic<bool> dead{false};  // set by the EQ thread, read by the owning thread
  NodeId client = 0;
  pid_t pid = 0;
  uint8_t client_nonce[wire::kNonceBytes] = {};
  uint8_t server_nonce[wire::kNonceBytes] = {};
  // Hostile peers (fit_wire.h).
  int64_t accepted_ns = 0;       // when it connected: the handshake deadline, oldest-first caps
  uint32_t source = 0;           // the peer's IPv4 address (network order); 0 when unknown
  int64_t close_by_ns = 0;       // msg: refused; closed by then even if the error is not out
  bool pending_counted = false;  // counted in handshakes_pending
  std::atomic<uint64_t>* open_gauge = nullptr;     // connections_open, while this lives
  std::atomic<uint64_t>* pending_gauge = nullptr;  // handshakes_pending, while counted

  // Socket transport. Before authentication own_bufs is handshake-sized (one page);
  // after, its send slot 0 holds a full reply and its "rma" area is the stream buffer.
  int fd = -1;
  StreamBuffer in;
  bool in_pending_list = false;     // thread 0's list of connections awaiting the handshake
  bool just_authenticated = false;  // welcomed this turn: buffers to grow, thread to pick
  bool want_write = false;          // epoll waits for room to write instead of for input
  // A reply the socket has not taken all of: [out + out_done, out + out_len). While one is
  // pending the connection reads no further frame (its send slot is busy).
  const std::byte* out = nullptr;
  size_t out_len = 0;
  size_t out_done = 0;
  int64_t out_since_ns = 0;  // when the socket last took some of it

  ~ServerConn() {
    if (fd >= 0) close(fd);
    if (open_gauge != nullptr) open_gauge->fetch_sub(1, std::memory_order_relaxed);
    if (pending_counted) pending_gauge->fetch_sub(1, std::memory_order_relaxed);
  }
};

// Whether `peer`, in its handshake state, may send a frame of kind `kind` (the rules of
// fit_wire.h). The header itself was checked by wire::check_header.
Status admit(const ServerConn& peer, uint8_t kind, const std::string& who) {
  const auto k = static_cast<Kind>(kind);
  if (peer.authenticated.load(std::memory_order_relaxed)) {
    if (k == Kind::kRequest) return Status();
    return Status(EPROTO, who + " got an unexpected " + wire::kind_name(kind) + " frame");
  }
  if (k == Kind::kHello) {
    return peer.said_hello ? Status(EPROTO, who + " got a second hello") : Status();
  }
  if (k == Kind::kProof && peer.challenged) return Status();
  return Status(EACCES, who + " serves only peers that proved the cluster key (got a " +
                            wire::kind_name(kind) + " frame before the handshake ended)");
}

enum class CloseWhy : uint8_t { kPeer, kRejected, kHandshakeTimeout, kCap, kStalledReader };

}  // namespace

struct Node::Impl::ServerThread {
  Node::Impl* node = nullptr;
  int index = 0;
  ThreadPace* pace = nullptr;
  int64_t now_ns = 0;  // this turn's clock
  ofi::Fid<fid_cq> cq;
  bool waitable = false;
  std::thread thread;
  // msg: connections whose CQ is this thread's. Guarded by mu (the EQ thread adds).
  // Socket transport: this thread's connections; mu guards adding and removing (thread 0
  // hands authenticated connections to the others), the owning thread alone uses them.
  std::mutex mu;
  std::vector<std::unique_ptr<ServerConn>> conns;
  std::vector<ServerConn*> closing;  // shut down by the peer; closed by this thread
  // msg, thread 0 only.
  ofi::Fid<fid_eq> eq;
  ofi::Fid<fid_pep> pep;
  // rdm: the single endpoint and its peers, owned by thread 0.
  ofi::Fid<fid_av> av;
  ofi::Fid<fid_ep> rdm_ep;
  std::unique_ptr<SlotBuffers> rdm_bufs;
  // rdm slots are shared by all peers: which peer each receive slot's request came from.
  std::unordered_map<fi_addr_t, std::unique_ptr<ServerConn>> rdm_peers;
  ServerConn rdm_any;  // owner of the shared endpoint's contexts
  // Socket transport: this thread's epoll set; thread 0 also owns the listening socket
  // and every connection until it authenticates.
  int epfd = -1;
  int listen_fd = -1;
  int64_t listen_paused_until = 0;       // 0: the listener is polled
  std::vector<ServerConn*> backlog;      // frames left after their turn's budget
  std::vector<ServerConn*> backlog_now;  // last turn's backlog, being served
  std::deque<ServerConn*> pending;       // thread 0: awaiting the handshake, oldest first
  std::unordered_map<uint32_t, uint32_t> pending_by_source;  // thread 0: their sources
  bool any_closed = false;    // a connection was closed this turn: reap
  int64_t next_sweep_ns = 0;  // next look for replies nobody reads

  // Accepted endpoints are bound to thread 0's event queue and to our completion queue:
  // close them before either (members would go in the opposite order).
  ~ServerThread() {
    conns.clear();
    rdm_peers.clear();
    if (listen_fd >= 0) close(listen_fd);
    if (epfd >= 0) close(epfd);
  }
  // Socket transport.
  void run_sock();
  void accept_sock();
  void read_sock(ServerConn& conn);
  bool flush_sock(ServerConn& conn);
  void close_sock(ServerConn& conn, CloseWhy why);
  void refuse_sock(ServerConn& conn, const Status& st, uint16_t opcode, uint64_t id, CloseWhy why);
  bool upgrade_sock(ServerConn& conn);
  void drop_pending(ServerConn& conn);
  void enforce_pending_caps(uint32_t source);
  ServerConn* cap_victim(uint32_t source);
  void sweep_sock();
  void reap_sock();
  void set_events(ServerConn& conn, uint32_t events);

  void run();
  void turn();
  void handle_eq();
  void handle_completion(const fi_cq_data_entry& e, fi_addr_t src);
  // `frame`: the received frame; null for the receive slot's buffer.
  void serve(ServerConn& conn, int slot, const fi_cq_data_entry& e, fi_addr_t src,
             std::byte* frame = nullptr);
  void post_recv(ServerConn& conn, int slot);
  void send(ServerConn& conn, int slot, fi_addr_t to, Kind kind, uint16_t opcode, uint32_t length,
            int32_t status, uint64_t id);
  void send_error(ServerConn& conn, int slot, fi_addr_t to, uint16_t opcode, uint64_t id,
                  const Status& st);
  // Answers kError(st) and closes the connection (forgets an rdm peer): fit_wire.h's rules.
  // `peer` null: an rdm sender we cannot address; its frame is dropped.
  void reject(ServerConn& conn, ServerConn* peer, int slot, fi_addr_t to, uint16_t opcode,
              uint64_t id, const Status& st);
  void count_new_connection(ServerConn& conn);
  void mark_authenticated(ServerConn& peer);
  void count_close(CloseWhy why);
  void enforce_ofi_caps(uint32_t source);
  void reap_closed();
  void reap_dead_rdm_peers();
};

void Node::Impl::ServerThread::turn() {
  now_ns = static_cast<int64_t>(monotonic_ns());
  if (pace->turn(now_ns)) node->counters.server_stalls.fetch_add(1, std::memory_order_relaxed);
}

void Node::Impl::ServerThread::count_new_connection(ServerConn& conn) {
  auto& c = node->counters;
  c.connections_accepted.fetch_add(1, std::memory_order_relaxed);
  c.connections_open.fetch_add(1, std::memory_order_relaxed);
  c.handshakes_pending.fetch_add(1, std::memory_order_relaxed);
  conn.open_gauge = &c.connections_open;
  conn.pending_gauge = &c.handshakes_pending;
  conn.pending_counted = true;
  conn.accepted_ns = now_ns;
}

void Node::Impl::ServerThread::mark_authenticated(ServerConn& peer) {
  peer.authenticated = true;
  node->counters.connections_authenticated.fetch_add(1, std::memory_order_relaxed);
  if (peer.pending_counted) {
    peer.pending_counted = false;
    peer.pending_gauge->fetch_sub(1, std::memory_order_relaxed);
  }
}

void Node::Impl::ServerThread::count_close(CloseWhy why) {
  auto& c = node->counters;
  switch (why) {
    case CloseWhy::kPeer:
      return;
    case CloseWhy::kRejected:
      c.closed_rejected.fetch_add(1, std::memory_order_relaxed);
      return;
    case CloseWhy::kHandshakeTimeout:
      c.closed_handshake_timeout.fetch_add(1, std::memory_order_relaxed);
      return;
    case CloseWhy::kCap:
      c.closed_handshake_cap.fetch_add(1, std::memory_order_relaxed);
      return;
    case CloseWhy::kStalledReader:
      c.closed_stalled_reader.fetch_add(1, std::memory_order_relaxed);
      return;
  }
}

void Node::Impl::ServerThread::post_recv(ServerConn& conn, int slot) {
  if (node->sock) return;  // the socket transport frames its stream instead
  OpCtx& c = conn.recv_ctx[slot];
  std::byte* buf = conn.bufs->slot(kWindow + slot);
  for (;;) {
    ssize_t r =
        fi_recv(conn.ep, buf, conn.bufs->slot_bytes, conn.bufs->desc(), FI_ADDR_UNSPEC, &c.fi);
    if (r != -FI_EAGAIN) {
      if (r != 0) {
        fprintf(stderr, "lego-fit: %s: posting a receive failed: %s\n", node->who().c_str(),
                fi_strerror(static_cast<int>(-r)));
        conn.dead = true;
      }
      return;
    }
    fi_cq_data_entry e[8];
    ssize_t n = read_cq(cq.get(), e, 8, false, 0);
    for (ssize_t k = 0; k < n; k++) handle_completion(e[k], FI_ADDR_NOTAVAIL);
  }
}

void Node::Impl::ServerThread::send(ServerConn& conn, int slot, fi_addr_t to, Kind kind,
                                    uint16_t opcode, uint32_t length, int32_t status, uint64_t id) {
  std::byte* buf = conn.bufs->slot(slot);
  bool compact = !node->msg && kind == Kind::kReply;
  if (!compact)
    wire::encode_header({buf, kHeader}, kind, opcode, length, status, id, node->self.id);
  if (node->sock) {
    // Written from the send slot where it lies; what the socket does not take now waits
    // there (flush_sock), and the connection reads nothing more until it is out.
    node->counters.bytes_sent.fetch_add(length, std::memory_order_relaxed);
    conn.out = buf;
    conn.out_len = kHeader + length;
    conn.out_done = 0;
    conn.out_since_ns = now_ns;
    flush_sock(conn);
    return;
  }
  OpCtx& c = conn.send_ctx[slot];
  for (;;) {
    ssize_t r = compact ? fi_senddata(conn.ep, buf + kHeader, length, conn.bufs->desc(),
                                      wire::compact_data(kind, opcode, id), to, &c.fi)
                        : fi_send(conn.ep, buf, kHeader + length, conn.bufs->desc(), to, &c.fi);
    if (r == 0) {
      node->counters.bytes_sent.fetch_add(length, std::memory_order_relaxed);
      return;
    }
    if (r != -FI_EAGAIN) {
      // The connection is going away; the receive slot is reposted by nobody, which is
      // right for a dead connection.
      conn.dead = true;
      return;
    }
    fi_cq_data_entry e[8];
    ssize_t n = read_cq(cq.get(), e, 8, false, 0);
    for (ssize_t k = 0; k < n; k++) handle_completion(e[k], FI_ADDR_NOTAVAIL);
  }
}

void Node::Impl::ServerThread::send_error(ServerConn& conn, int slot, fi_addr_t to, uint16_t opcode,
                                          uint64_t id, const Status& st) {
  std::byte* payload = conn.bufs->slot(slot) + kHeader;
  size_t n = std::min(st.message().size(), conn.bufs->slot_bytes - kHeader);
  memcpy(payload, st.message().data(), n);
  send(conn, slot, to, Kind::kError, opcode, static_cast<uint32_t>(n), st.code(), id);
}

void Node::Impl::ServerThread::reject(ServerConn& conn, ServerConn* peer, int slot, fi_addr_t to,
                                      uint16_t opcode, uint64_t id, const Status& st) {
  node->counters.requests_rejected.fetch_add(1, std::memory_order_relaxed);
  // (FI_ADDR_NOTAVAIL is FI_ADDR_UNSPEC, which is what msg connections send to.)
  if (peer == nullptr || (!node->msg && to == FI_ADDR_NOTAVAIL)) {
    post_recv(conn, slot);  // rdm: a sender that never said hello cannot even be answered
    return;
  }
  if (node->sock) {
    refuse_sock(conn, st, opcode, id, CloseWhy::kRejected);
    return;
  }
  count_close(CloseWhy::kRejected);
  if (node->msg) {
    // Closed when the error's send completes (handle_completion), or after a second if a
    // peer that does not read keeps it from completing (reap_closed).
    peer->close_after_send = true;
    peer->close_by_ns = now_ns + 1'000'000'000;
    send_error(conn, slot, to, opcode, id, st);
  } else {
    send_error(conn, slot, to, opcode, id, st);
    peer->dead = true;  // forgotten by reap_dead_rdm_peers
  }
}

void Node::Impl::ServerThread::serve(ServerConn& conn, int slot, const fi_cq_data_entry& e,
                                     fi_addr_t src, std::byte* frame_at) {
  std::byte* in = frame_at != nullptr ? frame_at : conn.bufs->slot(kWindow + slot);
  size_t max_payload = node->config.max_message_bytes;
  bool compact = !node->msg && (e.flags & FI_REMOTE_CQ_DATA) != 0;
  auto frame = compact ? wire::decode_compact(e.data, {in, e.len}, max_payload, 0)
                       : wire::decode_frame({in, e.len}, max_payload);
  fi_addr_t to = node->msg ? FI_ADDR_UNSPEC : src;

  ServerConn* peer = &conn;
  if (!node->msg) {
    // rdm: find the peer's state by source address; a hello may come from an address we
    // have not inserted yet (FI_ADDR_NOTAVAIL).
    auto it = rdm_peers.find(src);
    peer = it == rdm_peers.end() ? nullptr : it->second.get();
    if (peer != nullptr && peer->dead) {
      post_recv(conn, slot);  // refused or evicted: forgotten at the next reap
      return;
    }
  }
  if (!frame) {
    reject(conn, peer, slot, to, 0, 0, frame.status().with_context(node->who()));
    return;
  }
  const FrameHeader& h = frame->header;
  node->counters.bytes_received.fetch_add(h.length, std::memory_order_relaxed);
  auto payload = frame->payload;
  const bool is_hello = h.kind == static_cast<uint8_t>(Kind::kHello);

  wire::HelloPayload hello{};
  if (is_hello && payload.size() == sizeof(hello)) memcpy(&hello, payload.data(), sizeof(hello));
  if (is_hello && !node->msg) {
    // rdm: a hello (re)starts the state kept for its sender's address: a client that
    // reconnects starts over.
    if (payload.size() != sizeof(hello) || hello.name_length == 0 ||
        hello.name_length > wire::kMaxShmName) {
      reject(conn, peer, slot, to, 0, h.request_id, Status(EPROTO, node->who() + ": bad hello"));
      return;
    }
    fi_addr_t addr = FI_ADDR_NOTAVAIL;
    int r = fi_av_insert(av.get(), hello.name, 1, &addr, 0, nullptr);
    if (r != 1) {
      post_recv(conn, slot);
      return;
    }
    auto& p = rdm_peers[addr];
    p = std::make_unique<ServerConn>();
    p->ep = rdm_ep.get();
    p->addr = addr;
    p->bufs = rdm_bufs.get();
    count_new_connection(*p);
    peer = p.get();
    to = addr;
    enforce_ofi_caps(0);
  }
  if (peer == nullptr) {
    // rdm sender that never said hello: we cannot even address a reply.
    reject(conn, nullptr, slot, to, 0, 0, Status(EACCES, "no hello"));
    return;
  }
  Status admitted = admit(*peer, h.kind, node->who());
  if (!admitted) {
    if (!peer->authenticated) {
      log_peer_trouble(node->who() +
                       ": closed a connection that broke the handshake: " + admitted.message());
    }
    reject(conn, peer, slot, to, h.opcode, h.request_id, admitted);
    return;
  }

  if (is_hello) {
    if (payload.size() != sizeof(wire::HelloPayload)) {
      reject(conn, peer, slot, to, 0, h.request_id, Status(EPROTO, node->who() + ": bad hello"));
      return;
    }
    peer->said_hello = true;
    peer->client = hello.client_node;
    peer->pid = static_cast<pid_t>(hello.pid);
    memcpy(peer->client_nonce, hello.client_nonce, wire::kNonceBytes);
    auth::make_nonce(peer->server_nonce);
    peer->challenged = true;
    wire::ChallengePayload ch{};
    ch.server_node = node->self.id;
    ch.pid = static_cast<uint32_t>(getpid());
    memcpy(ch.server_nonce, peer->server_nonce, wire::kNonceBytes);
    auth::prove(node->config.key, auth::Direction::kServerToClient, peer->client_nonce,
                peer->server_nonce, peer->client, node->self.id, ch.server_proof);
    memcpy(conn.bufs->slot(slot) + kHeader, &ch, sizeof(ch));
    send(conn, slot, to, Kind::kChallenge, 0, sizeof(ch), 0, h.request_id);
    return;
  }

  if (h.kind == static_cast<uint8_t>(Kind::kProof)) {
    wire::ProofPayload proof{};
    bool ok = payload.size() == sizeof(proof);
    if (ok) {
      memcpy(&proof, payload.data(), sizeof(proof));
      ok = auth::verify(node->config.key, auth::Direction::kClientToServer, peer->client_nonce,
                        peer->server_nonce, peer->client, node->self.id, proof.client_proof);
    }
    peer->challenged = false;
    if (!ok) {
      node->counters.auth_failures.fetch_add(1, std::memory_order_relaxed);
      log_peer_trouble(node->who() + ": refused node " + std::to_string(peer->client) +
                       ": it does not hold the cluster key");
      reject(conn, peer, slot, to, 0, h.request_id,
             Status(EACCES, node->who() + " refused the connection: wrong cluster key"));
      return;
    }
    mark_authenticated(*peer);
    peer->just_authenticated = node->sock;
    send(conn, slot, to, Kind::kWelcome, 0, 0, 0, h.request_id);
    return;
  }

  // A request from an authenticated peer (admit() let nothing else through).
  if (node->sock && (h.opcode == kSockRmaRead || h.opcode == kSockRmaWrite)) {
    std::span<std::byte> reply{conn.bufs->slot(slot) + kHeader, max_payload};
    Result<size_t> r = node->serve_sock_rma(h.opcode, payload, reply);
    if (!r) {
      send_error(conn, slot, to, h.opcode, h.request_id, r.status());
    } else {
      send(conn, slot, to, Kind::kReply, h.opcode, static_cast<uint32_t>(r.value()), 0,
           h.request_id);
    }
    return;
  }
  auto handler = node->handlers.find(h.opcode);
  if (handler == node->handlers.end()) {
    node->counters.requests_rejected.fetch_add(1, std::memory_order_relaxed);
    send_error(
        conn, slot, to, h.opcode, h.request_id,
        Status(EOPNOTSUPP, node->who() + " has no handler for opcode " + std::to_string(h.opcode)));
    return;
  }
  std::span<std::byte> reply{conn.bufs->slot(slot) + kHeader, max_payload};
  RpcContext ctx{peer->client, h.opcode};
  Result<size_t> r = handler->second(ctx, payload, reply);
  node->counters.requests_served.fetch_add(1, std::memory_order_relaxed);
  if (!r) {
    send_error(conn, slot, to, h.opcode, h.request_id, r.status());
  } else if (r.value() > max_payload) {
    send_error(conn, slot, to, h.opcode, h.request_id,
               Status(EMSGSIZE, "handler for opcode " + std::to_string(h.opcode) +
                                    " returned more than max_message_bytes"));
  } else {
    send(conn, slot, to, Kind::kReply, h.opcode, static_cast<uint32_t>(r.value()), 0, h.request_id);
  }
}

void Node::Impl::ServerThread::handle_completion(const fi_cq_data_entry& e, fi_addr_t src) {
  auto* c = static_cast<OpCtx*>(e.op_context);
  auto* conn = static_cast<ServerConn*>(c->owner);
  if (conn->dead && node->msg) return;  // reaped soon; nothing to do for it
  if (c->type == OpType::kRecv) {
    serve(*conn, c->index, e, src);
  } else if (c->type == OpType::kSend) {
    if (conn->close_after_send) {
      conn->dead = true;
      return;
    }
    post_recv(*conn, c->index);  // the pair's send buffer is free again
  }
}

namespace {
// Which of two connections awaiting the handshake a cap closes first: one that has not
// said hello before one that has (an honest client says hello at once), then the older.
bool evict_first(const ServerConn& a, const ServerConn& b) {
  if (a.said_hello != b.said_hello) return !a.said_hello;
  return a.accepted_ns < b.accepted_ns;
}
}  // namespace

// The libfabric transports' caps on connections (rdm: peers) awaiting the handshake: over
// one, the oldest such is closed (marked dead; its owner thread closes it). `source`: the
// newcomer's IPv4 address, 0 when unknown. Connections are spread over the threads when
// they connect, so this looks at every thread's (under each one's mu); rdm peers all
// belong to thread 0. No error frame: the owner's send slots are not ours to use.
void Node::Impl::ServerThread::enforce_ofi_caps(uint32_t source) {
  for (;;) {
    ServerConn* oldest = nullptr;
    ServerConn* oldest_same = nullptr;
    ServerThread* oldest_owner = nullptr;
    ServerThread* oldest_same_owner = nullptr;
    size_t total = 0, same = 0;
    auto consider = [&](ServerThread& t, ServerConn& c) {
      if (c.dead || c.authenticated.load(std::memory_order_relaxed)) return;
      total++;
      if (oldest == nullptr || evict_first(c, *oldest)) {
        oldest = &c;
        oldest_owner = &t;
      }
      if (source != 0 && c.source == source) {
        same++;
        if (oldest_same == nullptr || evict_first(c, *oldest_same)) {
          oldest_same = &c;
          oldest_same_owner = &t;
        }
      }
    };
    if (node->msg) {
      for (auto& t : node->server_threads) {
        std::lock_guard<std::mutex> g(t->mu);
        for (auto& c : t->conns) consider(*t, *c);
      }
    } else {
      for (auto& [a, c] : rdm_peers) consider(*this, *c);
    }
    ServerConn* victim = nullptr;
    ServerThread* owner = nullptr;
    if (same > kMaxPendingPerSource) {
      victim = oldest_same;  // (the first to close: evict_first)
      owner = oldest_same_owner;
    } else if (total > kMaxPendingHandshakes) {
      victim = oldest;
      owner = oldest_owner;
    }
    if (victim == nullptr) return;
    if (node->msg) {
      // Its owner may have closed and freed it since we looked: only a connection still
      // in its list may be touched. (No other thread creates connections, so a pointer
      // found there is the one we chose.)
      std::lock_guard<std::mutex> g(owner->mu);
      auto& list = owner->conns;
      if (std::none_of(list.begin(), list.end(), [victim](const std::unique_ptr<ServerConn>& c) {
            return c.get() == victim;
          })) {
        continue;
      }
      victim->dead = true;
      owner->closing.push_back(victim);
    } else {
      victim->dead = true;  // rdm peers are this thread's alone
    }
    count_close(CloseWhy::kCap);
  }
}

void Node::Impl::ServerThread::handle_eq() {
  fi_eq_cm_entry entry{};
  uint32_t event = 0;
  ssize_t r = fi_eq_read(eq.get(), &event, &entry, sizeof(entry), 0);
  if (r == -FI_EAGAIN) return;
  if (r == -FI_EAVAIL) {
    fi_eq_err_entry err{};
    fi_eq_readerr(eq.get(), &err, 0);
    return;  // a connection attempt that failed; nothing was set up for it
  }
  if (r < 0) return;
  if (event == FI_CONNREQ) {
    ofi::InfoPtr info(entry.info);
    auto conn = std::make_unique<ServerConn>();
    // Spread connections over the server threads.
    static std::atomic<unsigned> next{0};
    ServerThread& owner = *node->server_threads[next++ % node->server_threads.size()];
    ofi::Domain& d = *node->server_domain;
    int ret = fi_endpoint(d.domain.get(), info.get(), conn->owned_ep.out(), nullptr);
    if (ret == 0) ret = fi_ep_bind(conn->owned_ep.get(), &eq.get()->fid, 0);
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
    Status st = ret == 0 ? conn->own_bufs->init(d, node->config.max_message_bytes, 0, 2 * kWindow)
                         : ofi::error(ret, "setting up an accepted endpoint");
    if (!st) {
      fprintf(stderr, "lego-fit: %s: %s\n", node->who().c_str(), st.message().c_str());
      fi_reject(pep.get(), info->handle, nullptr, 0);
      node->counters.accept_errors.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    conn->bufs = conn->own_bufs.get();
    for (int i = 0; i < kWindow; i++) {
      conn->send_ctx[i] = OpCtx{{}, conn.get(), OpType::kSend, static_cast<uint16_t>(i)};
      conn->recv_ctx[i] = OpCtx{{}, conn.get(), OpType::kRecv, static_cast<uint16_t>(i)};
    }
    if (info->dest_addr != nullptr && info->addr_format == FI_SOCKADDR_IN) {
      conn->source = static_cast<const sockaddr_in*>(info->dest_addr)->sin_addr.s_addr;
    }
    count_new_connection(*conn);
    ServerConn* raw = conn.get();
    const uint32_t source = conn->source;
    {
      std::lock_guard<std::mutex> g(owner.mu);
      owner.conns.push_back(std::move(conn));
    }
    // Receives go up before accept so the client's hello always finds one. Posting from
    // this thread is safe: the endpoint is FI_THREAD_SAFE and nothing else uses it yet.
    for (int i = 0; i < kWindow; i++) {
      ssize_t pr = fi_recv(raw->ep, raw->bufs->slot(kWindow + i), raw->bufs->slot_bytes,
                           raw->bufs->desc(), FI_ADDR_UNSPEC, &raw->recv_ctx[i].fi);
      if (pr != 0) raw->dead = true;
    }
    if (fi_accept(raw->ep, nullptr, 0) != 0) raw->dead = true;
    if (raw->dead) {
      std::lock_guard<std::mutex> g(owner.mu);
      owner.closing.push_back(raw);
    }
    enforce_ofi_caps(source);
  } else if (event == FI_SHUTDOWN) {
    for (auto& t : node->server_threads) {
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

void Node::Impl::ServerThread::reap_closed() {
  std::vector<ServerConn*> doomed;
  const int64_t deadline = handshake_deadline_ns(node->config);
  {
    std::lock_guard<std::mutex> g(mu);
    for (auto& c : conns) {
      if (!c->dead && !c->authenticated.load(std::memory_order_relaxed) &&
          now_ns - c->accepted_ns > deadline) {
        count_close(CloseWhy::kHandshakeTimeout);
        c->dead = true;
      }
      if (!c->dead && c->close_after_send && now_ns > c->close_by_ns) c->dead = true;
      if (c->dead && std::find(closing.begin(), closing.end(), c.get()) == closing.end()) {
        closing.push_back(c.get());  // refused or failed by this thread
      }
    }
    doomed.swap(closing);
  }
  if (doomed.empty()) return;
  for (ServerConn* c : doomed) {
    c->dead = true;
    c->owned_ep.reset();
  }
  // Completions already queued may still name the closed connections: serve the queue
  // dry (handle_completion skips dead connections) before freeing them.
  fi_cq_data_entry e[16];
  for (;;) {
    ssize_t n = read_cq(cq.get(), e, 16, false, 0);
    if (n == -FI_EAVAIL) {
      fi_cq_err_entry err{};
      fi_cq_readerr(cq.get(), &err, 0);
      continue;
    }
    if (n <= 0) break;
    for (ssize_t k = 0; k < n; k++) handle_completion(e[k], FI_ADDR_UNSPEC);
  }
  std::lock_guard<std::mutex> g(mu);
  conns.erase(std::remove_if(conns.begin(), conns.end(),
                             [&](const std::unique_ptr<ServerConn>& c) {
                               return std::find(doomed.begin(), doomed.end(), c.get()) !=
                                      doomed.end();
                             }),
              conns.end());
}

void Node::Impl::ServerThread::reap_dead_rdm_peers() {
  const int64_t deadline = handshake_deadline_ns(node->config);
  for (auto it = rdm_peers.begin(); it != rdm_peers.end();) {
    ServerConn& p = *it->second;
    if (!p.dead && !p.authenticated.load(std::memory_order_relaxed) &&
        now_ns - p.accepted_ns > deadline) {
      count_close(CloseWhy::kHandshakeTimeout);
      p.dead = true;
    }
    if (p.dead || pid_gone(p.pid)) {
      fi_addr_t a = it->first;
      fi_av_remove(av.get(), &a, 1, 0);
      it = rdm_peers.erase(it);
    } else {
      ++it;
    }
  }
}

void Node::Impl::ServerThread::run() {
  pace->start(static_cast<int64_t>(monotonic_ns()));
  if (node->sock) {
    run_sock();
    return;
  }
  fi_cq_data_entry e[16];
  fi_addr_t src[16];
  auto last_housekeeping = Clock::now();
  auto last_events = last_housekeeping;
  uint64_t spins = 0;
  IdlePoll idle;
  while (!node->stopping.load(std::memory_order_relaxed)) {
    bool rdm = !node->msg;
    ssize_t n =
        read_cq(cq.get(), e, 16, node->blocking && waitable, kBlockingSliceMs, rdm ? src : nullptr);
    if (n == -FI_EAVAIL) {
      fi_cq_err_entry err{};
      fi_cq_readerr(cq.get(), &err, 0);
      // A failed op belongs to a connection that is going away (msg), or to a client
      // that vanished (rdm); mark it so its slot is not reused blindly.
      if (err.op_context != nullptr) {
        auto* c = static_cast<OpCtx*>(err.op_context);
        auto* conn = static_cast<ServerConn*>(c->owner);
        if (node->msg) {
          conn->dead = true;
        } else {
          post_recv(*conn, c->index);  // the slot pair is free again
        }
      }
    } else if (n > 0) {
      for (ssize_t k = 0; k < n; k++) handle_completion(e[k], rdm ? src[k] : FI_ADDR_UNSPEC);
      idle.busy();
    } else {
      nap_if_needed(node->blocking, waitable, idle, kServerSpinNs);
    }
    // Connection events and reaping every 256 rounds or 5 ms, busy or not: a loaded
    // server must still accept new clients.
    // The clock is read every 16 rounds (as costly as a poll): a busy loop needs no more.
    // A blocking round may have waited kBlockingSliceMs: read it every round then, so the
    // pace (server_stalled) sees the loop turn.
    if ((++spins & 15) != 0 && n <= 0 && !node->blocking) continue;
    turn();
    auto now = Clock::now();
    if ((spins & 255) == 0 || now - last_events > std::chrono::milliseconds(kBlockingSliceMs)) {
      last_events = now;
      if (index == 0 && node->msg) handle_eq();
      if (node->msg) reap_closed();
      if (rdm && now - last_housekeeping > std::chrono::milliseconds(500)) {
        reap_dead_rdm_peers();
        last_housekeeping = now;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The socket transport's server. Thread 0 accepts and runs every handshake; an
// authenticated connection gets full-size buffers and moves to its serving thread (round
// robin). No call here waits for a peer: sockets are non-blocking, a reply the socket
// cannot take waits in its send slot (want_write), and each turn serves at most
// kFramesPerTurn frames of a connection and kAcceptsPerTurn new connections.

void Node::Impl::ServerThread::set_events(ServerConn& conn, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.ptr = &conn;
  epoll_ctl(epfd, EPOLL_CTL_MOD, conn.fd, &ev);
}

// Writes what the socket takes of the pending reply. True when all of it is out; false
// while some waits (epoll then reports room) or when the connection failed (closed).
bool Node::Impl::ServerThread::flush_sock(ServerConn& conn) {
  while (conn.out_done < conn.out_len) {
    ssize_t n = ::send(conn.fd, conn.out + conn.out_done, conn.out_len - conn.out_done,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      conn.out_done += static_cast<size_t>(n);
      conn.out_since_ns = now_ns;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!conn.want_write) {
        conn.want_write = true;
        set_events(conn, EPOLLOUT);
      }
      return false;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      close_sock(conn, CloseWhy::kPeer);
      return false;
    }
  }
  conn.out = nullptr;
  conn.out_len = conn.out_done = 0;
  if (conn.want_write) {
    conn.want_write = false;
    set_events(conn, EPOLLIN);
  }
  return true;
}

void Node::Impl::ServerThread::drop_pending(ServerConn& conn) {
  if (!conn.in_pending_list) return;
  conn.in_pending_list = false;
  auto it = std::find(pending.begin(), pending.end(), &conn);
  if (it != pending.end()) pending.erase(it);
  if (conn.source != 0) {
    auto s = pending_by_source.find(conn.source);
    if (s != pending_by_source.end() && --s->second == 0) pending_by_source.erase(s);
  }
}

void Node::Impl::ServerThread::close_sock(ServerConn& conn, CloseWhy why) {
  if (conn.dead) return;
  conn.dead = true;
  any_closed = true;
  count_close(why);
  epoll_ctl(epfd, EPOLL_CTL_DEL, conn.fd, nullptr);
  drop_pending(conn);
  if (why != CloseWhy::kPeer && why != CloseWhy::kStalledReader) {
    // Read (and drop) what the peer sent that we will never look at: closing a socket with
    // unread bytes sends a reset, which can destroy the error frame just sent before the
    // peer reads it. Bounded: a peer that keeps sending gets its reset.
    std::byte sink[4096];
    for (int i = 0; i < 16 && recv(conn.fd, sink, sizeof sink, MSG_DONTWAIT) > 0; i++) {
    }
  }
  // The descriptor and buffers go when reap_sock frees the connection, this turn.
}

void Node::Impl::ServerThread::refuse_sock(ServerConn& conn, const Status& st, uint16_t opcode,
                                           uint64_t id, CloseWhy why) {
  if (conn.dead) return;
  if (conn.out == nullptr) {
    // One try, without waiting: a peer that does not read will not read this either.
    std::byte* buf = conn.bufs->slot(0);
    size_t n = std::min(st.message().size(), conn.bufs->slot_bytes - kHeader);
    memcpy(buf + kHeader, st.message().data(), n);
    wire::encode_header({buf, kHeader}, Kind::kError, opcode, static_cast<uint32_t>(n), st.code(),
                        id, node->self.id);
    (void)!::send(conn.fd, buf, kHeader + n, MSG_NOSIGNAL | MSG_DONTWAIT);
  }
  close_sock(conn, why);
}

// Over a cap on connections awaiting the handshake, the oldest goes, silent ones first
// (fit_wire.h). The pending connection a cap closes: of those from `source` (0: of all), the oldest
// that has not said hello, else the oldest. An honest client says hello the moment it connects and
// is done a round trip later, so it is never the oldest silent connection; a peer sharing its
// address (the same host) that holds slots with silent connections loses those first. pending is
// oldest first and holds at least one match when called.
ServerConn* Node::Impl::ServerThread::cap_victim(uint32_t source) {
  ServerConn* oldest = nullptr;
  for (ServerConn* c : pending) {
    if (source != 0 && c->source != source) continue;
    if (!c->said_hello) return c;
    if (oldest == nullptr) oldest = c;
  }
  return oldest;
}

void Node::Impl::ServerThread::enforce_pending_caps(uint32_t source) {
  auto same = pending_by_source.find(source);
  while (source != 0 && same != pending_by_source.end() && same->second > kMaxPendingPerSource) {
    refuse_sock(*cap_victim(source),
                Status(EAGAIN, node->who() + ": too many connections from one address "
                                             "awaiting the handshake; this, the oldest, is closed"),
                0, 0, CloseWhy::kCap);
    same = pending_by_source.find(source);
  }
  while (pending.size() > kMaxPendingHandshakes) {
    refuse_sock(*cap_victim(0),
                Status(EAGAIN, node->who() + ": too many connections awaiting the handshake; "
                                             "this, the oldest, is closed"),
                0, 0, CloseWhy::kCap);
  }
}

void Node::Impl::ServerThread::accept_sock() {
  for (int k = 0; k < kAcceptsPerTurn; k++) {
    sockaddr_in from{};
    socklen_t from_len = sizeof(from);
    int fd = accept4(listen_fd, reinterpret_cast<sockaddr*>(&from), &from_len,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;    // all accepted
      if (errno == EINTR || errno == ECONNABORTED) continue;  // that one gave up
      const int err = errno;
      node->counters.accept_errors.fetch_add(1, std::memory_order_relaxed);
      // Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), or worse: give
      // back the oldest handshake's descriptor, and stop polling the listener for a while
      // (the connection waiting in the backlog would report it ready again at once).
      if (!pending.empty()) {
        refuse_sock(*cap_victim(0),
                    Status(EAGAIN, node->who() + ": out of descriptors; the oldest connection "
                                                 "awaiting the handshake is closed"),
                    0, 0, CloseWhy::kCap);
      }
      epoll_event ev{};
      ev.events = 0;
      ev.data.ptr = nullptr;
      epoll_ctl(epfd, EPOLL_CTL_MOD, listen_fd, &ev);
      listen_paused_until = now_ns + kAcceptPauseNs;
      static std::atomic<int64_t> last_said{0};
      if (now_ns - last_said.load() > 10'000'000'000) {  // at most every 10 s
        last_said = now_ns;
        fprintf(stderr, "lego-fit: %s: accepting a connection failed: %s (%llu open)\n",
                node->who().c_str(), strerror(err),
                static_cast<unsigned long long>(node->counters.connections_open.load()));
      }
      return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto conn = std::make_unique<ServerConn>();
    conn->fd = fd;
    conn->own_bufs = std::make_unique<SlotBuffers>();
    const size_t hs_slot = (kHeader + kHandshakeSlotPayload + 63) & ~size_t{63};
    if (!conn->own_bufs->init_plain(kHandshakeSlotPayload, 2 * hs_slot, 1)) {
      node->counters.accept_errors.fetch_add(1, std::memory_order_relaxed);
      continue;  // out of memory: the connection closes with `conn`
    }
    conn->bufs = conn->own_bufs.get();
    conn->in.reset(conn->bufs->rma(), conn->bufs->rma_bytes);
    const uint32_t source = from.sin_family == AF_INET ? from.sin_addr.s_addr : 0;
    conn->source = source;
    count_new_connection(*conn);
    conn->in_pending_list = true;
    pending.push_back(conn.get());
    if (conn->source != 0) pending_by_source[conn->source]++;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = conn.get();
    {
      std::lock_guard<std::mutex> g(mu);
      epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
      conns.push_back(std::move(conn));
    }
    enforce_pending_caps(source);
  }
}

// A connection just welcomed: full-size buffers, and its serving thread. False when it
// was closed or now belongs to another thread (the caller must not touch it then).
bool Node::Impl::ServerThread::upgrade_sock(ServerConn& conn) {
  conn.just_authenticated = false;
  drop_pending(conn);
  if (conn.in.buffered() > 0) {
    refuse_sock(conn, Status(EPROTO, node->who() + ": the client sent data before it was welcomed"),
                0, 0, CloseWhy::kRejected);
    return false;
  }
  const size_t max = node->config.max_message_bytes;
  const size_t slot = (kHeader + max + 63) & ~size_t{63};
  auto big = std::make_unique<SlotBuffers>();
  if (!big->init_plain(max, 2 * slot, 1)) {
    fprintf(stderr, "lego-fit: %s: out of memory for node %u's connection buffers\n",
            node->who().c_str(), conn.client);
    close_sock(conn, CloseWhy::kPeer);
    return false;
  }
  if (conn.out != nullptr) {  // the welcome, not all written yet
    const size_t left = conn.out_len - conn.out_done;
    memcpy(big->slot(0), conn.out + conn.out_done, left);
    conn.out = big->slot(0);
    conn.out_len = left;
    conn.out_done = 0;
  }
  conn.own_bufs = std::move(big);  // the handshake page goes back
  conn.bufs = conn.own_bufs.get();
  conn.in.reset(conn.bufs->rma(), conn.bufs->rma_bytes);

  static std::atomic<unsigned> next{0};
  ServerThread& owner = *node->server_threads[next++ % node->server_threads.size()];
  if (&owner == this) return true;
  epoll_ctl(epfd, EPOLL_CTL_DEL, conn.fd, nullptr);
  std::unique_ptr<ServerConn> moving;
  {
    std::lock_guard<std::mutex> g(mu);
    auto it = std::find_if(conns.begin(), conns.end(),
                           [&](const std::unique_ptr<ServerConn>& c) { return c.get() == &conn; });
    moving = std::move(*it);
    conns.erase(it);
  }
  backlog.erase(std::remove(backlog.begin(), backlog.end(), &conn), backlog.end());
  std::replace(backlog_now.begin(), backlog_now.end(), &conn, static_cast<ServerConn*>(nullptr));
  epoll_event ev{};
  ev.events = conn.want_write ? EPOLLOUT : EPOLLIN;
  ev.data.ptr = &conn;
  std::lock_guard<std::mutex> g(owner.mu);
  epoll_ctl(owner.epfd, EPOLL_CTL_ADD, conn.fd, &ev);
  owner.conns.push_back(std::move(moving));
  return false;
}

// Serves what the connection sent, at most kFramesPerTurn frames. Every header is judged
// as soon as it is in (wire::check_header and admit), before its payload is waited for.
void Node::Impl::ServerThread::read_sock(ServerConn& conn) {
  int served = 0;
  bool drained = false;  // the last read emptied the socket
  for (;;) {
    while (!conn.dead && conn.out == nullptr && conn.in.buffered() >= kHeader) {
      FrameHeader h;
      memcpy(&h, conn.in.front(), kHeader);
      const bool authed = conn.authenticated.load(std::memory_order_relaxed);
      Status st = wire::check_header(
          h, authed ? node->config.max_message_bytes : wire::kMaxHandshakePayload);
      if (st) st = admit(conn, h.kind, node->who());
      if (!st) {
        if (!authed) {
          log_peer_trouble(node->who() +
                           ": closed a connection that broke the handshake: " + st.message());
        }
        node->counters.requests_rejected.fetch_add(1, std::memory_order_relaxed);
        refuse_sock(conn, st.with_context(node->who()), h.opcode, h.request_id,
                    CloseWhy::kRejected);
        return;
      }
      const size_t total = kHeader + h.length;
      if (conn.in.buffered() < total) break;  // the rest is yet to come
      if (served == kFramesPerTurn) {
        backlog.push_back(&conn);  // more next turn, whether or not the socket has more
        return;
      }
      // Served where it lies in the stream buffer (no copy); the reply goes to send slot 0.
      fi_cq_data_entry e{};
      e.len = total;
      serve(conn, 0, e, FI_ADDR_UNSPEC, conn.in.data + conn.in.head);
      conn.in.head += total;
      served++;
      if (conn.just_authenticated && !upgrade_sock(conn)) return;
    }
    // A read that did not fill the buffer emptied the socket: asking again would only
    // return EAGAIN (a system call per request; epoll is level-triggered and reports
    // bytes that came since).
    if (conn.dead || conn.out != nullptr || drained) return;
    const size_t room = conn.in.cap - conn.in.buffered();
    ssize_t n = recv_some(conn.fd, conn.in);
    if (n < 0) {
      close_sock(conn, CloseWhy::kPeer);
      return;
    }
    if (n == 0) return;
    drained = static_cast<size_t>(n) < room;
  }
}

void Node::Impl::ServerThread::sweep_sock() {
  // A reply its peer does not read for timeout_ms (an honest client reads its replies:
  // it has at most max_outstanding() requests out, and waits for them).
  const int64_t limit =
      std::chrono::duration_cast<std::chrono::nanoseconds>(node->config.timeout).count();
  std::lock_guard<std::mutex> g(mu);
  for (auto& c : conns) {
    if (!c->dead && c->out != nullptr && now_ns - c->out_since_ns > limit) {
      close_sock(*c, CloseWhy::kStalledReader);
    }
  }
}

void Node::Impl::ServerThread::reap_sock() {
  any_closed = false;
  backlog.erase(
      std::remove_if(backlog.begin(), backlog.end(), [](ServerConn* c) { return c->dead.load(); }),
      backlog.end());
  std::vector<std::unique_ptr<ServerConn>> doomed;  // freed outside the lock
  std::lock_guard<std::mutex> g(mu);
  for (auto& c : conns) {
    if (c->dead) doomed.push_back(std::move(c));
  }
  conns.erase(std::remove(conns.begin(), conns.end(), nullptr), conns.end());
}

void Node::Impl::ServerThread::run_sock() {
  epoll_event evs[16];
  IdlePoll idle;
  bool sleep = false;
  const int64_t deadline = handshake_deadline_ns(node->config);
  while (!node->stopping.load(std::memory_order_relaxed)) {
    const int wait = !backlog.empty() ? 0 : node->blocking || sleep ? kBlockingSliceMs : 0;
    int n = epoll_wait(epfd, evs, 16, wait);
    turn();
    if (n <= 0 && backlog.empty()) {
      sleep = !node->blocking && idle.should_sleep(kServerSpinNs);
    } else {
      idle.busy();
      sleep = false;
    }
    for (int i = 0; i < n; i++) {
      if (evs[i].data.ptr == nullptr) {
        accept_sock();
        continue;
      }
      auto* conn = static_cast<ServerConn*>(evs[i].data.ptr);
      if (conn->dead) continue;
      if (conn->out != nullptr && !flush_sock(*conn)) continue;
      read_sock(*conn);
    }
    backlog_now.swap(backlog);
    for (size_t i = 0; i < backlog_now.size(); i++) {  // read_sock may null entries
      ServerConn* conn = backlog_now[i];
      if (conn != nullptr && !conn->dead && conn->out == nullptr) read_sock(*conn);
    }
    backlog_now.clear();
    if (index == 0) {
      while (!pending.empty() && now_ns - pending.front()->accepted_ns > deadline) {
        refuse_sock(
            *pending.front(),
            Status(ETIMEDOUT, node->who() + ": the connection handshake did not end within " +
                                  std::to_string(deadline / 1000000) + " ms"),
            0, 0, CloseWhy::kHandshakeTimeout);
      }
      if (listen_paused_until != 0 && now_ns >= listen_paused_until) {
        listen_paused_until = 0;
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.ptr = nullptr;
        epoll_ctl(epfd, EPOLL_CTL_MOD, listen_fd, &ev);
      }
    }
    if (now_ns >= next_sweep_ns) {
      sweep_sock();
      next_sweep_ns = now_ns + 100'000'000;
    }
    if (any_closed) reap_sock();
  }
}

Result<size_t> Node::Impl::serve_sock_rma(uint16_t opcode, std::span<const std::byte> req,
                                          std::span<std::byte> reply) {
  SockRmaRequest r;
  if (req.size() < sizeof(r)) return Status(EPROTO, who() + ": short one-sided request");
  memcpy(&r, req.data(), sizeof(r));
  bool write = opcode == kSockRmaWrite;
  if ((write && req.size() != sizeof(r) + r.length) || (!write && r.length > reply.size())) {
    return Status(EPROTO, who() + ": malformed one-sided request");
  }
  std::lock_guard<std::mutex> g(regions_mu);
  auto it = sock_regions.find(r.key);
  auto base = it == sock_regions.end() ? 0 : reinterpret_cast<uint64_t>(it->second.data);
  if (it == sock_regions.end() || r.addr < base || r.length > it->second.size ||
      r.addr - base > it->second.size - r.length) {
    return Status(EACCES, who() + ": no registered region holds that key and range");
  }
  if (write && !it->second.writable) return Status(EACCES, who() + ": the region is read-only");
  std::byte* at = reinterpret_cast<std::byte*>(r.addr);
  if (write) {
    memcpy(at, req.data() + sizeof(r), r.length);
    return size_t{0};
  }
  memcpy(reply.data(), at, r.length);
  return static_cast<size_t>(r.length);
}

Status Node::Impl::listen() {
  if (sock) {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    addrinfo* ai = nullptr;
    std::string port = std::to_string(self.port);
    int gr = getaddrinfo(self.address.c_str(), port.c_str(), &hints, &ai);
    if (gr != 0) {
      return Status(EADDRNOTAVAIL,
                    who() + ": cannot resolve " + self.address + ": " + gai_strerror(gr));
    }
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    int br = fd < 0 ? -1 : bind(fd, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    // A deep accept queue: under a burst of connections (or a peer opening thousands) the
    // kernel drops SYNs once it is full, and a dropped client retries only after 1 s.
    if (br != 0 || ::listen(fd, SOMAXCONN) != 0) {
      int e = errno;
      if (fd >= 0) close(fd);
      return Status::from_errno(e, who() + ": listen on " + self.address + ":" + port);
    }
    int threads = std::max(1, self.server_threads);
    for (int i = 0; i < threads; i++) {
      auto t = std::make_unique<ServerThread>();
      t->node = this;
      t->index = i;
      t->pace = &paces[i];
      t->epfd = epoll_create1(EPOLL_CLOEXEC);
      if (t->epfd < 0) {
        close(fd);
        return Status::from_errno(errno, who() + ": epoll_create1");
      }
      server_threads.push_back(std::move(t));
    }
    ServerThread& t0 = *server_threads[0];
    t0.listen_fd = fd;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = nullptr;  // the listening socket
    epoll_ctl(t0.epfd, EPOLL_CTL_ADD, fd, &ev);
    start_server_threads();
    return Status();
  }
  std::string service = self.port ? std::to_string(self.port) : "";
  std::string nodename = self.address;
  if (!msg && service.empty()) service = "0";
  auto info = ofi::get_info(self.provider, nodename, service, true);
  if (!info) return info.status().with_context(who() + ": listen");
  auto dom = ofi::Domain::open(std::move(info.value()));
  if (!dom) return dom.status().with_context(who() + ": listen");
  server_domain = std::move(dom.value());
  ofi::Domain& d = *server_domain;
  int threads = msg ? std::max(1, self.server_threads) : 1;
  for (int i = 0; i < threads; i++) {
    auto t = std::make_unique<ServerThread>();
    t->node = this;
    t->index = i;
    t->pace = &paces[i];
    LEGO_RETURN_IF_ERROR(open_cq(d, blocking, 4 * kWindow * 64, t->cq, &t->waitable));
    server_threads.push_back(std::move(t));
  }
  ServerThread& t0 = *server_threads[0];
  int ret;
  if (msg) {
    fi_eq_attr eq_attr{};
    eq_attr.wait_obj = FI_WAIT_NONE;
    ret = fi_eq_open(d.fabric.get(), &eq_attr, t0.eq.out(), nullptr);
    if (ret != 0) return ofi::error(ret, who() + ": fi_eq_open");
    ret = fi_passive_ep(d.fabric.get(), d.info.get(), t0.pep.out(), nullptr);
    if (ret != 0) return ofi::error(ret, who() + ": fi_passive_ep");
    ret = fi_pep_bind(t0.pep.get(), &t0.eq.get()->fid, 0);
    if (ret != 0) return ofi::error(ret, who() + ": fi_pep_bind");
    ret = fi_listen(t0.pep.get());
    if (ret != 0) {
      return ofi::error(ret, who() + ": listen on " + self.address + ":" + service);
    }
  } else {
    fi_av_attr av_attr{};
    av_attr.type = FI_AV_MAP;
    ret = fi_av_open(d.domain.get(), &av_attr, t0.av.out(), nullptr);
    if (ret != 0) return ofi::error(ret, who() + ": fi_av_open");
    ret = fi_endpoint(d.domain.get(), d.info.get(), t0.rdm_ep.out(), nullptr);
    if (ret == 0) ret = fi_ep_bind(t0.rdm_ep.get(), &t0.av.get()->fid, 0);
    if (ret == 0) ret = fi_ep_bind(t0.rdm_ep.get(), &t0.cq.get()->fid, FI_TRANSMIT | FI_RECV);
    if (ret == 0) ret = fi_enable(t0.rdm_ep.get());
    if (ret != 0) return ofi::error(ret, who() + ": opening the shm endpoint");
    t0.rdm_bufs = std::make_unique<SlotBuffers>();
    LEGO_RETURN_IF_ERROR(t0.rdm_bufs->init(d, config.max_message_bytes, 0, 2 * kWindow));
    ServerConn& any = t0.rdm_any;
    any.ep = t0.rdm_ep.get();
    any.bufs = t0.rdm_bufs.get();
    for (int i = 0; i < kWindow; i++) {
      any.send_ctx[i] = OpCtx{{}, &any, OpType::kSend, static_cast<uint16_t>(i)};
      any.recv_ctx[i] = OpCtx{{}, &any, OpType::kRecv, static_cast<uint16_t>(i)};
      t0.post_recv(any, i);
    }
  }
  start_server_threads();
  return Status();
}

void Node::Impl::start_server_threads() {
  const int64_t now = static_cast<int64_t>(monotonic_ns());
  for (auto& t : server_threads) t->pace->start(now);
  pace_count.store(static_cast<int>(server_threads.size()), std::memory_order_release);
  for (auto& t : server_threads) t->thread = std::thread([tp = t.get()] { tp->run(); });
}

int64_t Node::Impl::stalled_ns() const {
  const int64_t now = static_cast<int64_t>(monotonic_ns());
  int64_t sum = retired_stall_ns.load(std::memory_order_acquire);
  const int n = pace_count.load(std::memory_order_acquire);
  for (int i = 0; i < n; i++) sum += paces[i].stalled(now);
  return sum;
}

// ---------------------------------------------------------------------------------------
// Client implementation

Result<ClientChannel*> Node::Impl::channel_for(NodeId peer, std::unique_lock<std::mutex>& lock) {
  std::vector<std::unique_ptr<ClientChannel>>* chans;
  {
    std::lock_guard<std::mutex> g(peers_mu);
    auto it = peers.find(peer);
    if (it == peers.end()) {
      if (config.find(peer) == nullptr) {
        return Status(EHOSTUNREACH, who() + ": node " + std::to_string(peer) +
                                        " is not in the cluster file " + config.origin);
      }
      auto& v = peers[peer];
      for (int i = 0; i < config.channels_per_peer; i++) {
        auto ch = std::make_unique<ClientChannel>();
        ch->peer = peer;
        ch->index = i;
        v.push_back(std::move(ch));
      }
      it = peers.find(peer);
    }
    chans = &it->second;
  }
  // A thread keeps to one channel; if another thread holds it, take any free one.
  static std::atomic<unsigned> next_hint{0};
  thread_local unsigned hint = next_hint++;
  size_t n = chans->size();
  for (size_t k = 0; k < n; k++) {
    ClientChannel* ch = (*chans)[(hint + k) % n].get();
    std::unique_lock<std::mutex> l(ch->mu, std::try_to_lock);
    if (l.owns_lock()) {
      lock = std::move(l);
      return ch;
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

Status Node::Impl::post_recv(ClientChannel& ch, int i) {
  if (sock) return Status();  // the socket transport frames its stream instead
  for (;;) {
    ssize_t r = fi_recv(ch.ep.get(), ch.bufs.slot(kWindow + i), ch.bufs.slot_bytes, ch.bufs.desc(),
                        ch.dest, &ch.recv_ctx[i].fi);
    if (r == 0) return Status();
    if (r != -FI_EAGAIN) return ofi::error(r, who() + ": posting a receive");
    LEGO_RETURN_IF_ERROR(progress(ch, 0));
  }
}

Status Node::Impl::post_frame(ClientChannel& ch, int slot, Kind kind, uint16_t opcode,
                              std::span<const std::byte> payload, uint64_t id, bool caller_keeps) {
  std::byte* buf = ch.bufs.slot(slot);
  bool compact = !msg && kind == Kind::kRequest;
  if (!compact) {
    wire::encode_header({buf, kHeader}, kind, opcode, static_cast<uint32_t>(payload.size()), 0, id,
                        self.id);
  }
  // A compact frame no larger than the provider's inject size is copied by the provider
  // when posted, so it can go straight from the caller's buffer (one 4 KiB copy less); so
  // can a larger one whose caller keeps it until the send completes (PendingCall::zero_copy).
  const bool from_caller =
      compact && !ch.domain->local_mr && !payload.empty() &&
      (caller_keeps || payload.size() <= ch.domain->info->tx_attr->inject_size);
  if (sock) {
    // The payload goes from the caller's buffer: send_reply does not return before it is
    // in the socket.
    int e = send_all2(ch.fd, buf, kHeader, payload.data(), payload.size(),
                      static_cast<int>(config.timeout.count()));
    if (e != 0) {
      Status st(e == ETIMEDOUT ? ETIMEDOUT : ECONNRESET,
                who() + ": sending to node " + std::to_string(ch.peer) + ": " + strerror(e));
      fail_channel(ch, st);
      return st;
    }
    counters.bytes_sent.fetch_add(payload.size(), std::memory_order_relaxed);
    return Status();
  }
  if (!payload.empty() && !from_caller) memcpy(buf + kHeader, payload.data(), payload.size());
  ch.slots[slot].send_pending = true;
  for (;;) {
    ssize_t r =
        compact ? fi_senddata(ch.ep.get(),
                              from_caller ? const_cast<std::byte*>(payload.data()) : buf + kHeader,
                              payload.size(), from_caller ? nullptr : ch.bufs.desc(),
                              wire::compact_data(kind, opcode, id), ch.dest, &ch.send_ctx[slot].fi)
                : fi_send(ch.ep.get(), buf, kHeader + payload.size(), ch.bufs.desc(), ch.dest,
                          &ch.send_ctx[slot].fi);
    if (r == 0) break;
    if (r != -FI_EAGAIN) {
      ch.slots[slot].send_pending = false;
      Status st = ofi::error(r, who() + ": sending to node " + std::to_string(ch.peer));
      if (r == -FI_ENOTCONN || r == -FI_ECONNRESET || r == -EPIPE) {
        st = Status(ECONNRESET,
                    who() + ": node " + std::to_string(ch.peer) + " closed the connection");
      }
      fail_channel(ch, st);
      return st;
    }
    LEGO_RETURN_IF_ERROR(progress(ch, 0));
  }
  counters.bytes_sent.fetch_add(payload.size(), std::memory_order_relaxed);
  return Status();
}

void Node::Impl::on_client_recv(ClientChannel& ch, const fi_cq_data_entry& e, int i,
                                std::byte* frame_at) {
  std::byte* buf = frame_at != nullptr ? frame_at : ch.bufs.slot(kWindow + i);
  bool compact = !msg && (e.flags & FI_REMOTE_CQ_DATA) != 0;
  auto frame = compact
                   ? wire::decode_compact(e.data, {buf, e.len}, config.max_message_bytes, ch.peer)
                   : wire::decode_frame({buf, e.len}, config.max_message_bytes);
  if (!frame) {
    fail_channel(
        ch, frame.status().with_context(who() + ": reply from node " + std::to_string(ch.peer)));
  } else {
    const FrameHeader& h = frame->header;
    counters.bytes_received.fetch_add(h.length, std::memory_order_relaxed);
    auto kind = static_cast<Kind>(h.kind);
    if (!ch.connected) {
      ch.have_control = true;
      ch.control_header = h;
      ch.control_payload.assign(frame->payload.begin(), frame->payload.end());
    } else if (kind == Kind::kReply || kind == Kind::kError) {
      for (auto& s : ch.slots) {
        // Compact frames carry the low 32 bits of the id; 16 calls in flight never wrap.
        if (!s.in_use || s.done ||
            static_cast<uint32_t>(s.id) != static_cast<uint32_t>(h.request_id)) {
          continue;
        }
        if (kind == Kind::kError) {
          std::string msg(reinterpret_cast<const char*>(frame->payload.data()),
                          frame->payload.size());
          int code = h.status > 0 ? h.status : EPROTO;
          s.status = Status(code, "node " + std::to_string(ch.peer) + ": " + msg);
        } else if (frame->payload.size() > s.reply.size()) {
          s.status = Status(EMSGSIZE, "reply of " + std::to_string(frame->payload.size()) +
                                          " bytes from node " + std::to_string(ch.peer) +
                                          " does not fit the " + std::to_string(s.reply.size()) +
                                          "-byte reply buffer");
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
      fail_channel(ch, Status(h.status > 0 ? h.status : EPROTO,
                              "node " + std::to_string(ch.peer) + " closed the connection"));
    }
  }
  Status st = post_recv(ch, i);
  if (!st) fail_channel(ch, st);
}

Status Node::Impl::progress_sock(ClientChannel& ch, int wait_ms) {
  if (blocking && wait_ms > 0) {
    pollfd p{ch.fd, POLLIN, 0};
    poll(&p, 1, wait_ms);
  }
  ssize_t n = recv_some(ch.fd, ch.in);
  if (n < 0) {
    Status st(ECONNRESET, who() + ": node " + std::to_string(ch.peer) + " went away (" +
                              strerror(static_cast<int>(-n)) + ")");
    fail_channel(ch, st);
    return st;
  }
  for (;;) {
    ssize_t total = next_frame(ch.in, config.max_message_bytes);
    if (total < 0) {
      Status st(EPROTO, who() + ": node " + std::to_string(ch.peer) +
                            " sent a frame longer than max_message_bytes");
      fail_channel(ch, st);
      return st;
    }
    if (total == 0) break;
    // Decoded straight from the stream buffer (the reply is copied once, into the caller's
    // buffer), then consumed.
    fi_cq_data_entry e{};
    e.len = static_cast<size_t>(total);
    on_client_recv(ch, e, 0, ch.in.data + ch.in.head);
    ch.in.head += static_cast<size_t>(total);
    if (!ch.broken.is_ok()) return ch.broken;
  }
  if (n > 0) {
    ch.idle.busy();
  } else if (n == 0 && !blocking && ch.idle.should_sleep(kSpinNs)) {
    // Spun past the budget: sleep until bytes arrive (or 1 ms, to re-check deadlines).
    pollfd p{ch.fd, POLLIN, 0};
    poll(&p, 1, 1);
  } else if (n == 0 && blocking) {
    nap_if_needed(blocking, true, ch.idle, kSpinNs);
  }
  return Status();
}

Status Node::Impl::progress(ClientChannel& ch, int wait_ms) {
  if (!ch.broken.is_ok()) return ch.broken;
  if (sock) return progress_sock(ch, wait_ms);
  fi_cq_data_entry e[8];
  ssize_t n = read_cq(ch.cq.get(), e, 8, blocking && ch.waitable, wait_ms);
  if (n > 0) {
    ch.idle.busy();
    for (ssize_t k = 0; k < n; k++) {
      auto* c = static_cast<OpCtx*>(e[k].op_context);
      if (c->type == OpType::kRecv) {
        on_client_recv(ch, e[k], c->index);
      } else if (c->type == OpType::kSend) {
        auto& s = ch.slots[c->index];
        s.send_pending = false;
        if (s.abandoned) s.in_use = s.abandoned = false;
      } else {
        ch.rma_done = true;
      }
    }
    return ch.broken;
  }
  if (n == -FI_EAVAIL) {
    fi_cq_err_entry err{};
    fi_cq_readerr(ch.cq.get(), &err, 0);
    if (err.op_context == &ch.rma_ctx.fi) {
      ch.rma_done = true;
      ch.rma_status = Status(err.err == FI_EACCES || err.err == EACCES ? EACCES : EIO,
                             who() + ": one-sided access to node " + std::to_string(ch.peer) +
                                 " failed: " + fi_strerror(err.err));
      return Status();
    }
    Status st(ECONNRESET, who() + ": connection to node " + std::to_string(ch.peer) +
                              " failed: " + fi_strerror(err.err));
    fail_channel(ch, st);
    return st;
  }
  if (n < 0) {
    Status st = ofi::error(n, who() + ": polling node " + std::to_string(ch.peer));
    fail_channel(ch, st);
    return st;
  }
  nap_if_needed(blocking, ch.waitable, ch.idle, kSpinNs);
  // Nothing arrived: now and then, check whether the peer is still there.
  if (blocking || (++ch.polls & 1023) == 0) {
    if (msg && ch.eq.get() != nullptr) {
      fi_eq_cm_entry entry{};
      uint32_t event = 0;
      ssize_t r = fi_eq_read(ch.eq.get(), &event, &entry, sizeof(entry), 0);
      if ((r >= 0 && event == FI_SHUTDOWN) || r == -FI_EAVAIL) {
        if (r == -FI_EAVAIL) {
          fi_eq_err_entry err{};
          fi_eq_readerr(ch.eq.get(), &err, 0);
        }
        Status st(ECONNRESET,
                  who() + ": node " + std::to_string(ch.peer) + " went away (connection closed)");
        fail_channel(ch, st);
        return st;
      }
    } else if (pid_gone(ch.peer_pid)) {
      Status st(ECONNRESET, who() + ": node " + std::to_string(ch.peer) + " (pid " +
                                std::to_string(ch.peer_pid) + ") went away");
      fail_channel(ch, st);
      return st;
    }
  }
  return Status();
}

Status Node::Impl::wait_control(ClientChannel& ch, Kind want, Clock::time_point deadline) {
  while (!ch.have_control) {
    if (Clock::now() > deadline) {
      return Status(ETIMEDOUT, who() + ": node " + std::to_string(ch.peer) +
                                   " did not answer the connection handshake");
    }
    LEGO_RETURN_IF_ERROR(progress(ch, kBlockingSliceMs));
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

Status Node::Impl::connect_msg(ClientChannel& ch, const NodeConfig& peer) {
  auto info = ofi::get_info(peer.provider, peer.address, std::to_string(peer.port), false);
  if (!info) return info.status();
  fi_info* fi = info->get();
  auto dom = ofi::Domain::open(ofi::InfoPtr(fi_dupinfo(fi)));
  if (!dom) return dom.status();
  ch.own_domain = std::move(dom.value());
  ch.domain = ch.own_domain.get();
  fi_eq_attr eq_attr{};
  eq_attr.wait_obj = FI_WAIT_UNSPEC;
  int ret = fi_eq_open(ch.domain->fabric.get(), &eq_attr, ch.eq.out(), nullptr);
  if (ret != 0) return ofi::error(ret, "fi_eq_open");
  LEGO_RETURN_IF_ERROR(open_cq(*ch.domain, blocking, 4 * kWindow, ch.cq, &ch.waitable));
  ret = fi_endpoint(ch.domain->domain.get(), fi, ch.ep.out(), nullptr);
  if (ret == 0) ret = fi_ep_bind(ch.ep.get(), &ch.eq.get()->fid, 0);
  if (ret == 0) ret = fi_ep_bind(ch.ep.get(), &ch.cq.get()->fid, FI_TRANSMIT | FI_RECV);
  if (ret == 0) ret = fi_enable(ch.ep.get());
  if (ret != 0) return ofi::error(ret, "opening an endpoint");
  LEGO_RETURN_IF_ERROR(
      ch.bufs.init(*ch.domain, config.max_message_bytes, config.max_message_bytes, 2 * kWindow));
  for (int i = 0; i < kWindow; i++) LEGO_RETURN_IF_ERROR(post_recv(ch, i));
  ret = fi_connect(ch.ep.get(), fi->dest_addr, nullptr, 0);
  if (ret != 0) return ofi::error(ret, "fi_connect");
  fi_eq_cm_entry entry{};
  uint32_t event = 0;
  ssize_t r = fi_eq_sread(ch.eq.get(), &event, &entry, sizeof(entry),
                          static_cast<int>(config.timeout.count()), 0);
  if (r == -FI_EAVAIL) {
    fi_eq_err_entry err{};
    fi_eq_readerr(ch.eq.get(), &err, 0);
    int code = err.err == FI_ECONNREFUSED || err.err == ECONNREFUSED ? ECONNREFUSED
                                                                     : (err.err ? err.err : EIO);
    return Status(code, std::string("connection refused or failed: ") + fi_strerror(err.err));
  }
  if (r == -FI_EAGAIN || r == -FI_ETIMEDOUT) return Status(ETIMEDOUT, "no answer to connect");
  if (r < 0) return ofi::error(r, "waiting for the connection");
  if (event != FI_CONNECTED) return Status(ECONNREFUSED, "connection not established");
  return Status();
}

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

Status Node::Impl::connect_rdm(ClientChannel& ch, const NodeConfig& peer) {
  if (!server_domain) {
    // A client-only node still needs a domain of its provider for its endpoints.
    auto info = ofi::get_info(self.provider, "", "", false);
    if (!info) return info.status();
    auto dom = ofi::Domain::open(std::move(info.value()));
    if (!dom) return dom.status();
    ch.own_domain = std::move(dom.value());
    ch.domain = ch.own_domain.get();
  } else {
    ch.domain = server_domain.get();
  }
  std::string service = peer.port ? std::to_string(peer.port) : "0";
  auto info = ofi::get_info(peer.provider, peer.address, service, false);
  if (!info) return info.status();
  fi_av_attr av_attr{};
  av_attr.type = FI_AV_MAP;
  int ret = fi_av_open(ch.domain->domain.get(), &av_attr, ch.av.out(), nullptr);
  if (ret != 0) return ofi::error(ret, "fi_av_open");
  LEGO_RETURN_IF_ERROR(open_cq(*ch.domain, blocking, 4 * kWindow, ch.cq, &ch.waitable));
  // shm names an endpoint's region in /dev/shm after its source address, by default
  // "<pid>:<uid>:<n>": an image that exec() replaced never closed its endpoints, so the new
  // image's names would collide with the old ones (EBUSY), or, were those removed, be
  // confused with them by the peers that mapped them. A source address unique to this
  // image makes names that never repeat.
  ofi::InfoPtr ep_info;
  if (peer.provider == "shm") {
    ep_info.reset(fi_dupinfo(ch.domain->info.get()));
    if (!ep_info) return Status(ENOMEM, "fi_dupinfo");
    std::string name = "fi_shm://" + shm_source_name();
    free(ep_info->src_addr);
    ep_info->src_addr = strdup(name.c_str());
    ep_info->src_addrlen = name.size() + 1;
    ep_info->addr_format = FI_ADDR_STR;
  }
  ret = fi_endpoint(ch.domain->domain.get(), ep_info ? ep_info.get() : ch.domain->info.get(),
                    ch.ep.out(), nullptr);
  if (ret == 0) ret = fi_ep_bind(ch.ep.get(), &ch.av.get()->fid, 0);
  if (ret == 0) ret = fi_ep_bind(ch.ep.get(), &ch.cq.get()->fid, FI_TRANSMIT | FI_RECV);
  if (ret == 0) ret = fi_enable(ch.ep.get());
  if (ret != 0) return ofi::error(ret, "opening an shm endpoint");
  if (fi_av_insert(ch.av.get(), info.value()->dest_addr, 1, &ch.dest, 0, nullptr) != 1) {
    return Status(EHOSTUNREACH,
                  "cannot resolve the shm address of node " + std::to_string(peer.id));
  }
  LEGO_RETURN_IF_ERROR(
      ch.bufs.init(*ch.domain, config.max_message_bytes, config.max_message_bytes, 2 * kWindow));
  for (int i = 0; i < kWindow; i++) LEGO_RETURN_IF_ERROR(post_recv(ch, i));
  return Status();
}

Status Node::Impl::connect_sock(ClientChannel& ch, const NodeConfig& peer) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* ai = nullptr;
  std::string port = std::to_string(peer.port);
  int gr = getaddrinfo(peer.address.c_str(), port.c_str(), &hints, &ai);
  if (gr != 0) return Status(EHOSTUNREACH, std::string("cannot resolve: ") + gai_strerror(gr));
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(ai);
    return Status::from_errno(errno, "socket");
  }
  int r = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
  freeaddrinfo(ai);
  if (r != 0 && errno != EINPROGRESS) {
    int e = errno;
    close(fd);
    return Status::from_errno(e, "connect");
  }
  pollfd p{fd, POLLOUT, 0};
  if (r != 0 && poll(&p, 1, static_cast<int>(config.timeout.count())) != 1) {
    close(fd);
    return Status(ETIMEDOUT, "no answer to connect");
  }
  int err = 0;
  socklen_t len = sizeof(err);
  getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) {
    close(fd);
    return Status::from_errno(err, "connect");
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  ch.fd = fd;
  LEGO_RETURN_IF_ERROR(
      ch.bufs.init_plain(config.max_message_bytes, config.max_message_bytes, 2 * kWindow));
  LEGO_RETURN_IF_ERROR(ch.in_storage.map(2 * ch.bufs.slot_bytes));
  ch.in.reset(ch.in_storage.data, ch.in_storage.size);
  return Status();
}

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
  const NodeConfig* peer = config.find(ch.peer);
  // Start from nothing: a broken channel's old endpoint and buffers go away.
  ch.ep.reset();
  ch.cq.reset();
  ch.av.reset();
  ch.eq.reset();
  ch.bufs.~SlotBuffers();
  new (&ch.bufs) SlotBuffers();
  ch.own_domain.reset();
  if (ch.fd >= 0) close(ch.fd);
  ch.fd = -1;
  ch.in.head = ch.in.len = 0;
  ch.broken = Status();
  ch.connected = false;
  ch.have_control = false;
  ch.peer_pid = 0;
  for (auto& s : ch.slots) s = ClientChannel::Slot();
  for (int i = 0; i < kWindow; i++) {
    ch.send_ctx[i] = OpCtx{{}, &ch, OpType::kSend, static_cast<uint16_t>(i)};
    ch.recv_ctx[i] = OpCtx{{}, &ch, OpType::kRecv, static_cast<uint16_t>(i)};
  }
  ch.rma_ctx = OpCtx{{}, &ch, OpType::kRma, 0};

  std::string where = who() + ": connecting to node " + std::to_string(peer->id) + " at " +
                      peer->address + ":" + std::to_string(peer->port) + " (" + peer->provider +
                      ")";
  Status st = sock  ? connect_sock(ch, *peer)
              : msg ? connect_msg(ch, *peer)
                    : connect_rdm(ch, *peer);
  if (!st) return st.with_context(where);

  // Handshake: hello -> challenge (server proves the key) -> proof -> welcome.
  auto deadline = Clock::now() + config.timeout;
  wire::HelloPayload hello{};
  hello.client_node = self.id;
  hello.window = kWindow;
  auth::make_nonce(hello.client_nonce);
  if (!msg) {
    size_t len = sizeof(hello.name);
    int ret = fi_getname(&ch.ep.get()->fid, hello.name, &len);
    if (ret != 0) return ofi::error(ret, where + ": fi_getname");
    hello.name_length = static_cast<uint32_t>(len);
    hello.pid = static_cast<uint32_t>(getpid());
  }
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
  if (!msg) ch.peer_pid = static_cast<pid_t>(challenge.pid);
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
    LEGO_RETURN_IF_ERROR(progress(ch, kBlockingSliceMs));
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
    Status st = progress(ch, kBlockingSliceMs);
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

Status Node::Impl::rma(const RemoteRegion& region, uint64_t offset, std::byte* local, size_t len,
                       bool write) {
  if (offset > region.length || len > region.length - offset) {
    return Status(EINVAL, who() + ": one-sided " + (write ? "write" : "read") + " of " +
                              std::to_string(len) + " bytes at offset " + std::to_string(offset) +
                              " is outside node " + std::to_string(region.node) + "'s " +
                              std::to_string(region.length) + "-byte region");
  }
  if (sock) {
    // One-sided ops over sockets: served by the owner's libfit server thread.
    size_t chunk = config.max_message_bytes - sizeof(SockRmaRequest);
    std::vector<std::byte> req(sizeof(SockRmaRequest) + (write ? std::min(len, chunk) : 0));
    for (size_t done = 0; done < len;) {
      size_t n = std::min(len - done, chunk);
      SockRmaRequest r{region.key, region.base + offset + done, n};
      memcpy(req.data(), &r, sizeof(r));
      if (write) memcpy(req.data() + sizeof(r), local + done, n);
      auto res = node_send_reply(region.node, write ? kSockRmaWrite : kSockRmaRead,
                                 {req.data(), sizeof(r) + (write ? n : 0)},
                                 {write ? nullptr : local + done, write ? 0 : n});
      if (!res) return res.status();
      if (!write && res.value() != n) return Status(EPROTO, who() + ": short one-sided read");
      done += n;
    }
    (write ? counters.rma_writes : counters.rma_reads).fetch_add(1, std::memory_order_relaxed);
    return Status();
  }
  std::unique_lock<std::mutex> lock;
  auto chr = channel_for(region.node, lock);
  if (!chr) return chr.status();
  ClientChannel& ch = *chr.value();
  if (!ch.connected || !ch.broken.is_ok()) LEGO_RETURN_IF_ERROR(connect(ch));
  auto deadline = Clock::now() + config.timeout;
  size_t done = 0;
  while (done < len) {
    size_t n = std::min(len - done, ch.bufs.rma_bytes);
    if (write) memcpy(ch.bufs.rma(), local + done, n);
    ch.rma_done = false;
    ch.rma_status = Status();
    uint64_t addr = region.base + offset + done;
    ssize_t r;
    do {
      r = write ? fi_write(ch.ep.get(), ch.bufs.rma(), n, ch.bufs.desc(), ch.dest, addr, region.key,
                           &ch.rma_ctx.fi)
                : fi_read(ch.ep.get(), ch.bufs.rma(), n, ch.bufs.desc(), ch.dest, addr, region.key,
                          &ch.rma_ctx.fi);
      if (r == -FI_EAGAIN) LEGO_RETURN_IF_ERROR(progress(ch, 0));
    } while (r == -FI_EAGAIN);
    if (r != 0)
      return ofi::error(r,
                        who() + ": posting a one-sided op to node " + std::to_string(region.node));
    while (!ch.rma_done) {
      if (Clock::now() > deadline) {
        // The op still owns the bounce buffer: the channel cannot be reused safely.
        Status st(ETIMEDOUT, who() + ": one-sided op to node " + std::to_string(region.node) +
                                 " did not complete");
        fail_channel(ch, st);
        return st;
      }
      LEGO_RETURN_IF_ERROR(progress(ch, kBlockingSliceMs));
    }
    LEGO_RETURN_IF_ERROR(ch.rma_status);
    if (!write) memcpy(local + done, ch.bufs.rma(), n);
    done += n;
  }
  (write ? counters.rma_writes : counters.rma_reads).fetch_add(1, std::memory_order_relaxed);
  return Status();
}

// ---------------------------------------------------------------------------------------
// Node

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
  impl->msg = ofi::uses_msg_endpoints(me->provider);
  impl->sock = me->provider == "tcp";
  impl->blocking = me->progress == Progress::kBlocking;
  impl->paces =
      std::make_unique<ThreadPace[]>(static_cast<size_t>(std::max(1, me->server_threads)));
  return std::unique_ptr<Node>(new Node(std::move(impl)));
}

void Node::handle(uint16_t opcode, Handler handler) {
  impl_->handlers[opcode] = std::move(handler);
}

Status Node::start() {
  if (impl_->started) return Status(EALREADY, impl_->who() + " is already serving");
  Status st = impl_->listen();
  if (!st) {
    impl_->stopping = true;
    for (auto& t : impl_->server_threads) {
      if (t->thread.joinable()) t->thread.join();
    }
    impl_->server_threads.clear();
    impl_->stopping = false;
    return st;
  }
  impl_->started = true;
  return Status();
}

void Node::stop() {
  if (!impl_) return;
  impl_->stopping = true;
  for (auto& t : impl_->server_threads) {
    if (t->thread.joinable()) t->thread.join();
  }
  // The threads' stalls stay counted (server_stalled never decreases); a stopped node
  // has no thread to stall.
  if (impl_->pace_count.load() > 0) {
    impl_->retired_stall_ns.store(impl_->stalled_ns());
    impl_->pace_count.store(0);
  }
  // Last first: thread 0 owns the event queue the others' endpoints are bound to.
  while (!impl_->server_threads.empty()) impl_->server_threads.pop_back();
  {
    std::lock_guard<std::mutex> g(impl_->peers_mu);
    impl_->peers.clear();
  }
  impl_->server_domain.reset();
  impl_->started = false;
}

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

Result<size_t> Node::Impl::node_send_reply(NodeId peer, uint16_t opcode,
                                           std::span<const std::byte> request,
                                           std::span<std::byte> reply) {
  auto deadline = Clock::now() + config.timeout;
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

Result<size_t> Node::send_reply(NodeId peer, uint16_t opcode, std::span<const std::byte> request,
                                std::span<std::byte> reply, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + (timeout.count() > 0 ? timeout : impl_->config.timeout);
  std::unique_lock<std::mutex> lock;
  auto ch = impl_->channel_for(peer, lock);
  if (!ch) return ch.status();
  auto slot = impl_->start_call(*ch.value(), opcode, request, reply, deadline);
  if (!slot) {
    impl_->counters.calls_failed.fetch_add(1, std::memory_order_relaxed);
    return slot.status();
  }
  return impl_->finish_call(*ch.value(), slot.value(), deadline);
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

struct RpcFuture::State {
  Node::Impl* node = nullptr;
  ClientChannel* ch = nullptr;
  int slot = -1;
  uint64_t id = 0;
  Clock::time_point deadline;
  bool finished = false;
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

Result<MemoryRegion> Node::register_memory(void* data, size_t size, bool remote_write) {
  if (impl_->sock) {
    if (!impl_->started) {
      return Status(EINVAL, impl_->who() + ": start() the node before registering memory");
    }
    MemoryRegion mr;
    mr.impl_ = std::make_unique<MemoryRegion::Impl>();
    uint64_t key = auth::random_u64();
    {
      std::lock_guard<std::mutex> g(impl_->regions_mu);
      impl_->sock_regions[key] = {static_cast<std::byte*>(data), size, remote_write};
    }
    Impl* impl = impl_.get();
    mr.impl_->release = [impl, key] {
      std::lock_guard<std::mutex> g(impl->regions_mu);
      impl->sock_regions.erase(key);
    };
    mr.data_ = data;
    mr.size_ = size;
    mr.remote_ = {impl_->self.id, key, reinterpret_cast<uint64_t>(data), size};
    return mr;
  }
  if (!impl_->server_domain) {
    return Status(EINVAL, impl_->who() + ": start() the node before registering memory");
  }
  uint64_t access = FI_REMOTE_READ | FI_READ | FI_WRITE | (remote_write ? FI_REMOTE_WRITE : 0);
  auto reg = ofi::register_buffer(*impl_->server_domain, data, size, access);
  if (!reg) return reg.status().with_context(impl_->who());
  MemoryRegion mr;
  mr.impl_ = std::make_unique<MemoryRegion::Impl>();
  mr.impl_->reg = std::move(reg.value());
  mr.data_ = data;
  mr.size_ = size;
  mr.remote_.node = impl_->self.id;
  mr.remote_.key = mr.impl_->reg->key;
  mr.remote_.base = impl_->server_domain->virt_addr ? reinterpret_cast<uint64_t>(data) : 0;
  mr.remote_.length = size;
  return mr;
}

Status Node::rma_read(const RemoteRegion& region, uint64_t offset, std::span<std::byte> dst) {
  return impl_->rma(region, offset, dst.data(), dst.size(), false);
}

Status Node::rma_write(const RemoteRegion& region, uint64_t offset,
                       std::span<const std::byte> src) {
  return impl_->rma(region, offset, const_cast<std::byte*>(src.data()), src.size(), true);
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
  const std::pair<const char*, uint64_t> rows[] = {
      {"calls_sent", s.calls_sent},
      {"calls_failed", s.calls_failed},
      {"calls_timed_out", s.calls_timed_out},
      {"requests_served", s.requests_served},
      {"requests_rejected", s.requests_rejected},
      {"auth_failures", s.auth_failures},
      {"bytes_sent", s.bytes_sent},
      {"bytes_received", s.bytes_received},
      {"rma_reads", s.rma_reads},
      {"rma_writes", s.rma_writes},
      {"connections_accepted", s.connections_accepted},
      {"connections_authenticated", s.connections_authenticated},
      {"connections_open", s.connections_open},
      {"handshakes_pending", s.handshakes_pending},
      {"closed_handshake_timeout", s.closed_handshake_timeout},
      {"closed_handshake_cap", s.closed_handshake_cap},
      {"closed_rejected", s.closed_rejected},
      {"closed_stalled_reader", s.closed_stalled_reader},
      {"accept_errors", s.accept_errors},
      {"server_stalls", s.server_stalls},
  };
  std::string out;
  for (const auto& [name, value] : rows) {
    out += name;
    out += ' ';
    out += std::to_string(value);
    out += '\n';
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// LeaseClock

LeaseClock::LeaseClock() {
  steady_at_last_ = static_cast<Nanos>(monotonic_ns());
  offset_.store(steady_at_last_, std::memory_order_relaxed);  // lease time starts at 0
}

void LeaseClock::follow(const Node* node) {
  std::lock_guard<std::mutex> g(mu_);
  node_ = node;
  stalled_at_last_ = node != nullptr ? node->server_stalled().count() : 0;
}

LeaseClock::Nanos LeaseClock::now() const {
  return static_cast<Nanos>(monotonic_ns()) - offset_.load(std::memory_order_acquire);
}

LeaseClock::Nanos LeaseClock::advance() {
  std::lock_guard<std::mutex> g(mu_);
  const Nanos steady = static_cast<Nanos>(monotonic_ns());
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
