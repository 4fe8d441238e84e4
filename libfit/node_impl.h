// libfit's core, internal: a Node's state (Node::Impl) and its client channels, shared by
// rpc.cc (calls), handshake.cc (the key challenge), server.cc (serving), rma.cc (one-sided
// ops) and node.cc (the Node itself). Providers see only transport.h.
//
// Structure:
//   - ClientChannel: one outgoing connection (a provider's ClientConnection) and the
//     kWindow request slots of the calls on it. The calling thread polls it itself, so a
//     reply never needs a cross-thread wake-up. channels_per_peer channels per peer; a
//     thread sticks to one (thread-local hint).
//   - The server: the provider's threads (Transport::run), started here, each feeding
//     received frames to ServerHost::serve, which runs handlers inline.
//   - Leases: each server thread records the pauses of its loop (ThreadPace), which
//     Node::server_stalled() sums for LeaseClock.
//
// Lock order: ClientChannel::mu before Impl::peers_mu. A provider's server-thread locks
// are never held with another lock.
#pragma once

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "lego/fit.h"
#include "lego/fit_wire.h"
#include "libfit/transport.h"

namespace lego::fit {

using transport::Clock;
using transport::kWindow;

// One outgoing connection to a peer and the calls on it. A thread holds mu for as long as
// it posts to or polls the channel; everything here is guarded by it.
struct ClientChannel final : transport::ClientHost {
  struct Slot {
    bool in_use = false;        // a call owns it (or abandoned it while its send is pending)
    bool send_pending = false;  // the provider still reads the send buffer
    bool done = false;
    bool abandoned = false;
    uint64_t id = 0;
    std::span<std::byte> reply;
    size_t reply_len = 0;
    Status status;
    Clock::time_point deadline;
    uint16_t opcode = 0;
  };

  Node::Impl* node = nullptr;
  NodeId peer = 0;
  int index = 0;
  std::mutex mu;
  std::unique_ptr<transport::ClientConnection> conn;  // null before the first connect
  Slot slots[kWindow];
  bool connected = false;  // the handshake ended: frames are replies to calls
  Status broken;           // set when the connection failed; calls then fail with it
  uint64_t next_id = 1;
  // Handshake: the last control frame received while connecting.
  bool have_control = false;
  wire::FrameHeader control_header{};
  std::vector<std::byte> control_payload;

  // transport::ClientHost (rpc.cc).
  bool on_frame(const transport::RawFrame& frame) override;
  void on_sent(int slot) override;
  void fail(const Status& why) override;
  const Status& failure() const override { return broken; }
  Result<size_t> call(uint16_t opcode, std::span<const std::byte> request,
                      std::span<std::byte> reply) override;
};

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
  bool turn(int64_t now);
  // Stall time up to `now`, a pause still going on included.
  int64_t stalled(int64_t now) const;
};

struct Node::Impl {
  ClusterConfig config;
  NodeConfig self;
  bool blocking = false;
  std::string name;  // "node 3", for messages
  std::map<uint16_t, Handler> handlers;
  transport::Counters counters;
  transport::Context context;  // points into this Impl
  std::unique_ptr<transport::Transport> transport;

  // Server.
  transport::ServerHost server{this};
  std::vector<std::thread> server_threads;
  std::atomic<bool> stopping{false};
  bool started = false;
  // The server threads' paces (Node::server_stalled). Allocated once, for as many threads
  // as the node may start, and never freed before the node: server_stalled() may read
  // them from any thread while the node starts or stops.
  std::unique_ptr<ThreadPace[]> paces;
  int max_threads = 1;
  std::atomic<int> pace_count{0};
  std::atomic<int64_t> retired_stall_ns{0};  // stalls of threads a stop() ended

  // Peers not in the cluster file (Node::add_peer): a deque, so that the NodeConfig a
  // connection was opened with stays where it is. Only ever appended to.
  mutable std::mutex learned_mu;
  std::deque<NodeConfig> learned;  // guarded by learned_mu
  // The cluster file's node `id`, else a learned one, else nullptr. The pointer stays valid
  // for the node's life.
  const NodeConfig* find_peer(NodeId id) const;

  // Client.
  std::mutex peers_mu;
  std::unordered_map<NodeId, std::vector<std::unique_ptr<ClientChannel>>> peers;

  const std::string& who() const { return name; }

  // --- client calls (rpc.cc)
  Result<ClientChannel*> channel_for(NodeId peer, std::unique_lock<std::mutex>& lock);
  void fail_channel(ClientChannel& ch, Status why);
  // Polls the channel's connection; returns the channel's failure, if any.
  Status progress(ClientChannel& ch, int wait_ms);
  // `caller_keeps`: the payload stays valid and unchanged until the send completes, so it
  // may be sent from where it is (PendingCall::zero_copy).
  Status post_frame(ClientChannel& ch, int slot, wire::Kind kind, uint16_t opcode,
                    std::span<const std::byte> payload, uint64_t id, bool caller_keeps = false);
  Result<int> start_call(ClientChannel& ch, uint16_t opcode, std::span<const std::byte> request,
                         std::span<std::byte> reply, Clock::time_point deadline,
                         bool caller_keeps = false);
  Result<size_t> finish_call(ClientChannel& ch, int slot, Clock::time_point deadline);
  // A whole call to `peer` on whichever channel this thread gets.
  Result<size_t> call(NodeId peer, uint16_t opcode, std::span<const std::byte> request,
                      std::span<std::byte> reply, Clock::time_point deadline);

  // --- the handshake, client side (handshake.cc)
  Status connect(ClientChannel& ch);
  Status connect_once(ClientChannel& ch);
  Status wait_control(ClientChannel& ch, wire::Kind want, Clock::time_point deadline);

  // --- one-sided ops (rma.cc)
  Status rma(const RemoteRegion& region, uint64_t offset, std::byte* local, size_t len, bool write);

  // --- the server's threads (server.cc)
  Status start_server();
  void stop_server();
  int64_t stalled_ns() const;  // Node::server_stalled
};

}  // namespace lego::fit
