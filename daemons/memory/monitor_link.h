// lego-memd's side of the monitor protocol (include/lego/monitor_proto.h): when the cluster
// file names a monitor, the memory node registers with it at start and heartbeats from a
// thread of its own (never a FIT server thread), registering again when the monitor answers
// a heartbeat with ENOENT (it restarted: that is how it rebuilds its view).
//
// At start (start(), on the main thread, before the node reports ready):
//   - the monitor refuses this node's key: a message naming the monitor, exit status 1;
//   - the id is live with another incarnation (EEXIST): retried for lost_after_ms plus a
//     heartbeat (a crashed node restarted at once under systemd waits for its old self to
//     be declared lost), then a message naming the conflict, exit status 1;
//   - the monitor does not answer: one message, the node serves anyway, and the heartbeat
//     thread keeps registering until it does.
//
// Thread-safety: start() and stop() from the main thread; status_text() from any.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "lego/fit.h"
#include "lego/memory_node.h"
#include "lego/monitor_proto.h"
#include "lego/status.h"

namespace lego::mem {

class MonitorLink {
 public:
  // `memory` (which gives the usage) and `monitor` (the cluster file's monitor node) must
  // outlive the link.
  MonitorLink(MemoryNode* memory, const fit::NodeConfig& monitor);
  ~MonitorLink();

  // The first registration through `node` (serving), then the heartbeat thread. May exit
  // the process (above). `node` must outlive stop().
  void start(fit::Node& node);
  // Ends the heartbeat thread. Idempotent.
  void stop();
  // "monitor node 9 at 10.0.0.9:18609: registered, heartbeat 500 ms, last answer 120 ms
  // ago" and the link's counters, for lego-memd --status.
  std::string status_text() const;

 private:
  enum class State { kStarting, kRegistered, kUnreachable, kRefused };
  Status register_once();
  Status heartbeat_once();
  void loop();
  std::string monitor_name() const;
  void set_state(State s, const std::string& why);

  MemoryNode* memory_;
  fit::NodeConfig monitor_;
  fit::Node* node_ = nullptr;
  std::chrono::milliseconds heartbeat_{500}, lost_after_{3000};
  mutable std::mutex mu_;
  State state_ = State::kStarting;                       // guarded by mu_
  std::string why_;                                      // guarded by mu_: the last failure
  std::chrono::steady_clock::time_point last_answer_{};  // guarded by mu_
  std::atomic<uint64_t> registrations_{0}, heartbeats_{0}, failures_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace lego::mem
