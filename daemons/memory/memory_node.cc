// MemoryNode: address spaces of 4 KiB lines in a bounded pool, promised in vRegions, served
// over FIT; and the copy worker that pushes a vRegion to another memory node.
//
// The pool is cut into blocks of one vRegion each (16 MiB); a placed vRegion owns one block
// for as long as it is placed, line k at byte k * 4 KiB of it, so a processor granted the
// block's key (kPlaceRma) finds any line without asking (docs/rma.md). Invariant: a slot
// whose line is not stored holds zeros (a freed line is zeroed), so a one-sided read of a
// line never written reads zeros as kFetch answers.
//
// Lock order: the spaces table's mutex, then Space::mu, then Impl::pool_mu; Impl::jobs_mu is
// never held with any of them. Requests of one space serialize on its mu; different spaces
// proceed in parallel. The copy worker takes a space's mu only to read one batch.
#include <sodium.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <vector>

#include "lego/lease_table.h"
#include "lego/memory_node.h"
#include "lego/retry.h"

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

uint64_t random_nonzero() {
  uint64_t v = 0;
  while (v == 0) randombytes_buf(&v, sizeof(v));
  return v;
}

size_t versions_bytes(uint32_t lines) {
  return std::max<size_t>(size_t{lines} * sizeof(uint64_t), 4096);
}

std::string mib(uint64_t bytes) {
  return std::to_string(bytes >> 20) + " MiB";
}

}  // namespace

struct MemoryNode::Impl {
  // A placed vRegion of a space. While a copy of it is incoming (kPlaceIncomingCopy until
  // the copy's last batch), `released` holds, per line, the version of the newest release
  // that covered it (0: none), and all-zero write-backs are kept as lines: together they
  // let a copied line be applied only when nothing newer happened here (memory_proto.h).
  struct VRegion {
    uint32_t block = 0;  // the pool block holding its lines
    bool incoming = false;
    std::vector<uint64_t> released;  // kLinesPerVRegion entries while incoming, else empty
    // The block's registration for one-sided reads (kPlaceRma), or null. Dropping it
    // revokes the key: done before the block's lines are zeroed and the block reused.
    std::unique_ptr<fit::MemoryRegion> rma;
  };

  struct Space {
    std::mutex mu;
    fit::NodeId owner = 0;
    uint32_t pid = 0;
    uint64_t process_key = 0;
    std::string program;
    // Guarded by mu from here on.
    bool based = false;                            // region_base set (by the first kPlace)
    uint64_t region_base = 0;                      // kVRegionBytes aligned
    std::unordered_map<uint64_t, uint32_t> lines;  // line address -> pool slot (fixed by
                                                   // its vRegion's block)
    std::map<uint64_t, VRegion> placed;            // vRegion index -> state
    bool closed = false;

    // The vRegion index of line address `a`, or -1 when `a` is in no placed vRegion.
    int64_t placed_vregion(uint64_t a) const {
      if (!based || a < region_base) return -1;
      uint64_t i = (a - region_base) / kVRegionBytes;
      return placed.count(i) ? static_cast<int64_t>(i) : -1;
    }
    uint64_t vregion_start(uint64_t i) const { return region_base + i * kVRegionBytes; }
  };

  struct CopyJob {
    uint64_t id = 0;
    uint64_t source_space = 0;
    uint8_t source_secret[16] = {};
    uint64_t vregion = 0;
    SpaceHandle target{};
    fit::NodeId target_node = 0;
    // Guarded by jobs_mu.
    uint32_t state = kCopyRunning;
    int error = 0;
    std::string message;
    uint64_t lines_copied = 0;
    uint64_t lines_total = 0;
  };

  MemoryNodeOptions options;
  uint64_t incarnation = 0;
  fit::Node* node = nullptr;  // set by serve(): counters, and the copy worker's calls
  // Set by stop(): no more registrations (they must all be gone before `node` is).
  std::atomic<bool> grants_closed{false};
  // The spaces by id and secret. Leases run on the FIT node's serving time: a space never
  // expires for time in which the server could not hear its process.
  LeaseTable<Space> spaces;

  // The pool: capacity_bytes reserved up front, touched (and so resident) only as used, in
  // blocks of one vRegion; versions: one per slot, the version of the line stored there
  // (same treatment). Placements never promise more vRegions than there are blocks.
  std::byte* pool = nullptr;
  uint64_t* versions = nullptr;
  uint32_t pool_lines = 0;   // pool_blocks * kLinesPerVRegion
  uint32_t pool_blocks = 0;  // capacity_bytes / kVRegionBytes
  mutable std::mutex pool_mu;
  std::vector<uint32_t> free_blocks;  // guarded by pool_mu
  uint64_t reserved_total = 0;        // bytes of all placed vRegions; guarded by pool_mu
  uint64_t placed_total = 0;          // placed vRegions; guarded by pool_mu
  uint32_t never_used = 0;            // blocks [never_used, pool_blocks) untouched; pool_mu

  // Copy jobs: queued and running ones in `queue` (the worker takes the front), all known
  // ones (for kCopyStatus) in `jobs`, the finished ones' ids in finish order in `finished`.
  std::mutex jobs_mu;
  std::condition_variable jobs_cv;
  std::deque<std::shared_ptr<CopyJob>> queue;                   // guarded by jobs_mu
  std::unordered_map<uint64_t, std::shared_ptr<CopyJob>> jobs;  // guarded by jobs_mu
  std::deque<uint64_t> finished;                                // guarded by jobs_mu
  uint64_t next_job = 1;                                        // guarded by jobs_mu
  bool stopping = false;                                        // guarded by jobs_mu
  std::thread worker;

  struct Counters {
    std::atomic<uint64_t> spaces_opened{0}, spaces_expired{0}, lines_stored{0}, fetches{0},
        fetch_zero{0}, write_backs{0}, zero_drops{0}, released{0}, refused{0}, places{0},
        unplaces{0}, zero_kept{0}, copies_started{0}, copies_done{0}, copies_failed{0},
        copy_lines_sent{0}, copy_lines_applied{0}, copy_lines_skipped{0}, rma_grants{0},
        rma_grant_failures{0}, rma_revoked{0}, generation{0};
  } c;

  std::byte* slot(uint32_t s) const { return pool + size_t{s} * kLineBytes; }
  std::byte* block(uint32_t b) const { return pool + size_t{b} * kVRegionBytes; }

  // A block for a newly placed vRegion (pool_mu held). Cannot fail once the placement's
  // promise was counted: placements never promise more vRegions than there are blocks.
  bool alloc_block_locked(uint32_t* b) {
    if (!free_blocks.empty()) {
      *b = free_blocks.back();
      free_blocks.pop_back();
      return true;
    }
    if (never_used < pool_blocks) {
      *b = never_used++;
      return true;
    }
    return false;
  }

  // Drops line `it` of `sp` (sp.mu held): its slot is zeroed (the pool's invariant).
  std::unordered_map<uint64_t, uint32_t>::iterator drop_line_locked(
      Space& sp, std::unordered_map<uint64_t, uint32_t>::iterator it) {
    memset(slot(it->second), 0, kLineBytes);
    c.lines_stored--;
    return sp.lines.erase(it);
  }

  // The slot of line `a` of vRegion `vr` (placed at its block) of `sp`.
  static uint32_t slot_of(const Space& sp, const VRegion& vr, uint64_t a) {
    const uint64_t k = (a - sp.region_base) % kVRegionBytes / kLineBytes;
    return static_cast<uint32_t>(vr.block * kLinesPerVRegion + k);
  }

  // Stores `data` with `version` as line `a` of `sp` (sp.mu held; `a` in a placed vRegion).
  void store_line(Space& sp, uint64_t a, const std::byte* data, uint64_t version) {
    auto it = sp.lines.find(a);
    if (it == sp.lines.end()) {
      const VRegion& vr = sp.placed.find(static_cast<uint64_t>(sp.placed_vregion(a)))->second;
      it = sp.lines.emplace(a, slot_of(sp, vr, a)).first;
      c.lines_stored++;
    }
    memcpy(slot(it->second), data, kLineBytes);
    versions[it->second] = version;
  }

  // Ends vRegion `vr`'s grant, if any: from here on a one-sided read with its key fails.
  void revoke(VRegion& vr) {
    if (!vr.rma) return;
    vr.rma.reset();
    c.rma_revoked++;
  }

  // Zeroes block `b`, no longer placed, by giving its pages back to the kernel (they read
  // as zeros again): a process that ended leaves no resident memory behind. Zeroing its
  // lines in place kept every page it had written resident for good, so each run of a
  // program grew lego-memd's RSS by the lines it stored (hostile_memd_test: +10-20 MiB).
  void zero_block(uint32_t b) {
    if (madvise(block(b), kVRegionBytes, MADV_DONTNEED) != 0) {
      memset(block(b), 0, kVRegionBytes);  // cannot happen for a private anonymous map
    }
  }

  void free_lines(Space& sp) {
    // Keys first: no one-sided read may see a block being zeroed or reused.
    for (auto& [i, vr] : sp.placed) revoke(vr);
    // Every line of the space is in one of its blocks, zeroed whole below.
    c.lines_stored -= sp.lines.size();
    sp.lines.clear();
    for (auto& [i, vr] : sp.placed) zero_block(vr.block);
    std::lock_guard<std::mutex> g(pool_mu);
    reserved_total -= sp.placed.size() * kVRegionBytes;
    placed_total -= sp.placed.size();
    for (auto& [i, vr] : sp.placed) free_blocks.push_back(vr.block);
    sp.placed.clear();
    c.generation++;
  }

  // Registers vRegion `vr`'s block for one-sided reads, once (sp.mu held); fills `out`'s
  // grant. A failed registration leaves the vRegion served by requests only.
  void grant(const Space& sp, VRegion& vr, uint64_t i, PlaceReply* out) {
    if (!vr.rma && node != nullptr && !grants_closed.load()) {
      auto r = node->register_memory(block(vr.block), kVRegionBytes, /*remote_write=*/false);
      if (!r) {
        c.rma_grant_failures++;
        fprintf(stderr,
                "lego-memd: vRegion %lu of pid %u served by requests only: registering its "
                "block for one-sided reads failed: %s\n",
                static_cast<unsigned long>(i), sp.pid, r.status().message().c_str());
        return;
      }
      vr.rma = std::make_unique<fit::MemoryRegion>(std::move(r.value()));
      c.rma_grants++;
    }
    if (!vr.rma) return;
    out->rma_granted = 1;
    out->rma_key = vr.rma->remote().key;
    out->rma_base = vr.rma->remote().base;
  }

  // Drops the all-zero lines of vRegion i of sp (sp.mu held): the kept zero lines of a
  // finished copy.
  void drop_zero_lines(Space& sp, uint64_t i) {
    const uint64_t start = sp.vregion_start(i);
    for (uint64_t k = 0; k < kLinesPerVRegion; k++) {
      auto it = sp.lines.find(start + k * kLineBytes);
      if (it != sp.lines.end() && all_zero(slot(it->second))) drop_line_locked(sp, it);
    }
  }

  // Forgets every line of vRegion i of sp and zeroes its block whole (sp.mu held; the
  // vRegion is being unplaced, its key revoked): no line is zeroed on its own first.
  void clear_vregion(Space& sp, uint64_t i, const VRegion& vr) {
    const uint64_t start = sp.vregion_start(i);
    for (uint64_t k = 0; k < kLinesPerVRegion; k++) {
      if (sp.lines.erase(start + k * kLineBytes) != 0) c.lines_stored--;
    }
    zero_block(vr.block);
  }

  Status refuse(int code, const std::string& msg) {
    c.refused++;
    return Status(code, msg);
  }

  // What a request naming no space of the asker's gets.
  Status unknown_space(const SpaceHandle& h, fit::NodeId from) {
    return refuse(EACCES, "address space " + std::to_string(h.id) + " asked for by node " +
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
      // A v1/v2 OpenRequest had the same size; its version field says which it is.
      return refuse(EPROTO, "open: request of " + std::to_string(req.size()) + " bytes, expected " +
                                std::to_string(sizeof(r)));
    }
    if (r.version != kProtoVersion) {
      return refuse(EPROTONOSUPPORT, "open: memory protocol version " + std::to_string(r.version) +
                                         ", this memory node speaks " +
                                         std::to_string(kProtoVersion));
    }
    auto sp = std::make_shared<Space>();
    sp->owner = ctx.from;
    sp->pid = r.pid;
    sp->process_key = r.process_key;
    sp->program.assign(r.program, strnlen(r.program, sizeof(r.program)));
    return publish(sp, rep);
  }

  // Registers `sp` (opened, or forked) under a fresh id and answers with its handle.
  Result<size_t> publish(const std::shared_ptr<Space>& sp, std::span<std::byte> rep) {
    OpenReply out{};
    if (rep.size() < sizeof(out)) return Status(EMSGSIZE, "reply buffer too small for a handle");
    const auto key = spaces.add(sp);  // no bound: capacity bounds what the spaces hold
    c.spaces_opened++;
    c.generation++;
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
    if (!read_struct(req, &r)) return refuse(EPROTO, "close: short request");
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
      return refuse(EPROTO, "fetch: malformed request of " + std::to_string(req.size()) + " bytes");
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
        return refuse(EINVAL, "fetch: address " + std::to_string(a) + " is not line aligned");
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
    if (!read_struct(req, &r)) return refuse(EPROTO, "write-back: short request");
    const bool copy = (r.flags & kWriteBackCopy) != 0;
    const bool last = (r.flags & kWriteBackCopyLast) != 0;
    if ((r.flags & ~(kWriteBackCopy | kWriteBackCopyLast)) != 0 || (last && !copy) ||
        r.count > kMaxBatch || (r.count == 0 && !last) ||
        req.size() != write_back_request_bytes(r.count, r.flags)) {
      return refuse(EPROTO, "write-back: malformed request of " + std::to_string(req.size()) +
                                " bytes (count " + std::to_string(r.count) + ", flags " +
                                std::to_string(r.flags) + ")");
    }
    if (!copy && r.version == 0) return refuse(EPROTO, "write-back: version 0");
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    Space& s = *sp.value();
    const std::byte* addrs = req.data() + sizeof(r);
    const std::byte* vers = addrs + size_t{r.count} * sizeof(uint64_t);
    const std::byte* data = vers + (copy ? size_t{r.count} * sizeof(uint64_t) : 0);
    std::lock_guard<std::mutex> g(s.mu);
    // Every address is checked before any line is stored: a refused batch changes nothing.
    for (uint32_t i = 0; i < r.count; i++) {
      uint64_t a;
      memcpy(&a, addrs + i * sizeof(a), sizeof(a));
      if (a % kLineBytes != 0) {
        return refuse(EINVAL, "write-back: address " + std::to_string(a) + " is not line aligned");
      }
      const int64_t v = s.placed_vregion(a);
      if (v < 0 || (copy && static_cast<uint64_t>(v) != r.vregion)) {
        return refuse(EINVAL, "write-back: address " + std::to_string(a) +
                                  (copy ? " is not in the vRegion being copied"
                                        : " is in no vRegion placed here (kPlace first)") +
                                  " (space " + std::to_string(r.handle.id) + ", pid " +
                                  std::to_string(s.pid) + ")");
      }
    }
    if (copy) return apply_copy(s, r, addrs, vers, data);
    for (uint32_t i = 0; i < r.count; i++) {
      uint64_t a;
      memcpy(&a, addrs + i * sizeof(a), sizeof(a));
      const std::byte* line = data + size_t{i} * kLineBytes;
      c.write_backs++;
      if (all_zero(line)) {
        const VRegion& vr = s.placed.find(static_cast<uint64_t>(s.placed_vregion(a)))->second;
        if (vr.incoming) {
          // Kept while a copy is incoming: an older copied line must not bring it back.
          c.zero_kept++;
        } else {
          // Zero lines cost nothing to keep: forget them.
          c.zero_drops++;
          auto it = s.lines.find(a);
          if (it != s.lines.end()) drop_line_locked(s, it);
          continue;
        }
      }
      store_line(s, a, line, r.version);
    }
    return size_t{0};
  }

  // A copy worker's batch (s.mu held, addresses checked): each line stored only when this
  // node holds no newer version of it and no release at least as new covers it. A batch for
  // a vRegion with no copy incoming (a retried last batch, a copy that came after the
  // vRegion became a full replica some other way) is dropped: what is here is newer.
  Result<size_t> apply_copy(Space& s, const WriteBackRequest& r, const std::byte* addrs,
                            const std::byte* vers, const std::byte* data) {
    VRegion& vr = s.placed.find(r.vregion)->second;
    if (!vr.incoming) {
      c.copy_lines_skipped += r.count;
      return size_t{0};
    }
    const uint64_t start = s.vregion_start(r.vregion);
    for (uint32_t i = 0; i < r.count; i++) {
      uint64_t a, v;
      memcpy(&a, addrs + i * sizeof(a), sizeof(a));
      memcpy(&v, vers + i * sizeof(v), sizeof(v));
      auto it = s.lines.find(a);
      const bool newer_here = it != s.lines.end() && versions[it->second] >= v;
      const bool released_since = vr.released[(a - start) / kLineBytes] >= v;
      if (newer_here || released_since) {
        c.copy_lines_skipped++;
        continue;
      }
      store_line(s, a, data + size_t{i} * kLineBytes, v);
      c.copy_lines_applied++;
    }
    if ((r.flags & kWriteBackCopyLast) != 0) {
      // The copy is whole: the kept zero lines and the releases have done their work.
      drop_zero_lines(s, r.vregion);
      vr.incoming = false;
      vr.released.clear();
      vr.released.shrink_to_fit();
      c.generation++;
    }
    return size_t{0};
  }

  Result<size_t> release(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    ReleaseRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r) || r.addr % kLineBytes != 0 ||
        r.length % kLineBytes != 0 || r.addr + r.length < r.addr) {
      return refuse(EINVAL, "release: malformed or unaligned range");
    }
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    Space& s = *sp.value();
    std::lock_guard<std::mutex> g(s.mu);
    const uint64_t end = r.addr + r.length;
    // Remembered for every incoming copy it covers (memory_proto.h).
    for (auto& [i, vr] : s.placed) {
      if (!vr.incoming) continue;
      const uint64_t vs = s.vregion_start(i), ve = vs + kVRegionBytes;
      const uint64_t from = std::max(vs, r.addr), to = std::min(ve, end);
      for (uint64_t a = from; a < to; a += kLineBytes) {
        uint64_t& rel = vr.released[(a - vs) / kLineBytes];
        rel = std::max(rel, r.version);
      }
    }
    uint64_t n = r.length / kLineBytes;
    if (n <= s.lines.size()) {
      for (uint64_t a = r.addr; a < end; a += kLineBytes) {
        auto it = s.lines.find(a);
        if (it != s.lines.end()) {
          drop_line_locked(s, it);
          c.released++;
        }
      }
    } else {
      // A huge range over a small space: walk the space instead.
      for (auto it = s.lines.begin(); it != s.lines.end();) {
        if (it->first >= r.addr && it->first < end) {
          it = drop_line_locked(s, it);
          c.released++;
        } else {
          ++it;
        }
      }
    }
    return size_t{0};
  }

  Result<size_t> place(const fit::RpcContext& ctx, std::span<const std::byte> req,
                       std::span<std::byte> rep, bool unplace) {
    PlaceRequest r;
    const char* what = unplace ? "unplace" : "place";
    if (!read_struct(req, &r) || req.size() != sizeof(r) ||
        (r.flags & ~(kPlaceIncomingCopy | kPlaceRma)) != 0) {
      return refuse(EPROTO, std::string(what) + ": malformed request");
    }
    if (r.region_base % kVRegionBytes != 0 || r.vregion >= kMaxVRegions ||
        r.region_base + (r.vregion + 1) * kVRegionBytes < r.region_base) {
      return refuse(EINVAL, std::string(what) + ": vRegion " + std::to_string(r.vregion) +
                                " of a region at " + std::to_string(r.region_base) +
                                " is not a vRegion (the base must be 16 MiB aligned)");
    }
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    Space& s = *sp.value();
    std::lock_guard<std::mutex> g(s.mu);
    if (s.based && s.region_base != r.region_base) {
      return refuse(EINVAL, std::string(what) + ": region base " + std::to_string(r.region_base) +
                                " differs from the space's " + std::to_string(s.region_base));
    }
    if (unplace) {
      auto it = s.placed.find(r.vregion);
      if (it == s.placed.end()) return size_t{0};  // a retried call
      revoke(it->second);  // before its lines are zeroed and its block reused
      clear_vregion(s, r.vregion, it->second);
      const uint32_t b = it->second.block;
      s.placed.erase(it);
      std::lock_guard<std::mutex> pg(pool_mu);
      free_blocks.push_back(b);
      reserved_total -= kVRegionBytes;
      placed_total--;
      c.unplaces++;
      c.generation++;
      return size_t{0};
    }
    if (rep.size() < sizeof(PlaceReply)) return Status(EMSGSIZE, "place: reply buffer too small");
    PlaceReply out{};
    out.capacity_bytes = options.capacity_bytes;
    auto answer = [&] {
      memcpy(rep.data(), &out, sizeof(out));
      return sizeof(out);
    };
    if (auto it = s.placed.find(r.vregion); it != s.placed.end()) {  // a retried call
      if (r.flags & kPlaceRma) grant(s, it->second, r.vregion, &out);
      std::lock_guard<std::mutex> pg(pool_mu);
      out.reserved_bytes = reserved_total;
      return answer();
    }
    uint32_t b = 0;
    {
      std::lock_guard<std::mutex> pg(pool_mu);
      out.reserved_bytes = reserved_total;
      if (reserved_total + kVRegionBytes > options.capacity_bytes || !alloc_block_locked(&b)) {
        c.refused++;
        out.error = ENOMEM;  // an answer, not an error frame (memory_proto.h)
        return answer();
      }
      reserved_total += kVRegionBytes;
      placed_total++;
      out.reserved_bytes = reserved_total;
    }
    s.based = true;
    s.region_base = r.region_base;
    VRegion& vr = s.placed[r.vregion];
    vr.block = b;
    if (r.flags & kPlaceIncomingCopy) {
      vr.incoming = true;
      vr.released.assign(kLinesPerVRegion, 0);
    }
    if (r.flags & kPlaceRma) grant(s, vr, r.vregion, &out);
    c.places++;
    c.generation++;
    return answer();
  }

  // A copy of a space for a forked child: lines (with their versions) and placements are
  // copied, not shared: simple, and a child that execs soon (the common case) frees its
  // copy when it is gone. A vRegion with a copy incoming stays so in the child (the child's
  // copy is not a full replica either). The copy has blocks of its own and no grants: a
  // snapshot is read by kFetch.
  Result<size_t> fork(const fit::RpcContext& ctx, std::span<const std::byte> req,
                      std::span<std::byte> rep) {
    SpaceRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) {
      return refuse(EPROTO, "fork: malformed request");
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
      child->process_key = parent.process_key;
      child->program = parent.program + " (fork)";
      child->based = parent.based;
      child->region_base = parent.region_base;
      std::lock_guard<std::mutex> pg(pool_mu);
      // The copy needs the parent's promise (every vRegion it placed) again.
      const uint64_t want = parent.placed.size() * kVRegionBytes;
      if (reserved_total + want > options.capacity_bytes ||
          free_blocks.size() + (pool_blocks - never_used) < parent.placed.size()) {
        return refuse(ENOMEM, "memory node is full: cannot copy address space " +
                                  std::to_string(r.handle.id) + " (" + mib(want) +
                                  " placed) for a forked child");
      }
      reserved_total += want;
      placed_total += parent.placed.size();
      for (auto& [i, from] : parent.placed) {
        VRegion& vr = child->placed[i];
        alloc_block_locked(&vr.block);  // cannot fail: checked above
        vr.incoming = from.incoming;
        vr.released = from.released;
      }
      child->lines.reserve(parent.lines.size());
      for (auto& [addr, from] : parent.lines) {
        const VRegion& vr =
            child->placed.find(static_cast<uint64_t>(child->placed_vregion(addr)))->second;
        const uint32_t to = slot_of(*child, vr, addr);
        memcpy(slot(to), slot(from), kLineBytes);
        versions[to] = versions[from];
        child->lines.emplace(addr, to);
      }
      c.lines_stored += child->lines.size();
    }
    return publish(child, rep);
  }

  Result<size_t> heartbeat(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    SpaceRequest r;
    if (!read_struct(req, &r)) return refuse(EPROTO, "heartbeat: short request");
    auto sp = lookup(r.handle, ctx.from);
    if (!sp) return sp.status();
    return size_t{0};
  }

  std::function<std::string()> status_extra;

  Result<size_t> usage(std::span<std::byte> rep) {
    if (rep.size() < sizeof(UsageReply)) return Status(EMSGSIZE, "usage: reply buffer too small");
    UsageReply out = usage_now();
    memcpy(rep.data(), &out, sizeof(out));
    return sizeof(out);
  }

  UsageReply usage_now() const {
    UsageReply out{};
    out.capacity_bytes = options.capacity_bytes;
    {
      std::lock_guard<std::mutex> pg(pool_mu);
      out.reserved_bytes = reserved_total;
    }
    out.stored_bytes = c.lines_stored.load() * kLineBytes;
    out.incarnation = incarnation;
    out.requests = node != nullptr ? node->stats().requests_served : 0;
    out.generation = c.generation.load();
    return out;
  }

  Result<size_t> list_spaces(std::span<const std::byte> req, std::span<std::byte> rep) {
    ListSpacesRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) {
      return refuse(EPROTO, "list spaces: malformed request");
    }
    if (r.max_reply_bytes != 0 && r.max_reply_bytes < rep.size()) {
      rep = rep.first(r.max_reply_bytes);
    }
    if (rep.size() < sizeof(ListSpacesReply)) return Status(EMSGSIZE, "list spaces: no room");
    // The spaces at or after the cursor, in id order (ids only grow).
    std::vector<std::pair<uint64_t, std::shared_ptr<Space>>> all;
    spaces.for_each_shared([&](uint64_t id, const std::shared_ptr<Space>& sp) {
      if (id >= r.cursor) all.emplace_back(id, sp);
    });
    std::sort(all.begin(), all.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    ListSpacesReply out{};
    size_t used = sizeof(out);
    for (auto& [id, sp] : all) {
      std::lock_guard<std::mutex> g(sp->mu);
      if (sp->closed) continue;
      const size_t need = sizeof(SpaceEntry) + sp->placed.size() * sizeof(uint64_t);
      if (used + need > rep.size()) {
        if (out.count == 0) return Status(EMSGSIZE, "list spaces: one entry does not fit");
        out.next_cursor = id;
        break;
      }
      SpaceEntry e{};
      e.space_id = id;
      e.process_key = sp->process_key;
      e.owner_node = sp->owner;
      e.pid = sp->pid;
      memcpy(e.program, sp->program.data(), std::min(sp->program.size(), sizeof(e.program) - 1));
      e.region_base = sp->region_base;
      e.lines_stored = sp->lines.size();
      std::vector<uint64_t> full, copying;
      for (auto& [i, vr] : sp->placed) (vr.incoming ? copying : full).push_back(i);
      e.vregion_count = static_cast<uint32_t>(full.size());
      e.copying_count = static_cast<uint32_t>(copying.size());
      memcpy(rep.data() + used, &e, sizeof(e));
      used += sizeof(e);
      for (auto* list : {&full, &copying}) {
        if (list->empty()) continue;  // (data() may be null: no memcpy from it)
        memcpy(rep.data() + used, list->data(), list->size() * sizeof(uint64_t));
        used += list->size() * sizeof(uint64_t);
      }
      out.count++;
    }
    memcpy(rep.data(), &out, sizeof(out));
    return used;
  }

  // ---- Copies (this node the source) ------------------------------------------------

  Result<size_t> copy_range(const fit::RpcContext& ctx, std::span<const std::byte> req,
                            std::span<std::byte> rep) {
    CopyRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) {
      return refuse(EPROTO, "copy: malformed request");
    }
    if (rep.size() < sizeof(CopyReply)) return Status(EMSGSIZE, "copy: reply buffer too small");
    auto sp = lookup(r.source, ctx.from);
    if (!sp) return sp.status();
    {
      std::lock_guard<std::mutex> g(sp.value()->mu);
      auto it = sp.value()->placed.find(r.vregion);
      if (it == sp.value()->placed.end() || it->second.incoming) {
        return refuse(EINVAL, "copy: vRegion " + std::to_string(r.vregion) + " of space " +
                                  std::to_string(r.source.id) + " is " +
                                  (it == sp.value()->placed.end() ? "not placed here"
                                                                  : "itself awaiting a copy"));
      }
    }
    Status target = resolve_target(r.target_at);
    if (!target) return refuse(target.code(), "copy: " + target.message());
    auto job = std::make_shared<CopyJob>();
    job->source_space = r.source.id;
    memcpy(job->source_secret, r.source.secret, sizeof(job->source_secret));
    job->vregion = r.vregion;
    job->target = r.target;
    job->target_node = r.target_at.id;
    {
      std::lock_guard<std::mutex> g(jobs_mu);
      size_t running = 0;
      for (auto& q : queue) running += q->state == kCopyRunning;
      if (running >= kMaxCopyJobs) {
        return refuse(EBUSY, "copy: " + std::to_string(kMaxCopyJobs) +
                                 " copies are running on this memory node; ask again later");
      }
      if (stopping) return refuse(ESHUTDOWN, "copy: this memory node is stopping");
      job->id = next_job++;
      jobs.emplace(job->id, job);
      queue.push_back(job);
    }
    jobs_cv.notify_one();
    c.copies_started++;
    c.generation++;
    CopyReply out{job->id};
    memcpy(rep.data(), &out, sizeof(out));
    return sizeof(out);
  }

  // The copy's target must be reachable through our node: a node of the cluster file (named
  // as there), or one the monitor told the processor of, added as a peer.
  Status resolve_target(const NodeAddress& at) {
    const size_t len = strnlen(at.address, sizeof(at.address));
    if (len == 0 || len == sizeof(at.address)) {
      return Status(EINVAL, "target node " + std::to_string(at.id) + " has no address");
    }
    fit::NodeConfig want;
    want.id = at.id;
    want.role = fit::Role::kMemory;
    want.address.assign(at.address, len);
    want.port = at.port;
    if (at.provider > static_cast<uint8_t>(fit::Provider::kVerbs)) {
      return Status(EINVAL, "target node " + std::to_string(at.id) + ": unknown provider " +
                                std::to_string(at.provider));
    }
    want.provider = static_cast<fit::Provider>(at.provider);
    if (at.id == node->id()) return Status(EINVAL, "the target is this memory node");
    return node->add_peer(want);  // OK when it is known with this address already
  }

  Result<size_t> copy_status(std::span<const std::byte> req, std::span<std::byte> rep) {
    CopyStatusRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) {
      return refuse(EPROTO, "copy status: malformed request");
    }
    if (rep.size() < sizeof(CopyStatusReply)) return Status(EMSGSIZE, "copy status: no room");
    CopyStatusReply out{};
    {
      std::lock_guard<std::mutex> g(jobs_mu);
      auto it = jobs.find(r.job);
      if (it == jobs.end() || it->second->source_space != r.source.id ||
          !lease_secrets_equal(it->second->source_secret, r.source.secret)) {
        return refuse(ENOENT, "copy status: no copy job " + std::to_string(r.job) +
                                  " of this space (finished long ago, or never started)");
      }
      const CopyJob& j = *it->second;
      out.state = j.state;
      out.error = j.error;
      out.lines_copied = j.lines_copied;
      out.lines_total = j.lines_total;
    }
    memcpy(rep.data(), &out, sizeof(out));
    return sizeof(out);
  }

  void finish_job(const std::shared_ptr<CopyJob>& job, int error, const std::string& why) {
    std::lock_guard<std::mutex> g(jobs_mu);
    job->state = error == 0 ? kCopyDone : kCopyFailed;
    job->error = error;
    job->message = why;
    (error == 0 ? c.copies_done : c.copies_failed)++;
    c.generation++;
    queue.erase(std::find(queue.begin(), queue.end(), job));
    finished.push_back(job->id);
    while (finished.size() > kMaxCopyJobsKept) {
      jobs.erase(finished.front());
      finished.pop_front();
    }
  }

  // Sends one batch to the target, retried as lego/retry.h says, and gives up at once when
  // the node is stopping: the call is asynchronous and its reply polled (backing off from
  // 20 us to 2 ms, so a copy's pace is the target's, not the poll's), and a stop abandons
  // it, so a silent target cannot hold up a stop for a call's timeout.
  Status send_batch(fit::NodeId target, const std::vector<std::byte>& buf) {
    Status st;
    for (int attempt = 0; attempt < kAttempts; attempt++) {
      fit::RpcFuture call = node->send_reply_async(target, kWriteBack, buf, {});
      auto pause = std::chrono::microseconds(20);
      while (!call.ready()) {
        std::unique_lock<std::mutex> g(jobs_mu);
        if (jobs_cv.wait_for(g, pause, [&] { return stopping; })) {
          return Status(ECANCELED, "the memory node is stopping");
        }
        pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(2));
      }
      auto r = call.wait();
      if (r) return Status();
      st = r.status();
      if (classify(st) != ErrorClass::kRetry) break;
    }
    return st;
  }

  // One job, on the worker thread: the vRegion's lines as they are now, in batches of
  // kMaxBatch, each line read (with its version) under the space's lock just before its
  // batch goes out; lines released meanwhile are skipped (the target got the release).
  void run_job(const std::shared_ptr<CopyJob>& job) {
    std::shared_ptr<Space> sp = spaces.find(job->source_space, job->source_secret);
    if (!sp) return finish_job(job, ENOENT, "the source space was closed");
    std::vector<uint64_t> addrs;
    {
      std::lock_guard<std::mutex> g(sp->mu);
      if (sp->closed || !sp->placed.count(job->vregion)) {
        return finish_job(job, ENOENT, "the source vRegion went away");
      }
      const uint64_t start = sp->vregion_start(job->vregion);
      for (uint64_t k = 0; k < kLinesPerVRegion; k++) {
        if (sp->lines.count(start + k * kLineBytes)) addrs.push_back(start + k * kLineBytes);
      }
    }
    {
      std::lock_guard<std::mutex> g(jobs_mu);
      job->lines_total = addrs.size();
    }
    std::vector<std::byte> buf;
    size_t done = 0;
    do {
      {
        std::lock_guard<std::mutex> g(jobs_mu);
        if (stopping) return finish_job(job, ECANCELED, "the memory node is stopping");
      }
      const size_t want = std::min<size_t>(addrs.size() - done, kMaxBatch);
      const bool last = done + want == addrs.size();
      WriteBackRequest head{};
      head.handle = job->target;
      head.flags = kWriteBackCopy | (last ? kWriteBackCopyLast : 0);
      head.vregion = job->vregion;
      std::vector<uint64_t> a, v;
      std::vector<std::byte> lines;
      {
        std::lock_guard<std::mutex> g(sp->mu);
        if (sp->closed || !sp->placed.count(job->vregion)) {
          return finish_job(job, ENOENT, "the source vRegion went away mid-copy");
        }
        for (size_t k = done; k < done + want; k++) {
          auto it = sp->lines.find(addrs[k]);
          if (it == sp->lines.end()) continue;  // released since: the target knows
          a.push_back(addrs[k]);
          v.push_back(versions[it->second]);
          lines.insert(lines.end(), slot(it->second), slot(it->second) + kLineBytes);
        }
      }
      head.count = static_cast<uint32_t>(a.size());
      if (head.count == 0 && !last) {
        done += want;
        continue;
      }
      buf.resize(write_back_request_bytes(head.count, head.flags));
      std::byte* p = buf.data();
      memcpy(p, &head, sizeof(head));
      p += sizeof(head);
      if (!a.empty()) {  // (an empty last batch: no memcpy from a null data())
        memcpy(p, a.data(), a.size() * sizeof(uint64_t));
        p += a.size() * sizeof(uint64_t);
        memcpy(p, v.data(), v.size() * sizeof(uint64_t));
        p += v.size() * sizeof(uint64_t);
        memcpy(p, lines.data(), lines.size());
      }
      Status st = send_batch(job->target_node, buf);
      if (!st) {
        fprintf(stderr,
                "lego-memd: copy %lu of vRegion %lu (pid %u) to memory node %u failed: %s\n",
                static_cast<unsigned long>(job->id), static_cast<unsigned long>(job->vregion),
                sp->pid, job->target_node, st.message().c_str());
        return finish_job(job, st.code() != 0 ? st.code() : EIO, st.message());
      }
      c.copy_lines_sent += head.count;
      done += want;
      std::lock_guard<std::mutex> g(jobs_mu);
      job->lines_copied += head.count;
    } while (done < addrs.size());
    finish_job(job, 0, "");
  }

  void worker_loop() {
    for (;;) {
      std::shared_ptr<CopyJob> job;
      {
        std::unique_lock<std::mutex> g(jobs_mu);
        // The first job not finished; jobs run one at a time, in order.
        jobs_cv.wait(g, [&] { return stopping || !queue.empty(); });
        if (stopping) {
          while (!queue.empty()) {
            auto j = queue.front();
            g.unlock();
            finish_job(j, ECANCELED, "the memory node is stopping");
            g.lock();
          }
          return;
        }
        job = queue.front();
      }
      run_job(job);
    }
  }
};

MemoryNode::MemoryNode(MemoryNodeOptions options) : impl_(std::make_unique<Impl>()) {
  if (sodium_init() < 0) abort();
  impl_->options = options;
  impl_->incarnation = random_nonzero();
  impl_->pool_blocks = static_cast<uint32_t>(options.capacity_bytes / kVRegionBytes);
  impl_->pool_lines = static_cast<uint32_t>(impl_->pool_blocks * kLinesPerVRegion);
  void* p = mmap(nullptr, std::max<size_t>(options.capacity_bytes, kLineBytes),
                 PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  void* v = mmap(nullptr, versions_bytes(impl_->pool_lines), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED || v == MAP_FAILED) {
    if (p != MAP_FAILED) munmap(p, std::max<size_t>(options.capacity_bytes, kLineBytes));
    if (v != MAP_FAILED) munmap(v, versions_bytes(impl_->pool_lines));
    // Nothing can be placed: every kPlace then fails with ENOMEM, clearly.
    impl_->pool_lines = 0;
    impl_->pool_blocks = 0;
    impl_->options.capacity_bytes = 0;
  } else {
    impl_->versions = static_cast<uint64_t*>(v);
    impl_->pool = static_cast<std::byte*>(p);
    // No MADV_HUGEPAGE, though misses land on random slots and 4 KiB pages miss the TLB:
    // with THP defrag "madvise" (Debian's default) the first store to each new 2 MiB of the
    // pool may compact memory synchronously, stalling the (single) server thread, and
    // every miss queued behind it, for 4-8 ms. Measured: with it, 30-38% of a Zipf run's
    // miss time was such stalls; without, none, and per-access times the same otherwise.
  }
}

MemoryNode::~MemoryNode() {
  stop();
  if (impl_->pool != nullptr) {
    munmap(impl_->pool, std::max<size_t>(impl_->options.capacity_bytes, kLineBytes));
    munmap(impl_->versions, versions_bytes(impl_->pool_lines));
  }
}

void MemoryNode::stop() {
  {
    std::lock_guard<std::mutex> g(impl_->jobs_mu);
    impl_->stopping = true;
  }
  impl_->jobs_cv.notify_all();
  if (impl_->worker.joinable()) impl_->worker.join();
  // Registrations belong to the FIT node, which may go before this MemoryNode does.
  impl_->grants_closed = true;
  impl_->spaces.for_each([this](uint64_t, Impl::Space& sp) {
    std::lock_guard<std::mutex> g(sp.mu);
    for (auto& [i, vr] : sp.placed) impl_->revoke(vr);
  });
}

uint64_t MemoryNode::incarnation() const {
  return impl_->incarnation;
}

UsageReply MemoryNode::usage() const {
  return impl_->usage_now();
}

void MemoryNode::set_status_extra(std::function<std::string()> extra) {
  impl_->status_extra = std::move(extra);
}

void MemoryNode::serve(fit::Node& node) {
  Impl* m = impl_.get();
  m->node = &node;
  m->spaces.follow(&node);
  m->worker = std::thread([m] { m->worker_loop(); });
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
  node.handle(kPlace, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                          std::span<std::byte> rep) { return m->place(ctx, req, rep, false); });
  node.handle(kUnplace, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                            std::span<std::byte> rep) { return m->place(ctx, req, rep, true); });
  node.handle(kCopyRange, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                              std::span<std::byte> rep) { return m->copy_range(ctx, req, rep); });
  node.handle(kCopyStatus, [m](const fit::RpcContext&, std::span<const std::byte> req,
                               std::span<std::byte> rep) { return m->copy_status(req, rep); });
  node.handle(kListSpaces, [m](const fit::RpcContext&, std::span<const std::byte> req,
                               std::span<std::byte> rep) { return m->list_spaces(req, rep); });
  node.handle(kUsage, [m](const fit::RpcContext&, std::span<const std::byte>,
                          std::span<std::byte> rep) { return m->usage(rep); });
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
    impl_->c.generation++;
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
    s.vregions_placed = impl_->placed_total;
  }
  s.fetches = c.fetches;
  s.fetch_zero = c.fetch_zero;
  s.write_backs = c.write_backs;
  s.zero_drops = c.zero_drops;
  s.released = c.released;
  s.refused = c.refused;
  s.places = c.places;
  s.unplaces = c.unplaces;
  s.zero_kept = c.zero_kept;
  s.copies_started = c.copies_started;
  s.copies_done = c.copies_done;
  s.copies_failed = c.copies_failed;
  s.copy_lines_sent = c.copy_lines_sent;
  s.copy_lines_applied = c.copy_lines_applied;
  s.copy_lines_skipped = c.copy_lines_skipped;
  s.rma_grants = c.rma_grants;
  s.rma_grant_failures = c.rma_grant_failures;
  s.rma_revoked = c.rma_revoked;
  s.requests = impl_->node != nullptr ? impl_->node->stats().requests_served : 0;
  s.generation = c.generation;
  return s;
}

std::string MemoryNode::status_text() const {
  MemoryNodeStats s = stats();
  std::ostringstream o;
#define LEGO_MEMORY_NODE_LINE(name, type, doc) o << #name " " << s.name << "\n";
  LEGO_MEMORY_NODE_COUNTERS(LEGO_MEMORY_NODE_LINE)
#undef LEGO_MEMORY_NODE_LINE
  o << "bytes_stored " << s.lines_stored * kLineBytes << "\n";
  o << "incarnation " << impl_->incarnation << "\n";
  if (impl_->status_extra) o << impl_->status_extra();
  if (impl_->node != nullptr) o << fit::stats_text(impl_->node->stats());
  impl_->spaces.for_each([&o](uint64_t id, Impl::Space& sp) {
    std::lock_guard<std::mutex> sg(sp.mu);
    size_t copying = 0;
    for (auto& [i, vr] : sp.placed) copying += vr.incoming;
    o << "space " << id << " node " << sp.owner << " pid " << sp.pid << " program "
      << (sp.program.empty() ? "?" : sp.program) << " lines " << sp.lines.size() << " vregions "
      << sp.placed.size() << " copying " << copying << "\n";
  });
  return o.str();
}

}  // namespace lego::mem
