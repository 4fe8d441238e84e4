// One-sided ops served by the owner's libfit (served_rma.h).
#include "libfit/served_rma.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "libfit/auth.h"

namespace lego::fit::transport::served_rma {

// A region in the registry, by key, until destroyed.
struct Entry final : Registration {
  Registry* registry = nullptr;
  uint64_t key = 0;
  ~Entry() override {
    std::lock_guard<std::mutex> g(registry->mu_);
    registry->regions_.erase(key);
  }
};

Registry::Registry(const Context& ctx) : ctx_(ctx) {
  read_ = [this](const RpcContext&, std::span<const std::byte> req, std::span<std::byte> reply) {
    return serve(false, req, reply);
  };
  write_ = [this](const RpcContext&, std::span<const std::byte> req, std::span<std::byte> reply) {
    return serve(true, req, reply);
  };
}

std::unique_ptr<Registration> Registry::add(void* data, size_t size, bool remote_write,
                                            RemoteRegion* remote) {
  auto reg = std::make_unique<Entry>();
  reg->registry = this;
  std::lock_guard<std::mutex> g(mu_);
  // Random, so keys cannot be guessed; never one in use (a collision in 2^64 is not
  // expected, but costs nothing to rule out).
  do {
    reg->key = auth::random_u64();
  } while (regions_.count(reg->key) != 0);
  regions_[reg->key] = {static_cast<std::byte*>(data), size, remote_write};
  remote->key = reg->key;
  remote->base = reinterpret_cast<uint64_t>(data);
  return reg;
}

const Handler* Registry::handler(uint16_t opcode) const {
  if (opcode == kRmaRead) return &read_;
  if (opcode == kRmaWrite) return &write_;
  return nullptr;
}

Result<size_t> Registry::serve(bool write, std::span<const std::byte> req,
                               std::span<std::byte> reply) {
  RmaRequest r;
  if (req.size() < sizeof(r)) return Status(EPROTO, ctx_.who + ": short one-sided request");
  memcpy(&r, req.data(), sizeof(r));
  if ((write && req.size() - sizeof(r) != r.length) || (!write && r.length > reply.size())) {
    return Status(EPROTO, ctx_.who + ": malformed one-sided request");
  }
  std::lock_guard<std::mutex> g(mu_);
  auto it = regions_.find(r.key);
  auto base = it == regions_.end() ? 0 : reinterpret_cast<uint64_t>(it->second.data);
  if (it == regions_.end() || r.addr < base || r.length > it->second.size ||
      r.addr - base > it->second.size - r.length) {
    return Status(EACCES, ctx_.who + ": no registered region holds that key and range");
  }
  if (write && !it->second.writable) return Status(EACCES, ctx_.who + ": the region is read-only");
  // Copied under the lock: the region cannot be dropped (and its memory freed) meanwhile.
  std::byte* at = reinterpret_cast<std::byte*>(r.addr);
  if (write) {
    memcpy(at, req.data() + sizeof(r), r.length);
    return size_t{0};
  }
  memcpy(reply.data(), at, r.length);
  return static_cast<size_t>(r.length);
}

Status call(const Context& ctx, ClientHost* host, bool write, uint64_t key, uint64_t addr,
            std::byte* local, size_t len) {
  const size_t chunk = ctx.config->max_message_bytes - sizeof(RmaRequest);
  // A read's request is the header alone, on the stack: reads allocate nothing, so the
  // runtime's miss path (which must not: lego/excache.h) can make them (lego-run --rma on).
  alignas(8) std::byte head[sizeof(RmaRequest)];
  std::vector<std::byte> wbuf(write ? sizeof(RmaRequest) + std::min(len, chunk) : 0);
  std::byte* req = write ? wbuf.data() : head;
  for (size_t done = 0; done < len;) {
    size_t n = std::min(len - done, chunk);
    RmaRequest r{key, addr + done, n};
    memcpy(req, &r, sizeof(r));
    if (write) memcpy(req + sizeof(r), local + done, n);
    auto res = host->call(write ? kRmaWrite : kRmaRead, {req, sizeof(r) + (write ? n : 0)},
                          {write ? nullptr : local + done, write ? 0 : n});
    if (!res) return res.status();
    if (!write && res.value() != n) return Status(EPROTO, ctx.who + ": short one-sided read");
    done += n;
  }
  return Status();
}

}  // namespace lego::fit::transport::served_rma
