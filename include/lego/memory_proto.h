// The memory-node protocol, version 3: what a processor node's runtime (and lego-mond, and
// other memory nodes) ask lego-memd. Carried as FIT RPCs (include/lego/fit.h); each request
// opcode below has one request and one reply layout. All integers little-endian; every
// struct's size is asserted; the memory node checks every length and count before using a
// request, and refuses (EPROTO) what does not fit. A peer speaking another version is
// refused at kOpen (EPROTONOSUPPORT), so old and new nodes never half-work together.
//
// Address spaces: a process image opens one space on each memory node it uses (kOpen), named
// by a SpaceHandle (an id plus a 128-bit random secret). Every later request names the handle;
// the memory node refuses (EACCES) a handle whose secret does not match, so one process can
// never read or write another's memory even from the same processor node. A space is freed by
// kClose, or when no request (kHeartbeat included) arrived for the lease time while the node
// was serving (its processor is lost). kOpen carries the process's `process_key` (random per
// process image): the memory nodes' reports (kListSpaces) let the monitor group one process's
// spaces across nodes.
//
// Placement: the region of a process is cut into vRegions of kVRegionBytes. A process places a
// vRegion on a memory node (kPlace) before it writes back any line of it there: the node
// promises the whole vRegion a place (so write-backs never fail for space) or answers ENOMEM.
// Capacity is counted in whole vRegions. kUnplace drops a vRegion's lines and its promise. A
// write-back or copy to a vRegion the space has not placed is refused (EINVAL). The first
// kPlace of a space fixes its region base; every line address must lie in a placed vRegion.
//
// Lines: 4 KiB, addressed by their virtual address in the process. A line never written back
// (or released since) reads as zeros and takes no space; an all-zero write-back frees it
// (except in a vRegion with an incoming copy: see below). Every stored line keeps the version
// of the write-back that stored it.
//
// One-sided reads (since v4): a placed vRegion owns a fixed block of the memory node's pool,
// kVRegionBytes long, line k of the vRegion at byte k * kLineBytes of the block; a line never
// stored (or freed since) reads as zeros there. A kPlace with kPlaceRma registers the block
// for one-sided reads (never writes) and answers its key and base in the PlaceReply: the
// processor may then read lines with fit::Node::rma_read instead of kFetch (docs/rma.md).
// The key dies with the space's hold on the vRegion (kUnplace, kClose, the lease running
// out): a read with it fails from then on (EACCES on tcp, shm and verbs). Write-backs,
// releases, copies and forks stay requests: only they keep versions, replicas and
// snapshots consistent.
//
// Versions: a process numbers its write-back batches 1, 2, ... (the same batch to every replica
// carries the same number); a release carries the number of the last batch sent before it, so
// it covers every write-back numbered up to it and none after.
//
// Re-replication (kCopyRange): the processor asks a memory node S holding a full copy of a
// vRegion to push it to node Y, where the process has placed it with kPlaceIncomingCopy and has
// been sending its new write-backs and releases since (Y is "joining"). S's copy worker (a
// thread of its own: a copy never holds up the requests S serves) sends S's lines of the
// vRegion to Y as kWriteBack with kWriteBackCopy (each line with its version), the last batch
// with kWriteBackCopyLast. Y applies a copied line only when it holds no newer version of it and
// no release with a version at least the line's covers it; while the copy is in flight Y stores
// all-zero write-backs of that vRegion as lines (with their version) and keeps the (range,
// version) of releases, and forgets both at kWriteBackCopyLast. So when the copy completes Y
// holds, for every line, the newest version any replica holds, and nothing released or zeroed
// since comes back.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lego::mem {

// Version 4: fixed pool blocks per vRegion and kPlaceRma's grant for one-sided reads.
// Version 3: vRegions and kPlace (replacing v2's byte-delta kReserve), process_key in kOpen,
// versioned write-backs and releases, copies between memory nodes, kListSpaces and kUsage.
// A one-line fetch reply has no FetchReply header (since v2).
inline constexpr uint32_t kProtoVersion = 4;
inline constexpr size_t kLineBytes = 4096;
// Lines per batched fetch or write-back: 32 x 4 KiB plus headers fits FIT's default
// 136 KiB max_message_bytes.
inline constexpr uint32_t kMaxBatch = 32;
// The placement unit: 16 MiB. LegoOS uses 1 GiB vRegions on machines of 100s of GB; a lego
// memory node may hold 64 MiB (tests) to a few GB, so 16 MiB lets the smallest node take
// several and balances capacity to within one vRegion per node, while a 1 GiB heap costs 64
// placements (at allocation time, never on the miss path).
inline constexpr uint64_t kVRegionBytes = uint64_t{16} << 20;
inline constexpr uint64_t kLinesPerVRegion = kVRegionBytes / kLineBytes;
// vRegion indices are below this: 2^24 vRegions are 256 TiB, all of x86-64's user space
// counted from 0 (a 64 GiB region has 4096).
inline constexpr uint64_t kMaxVRegions = uint64_t{1} << 24;

enum Opcode : uint16_t {
  kOpen = 0x100,  // OpenRequest -> OpenReply
  kClose,         // SpaceRequest -> (empty)
  kFetch,         // FetchRequest + addrs -> FetchReply + lines (one line: the line, or nothing)
  kWriteBack,     // WriteBackRequest + addrs [+ versions] + lines -> (empty); EINVAL for a
                  // line outside the space's placed vRegions
  kRelease,       // ReleaseRequest -> (empty): the range was unmapped or discarded
  kHeartbeat,     // SpaceRequest -> (empty): keeps the lease
  kStatus,        // (empty) -> UTF-8 text: the node's state and counters
  kPlace,         // PlaceRequest -> PlaceReply (error ENOMEM when the node cannot promise
                  // the vRegion). Placing a placed vRegion again is a no-op (a retried call).
  kFork,          // SpaceRequest -> OpenReply: a new space holding a copy of the named one
                  // (its lines, versions and placements), for a forked child; ENOMEM when
                  // the node cannot promise the copy. The copy has its own handle and lease.
  kUnplace,       // PlaceRequest -> (empty): the vRegion's lines and promise are dropped
  kCopyRange,     // CopyRequest -> CopyReply: start pushing a vRegion to another node;
                  // EBUSY when kMaxCopyJobs copies are running
  kCopyStatus,    // CopyStatusRequest -> CopyStatusReply; ENOENT for a job it forgot
  kListSpaces,    // ListSpacesRequest -> ListSpacesReply + entries (for lego-mond)
  kUsage,         // (empty) -> UsageReply: capacity and what is promised, for placement
};

// Where a node listens: its [[node]] of the cluster file. In a CopyRequest (so a memory node
// can push to a node that joined after it started) and in the monitor's replies.
struct NodeAddress {
  uint32_t id;
  uint16_t port;
  uint8_t provider;  // fit::Provider
  uint8_t reserved;
  char address[64];  // NUL-padded host name or IP
};
static_assert(sizeof(NodeAddress) == 72);

struct SpaceHandle {
  uint64_t id;
  uint8_t secret[16];
};
static_assert(sizeof(SpaceHandle) == 24);

struct OpenRequest {
  uint32_t version;      // kProtoVersion
  uint32_t pid;          // the process on its processor node, for status output
  uint64_t process_key;  // random per process image: groups its spaces across nodes
  char program[48];      // its name, NUL-padded, for status output
};
static_assert(sizeof(OpenRequest) == 64);

struct OpenReply {
  uint32_t version;
  uint32_t line_bytes;
  SpaceHandle handle;
  uint64_t capacity_bytes;  // the memory node's whole capacity
  uint32_t lease_ms;        // send something at least this often
  uint32_t reserved;
};
static_assert(sizeof(OpenReply) == 48);

struct SpaceRequest {
  SpaceHandle handle;
};
static_assert(sizeof(SpaceRequest) == 24);

// Followed by count uint64_t line addresses (4 KiB aligned).
struct FetchRequest {
  SpaceHandle handle;
  uint32_t count;  // 1..kMaxBatch
  uint32_t reserved;
};
static_assert(sizeof(FetchRequest) == 32);

// The reply to a fetch of count > 1 lines: followed by the 4 KiB contents of each requested
// line whose bit in stored_mask is set, in request order; lines whose bit is clear were never
// stored (zeros). A fetch of one line is answered without this header: the line's 4 KiB, or
// nothing when it was never stored. Why: FIT's shm transport copies up to 4 KiB through shared
// memory and a larger message by a slower handshake (fit-bench --sizes 4096,4104 over shm:
// 2.35 vs 7.70 µs per round trip). A kept zero line (incoming copy) is answered as stored.
struct FetchReply {
  uint64_t stored_mask;
};
static_assert(sizeof(FetchReply) == 8);

inline constexpr size_t fetch_reply_head_bytes(uint32_t count) {
  return count == 1 ? 0 : sizeof(FetchReply);
}

// WriteBackRequest.flags
inline constexpr uint32_t kWriteBackCopy = 1;      // from a copy worker: apply if newer (above)
inline constexpr uint32_t kWriteBackCopyLast = 2;  // with kWriteBackCopy: the copy's last batch
// Followed by count uint64_t addresses, then (kWriteBackCopy only) count uint64_t versions,
// then count x 4 KiB contents. Without kWriteBackCopy every line takes `version`.
struct WriteBackRequest {
  SpaceHandle handle;
  uint32_t count;  // 1..kMaxBatch (0 allowed only with kWriteBackCopyLast: nothing left)
  uint32_t flags;
  uint64_t version;  // the batch's version, >= 1 (kWriteBackCopy: ignored)
  uint64_t vregion;  // kWriteBackCopy: the vRegion being copied (every line must be in it)
};
static_assert(sizeof(WriteBackRequest) == 48);

inline constexpr size_t write_back_request_bytes(uint32_t count, uint32_t flags) {
  return sizeof(WriteBackRequest) +
         size_t{count} * sizeof(uint64_t) * ((flags & kWriteBackCopy) ? 2 : 1) +
         size_t{count} * kLineBytes;
}

struct ReleaseRequest {
  SpaceHandle handle;
  uint64_t addr;     // 4 KiB aligned
  uint64_t length;   // multiple of 4 KiB
  uint64_t version;  // the version of the last write-back batch the process sent before it
};
static_assert(sizeof(ReleaseRequest) == 48);

// PlaceRequest.flags
inline constexpr uint32_t kPlaceIncomingCopy = 1;  // a copy of this vRegion will arrive
// Grant one-sided reads of the vRegion's block (PlaceReply's rma fields). A retried kPlace
// with it answers the same grant; one on a vRegion placed without it registers the block then.
inline constexpr uint32_t kPlaceRma = 2;
struct PlaceRequest {
  SpaceHandle handle;
  uint64_t vregion;      // index: the vRegion [region_base + i*kVRegionBytes, +kVRegionBytes)
  uint64_t region_base;  // the process's region base, kVRegionBytes aligned; the same in
                         // every request of a space
  uint32_t flags;
  uint32_t reserved;
};
static_assert(sizeof(PlaceRequest) == 48);

// A full memory node answers kPlace with error = ENOMEM here, not with an error frame: a
// processor places vRegions from jemalloc's extent hooks, where libfit building an error's
// message (an allocation) could deadlock the allocator. Malformed requests and unknown
// handles are still error frames.
struct PlaceReply {
  int32_t error;  // 0: placed; ENOMEM: the node cannot promise another vRegion
  // kPlaceRma: 1 when the block is registered for one-sided reads (rma_key, rma_base valid);
  // 0 when the node could not register it (the processor reads by kFetch then).
  uint32_t rma_granted;
  uint64_t capacity_bytes;  // the node's, and what it has promised (after this request)
  uint64_t reserved_bytes;
  uint64_t rma_key;   // fit::RemoteRegion::key of the vRegion's block
  uint64_t rma_base;  // fit::RemoteRegion::base: line k of the vRegion is at base + k * 4 KiB
};
static_assert(sizeof(PlaceReply) == 40);

// At most this many copy jobs run on one memory node at once; finished jobs are remembered
// (for kCopyStatus) until kMaxCopyJobsKept have finished after them.
inline constexpr uint32_t kMaxCopyJobs = 16;
inline constexpr uint32_t kMaxCopyJobsKept = 256;

struct CopyRequest {
  SpaceHandle source;  // the space on this node to copy from
  uint64_t vregion;
  SpaceHandle target;     // the process's space on the target node
  NodeAddress target_at;  // the target node: its id and where it listens. A node in this
                          // node's cluster file must be named as there (EINVAL otherwise);
                          // another (one that joined later) is added as a peer.
};
static_assert(sizeof(CopyRequest) == 128);

struct CopyReply {
  uint64_t job;
};
static_assert(sizeof(CopyReply) == 8);

struct CopyStatusRequest {
  SpaceHandle source;  // must match the job's
  uint64_t job;
};
static_assert(sizeof(CopyStatusRequest) == 32);

enum CopyState : uint32_t { kCopyRunning = 0, kCopyDone = 1, kCopyFailed = 2 };
struct CopyStatusReply {
  uint32_t state;  // CopyState
  int32_t error;   // errno when failed
  uint64_t lines_copied;
  uint64_t lines_total;  // lines of the vRegion this node held when the copy started
};
static_assert(sizeof(CopyStatusReply) == 24);

// kListSpaces: paged by cursor (0 first); each reply holds as many whole entries as fit in
// max_reply_bytes (at least one, or EMSGSIZE). The cursor is a space id: spaces opened while
// a listing runs may or may not appear, none appears twice.
struct ListSpacesRequest {
  uint64_t cursor;
  uint32_t max_reply_bytes;  // the asker's reply buffer; 0: FIT's max_message_bytes
  uint32_t reserved;
};
static_assert(sizeof(ListSpacesRequest) == 16);
struct ListSpacesReply {
  uint64_t next_cursor;  // 0: no more
  uint32_t count;        // SpaceEntry records follow, each followed by its vregions
  uint32_t reserved;
};
static_assert(sizeof(ListSpacesReply) == 16);
struct SpaceEntry {
  uint64_t space_id;
  uint64_t process_key;
  uint32_t owner_node;
  uint32_t pid;
  char program[48];
  uint64_t region_base;
  uint64_t lines_stored;
  uint32_t vregion_count;  // followed by vregion_count uint64_t vRegion indices, ascending
  uint32_t copying_count;  // then copying_count more: the vRegions still awaiting their copy
};
static_assert(sizeof(SpaceEntry) == 96);

struct UsageReply {
  uint64_t capacity_bytes;
  uint64_t reserved_bytes;  // promised (placed vRegions)
  uint64_t stored_bytes;
  uint64_t incarnation;  // random per start of the daemon
  uint64_t requests;     // served since start (load)
  uint64_t generation;   // bumped whenever a space, a placement or a copy state changes:
                         // a reader of kListSpaces knows when to read again
};
static_assert(sizeof(UsageReply) == 48);

}  // namespace lego::mem
