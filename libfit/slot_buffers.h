// Message slots for providers: `slots` slots of (header + max payload) bytes plus a
// scratch area, in one anonymous mapping. A connection sends from slot i and receives into
// slot kWindow + i; the scratch area is the RMA bounce buffer (tcp: the stream buffer).
// The libfabric providers register the block with their domain (reg, desc). Internal to
// libfit.
#pragma once

#include <sys/mman.h>

#include <cerrno>
#include <cstddef>
#include <memory>

#include "libfit/transport.h"

namespace lego::fit::transport {

struct SlotBuffers {
  size_t slot_bytes = 0;
  size_t rma_bytes = 0;
  std::byte* base = nullptr;
  size_t total = 0;
  std::unique_ptr<Registration> reg;  // the provider's registration of the block, if any
  void* desc = nullptr;               // its local descriptor (FI_MR_LOCAL), if any

  SlotBuffers() = default;
  SlotBuffers(const SlotBuffers&) = delete;
  SlotBuffers& operator=(const SlotBuffers&) = delete;
  ~SlotBuffers() {
    reg.reset();
    if (base != nullptr) munmap(base, total);
  }
  // Maps the block; its pages become resident only as they are touched.
  Status init(size_t max_payload, size_t rma, int slots) {
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
};

// Bytes in an anonymous mapping, returned to the kernel (munmap) when destroyed. Used
// rather than malloc for buffers a connection keeps: glibc keeps large freed blocks in its
// heap once its dynamic mmap threshold has risen (it does after the first such block is
// freed), so a daemon that served thousands of connections would stay at its peak size;
// and what a client fills while serving a call may be filled in a signal handler (the
// ExCache's SIGBUS delivery), where malloc may not be called and would hand out memory of
// the very region being served. The pages are touched, and so resident, only as used.
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
    if (p == MAP_FAILED) return Status::from_errno(errno, "mmap of a FIT buffer");
    data = static_cast<std::byte*>(p);
    size = bytes;
    return Status();
  }
};

}  // namespace lego::fit::transport
