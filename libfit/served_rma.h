// One-sided ops served by the region owner's libfit server thread, for providers whose
// transport offers no one-sided access that checks the owner's keys: tcp (libfit's
// sockets) and shm. A registered region is an entry in the owner's Registry, under a
// random key; rma_read / rma_write become requests (kRmaRead, kRmaWrite) that the owner's
// server checks against the registry (key, range, write permission) before it copies a
// byte, and refuses with EACCES otherwise. Internal to libfit.
//
// Why shm is here: libfabric 1.17's shm provider, given FI_MR_VIRT_ADDR and no RMA
// ordering (what libfit asks for), takes a "fast RMA" path in which the initiator copies
// with process_vm_readv/writev straight into the owner's memory and never looks at the key
// or the range: a forged key read or wrote any address of the owner (the provider e2e
// test's wrong-key case, run on shm, passed the read). With RMA ordering requested
// instead, the owner's shm progress does check the key, but drops a refused op without
// answering: the initiator's op never completes (a wait for the whole timeout), and a
// write of up to 4 KiB is reported complete before the owner refused it. Served here, a
// wrong key is refused at once, and bytes move as in any request (over shm: through shm's
// inject buffers up to 4 KiB, by one process_vm_readv above).
//
// Threads: a Registry is shared by the owner's server threads (serve) and whoever
// registers or drops regions; its map is guarded by mu_ (a leaf lock, never held while
// calling out). call() runs on the channel's lock holder.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <unordered_map>

#include "libfit/transport.h"

namespace lego::fit::transport::served_rma {

// Internal opcodes of one-sided ops, served by libfit itself (ServerHost dispatches them
// before the user's handlers: Transport::internal_handler).
inline constexpr uint16_t kRmaRead = 0xfffe;
inline constexpr uint16_t kRmaWrite = 0xfffd;

// A one-sided op's request: kRmaWrite's is followed by `length` bytes; kRmaRead's reply
// is the `length` bytes.
struct RmaRequest {
  uint64_t key;
  uint64_t addr;  // a virtual address in the owner (RemoteRegion::base + offset)
  uint64_t length;
};
static_assert(sizeof(RmaRequest) == 24);

// The regions this node's peers may read and write, by key.
class Registry {
 public:
  explicit Registry(const Context& ctx);
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Adds [data, data+size) under a new random key; fills remote's key and base. The entry
  // is removed when the returned Registration is destroyed (before the Registry).
  std::unique_ptr<Registration> add(void* data, size_t size, bool remote_write,
                                    RemoteRegion* remote);
  // The handler of kRmaRead or kRmaWrite; nullptr for any other opcode.
  const Handler* handler(uint16_t opcode) const;

 private:
  friend struct Entry;
  Result<size_t> serve(bool write, std::span<const std::byte> req, std::span<std::byte> reply);

  struct Region {
    std::byte* data;
    size_t size;
    bool writable;
  };
  const Context& ctx_;
  Handler read_, write_;
  std::mutex mu_;
  std::unordered_map<uint64_t, Region> regions_;  // guarded by mu_
};

// The client's side: reads (writes) `len` bytes at `addr` of the peer's region `key` into
// (from) `local` as requests of at most max_message_bytes each, each within the cluster's
// timeout (ClientHost::call). Errors: the owner's (EACCES: no such key or range, or a
// read-only region), or the channel's.
Status call(const Context& ctx, ClientHost* host, bool write, uint64_t key, uint64_t addr,
            std::byte* local, size_t len);

}  // namespace lego::fit::transport::served_rma
