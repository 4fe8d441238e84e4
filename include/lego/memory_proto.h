// The memory-node protocol, version 1: what a processor node's runtime asks lego-memd.
// Carried as FIT RPCs (include/lego/fit.h); each request opcode below has one request and
// one reply layout. All integers little-endian; every struct's size is asserted; the
// memory node checks every length and count before using a request.
//
// Address spaces: kOpen creates one for a process and returns a SpaceHandle (an id plus a
// 128-bit random secret). Every later request names the handle; the memory node refuses
// (EACCES) a handle whose secret does not match, so one process can never read or write
// another's memory even from the same processor node. A space is freed by kClose, or when
// no request (kHeartbeat included) arrived for the lease time (its processor is lost).
//
// Capacity: a process reserves bytes (kReserve) before it uses a range (its allocator maps
// an extent, it mmaps), and releases them when the range is freed. The memory node
// promises every reserved byte a place, so write-backs never fail for space; when it
// cannot promise more, kReserve fails with ENOMEM and the allocation fails as malloc
// failing would.
//
// Lines: 4 KiB, addressed by their virtual address in the process. A line never written
// back reads as zeros and takes no memory-node space; an all-zero write-back frees it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lego::mem {

// Version 2: a one-line fetch reply has no FetchReply header (see FetchReply).
inline constexpr uint32_t kProtoVersion = 2;
inline constexpr size_t kLineBytes = 4096;
// Lines per batched fetch or write-back: 32 x 4 KiB plus headers fits FIT's default
// 136 KiB max_message_bytes.
inline constexpr uint32_t kMaxBatch = 32;

enum Opcode : uint16_t {
  kOpen = 0x100,  // OpenRequest -> OpenReply
  kClose,         // SpaceRequest -> (empty)
  kFetch,         // FetchRequest -> FetchReply + lines (one line: the line, or nothing)
  kWriteBack,     // WriteBackRequest + lines -> (empty); ENOMEM when over capacity
  kRelease,       // ReleaseRequest -> (empty): the range was unmapped or discarded
  kHeartbeat,     // SpaceRequest -> (empty): keeps the lease
  kStatus,        // (empty) -> UTF-8 text: the node's state and counters
  kReserve,       // ReserveRequest -> (empty); ENOMEM when the node cannot promise it
  kFork,          // SpaceRequest -> OpenReply: a new space holding a copy of the named one
                  // (its lines and its reservation), for a forked child; ENOMEM when the
                  // node cannot promise the copy. The copy has its own handle and lease.
};

struct SpaceHandle {
  uint64_t id;
  uint8_t secret[16];
};
static_assert(sizeof(SpaceHandle) == 24);

struct OpenRequest {
  uint32_t version;  // kProtoVersion
  uint32_t pid;      // the process on its processor node, for status output
  char program[56];  // its name, NUL-padded, for status output
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

// The reply to a fetch of count > 1 lines. Followed by the 4 KiB contents of each requested
// line whose bit in stored_mask is set, in request order. Lines whose bit is clear were never
// stored: they are zeros.
// A fetch of one line (a miss's) is answered without this header: the line's 4 KiB, or
// nothing when it was never stored (zeros). Why: FIT's shm transport copies a message of
// up to 4 KiB through shared memory and sends a larger one by a cross-process copy
// handshake; 8 bytes past 4 KiB made every miss's round trip ~3x slower (fit-bench --sizes
// 4096,4104 over shm: 2.35 vs 7.70 µs).
struct FetchReply {
  uint64_t stored_mask;
};
static_assert(sizeof(FetchReply) == 8);

// Bytes of FetchReply header before the lines in the reply to a fetch of `count` lines.
inline constexpr size_t fetch_reply_head_bytes(uint32_t count) {
  return count == 1 ? 0 : sizeof(FetchReply);
}

// Followed by count uint64_t addresses, then count x 4 KiB contents.
struct WriteBackRequest {
  SpaceHandle handle;
  uint32_t count;  // 1..kMaxBatch
  uint32_t reserved;
};
static_assert(sizeof(WriteBackRequest) == 32);

struct ReleaseRequest {
  SpaceHandle handle;
  uint64_t addr;    // 4 KiB aligned
  uint64_t length;  // multiple of 4 KiB
};
static_assert(sizeof(ReleaseRequest) == 40);

struct ReserveRequest {
  SpaceHandle handle;
  int64_t delta_bytes;  // > 0 reserve, < 0 release (never below zero for the space)
};
static_assert(sizeof(ReserveRequest) == 32);

}  // namespace lego::mem
