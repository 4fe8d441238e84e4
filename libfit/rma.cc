// One-sided ops: memory registration (MemoryRegion) and rma_read / rma_write. The core
// checks the range and holds a channel to the region's node; the provider moves the bytes
// (verbs, ofi_tcp: fi_read/fi_write through the channel's bounce buffer; tcp and shm:
// requests served by the owner's libfit server thread, served_rma.h).
#include "libfit/node_impl.h"

namespace lego::fit {

struct MemoryRegion::Impl {
  std::unique_ptr<transport::Registration> reg;
};
MemoryRegion::MemoryRegion() = default;
MemoryRegion::MemoryRegion(MemoryRegion&&) noexcept = default;
MemoryRegion& MemoryRegion::operator=(MemoryRegion&&) noexcept = default;
MemoryRegion::~MemoryRegion() = default;

Result<MemoryRegion> Node::register_memory(void* data, size_t size, bool remote_write) {
  RemoteRegion remote;  // (the provider refuses before start(): nothing serves it yet)
  auto reg = impl_->transport->register_memory(data, size, remote_write, &remote);
  if (!reg) return reg.status();
  MemoryRegion mr;
  mr.impl_ = std::make_unique<MemoryRegion::Impl>();
  mr.impl_->reg = std::move(reg.value());
  mr.data_ = data;
  mr.size_ = size;
  mr.remote_ = remote;
  mr.remote_.node = impl_->self.id;
  mr.remote_.length = size;
  return mr;
}

Status Node::rma_read(const RemoteRegion& region, uint64_t offset, std::span<std::byte> dst) {
  return impl_->rma(region, offset, dst.data(), dst.size(), false);
}

Status Node::rma_write(const RemoteRegion& region, uint64_t offset,
                       std::span<const std::byte> src) {
  return impl_->rma(region, offset, const_cast<std::byte*>(src.data()), src.size(), true);
}

Status Node::Impl::rma(const RemoteRegion& region, uint64_t offset, std::byte* local, size_t len,
                       bool write) {
  if (offset > region.length || len > region.length - offset) {
    return Status(EINVAL, who() + ": one-sided " + (write ? "write" : "read") + " of " +
                              std::to_string(len) + " bytes at offset " + std::to_string(offset) +
                              " is outside node " + std::to_string(region.node) + "'s " +
                              std::to_string(region.length) + "-byte region");
  }
  std::unique_lock<std::mutex> lock;
  auto chr = channel_for(region.node, lock);
  if (!chr) return chr.status();
  ClientChannel& ch = *chr.value();
  if (!ch.connected || !ch.broken.is_ok()) LEGO_RETURN_IF_ERROR(connect(ch));
  LEGO_RETURN_IF_ERROR(ch.conn->rma(write, region.key, region.base + offset, local, len));
  (write ? counters.rma_writes : counters.rma_reads).fetch_add(1, std::memory_order_relaxed);
  return Status();
}

}  // namespace lego::fit
