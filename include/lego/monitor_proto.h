// The monitor protocol, version 1: what memory nodes and processor runtimes ask lego-mond
// (LegoOS's global memory monitor, GMM). Carried as FIT RPCs; little-endian, sizes asserted,
// every length and count checked on receipt (EPROTO otherwise).
//
// Membership: a memory node registers when it starts (kRegister: its id, a random incarnation,
// where it listens, its usage) and then heartbeats every heartbeat_ms (from the cluster file)
// from a thread of its own. A node not heard from for lost_after_ms is lost: it gets no new
// placements. A node registering with an id that is live with another incarnation is refused
// (EEXIST; the message says how long ago the live one was heard), so a second lego-memd with
// the same --node cannot join; a crashed node restarted under its old id is accepted once the
// old incarnation is lost. A heartbeat from a node the monitor does not know (the monitor
// restarted, or declared it lost) is answered ENOENT: the node registers again, which is how
// a restarted monitor rebuilds its view. A wrong key never gets this far (FIT's handshake).
//
// Reports: what a memory node holds (its spaces, each process's vRegions on it) is not sent in
// these messages: the monitor reads it with memory_proto.h's kListSpaces (paged, so any number
// of spaces fits), after a registration and whenever the heartbeat's usage.generation changed.
// The monitor calls memory nodes from a thread of its own, never from its server thread.
//
// Placement: kPlace asks for R distinct live memory nodes for one vRegion of one process,
// weighted by free capacity (placement.h), excluding the listed nodes. The reply names each
// node with where it listens, so a processor whose cluster file lacks a node that joined later
// can still reach it (fit::Node::add_peer).
#pragma once

#include <cstddef>
#include <cstdint>

#include "lego/memory_proto.h"

namespace lego::mon {

inline constexpr uint32_t kProtoVersion = 1;
inline constexpr uint32_t kMaxReplicas = 4;
inline constexpr uint32_t kMaxExclude = 16;

enum Opcode : uint16_t {
  kRegister = 0x300,  // RegisterRequest -> RegisterReply; EEXIST: the id is live elsewhere
  kNodeHeartbeat,     // NodeHeartbeat -> (empty); ENOENT: register again
  kPlace,             // PlaceRequest -> PlaceReply; ENOSPC when fewer than R nodes can take it
  kView,              // (empty) -> ViewReply + NodeInfo[count]: membership, for tools
  kStatus,            // (empty) -> UTF-8 text: nodes and placements (lego-mond --status)
  kReportLost,        // ReportLost -> (empty): a processor found a node lost (a hint)
};

using NodeAddress = mem::NodeAddress;

struct NodeUsage {
  uint64_t capacity_bytes;
  uint64_t reserved_bytes;  // promised to placed vRegions
  uint64_t stored_bytes;
  uint64_t requests;    // served since start (load: the monitor derives a rate)
  uint64_t generation;  // mem::UsageReply::generation: changed => the monitor re-reads
};
static_assert(sizeof(NodeUsage) == 40);

struct RegisterRequest {
  uint32_t version;  // kProtoVersion
  uint32_t reserved;
  uint64_t incarnation;  // random per start of lego-memd, never 0
  NodeAddress self;      // must match the registering connection's node id
  NodeUsage usage;
};
static_assert(sizeof(RegisterRequest) == 128);

struct RegisterReply {
  uint32_t version;
  uint32_t heartbeat_ms;
  uint32_t lost_after_ms;
  uint32_t reserved;
};
static_assert(sizeof(RegisterReply) == 16);

struct NodeHeartbeat {
  uint32_t node;
  uint32_t reserved;
  uint64_t incarnation;
  NodeUsage usage;
};
static_assert(sizeof(NodeHeartbeat) == 56);

struct PlaceRequest {
  uint64_t process_key;
  uint32_t owner_node;  // the processor node
  uint32_t pid;
  uint64_t vregion;
  uint32_t replicas;  // 1..kMaxReplicas
  uint32_t exclude_count;
  uint32_t exclude[kMaxExclude];  // nodes the process lost or already uses for this vRegion
};
static_assert(sizeof(PlaceRequest) == 96);

struct PlaceReply {
  uint32_t count;  // == replicas
  uint32_t reserved;
  NodeAddress nodes[kMaxReplicas];
};
static_assert(sizeof(PlaceReply) == 296);

struct ReportLost {
  uint32_t node;
  uint32_t reporter;  // the processor node
  int32_t error;      // what it saw (errno)
  uint32_t reserved;
};
static_assert(sizeof(ReportLost) == 16);

enum NodeState : uint32_t { kAlive = 0, kLost = 1, kSuspect = 2 };
struct NodeInfo {
  NodeAddress where;
  NodeUsage usage;
  uint64_t incarnation;
  uint32_t state;          // NodeState
  uint32_t last_heard_ms;  // ago
  uint64_t pending_bytes;  // placed by the monitor, not yet seen in the node's usage
};
static_assert(sizeof(NodeInfo) == 136);

struct ViewReply {
  uint64_t epoch;  // bumped on every membership change
  uint32_t count;  // NodeInfo records follow
  uint32_t reserved;
};
static_assert(sizeof(ViewReply) == 16);

}  // namespace lego::mon
