// libfit: lego's RPC and RDMA layer (LegoOS's FIT), on libfabric.
//
// Every lego node (processor, memory, storage, monitor) speaks FIT. A cluster file names
// the nodes (see ClusterConfig); a Node is this process's place in it. A Node offers:
//   - send_reply: a request/response RPC to a node id and opcode, synchronous or
//     asynchronous (RpcFuture). Servers register one Handler per opcode.
//   - one-sided RMA: register_memory() exposes a buffer; a peer that holds its
//     RemoteRegion reads or writes it with rma_read/rma_write, without the owner's CPU.
// Transports (Provider, one per cluster): "tcp" (libfit's own busy-polled kernel sockets,
// anywhere: the fastest TCP here, ~1.45x faster than libfabric's tcp provider), "ofi_tcp"
// (libfabric's tcp provider, msg endpoints), "shm" (libfabric rdm endpoints, same host),
// "verbs" (libfabric msg endpoints on an RDMA NIC). One-sided ops on "tcp" are served by
// libfit's server thread, as libfabric's tcp provider serves them in software too: the
// owner's handlers never run. Each node polls ("polling": lowest latency, burns a core
// while waiting) or blocks ("blocking"). Behind this API each transport is a provider
// (libfit/transport.h, the backend writers' API): the RPC core, the handshake and the
// server's rules are the same for all of them.
//
// Security: before a connection carries any request, both ends prove they hold the
// cluster's shared key (HMAC challenge-response, libsodium). Remote memory keys are
// random and only ever sent over authenticated connections.
//
// Hostile or slow peers (fit_wire.h lists every rule): a server thread never waits for
// one peer. A peer that breaks the protocol gets an error frame and is closed; one that
// has not authenticated within min(timeout_ms, 3 s) is closed; at most 256 connections
// (32 per source address) may await the handshake, the oldest silent one going first
// (a client whose handshake is closed for it tries again for timeout_ms); a tcp peer
// that leaves its replies unread for timeout_ms is cut off. Buffers for full-size
// messages exist only for authenticated connections and go back to the kernel when they
// close. FitStats counts each case.
//
// Errors: every call returns a Status/Result whose code is an errno value:
//   ETIMEDOUT     no reply within the timeout (the peer may still be alive), or no answer
//                 to the handshake within timeout_ms
//   ECONNREFUSED  nothing listens at the peer's address
//   EACCES        the peer refused our key, or could not prove it holds the cluster's
//   EHOSTUNREACH  the peer is not in the cluster file, or its address does not resolve
//   ECONNRESET    the peer went away mid-call (a connection reset during the handshake is
//                 connected again, for up to timeout_ms, before the call fails with it)
//   EMSGSIZE      request or reply larger than max_message_bytes / the reply buffer
//   EOPNOTSUPP    the peer has no handler for the opcode
//   EPROTO        a corrupt, truncated or wrong-version frame
//   EAGAIN        the server kept closing our connection while it awaited the handshake
//                 (too many did, ours the oldest), for all of timeout_ms: libfit
//                 retried the handshake meanwhile
//   (a handler's own error code)  passed through from the peer's handler
// libfit never sends a call again itself: lego/retry.h says which of these a caller may
// retry (classify) and how many times (kAttempts).
//
// Tests inject faults into a Node's transport with libfit/fault_injection.h (testonly);
// nothing else can.
//
// Thread-safety: a Node is safe to use from any number of threads after start(). Each
// peer gets several independent channels (channels_per_peer); a calling thread sticks to
// one and polls its completions itself, so threads do not hand work to each other.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "lego/status.h"

namespace lego::testing {
struct FitNodeAccess;  // libfit/fault_injection.h: tests wrap a Node's provider
}

namespace lego::fit {

using NodeId = uint32_t;

enum class Role : uint8_t { kProcessor, kMemory, kStorage, kMonitor };
enum class Progress : uint8_t {
  kPolling,   // spin on completion queues: lowest latency, one core busy while waiting
              // (a tcp server thread sleeps in epoll once 2 ms pass without a request)
  kBlocking,  // sleep on the queues' wait objects: no idle CPU, ~30 µs more per wake-up
};

// The transport a node speaks: the cluster file's `provider`, parsed once (config.cc) and
// chosen once (Node::create); nothing else in lego compares provider names.
enum class Provider : uint8_t {
  kTcp,     // "tcp" (default): libfit's own busy-polled kernel sockets, anywhere
  kOfiTcp,  // "ofi_tcp": libfabric's tcp provider, msg endpoints
  kShm,     // "shm": libfabric's shm provider, rdm endpoints between processes of one host
  kVerbs,   // "verbs": libfabric msg endpoints on an RDMA NIC
};

const char* role_name(Role role);
const char* progress_name(Progress progress);
// The cluster file's spelling of `provider`.
const char* provider_name(Provider provider);
// The provider spelled `name` as in the cluster file, or nullopt (for command lines that
// take one: lego-run --transport, fit-bench --providers).
std::optional<Provider> parse_provider(std::string_view name);

struct NodeConfig {
  NodeId id = 0;
  Role role = Role::kProcessor;
  std::string address;  // host name or IP (tcp, verbs); any label for shm
  uint16_t port = 0;    // tcp/verbs listen port; ignored by shm
  Provider provider = Provider::kTcp;
  Progress progress = Progress::kPolling;
  int server_threads = 1;  // threads serving incoming requests
  int line = 0;            // where the node was defined in the cluster file
};

// The cluster file, TOML:
//   [cluster]
//   key = "64 hex digits"        # or key_file = "/etc/lego/cluster.key" (hex inside)
//   channels_per_peer = 4        # default 4: independent channels per node pair
//   timeout_ms = 5000            # default 5000: send_reply's default timeout; a server
//                                # cuts off a peer that leaves a reply unread this long
//                                # and one not authenticated in min(this, 3 s)
//   max_message_bytes = 139264   # default 136 KiB: largest request or reply payload
//   replicas = 1                 # default 1: memory nodes holding each vRegion (1..4); with
//                                # 2+ a process survives losing a memory node, each write-back
//                                # costing a store on every replica
//   heartbeat_ms = 500           # default 500: memory nodes' heartbeat to the monitor
//   lost_after_ms = 3000         # default 3000: the monitor declares a memory node lost after
//                                # this long unheard (> heartbeat_ms); shorter finds a dead
//                                # node sooner, and mistakes a slow one for dead more often
//   monitor_wait_ms = 30000      # default 30000: how long placing memory waits for a monitor
//                                # that does not answer before the allocation fails
//   [[node]]
//   id = 1                       # unique, 0..65535
//   role = "memory"              # processor | memory | storage | monitor (at most one)
//   address = "10.77.0.2"
//   port = 18601                 # required for tcp and verbs
//   provider = "tcp"             # tcp (default) | ofi_tcp | shm | verbs
//   progress = "polling"         # polling (default) | blocking
//   server_threads = 1           # default 1
struct ClusterConfig {
  std::vector<uint8_t> key;  // 32 bytes
  int channels_per_peer = 4;
  std::chrono::milliseconds timeout{5000};
  size_t max_message_bytes = 136 * 1024;
  int replicas = 1;
  std::chrono::milliseconds heartbeat{500};
  std::chrono::milliseconds lost_after{3000};
  std::chrono::milliseconds monitor_wait{30000};
  std::vector<NodeConfig> nodes;
  std::string origin;  // file name, for messages

  // Parses a cluster file. Errors (EINVAL) name the file, line and field.
  static Result<ClusterConfig> parse_file(const std::string& path);
  static Result<ClusterConfig> parse_string(const std::string& text, const std::string& origin);
  // Renders this config as TOML that parse_string() accepts.
  std::string to_toml() const;

  const NodeConfig* find(NodeId id) const;
  // The first node of `role`, or nullptr.
  const NodeConfig* first_of(Role role) const;
};

// A contiguous byte range another node exposed for one-sided access. Plain data: send it
// in an RPC reply. Valid until the owner deregisters it.
struct RemoteRegion {
  NodeId node = 0;
  uint64_t key = 0;   // libfabric MR key
  uint64_t base = 0;  // address to use for offset 0 (the owner's virtual address, or 0)
  uint64_t length = 0;
};

class Node;

// Memory registered with this node's domain. Owns the registration (not the memory):
// the memory must outlive it. Move-only.
class MemoryRegion {
 public:
  MemoryRegion();
  MemoryRegion(MemoryRegion&&) noexcept;
  MemoryRegion& operator=(MemoryRegion&&) noexcept;
  ~MemoryRegion();

  // What a peer needs to read or write this region.
  RemoteRegion remote() const { return remote_; }
  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  friend class Node;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  RemoteRegion remote_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

struct RpcContext {
  NodeId from = 0;
  uint16_t opcode = 0;
};

// Serves one opcode. Reads `request`, writes at most reply.size() bytes into `reply` and
// returns how many, or returns an error Status whose code and message reach the caller.
// Runs on one of the node's server threads; must not block on other RPCs to the caller.
using Handler = std::function<Result<size_t>(
    const RpcContext& ctx, std::span<const std::byte> request, std::span<std::byte> reply)>;

// Counters of one node, summed over its threads. Names match `--stats` output.
// Every FIT counter of a node, once: X(name, counter|gauge, "what it counts"). This list
// makes FitStats, stats_text() (the daemons' --status) and the daemons' Prometheus
// metrics (lego_<daemon>_fit_NAME), in this order.
#define LEGO_FIT_COUNTERS(X)                                                                    \
  X(calls_sent, counter, "send_reply calls that were posted")                                   \
  X(calls_failed, counter, "send_reply calls that returned an error (any kind)")                \
  X(calls_timed_out, counter, "send_reply calls that hit their timeout")                        \
  X(requests_served, counter, "requests this node's handlers answered")                         \
  X(requests_rejected, counter, "bad frames, unknown opcodes, unauthenticated senders")         \
  X(auth_failures, counter, "peers that failed the key challenge")                              \
  X(bytes_sent, counter, "payload bytes sent (requests and replies)")                           \
  X(bytes_received, counter, "payload bytes received")                                          \
  X(rma_reads, counter, "one-sided reads issued")                                               \
  X(rma_writes, counter, "one-sided writes issued")                                             \
  X(connections_accepted, counter,                                                              \
    "connections this node served, accepted (tcp, ofi_tcp, verbs; shm: first hellos)")          \
  X(connections_authenticated, counter, "accepted connections that proved the key")             \
  X(connections_open, gauge, "connections open now, authenticated or not")                      \
  X(handshakes_pending, gauge, "connections open now and not authenticated yet")                \
  X(closed_handshake_timeout, counter, "closed: no proof within the handshake deadline")        \
  X(closed_handshake_cap, counter,                                                              \
    "closed: the oldest awaiting the handshake when a cap (per node, per source) was exceeded") \
  X(closed_rejected, counter,                                                                   \
    "closed after a rejection: wrong key, a frame before the handshake, a malformed frame")     \
  X(closed_stalled_reader, counter, "closed: left its replies unread for timeout_ms")           \
  X(accept_errors, counter,                                                                     \
    "accept() failures (EMFILE, ENFILE, ENOBUFS...); the listener pauses briefly after each")   \
  X(server_stalls, counter,                                                                     \
    "times a server thread's loop did not turn for longer than kStallThreshold")

struct FitStats {
#define LEGO_FIT_FIELD(name, type, doc) uint64_t name = 0;
  LEGO_FIT_COUNTERS(LEGO_FIT_FIELD)
#undef LEGO_FIT_FIELD
};

// FitStats as "name value" lines, one per field, in the order above: what the daemons'
// --status prints after their own counters.
std::string stats_text(const FitStats& stats);

class RpcFuture;

class Node {
 public:
  // Opens this node's fabric resources for node `self` of `config`. Does not listen yet.
  static Result<std::unique_ptr<Node>> create(const ClusterConfig& config, NodeId self);
  ~Node();

  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // Registers the handler for `opcode` (0..65535). Call before start(); replaces any
  // earlier handler for the same opcode.
  void handle(uint16_t opcode, Handler handler);
  // Starts listening and serving requests on server_threads threads. A node that only
  // calls others need not start().
  Status start();
  // Stops serving and closes every connection. Idempotent; the destructor calls it.
  void stop();

  // Opens (and authenticates) every channel to `peer` now rather than on first use, so
  // that later calls allocate nothing. Errors as send_reply.
  Status connect(NodeId peer);
  // Opens (and authenticates) the channel the calling thread's calls to `peer` use, and
  // no other: enough to learn that `peer` answers and takes the key, for a fraction of
  // connect()'s cost (over shm each channel maps and touches its own shared memory).
  // Errors as send_reply.
  Status connect_one(NodeId peer);

  // Takes in the reply to every call in flight on this node's channels (started by any
  // thread and not yet answered), for up to `timeout` (0: the cluster's), and returns once
  // none is left; a channel that fails meanwhile has its calls fail as usual. For a process
  // about to end: over shm a reply its receiver never takes stalls the peer (libfabric
  // 1.17's shm completes each send of over 4 KiB only once the receiver has copied it, and
  // a server's sends in order: one reply to a process gone holds back every later one, to
  // every client). Calls started meanwhile are taken in too. Costs a poll per channel.
  void drain(std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

  // Makes `peer`, a node not in the cluster file (a memory node that joined later, learned
  // from lego-mond), reachable by its id from now on. OK, changing nothing, when the node is
  // already known with the same address, port and provider (the file's, or an earlier
  // add_peer's). Errors: EEXIST when its id is this node's, or known with another address,
  // port or provider (the file and earlier peers are never changed: a node cannot be
  // redirected); EINVAL for an empty address, a missing port where the provider needs one,
  // or a provider other than this cluster's. Thread-safe, any time (before or after
  // start()); the peer is kept for the node's life.
  Status add_peer(const NodeConfig& peer);
  // The node `id` as this node reaches it: the cluster file's, or one added by add_peer.
  // nullopt when neither knows it.
  std::optional<NodeConfig> peer(NodeId id) const;

  // Sends `request` to `peer`'s handler for `opcode` and waits for its reply, copied into
  // `reply`. Returns the reply's length. Connects (and authenticates) on first use.
  // timeout 0 means the cluster's default.
  Result<size_t> send_reply(NodeId peer, uint16_t opcode, std::span<const std::byte> request,
                            std::span<std::byte> reply,
                            std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

  // Posts the request and returns at once. `reply` must stay valid until the future is
  // done. Up to max_outstanding() futures may be pending per calling thread and peer.
  RpcFuture send_reply_async(NodeId peer, uint16_t opcode, std::span<const std::byte> request,
                             std::span<std::byte> reply,
                             std::chrono::milliseconds timeout = std::chrono::milliseconds(0));
  static constexpr int max_outstanding() { return 16; }

  // The same as send_reply_async, in storage the caller owns: no allocation, so usable
  // where an RpcFuture is not (a signal handler). start_call posts the request and returns;
  // finish_call waits for the reply (or the timeout) and returns its length. Every started
  // call must be finished, from any thread; `reply` must stay valid until then.
  //
  // zero_copy (set before start_call): the caller keeps `request` valid and unchanged until
  // finish_call returns and, if finish_call then sets request_busy, for good (the provider
  // may still read it: reuse nothing of it). In return a request larger than the provider's
  // inject size is sent straight from it instead of being copied into libfit's buffer
  // first (rdm transports: shm).
  struct PendingCall {
    void* channel = nullptr;  // libfit's; null when not started
    int slot = -1;
    uint64_t id = 0;
    std::chrono::steady_clock::time_point deadline{};
    bool zero_copy = false;     // in: see above
    bool request_busy = false;  // out of finish_call: the request may still be read
  };
  Status start_call(PendingCall* call, NodeId peer, uint16_t opcode,
                    std::span<const std::byte> request, std::span<std::byte> reply,
                    std::chrono::milliseconds timeout = std::chrono::milliseconds(0));
  Result<size_t> finish_call(PendingCall* call);
  // Polls a started call's channel once, without waiting: true when finish_call would
  // return at once (its reply or its error is in, or its deadline passed), false while
  // the reply is on its way or another thread holds the channel (that thread's polling
  // takes this reply in too). For a thread with several calls in flight that has other
  // work meanwhile (ExCache's handler thread reading new faults). Costs one receive poll.
  bool call_done(PendingCall* call);

  // Registers [data, data+size) for one-sided access by peers (remote_write: peers may
  // write too). Cost: pins the pages; a few µs per MiB.
  Result<MemoryRegion> register_memory(void* data, size_t size, bool remote_write);

  // Copies region bytes [offset, offset+dst.size()) of `region` (which names its node)
  // into dst, or src into the region. One-sided: the owner's CPU is not involved.
  Status rma_read(const RemoteRegion& region, uint64_t offset, std::span<std::byte> dst);
  Status rma_write(const RemoteRegion& region, uint64_t offset, std::span<const std::byte> src);

  NodeId id() const;
  const ClusterConfig& config() const;
  FitStats stats() const;

  // Time this node's server threads could not serve, summed over the threads: for each,
  // every pause between two turns of its loop beyond kStallThreshold, including a pause
  // still going on. Turning the loop is what serving takes (a thread idle in epoll turns
  // it every few ms); a thread inside a slow handler, descheduled for long, or in a
  // stopped process (SIGSTOP) does not. Never decreases while the node serves; 0 before
  // start(). Lock-free, from any thread; costs a few atomic loads per server thread.
  // LeaseClock uses it so that no client is blamed for time the server could not hear it.
  std::chrono::nanoseconds server_stalled() const;
  // Pauses up to this long count as serving: a loop round that serves a burst of
  // requests, or a scheduler delay on a busy host, is not a stall.
  static constexpr std::chrono::milliseconds kStallThreshold{100};

  struct Impl;  // libfit/node_impl.h

 private:
  friend class RpcFuture;
  friend struct ::lego::testing::FitNodeAccess;
  explicit Node(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The pending reply of send_reply_async. Move-only; destroying it while pending abandons
// the call (its reply is discarded when it arrives).
class RpcFuture {
 public:
  RpcFuture();
  RpcFuture(RpcFuture&&) noexcept;
  RpcFuture& operator=(RpcFuture&&) noexcept;
  ~RpcFuture();

  // Makes progress without blocking; true once the result is known.
  bool ready();
  // Waits for the reply (or the timeout); returns the reply length. Call once.
  Result<size_t> wait();

 private:
  friend class Node;
  struct State;
  std::unique_ptr<State> state_;
};

// Time for leases: steady time less the time a Node's server threads could not serve
// (Node::server_stalled). A server that holds state for clients that must keep talking
// to it (lego-memd's address spaces, lego-stord's sessions) stamps each request with
// now() and frees what has not been heard from for a lease of this clock, so a client
// is never blamed for time in which the server was stuck in a handler, descheduled or
// stopped: its requests were waiting for the server, not missing.
//
// How it advances: advance() (called by the daemons' expiry tick) adds the steady time
// since the last advance less the stall time the node accumulated since then (at most
// all of it). Stalls of several server threads add up even when they overlap, so the
// clock errs towards keeping leases, never towards freeing them.
//
// Thread-safety: now() is lock-free and may be called from handlers on any thread;
// follow() and advance() may be called from any thread (they serialize on a mutex).
class LeaseClock {
 public:
  using Nanos = int64_t;

  LeaseClock();
  // From now on, discount `node`'s server stalls (nullptr: plain steady time). The node
  // must outlive this clock's advance() calls.
  void follow(const Node* node);
  // Lease time now: the value of the last advance() plus steady time since. It may run
  // ahead of what the next advance() settles on (by the stall found then), so a stamp
  // taken from it errs towards keeping a lease. Starts near 0.
  Nanos now() const;
  // Brings the clock up to date and returns its value. Call periodically (every few
  // hundred ms) and before deciding what expired.
  Nanos advance();

 private:
  std::mutex mu_;
  const Node* node_ = nullptr;  // guarded by mu_
  Nanos steady_at_last_ = 0;    // guarded by mu_: steady time at the last advance
  Nanos stalled_at_last_ = 0;   // guarded by mu_: node's server_stalled() then
  Nanos lease_at_last_ = 0;     // guarded by mu_: the lease time then
  // steady time - lease time, as of the last advance(): now() is steady time less this.
  std::atomic<Nanos> offset_{0};
};

}  // namespace lego::fit
