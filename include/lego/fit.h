// libfit: lego's RPC and RDMA layer (LegoOS's FIT), on libfabric.
//
// Every lego node (processor, memory, storage, monitor) speaks FIT. A cluster file names
// the nodes (see ClusterConfig); a Node is this process's place in it. A Node offers:
//   - send_reply: a request/response RPC to a node id and opcode, synchronous or
//     asynchronous (RpcFuture). Servers register one Handler per opcode.
//   - one-sided RMA: register_memory() exposes a buffer; a peer that holds its
//     RemoteRegion reads or writes it with rma_read/rma_write, without the owner's CPU.
// Transports: "tcp" (libfit's own busy-polled kernel sockets, anywhere: the fastest TCP
// here, ~1.45x faster than libfabric's tcp provider), "ofi_tcp" (libfabric's tcp provider,
// msg endpoints), "shm" (libfabric rdm endpoints, same host), "verbs" (libfabric msg
// endpoints on an RDMA NIC). One-sided ops on "tcp" are served by libfit's server thread,
// as libfabric's tcp provider serves them in software too: the owner's handlers never run. Each
// node polls
// ("polling": lowest latency, burns a core while waiting) or blocks ("blocking").
//
// Security: before a connection carries any request, both ends prove they hold the
// cluster's shared key (HMAC challenge-response, libsodium). Remote memory keys are
// random and only ever sent over authenticated connections.
//
// Errors: every call returns a Status/Result whose code is an errno value:
//   ETIMEDOUT     no reply within the timeout (the peer may still be alive)
//   ECONNREFUSED  nothing listens at the peer's address, or it refused our key (EACCES)
//   ECONNRESET    the peer went away mid-call
//   EMSGSIZE      request or reply larger than max_message_bytes / the reply buffer
//   EOPNOTSUPP    the peer has no handler for the opcode
//   EPROTO        a corrupt, truncated or wrong-version frame
//   (a handler's own error code)  passed through from the peer's handler
//
// Thread-safety: a Node is safe to use from any number of threads after start(). Each
// peer gets several independent channels (channels_per_peer); a calling thread sticks to
// one and polls its completions itself, so threads do not hand work to each other.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "lego/status.h"

namespace lego::fit {

using NodeId = uint32_t;

enum class Role : uint8_t { kProcessor, kMemory, kStorage, kMonitor };
enum class Progress : uint8_t {
  kPolling,   // spin on completion queues: lowest latency, one core busy while waiting
              // (a tcp server thread sleeps in epoll once 2 ms pass without a request)
  kBlocking,  // sleep on the queues' wait objects: no idle CPU, ~30 µs more per wake-up
};

const char* role_name(Role role);
const char* progress_name(Progress progress);

struct NodeConfig {
  NodeId id = 0;
  Role role = Role::kProcessor;
  std::string address;   // host name or IP (tcp, verbs); any label for shm
  uint16_t port = 0;     // tcp/verbs listen port; ignored by shm
  std::string provider;  // "tcp", "ofi_tcp", "shm" or "verbs"
  Progress progress = Progress::kPolling;
  int server_threads = 1;  // threads serving incoming requests
  int line = 0;            // where the node was defined in the cluster file
};

// The cluster file, TOML:
//   [cluster]
//   key = "64 hex digits"        # or key_file = "/etc/lego/cluster.key" (hex inside)
//   channels_per_peer = 4        # default 4: independent channels per node pair
//   timeout_ms = 5000            # default 5000: send_reply's default timeout
//   max_message_bytes = 139264   # default 136 KiB: largest request or reply payload
//   [[node]]
//   id = 1                       # unique, 0..65535
//   role = "memory"              # processor | memory | storage | monitor
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
struct FitStats {
  uint64_t calls_sent = 0;         // send_reply calls that were posted
  uint64_t calls_failed = 0;       // ... that returned an error (any kind)
  uint64_t calls_timed_out = 0;    // ... that hit their timeout
  uint64_t requests_served = 0;    // requests this node's handlers answered
  uint64_t requests_rejected = 0;  // bad frames, unknown opcodes, unauthenticated senders
  uint64_t auth_failures = 0;      // peers that failed the key challenge
  uint64_t bytes_sent = 0;         // payload bytes sent (requests and replies)
  uint64_t bytes_received = 0;     // payload bytes received
  uint64_t rma_reads = 0;
  uint64_t rma_writes = 0;
};

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

 private:
  friend class RpcFuture;
  struct Impl;
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

}  // namespace lego::fit
