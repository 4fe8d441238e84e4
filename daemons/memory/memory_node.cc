// MemoryNode: address spaces of 4 KiB lines in a bounded pool, served over FIT.
//
// Lock order: the spaces table's mutex, then Space::mu, then Impl::pool_mu. Requests of one space
// serialize on its mu; different spaces proceed in parallel.
#include <sodium.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "lego/lease_table.h"
#include "lego/memory_node.h"

namespace lego::mem {
namespace {

bool all_zero(const std::byte* p) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t acc = 0;
  for (size_t i = 0; i < kLineBytes / 8; i++) acc |= w[i];
  return acc == 0;
}

template <typename T>
bool read_struct(std::span<const std::byte> in, T* out) {
  if (in.size() < sizeof(T)) return false;
  memcpy(out, in.data(), sizeof(T));
  return true;
}

}  // namespace

struct MemoryNode::Impl {
  struct Space {
    std::mutex mu;
    fit::NodeId owner = 0;
    uint32_t pid = 0;
    std::string program;
    std::unordered_map<uint64_t, uint32_t> lines;  // line address -> pool slot. Guarded by mu.
    uint64_t reserved = 0;                         // bytes promised to this space; guarded by mu
    bool closed = false;                           // guarded by mu
  };

  MemoryNodeOptions options;
  const fit::Node* node = nullptr;  // set by serve(): its counters go into status_text()
  // The spaces by id and secret. Leases run on the FIT node's serving time: a space never
  // expires for time in which the server could not hear its process.
  LeaseTable<Space> spaces;

  // The pool: capacity_bytes reserved up front, touched (and so resident) only as used.
  std::byte* pool = nullptr;
  uint32_t pool_lines = 0;
  std::mutex pool_mu;
  std::vector<uint32_t> free_slots;  // guarded by pool_mu
  uint64_t reserved_total = 0;       // sum of the spaces' reservations; guarded by pool_mu
  uint32_t never_used = 0;           // slots [never_used, pool_lines) untouched; pool_mu

  struct Counters {
    std::atomic<uint64_t> spaces_opened{0}, spaces_expired{0}, lines_stored{0}, fetches{0},
        fetch_zero{0}, write_backs{0}, zero_drops{0}, released{0}, refused{0};
  } c;

  std::byte* slot(uint32_t s) const { return pool + size_t{s} * kLineBytes; }

  bool alloc_slot(uint32_t* s) {
    std::lock_guard<std::mutex> g(pool_mu);
    if (!free_slots.empty()) {
      *s = free_slots.back();
      free_slots.pop_back();
      return true;
    }
    if (never_used < pool_lines) {
      *s = never_used++;
      return true;
    }
    return false;
  }

  void free_slot_locked(uint32_t s) { free_slots.push_back(s); }

  void free_lines(Space& sp) {
    std::lock_guard<std::mutex> g(pool_mu);
    reserved_total -= sp.reserved;
    sp.reserved = 0;
    for (auto& [addr, s] : sp.lines) free_slot_locked(s);
    c.lines_stored -= sp.lines.size();
    sp.lines.clear();
  }

  // What a request naming no space of the asker's gets.
  Status unknown_space(const SpaceHandle& h, fit::NodeId from) {
    c.refused++;
    return Status(EACCES, "address space " + std::to_string(h.id) + " asked for by node " +
                              std::to_string(from) +
                              " does not exist or belongs to another process");
  }

  // The space named by `h`, if its secret matches; renews its lease.
  Result<std::shared_ptr<Space>> lookup(const SpaceHandle& h, fit::NodeId from) {
    std::shared_ptr<Space> sp = spaces.find(h.id, h.secret);
    if (!sp) return unknown_space(h, from);
    return sp;
  }

  Result<size_t> open(const fit::RpcContext& ctx, std::span<const std::byte> req,
                      std::span<std::byte> rep) {
    OpenRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) {
      c.refused++;
      return Status(EPROTO, "open: request of " + std::to_string(req.size()) + " bytes, expected " +
                                std::to_string(sizeof(r)));
    }
    if (r.version != kProtoVersion) {
      c.refused++;
      return Status(EPROTONOSUPPORT, "open: memory protocol version " + std::to_string(r.version) +
                                         ", this memory node speaks " +
                                         std::to_string(kProtoVersion));
    }
    auto sp = std::make_shared<Space>();
    sp->owner = ctx.from;
    sp->pid = r.pid;
    sp->program.assign(r.program, strnlen(r.program, sizeof(r.program)));
    return publish(sp, rep);
  }

  // Registers `sp` (opened, or forked) under a fresh id and answers with its handle.
  Result<size_t> publish(const std::shared_ptr<Space>& sp, std::span<std::byte> rep) {
    OpenReply out{};
    if (rep.size() < sizeof(out)) return Status(EMSGSIZE, "reply buffer too small for a handle");
    const auto key = spaces.add(sp);  // no bound: capacity bounds what the spaces hold
    c.spaces_opened++;
    out.version = kProtoVersion;
    out.line_bytes = kLineBytes;
    out.handle.id = key->id;
    memcpy(out.handle.secret, key->secret, sizeof(out.handle.secret));
    out.capacity_bytes = options.capacity_bytes;
    out.lease_ms = static_cast<uint32_t>(options.lease.count());
    memcpy(rep.data(), &out, sizeof(out));
    return sizeof(out);
  }

  Result<size_t> close(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    SpaceRequest r;
    if (!read_struct(req, &r)) {
      c.refused++;
      return Status(EPROTO, "close: short request");
    }
    std::shared_ptr<Space> sp = spaces.remove(r.handle.id, r.handle.secret);
    if (!sp) return unknown_space(r.handle, ctx.from);
    std::lock_guard<std::mutex> g(sp->mu);
    sp->closed = true;
    free_lines(*sp);
    return size_t{0};
  }

  Result<size_t> fetch(const fit::RpcContext& ctx, std::span<const std::byte> req,
                       std::span<std::byte> rep) {
    FetchRequest r;
    if (!read_struct(req, &r) || r.count == 0 || r.count > kMaxBatch ||
        req.size() != sizeof(r) + r.count * sizeof(uint64_t)) {
      c.refused++;
      return Status(EPROTO, "fetch: malformed request of " + std::to_string(req.size()) + " bytes");
    }
    // One line: no header (memory_proto.h); more: a FetchReply, then the stored lines.
    const size_t head = fetch_reply_head_bytes(r.count);
    if (rep.size() < head + size_t{r.count} * kLineBytes) {
      return Status(EMSGSIZE, "fetch: " + std::to_string(r.count) +
                                  " lines do not fit FIT's max_message_bytes");
    }
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    const std::byte* addrs = req.data() + sizeof(r);
    FetchReply out{};
    size_t used = head;
    std::lock_guard<std::mutex> g(sp.value()->mu);
    for (uint32_t i = 0; i < r.count; i++) {
      uint64_t a;
      memcpy(&a, addrs + i * sizeof(a), sizeof(a));
      if (a % kLineBytes != 0) {
        c.refused++;
        return Status(EINVAL, "fetch: address " + std::to_string(a) + " is not line aligned");
      }
      auto it = sp.value()->lines.find(a);
      c.fetches++;
      if (it == sp.value()->lines.end()) {
        c.fetch_zero++;
        continue;
      }
      out.stored_mask |= uint64_t{1} << i;
      memcpy(rep.data() + used, slot(it->second), kLineBytes);
      used += kLineBytes;
    }
    if (head != 0) memcpy(rep.data(), &out, sizeof(out));
    return used;
  }

  Result<size_t> write_back(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    WriteBackRequest r;
    if (!read_struct(req, &r) || r.count == 0 || r.count > kMaxBatch ||
        req.size() != sizeof(r) + r.count * (sizeof(uint64_t) + kLineBytes)) {
      c.refused++;
      return Status(EPROTO,
                    "write-back: malformed request of " + std::to_string(req.size()) + " bytes");
    }
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    const std::byte* addrs = req.data() + sizeof(r);
    const std::byte* data = addrs + r.count * sizeof(uint64_t);
    Space& s = *sp.value();
    std::lock_guard<std::mutex> g(s.mu);
    for (uint32_t i = 0; i < r.count; i++) {
      uint64_t a;
      memcpy(&a, addrs + i * sizeof(a), sizeof(a));
      if (a % kLineBytes != 0) {
        c.refused++;
        return Status(EINVAL, "write-back: address " + std::to_string(a) + " is not line aligned");
      }
    }
    for (uint32_t i = 0; i < r.count; i++) {
      uint64_t a;
      memcpy(&a, addrs + i * sizeof(a), sizeof(a));
      const std::byte* line = data + size_t{i} * kLineBytes;
      c.write_backs++;
      auto it = s.lines.find(a);
      if (all_zero(line)) {
        // Zero lines cost nothing to keep: forget them.
        c.zero_drops++;
        if (it != s.lines.end()) {
          std::lock_guard<std::mutex> pg(pool_mu);
          free_slot_locked(it->second);
          s.lines.erase(it);
          c.lines_stored--;
        }
        continue;
      }
      if (it == s.lines.end()) {
        uint32_t slot_index;
        if (!alloc_slot(&slot_index)) {
          c.refused++;
          return Status(ENOMEM, "memory node is full: all " + std::to_string(pool_lines) +
                                    " lines (" + std::to_string(options.capacity_bytes >> 20) +
                                    " MiB) are in use");
        }
        it = s.lines.emplace(a, slot_index).first;
        c.lines_stored++;
      }
      memcpy(slot(it->second), line, kLineBytes);
    }
    return size_t{0};
  }

  Result<size_t> release(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    ReleaseRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r) || r.addr % kLineBytes != 0 ||
        r.length % kLineBytes != 0 || r.addr + r.length < r.addr) {
      c.refused++;
      return Status(EINVAL, "release: malformed or unaligned range");
    }
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    Space& s = *sp.value();
    std::lock_guard<std::mutex> g(s.mu);
    std::lock_guard<std::mutex> pg(pool_mu);
    uint64_t n = r.length / kLineBytes;
    auto drop = [&](std::unordered_map<uint64_t, uint32_t>::iterator it) {
      free_slot_locked(it->second);
      c.lines_stored--;
      c.released++;
      return s.lines.erase(it);
    };
    if (n <= s.lines.size()) {
      for (uint64_t a = r.addr; a < r.addr + r.length; a += kLineBytes) {
        auto it = s.lines.find(a);
        if (it != s.lines.end()) drop(it);
      }
    } else {
      // A huge range over a small space: walk the space instead.
      for (auto it = s.lines.begin(); it != s.lines.end();) {
        if (it->first >= r.addr && it->first < r.addr + r.length)
          it = drop(it);
        else
          ++it;
      }
    }
    return size_t{0};
  }

  Result<size_t> reserve(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    ReserveRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) {
      c.refused++;
      return Status(EPROTO, "reserve: malformed request");
    }
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    Space& s = *sp.value();
    std::lock_guard<std::mutex> g(s.mu);
    std::lock_guard<std::mutex> pg(pool_mu);
    if (r.delta_bytes < 0) {
      uint64_t give = std::min<uint64_t>(s.reserved, static_cast<uint64_t>(-r.delta_bytes));
      s.reserved -= give;
      reserved_total -= give;
      return size_t{0};
    }
    uint64_t want = static_cast<uint64_t>(r.delta_bytes);
    if (want > options.capacity_bytes || reserved_total + want > options.capacity_bytes) {
      c.refused++;
      return Status(ENOMEM, "memory node is full: " + std::to_string(reserved_total >> 20) +
                                " of " + std::to_string(options.capacity_bytes >> 20) +
                                " MiB promised, " + std::to_string(want >> 10) +
                                " KiB more asked for by pid " + std::to_string(s.pid));
    }
    s.reserved += want;
    reserved_total += want;
    return size_t{0};
  }

  // A copy of a space for a forked child. Lines are copied, not shared: simple, and a
  // child that execs soon (the common case) frees its copy when it is gone.
  Result<size_t> fork(const fit::RpcContext& ctx, std::span<const std::byte> req,
                      std::span<std::byte> rep) {
    SpaceRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) {
      c.refused++;
      return Status(EPROTO, "fork: malformed request");
    }
    // Checked before the copy is charged: publish() failing afterwards would leak it.
    if (rep.size() < sizeof(OpenReply)) return Status(EMSGSIZE, "fork: reply buffer too small");
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    Space& parent = *sp.value();
    auto child = std::make_shared<Space>();
    child->owner = ctx.from;
    {
      std::lock_guard<std::mutex> g(parent.mu);
      child->pid = parent.pid;
      child->program = parent.program + " (fork)";
      std::lock_guard<std::mutex> pg(pool_mu);
      // The copy needs the parent's promise (every line it may ever write back) again.
      const uint64_t want = std::max<uint64_t>(parent.reserved, parent.lines.size() * kLineBytes);
      const uint64_t free_slots_now = free_slots.size() + (pool_lines - never_used);
      if (reserved_total + want > options.capacity_bytes || free_slots_now < parent.lines.size()) {
        c.refused++;
        return Status(ENOMEM, "memory node is full: cannot copy address space " +
                                  std::to_string(r.handle.id) + " (" + std::to_string(want >> 20) +
                                  " MiB) for a forked child");
      }
      child->reserved = want;
      reserved_total += want;
      child->lines.reserve(parent.lines.size());
      for (auto& [addr, s] : parent.lines) {
        uint32_t copy;
        if (!free_slots.empty()) {
          copy = free_slots.back();
          free_slots.pop_back();
        } else {
          copy = never_used++;
        }
        memcpy(slot(copy), slot(s), kLineBytes);
        child->lines.emplace(addr, copy);
      }
      c.lines_stored += child->lines.size();
    }
    return publish(child, rep);
  }

  Result<size_t> heartbeat(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    SpaceRequest r;
    if (!read_struct(req, &r)) {
      c.refused++;
      return Status(EPROTO, "heartbeat: short request");
    }
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    return size_t{0};
  }
};

MemoryNode::MemoryNode(MemoryNodeOptions options) : impl_(std::make_unique<Impl>()) {
  if (sodium_init() < 0) abort();
  impl_->options = options;
  impl_->pool_lines = static_cast<uint32_t>(options.capacity_bytes / kLineBytes);
  void* p = mmap(nullptr, std::max<size_t>(options.capacity_bytes, kLineBytes),
                 PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    impl_->pool_lines = 0;  // every write-back then fails with ENOMEM, clearly
  } else {
    impl_->pool = static_cast<std::byte*>(p);
    // No MADV_HUGEPAGE, though misses land on random slots and 4 KiB pages miss the TLB:
    // with THP defrag "madvise" (Debian's default) the first store to each new 2 MiB of the
    // pool may compact memory synchronously, stalling the (single) server thread, and
    // every miss queued behind it, for 4-8 ms. Measured: with it, 30-38% of a Zipf run's
    // miss time was such stalls; without, none, and per-access times the same otherwise.
  }
}

MemoryNode::~MemoryNode() {
  if (impl_->pool != nullptr) {
    munmap(impl_->pool, std::max<size_t>(impl_->options.capacity_bytes, kLineBytes));
  }
}

void MemoryNode::serve(fit::Node& node) {
  Impl* m = impl_.get();
  m->node = &node;
  m->spaces.follow(&node);
  node.handle(kOpen, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                         std::span<std::byte> rep) { return m->open(ctx, req, rep); });
  node.handle(kClose, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                          std::span<std::byte>) { return m->close(ctx, req); });
  node.handle(kFetch, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                          std::span<std::byte> rep) { return m->fetch(ctx, req, rep); });
  node.handle(kWriteBack, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                              std::span<std::byte>) { return m->write_back(ctx, req); });
  node.handle(kRelease, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                            std::span<std::byte>) { return m->release(ctx, req); });
  node.handle(kReserve, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                            std::span<std::byte>) { return m->reserve(ctx, req); });
  node.handle(kFork, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                         std::span<std::byte> rep) { return m->fork(ctx, req, rep); });
  node.handle(kHeartbeat, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                              std::span<std::byte>) { return m->heartbeat(ctx, req); });
  node.handle(kStatus,
              [this](const fit::RpcContext&, std::span<const std::byte>,
                     std::span<std::byte> rep) -> Result<size_t> {
                std::string text = status_text();
                size_t n = std::min(text.size(), rep.size());
                memcpy(rep.data(), text.data(), n);
                return n;
              });
}

size_t MemoryNode::expire_idle() {
  auto expired = impl_->spaces.expire(impl_->options.lease);
  for (auto& [id, sp] : expired) {
    std::lock_guard<std::mutex> g(sp->mu);
    sp->closed = true;
    impl_->free_lines(*sp);
    impl_->c.spaces_expired++;
    fprintf(stderr,
            "lego-memd: freed address space %lu of %s (pid %u on node %u): no request for %lld "
            "ms while this memory node was serving, its processor node is gone\n",
            static_cast<unsigned long>(id), sp->program.c_str(), sp->pid, sp->owner,
            static_cast<long long>(impl_->options.lease.count()));
  }
  return expired.size();
}

MemoryNodeStats MemoryNode::stats() const {
  MemoryNodeStats s;
  s.spaces_open = impl_->spaces.size();
  auto& c = impl_->c;
  s.spaces_opened = c.spaces_opened;
  s.spaces_expired = c.spaces_expired;
  s.lines_stored = c.lines_stored;
  s.lines_capacity = impl_->pool_lines;
  {
    std::lock_guard<std::mutex> g(impl_->pool_mu);
    s.bytes_reserved = impl_->reserved_total;
  }
  s.fetches = c.fetches;
  s.fetch_zero = c.fetch_zero;
  s.write_backs = c.write_backs;
  s.zero_drops = c.zero_drops;
  s.released = c.released;
  s.refused = c.refused;
  return s;
}

std::string MemoryNode::status_text() const {
  MemoryNodeStats s = stats();
  std::ostringstream o;
#define LEGO_MEMORY_NODE_LINE(name, type, doc) o << #name " " << s.name << "\n";
  LEGO_MEMORY_NODE_COUNTERS(LEGO_MEMORY_NODE_LINE)
#undef LEGO_MEMORY_NODE_LINE
  o << "bytes_stored " << s.lines_stored * kLineBytes << "\n";
  if (impl_->node != nullptr) o << fit::stats_text(impl_->node->stats());
  impl_->spaces.for_each([&o](uint64_t id, Impl::Space& sp) {
    std::lock_guard<std::mutex> sg(sp.mu);
    o << "space " << id << " node " << sp.owner << " pid " << sp.pid << " program "
      << (sp.program.empty() ? "?" : sp.program) << " lines " << sp.lines.size() << "\n";
  });
  return o.str();
}

}  // namespace lego::mem
