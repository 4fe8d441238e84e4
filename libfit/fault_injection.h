// Fault injection for libfit, for tests only (LevelDB's FaultInjectionTestEnv wraps its
// real Env the same way): inject_faults() wraps a Node's real provider in a
// FaultyTransport which, as a FaultPlan says, drops, delays, duplicates, reorders or
// truncates the frames of the node's connections, or resets a connection. Nothing is
// mocked: the frames that pass go over the real transport to a real peer, which sees the
// consequences (a request that never arrives, a connection that closes mid-handshake).
//
// Only tests can turn it on: this library is testonly (//libfit:fault_injection), and no
// cluster file setting or environment variable reaches it.
//
// What a plan acts on: the frames of the connections the node opens as a client (its
// calls to peers), both ways. Sent: the hello and proof of the handshake, requests.
// Received: the challenge and welcome (or error) of the handshake, replies and errors.
// A server's own frames are acted on where its client receives them.
//
//   fault       sent frames                        received frames
//   kDrop       never sent (the call times out)    never delivered
//   kDelay      the sending thread waits `delay`   delivered at the first poll `delay` on
//   kDuplicate  -                                  delivered, and again `delay` later
//                                                  (at once if 0)
//   kReorder    -                                  held until the next frame was delivered
//                                                  (or `delay`, if set), then delivered
//   kTruncate   -                                  only its first `keep_bytes` delivered
//   kReset      the connection is closed instead   the connection is closed on its arrival
//   (a reset fails every call on the connection with ECONNRESET, as a peer that closed it
//   would; the peer sees it close; the next call opens a new one through the plan again)
//
// Thread-safety: a FaultPlan may be shared by any number of connections and threads;
// add() and clear() may be called while calls run. Frames held back (kDelay, kReorder)
// cost an allocation each: do not use with an ExCache that serves misses in its SIGBUS
// handler (use ExCacheOptions::Delivery::kHandlerThread).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "lego/fit.h"
#include "lego/fit_wire.h"

namespace lego::testing {

enum class Fault : uint8_t { kDrop, kDelay, kDuplicate, kReorder, kTruncate, kReset };
enum class Way : uint8_t { kSend, kReceive };

// Which frames a rule acts on, and how. Unset filters match everything.
struct FaultRule {
  Way way = Way::kReceive;
  std::optional<fit::wire::Kind> kind;  // frames of this kind only
  std::optional<uint16_t> opcode;       // requests, replies and errors of this opcode only
  std::optional<fit::NodeId> peer;      // on connections to this node only
  int skip = 0;                         // let this many matching frames through first
  int count = 1;                        // then act on this many; -1: on every one
  Fault fault = Fault::kDrop;
  std::chrono::milliseconds delay{0};  // kDelay, kDuplicate; kReorder: released after it at
                                       // the latest
  size_t keep_bytes = 0;               // kTruncate
};

// The common rule: frames of `kind` going `way` (and of `opcode`, if given), the `count`
// after the first `skip`, get `fault`. Set delay or keep_bytes on the result if needed.
FaultRule fault_on(Way way, fit::wire::Kind kind, Fault fault,
                   std::optional<uint16_t> opcode = std::nullopt, int count = 1, int skip = 0);

class FaultPlan {
 public:
  // Adds a rule and returns its index (for fired()). Rules are tried in the order added;
  // the first that matches a frame (and has not skipped enough, or still has a count)
  // decides. A fault a way does not support (see the table) aborts the test.
  size_t add(const FaultRule& rule);
  // How many frames rule `index` acted on so far.
  int fired(size_t index) const;
  // Removes every rule: from now on frames pass (frames already held are still
  // delivered).
  void clear();

  // For FaultyTransport: the rule acting on this frame, or nullopt to let it pass.
  std::optional<FaultRule> decide(Way way, fit::NodeId peer, uint8_t kind, uint16_t opcode);

 private:
  struct Entry {
    FaultRule rule;
    int seen = 0;   // matching frames so far
    int fired = 0;  // ... acted on
  };
  mutable std::mutex mu_;
  std::vector<Entry> rules_;  // guarded by mu_
};

// Wraps `node`'s provider in a FaultyTransport following `plan`: every connection the
// node opens from now on (its first call to a peer, every reconnection) goes through the
// plan. Call before the node's first call to a peer for the plan to see that
// connection's handshake, and not while calls are in flight.
void inject_faults(fit::Node& node, std::shared_ptr<FaultPlan> plan);

}  // namespace lego::testing
