// Monitor: membership, placement and status of the cluster's memory nodes (monitor.h).
//
// Lock order: Impl::mu only; no call to another node is made with it held (the lister thread
// copies what it needs, lets go, calls, then takes it again to store the answer).
#include "lego/monitor.h"

#include <sodium.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "lego/memory_proto.h"
#include "lego/placement.h"
#include "lego/progress.h"
#include "lego/retry.h"

namespace lego::mon {
namespace {

using Clock = std::chrono::steady_clock;
// How many heartbeats a placement handed out but never seen in its node's promise counts
// against the node's free capacity.
constexpr int kPendingHeartbeats = 4;

template <typename T>
bool read_struct(std::span<const std::byte> in, T* out) {
  if (in.size() != sizeof(T)) return false;
  memcpy(out, in.data(), sizeof(T));
  return true;
}

std::string address_of(const NodeAddress& a) {
  return std::string(a.address, strnlen(a.address, sizeof(a.address))) + ":" +
         std::to_string(a.port);
}

const char* state_name(uint32_t s) {
  switch (s) {
    case kAlive:
      return "alive";
    case kLost:
      return "lost";
    case kSuspect:
      return "suspect";
  }
  return "?";
}

std::string hex16(uint64_t v) {
  char b[20];
  snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(v));
  return b;
}

}  // namespace

struct Monitor::Impl {
  // (process key, vRegion): one vRegion of one process, wherever its copies are.
  using VKey = std::pair<uint64_t, uint64_t>;
  // The re-replication that follows one memory node's loss, as the monitor sees it in the
  // other nodes' listings: each vRegion that had a copy there and others elsewhere, with
  // the number of full copies it had; done when it has them again or is gone.
  struct Repair {
    fit::NodeId lost = 0;
    Clock::time_point since;
    std::map<VKey, uint32_t> want;  // not yet back at its copies
    uint64_t total = 0, restored = 0, gone = 0;
    std::unique_ptr<Progress> progress;
  };
  struct Space {
    mem::SpaceEntry entry;
    std::vector<uint64_t> full, copying;
  };
  struct Rec {
    NodeAddress where{};
    uint64_t incarnation = 0;
    NodeUsage usage{};
    Clock::time_point last_heard{};
    uint32_t state = kAlive;
    bool want_list = true;
    uint64_t listed_generation = ~uint64_t{0};
    std::vector<Space> spaces;  // as last listed
    // Placements handed out that the node's usage may not show yet: (when, bytes).
    std::deque<std::pair<Clock::time_point, uint64_t>> pending;
    uint64_t pending_bytes() const {
      uint64_t n = 0;
      for (auto& p : pending) n += p.second;
      return n;
    }
  };

  struct Options {
    std::chrono::milliseconds heartbeat{500}, lost_after{3000};
  } options;  // the cluster file's, set by serve()
  fit::Node* node = nullptr;
  mutable std::mutex mu;
  std::map<fit::NodeId, Rec> nodes;     // guarded by mu
  std::unique_ptr<placement::Rng> rng;  // guarded by mu
  MonitorStats s;                       // guarded by mu
  std::condition_variable cv;           // the lister's
  std::vector<Repair> repairs;          // guarded by mu
  uint64_t listing_seq = 0;             // bumped when a listing is stored; guarded by mu
  uint64_t repairs_seen_seq = 0;        // listing_seq the repairs were last checked at
  // Each process's copies per vRegion, from its placements (kPlace's replicas; a
  // re-replication asks for 1 and changes nothing): how many copies a vRegion that lost
  // one must get back to. A restarted monitor learns it at the process's next placement;
  // until then the copies a vRegion was listed with stand for it. (count, last placed);
  // dropped a while after the process is no longer listed. Guarded by mu.
  std::map<uint64_t, std::pair<uint32_t, Clock::time_point>> process_replicas;
  bool stopping = false;  // guarded by mu
  std::thread lister;

  Status refuse(int code, const std::string& msg) { return Status(code, msg); }

  Result<size_t> do_register(const fit::RpcContext& ctx, std::span<const std::byte> req,
                             std::span<std::byte> rep) {
    RegisterRequest r;
    if (!read_struct(req, &r)) {
      return Status(EPROTO, "register: request of " + std::to_string(req.size()) +
                                " bytes, expected " + std::to_string(sizeof(r)));
    }
    if (r.version != kProtoVersion) {
      return Status(EPROTONOSUPPORT, "register: monitor protocol version " +
                                         std::to_string(r.version) + ", this monitor speaks " +
                                         std::to_string(kProtoVersion));
    }
    const size_t len = strnlen(r.self.address, sizeof(r.self.address));
    if (r.incarnation == 0 || len == 0 || len == sizeof(r.self.address) ||
        r.self.provider > static_cast<uint8_t>(fit::Provider::kVerbs)) {
      return Status(EPROTO, "register: malformed registration");
    }
    if (r.self.id != ctx.from) {
      return Status(EINVAL, "register: node " + std::to_string(ctx.from) + " registers as node " +
                                std::to_string(r.self.id));
    }
    if (rep.size() < sizeof(RegisterReply)) return Status(EMSGSIZE, "register: no room");
    const auto now = Clock::now();
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = nodes.find(r.self.id);
      if (it != nodes.end() && it->second.state != kLost &&
          it->second.incarnation != r.incarnation &&
          now - it->second.last_heard < options.lost_after) {
        s.refused_live_id++;
        const auto ago =
            std::chrono::duration_cast<std::chrono::milliseconds>(now - it->second.last_heard);
        return Status(EEXIST, "node " + std::to_string(r.self.id) +
                                  " is already live in this cluster: another lego-memd at " +
                                  address_of(it->second.where) + " (incarnation " +
                                  hex16(it->second.incarnation) + ") was heard " +
                                  std::to_string(ago.count()) + " ms ago");
      }
    }
    // The monitor reads the node's spaces from it: it must reach it where it says it is.
    fit::NodeConfig at;
    at.id = r.self.id;
    at.role = fit::Role::kMemory;
    at.address.assign(r.self.address, len);
    at.port = r.self.port;
    at.provider = static_cast<fit::Provider>(r.self.provider);
    if (Status st = node->add_peer(at); !st) {
      return Status(EINVAL, "register: " + st.message());
    }
    {
      std::lock_guard<std::mutex> g(mu);
      Rec& rec = nodes[r.self.id];
      const bool fresh = rec.incarnation != r.incarnation;
      rec.where = r.self;
      rec.incarnation = r.incarnation;
      rec.usage = r.usage;
      rec.last_heard = now;
      if (rec.state != kAlive || fresh) s.epoch++;
      rec.state = kAlive;
      rec.want_list = true;
      rec.listed_generation = ~uint64_t{0};
      if (fresh) {
        rec.spaces.clear();  // a restarted node holds nothing of before
        rec.pending.clear();
      }
      s.registrations++;
      fprintf(stderr, "lego-mond: memory node %u registered from %s (incarnation %s, %llu MiB)\n",
              r.self.id, address_of(r.self).c_str(), hex16(r.incarnation).c_str(),
              static_cast<unsigned long long>(r.usage.capacity_bytes >> 20));
    }
    cv.notify_all();
    RegisterReply out{kProtoVersion, static_cast<uint32_t>(options.heartbeat.count()),
                      static_cast<uint32_t>(options.lost_after.count()), 0};
    memcpy(rep.data(), &out, sizeof(out));
    return sizeof(out);
  }

  Result<size_t> heartbeat(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    NodeHeartbeat h;
    if (!read_struct(req, &h)) return Status(EPROTO, "heartbeat: malformed request");
    if (h.node != ctx.from) {
      return Status(EINVAL, "heartbeat: node " + std::to_string(ctx.from) + " speaks for node " +
                                std::to_string(h.node));
    }
    const auto now = Clock::now();
    bool list = false;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = nodes.find(h.node);
      if (it == nodes.end() || it->second.incarnation != h.incarnation ||
          it->second.state == kLost) {
        s.unknown_heartbeats++;
        return Status(ENOENT, "node " + std::to_string(h.node) +
                                  " is not registered with this monitor (it restarted, or "
                                  "declared the node lost): register again");
      }
      Rec& rec = it->second;
      // Placements handed out that the node's own figure shows now: its promise grew by
      // them (oldest first). Counting them until then, and never after, keeps a placement
      // from counting twice: a cluster placing fast near full would otherwise refuse room it
      // has. A growth that is not the monitor's doing (a fork's copy) takes some too: the
      // node may then be thought emptier than it is until its next heartbeat, and refuses
      // what it cannot promise (PlaceReply ENOMEM; the processor asks again).
      uint64_t grew = h.usage.reserved_bytes > rec.usage.reserved_bytes
                          ? h.usage.reserved_bytes - rec.usage.reserved_bytes
                          : 0;
      while (!rec.pending.empty() && grew >= rec.pending.front().second) {
        grew -= rec.pending.front().second;
        rec.pending.pop_front();
      }
      // One never placed (its processor died, or placed elsewhere) stops counting after a
      // few heartbeats: a processor places right after the monitor's answer.
      while (!rec.pending.empty() &&
             now - rec.pending.front().first > kPendingHeartbeats * options.heartbeat) {
        rec.pending.pop_front();
      }
      rec.usage = h.usage;
      rec.last_heard = now;
      if (rec.state != kAlive) s.epoch++;
      rec.state = kAlive;
      if (h.usage.generation != rec.listed_generation) list = rec.want_list = true;
      s.heartbeats++;
    }
    if (list) cv.notify_all();
    return size_t{0};
  }

  Result<size_t> place(std::span<const std::byte> req, std::span<std::byte> rep) {
    PlaceRequest r;
    if (!read_struct(req, &r) || r.replicas == 0 || r.replicas > kMaxReplicas ||
        r.exclude_count > kMaxExclude) {
      return Status(EPROTO, "place: malformed request");
    }
    if (rep.size() < sizeof(PlaceReply)) return Status(EMSGSIZE, "place: no room");
    PlaceReply out{};
    {
      std::lock_guard<std::mutex> g(mu);
      std::vector<placement::Candidate> c;
      for (auto& [id, rec] : nodes) {
        if (rec.state != kAlive) continue;
        const uint64_t used = rec.usage.reserved_bytes + rec.pending_bytes();
        c.push_back({id, rec.usage.capacity_bytes > used ? rec.usage.capacity_bytes - used : 0});
      }
      auto chosen =
          placement::choose(c, r.replicas, mem::kVRegionBytes,
                            std::span<const fit::NodeId>(r.exclude, r.exclude_count), *rng);
      if (!chosen) {
        s.placements_refused++;
        size_t lost = nodes.size() - c.size();
        return Status(ENOSPC, "monitor: cannot place vRegion " + std::to_string(r.vregion) +
                                  " of pid " + std::to_string(r.pid) + " on node " +
                                  std::to_string(r.owner_node) + ": " + chosen.status().message() +
                                  (lost ? "; " + std::to_string(lost) +
                                              " memory node(s) lost or suspect not counted"
                                        : ""));
      }
      const auto now = Clock::now();
      auto& pr = process_replicas[r.process_key];
      pr.first = std::max(pr.first, r.replicas);
      pr.second = now;
      if (holds_vregion(r.process_key, r.vregion)) s.replacements++;
      out.count = r.replicas;
      for (size_t i = 0; i < chosen.value().size(); i++) {
        Rec& rec = nodes[chosen.value()[i]];
        rec.pending.emplace_back(now, mem::kVRegionBytes);
        out.nodes[i] = rec.where;
      }
      s.placements++;
    }
    memcpy(rep.data(), &out, sizeof(out));
    return sizeof(out);
  }

  Result<size_t> report_lost(std::span<const std::byte> req) {
    ReportLost r;
    if (!read_struct(req, &r)) return Status(EPROTO, "report lost: malformed request");
    {
      std::lock_guard<std::mutex> g(mu);
      s.lost_reports++;
      auto it = nodes.find(r.node);
      // A hint: no placements on it until it is heard again; the lister asks it at once.
      if (it != nodes.end() && it->second.state == kAlive) {
        it->second.state = kSuspect;
        s.epoch++;
      }
    }
    cv.notify_all();
    return size_t{0};
  }

  Result<size_t> view(std::span<std::byte> rep) {
    std::lock_guard<std::mutex> g(mu);
    ViewReply head{s.epoch, 0, 0};
    size_t used = sizeof(head);
    const auto now = Clock::now();
    for (auto& [id, rec] : nodes) {
      if (used + sizeof(NodeInfo) > rep.size()) break;
      NodeInfo n{};
      n.where = rec.where;
      n.usage = rec.usage;
      n.incarnation = rec.incarnation;
      n.state = rec.state;
      n.last_heard_ms = static_cast<uint32_t>(
          std::chrono::duration_cast<std::chrono::milliseconds>(now - rec.last_heard).count());
      n.pending_bytes = rec.pending_bytes();
      memcpy(rep.data() + used, &n, sizeof(n));
      used += sizeof(n);
      head.count++;
    }
    if (rep.size() < sizeof(head)) return Status(EMSGSIZE, "view: no room");
    memcpy(rep.data(), &head, sizeof(head));
    return used;
  }

  // Reads every space of memory node `id` (all pages). Called without mu.
  Result<std::vector<Space>> list_node(fit::NodeId id) {
    std::vector<Space> out;
    std::vector<std::byte> rep(node->config().max_message_bytes);
    uint64_t cursor = 0;
    for (int pages = 0; pages < 100000; pages++) {
      mem::ListSpacesRequest r{cursor, 0, 0};
      auto got = node->send_reply(id, mem::kListSpaces,
                                  {reinterpret_cast<const std::byte*>(&r), sizeof(r)}, rep);
      if (!got) return got.status();
      const size_t n = got.value();
      mem::ListSpacesReply head;
      if (n < sizeof(head)) return Status(EPROTO, "a short kListSpaces reply");
      memcpy(&head, rep.data(), sizeof(head));
      size_t off = sizeof(head);
      for (uint32_t i = 0; i < head.count; i++) {
        Space sp;
        if (off + sizeof(sp.entry) > n) return Status(EPROTO, "a truncated kListSpaces reply");
        memcpy(&sp.entry, rep.data() + off, sizeof(sp.entry));
        off += sizeof(sp.entry);
        const size_t more = (size_t{sp.entry.vregion_count} + sp.entry.copying_count) * 8;
        if (off + more > n) return Status(EPROTO, "a truncated kListSpaces reply");
        sp.full.resize(sp.entry.vregion_count);
        if (!sp.full.empty()) memcpy(sp.full.data(), rep.data() + off, sp.full.size() * 8);
        off += sp.full.size() * 8;
        sp.copying.resize(sp.entry.copying_count);
        if (!sp.copying.empty()) {
          memcpy(sp.copying.data(), rep.data() + off, sp.copying.size() * 8);
        }
        off += sp.copying.size() * 8;
        out.push_back(std::move(sp));
      }
      if (head.next_cursor == 0) return out;
      if (head.next_cursor <= cursor) return Status(EPROTO, "kListSpaces went backwards");
      cursor = head.next_cursor;
    }
    return Status(EPROTO, "kListSpaces never ended");
  }

  // A suspect node: asked at once (kUsage); answering makes it alive, being gone lost.
  void check_suspect(fit::NodeId id) {
    std::vector<std::byte> rep(sizeof(mem::UsageReply));
    auto r = node->send_reply(id, mem::kUsage, {}, rep, options.heartbeat);
    std::lock_guard<std::mutex> g(mu);
    auto it = nodes.find(id);
    if (it == nodes.end() || it->second.state != kSuspect) return;
    if (r) {
      it->second.state = kAlive;
      s.epoch++;
    } else if (classify(r.status()) == ErrorClass::kPeerGone) {
      declare_lost(id, it->second, "it does not answer: " + r.status().message());
    }
  }

  // Whether a node not lost lists vRegion `v` of process `key` (full or being copied in).
  // Caller holds mu.
  bool holds_vregion(uint64_t key, uint64_t v) const {
    for (auto& [id, rec] : nodes) {
      if (rec.state == kLost) continue;
      for (auto& sp : rec.spaces) {
        if (sp.entry.process_key != key) continue;
        if (std::find(sp.full.begin(), sp.full.end(), v) != sp.full.end()) return true;
        if (std::find(sp.copying.begin(), sp.copying.end(), v) != sp.copying.end()) return true;
      }
    }
    return false;
  }

  // Full copies of every (process, vRegion) on the nodes not lost, as last listed. Caller
  // holds mu.
  std::map<VKey, uint32_t> full_copies() const {
    std::map<VKey, uint32_t> n;
    for (auto& [id, rec] : nodes) {
      if (rec.state == kLost) continue;
      for (auto& sp : rec.spaces) {
        for (uint64_t v : sp.full) n[{sp.entry.process_key, v}]++;
      }
    }
    return n;
  }

  // Caller holds mu.
  void declare_lost(fit::NodeId id, Rec& rec, const std::string& why) {
    // What it held, counted before it stops counting: a vRegion with no other full copy
    // is lost with it; the others are re-replicated by their processes' runtimes.
    const std::map<VKey, uint32_t> before = full_copies();
    rec.state = kLost;
    s.nodes_lost++;
    s.epoch++;
    fprintf(stderr, "lego-mond: memory node %u at %s lost: %s\n", id, address_of(rec.where).c_str(),
            why.c_str());
    Repair r;
    r.lost = id;
    r.since = Clock::now();
    uint64_t only = 0;
    std::set<uint64_t> procs_only, procs_more;
    std::string example;
    for (auto& sp : rec.spaces) {
      for (uint64_t v : sp.full) {
        auto it = before.find({sp.entry.process_key, v});
        const uint32_t copies = it == before.end() ? 1 : it->second;
        if (copies <= 1) {
          only++;
          procs_only.insert(sp.entry.process_key);
          if (example.empty()) {
            example =
                "pid " + std::to_string(sp.entry.pid) + " of node " +
                std::to_string(sp.entry.owner_node) + ", " +
                std::string(sp.entry.program, strnlen(sp.entry.program, sizeof(sp.entry.program)));
          }
        } else {
          // The listing of a copy made before this loss was declared would count twice:
          // the process's own replica count, when known, is the goal.
          auto pr = process_replicas.find(sp.entry.process_key);
          r.want[{sp.entry.process_key, v}] =
              pr != process_replicas.end() ? std::min(pr->second.first, copies) : copies;
          procs_more.insert(sp.entry.process_key);
        }
      }
    }
    rec.pending.clear();
    if (only > 0) {
      s.vregions_lost += only;
      fprintf(stderr,
              "lego-mond: memory node %u held the only copy of %llu vRegion(s) of %zu "
              "process(es) (%s%s), as last listed: lost with it\n",
              id, static_cast<unsigned long long>(only), procs_only.size(), example.c_str(),
              procs_only.size() > 1 ? ", ..." : "");
    }
    if (r.want.empty()) return;
    r.total = r.want.size();
    r.progress = std::make_unique<Progress>("lego-mond", 1);
    r.progress->step("re-replication after losing memory node " + std::to_string(id) + ": " +
                     std::to_string(r.total) + " vRegion(s) of " +
                     std::to_string(procs_more.size()) +
                     " process(es) had a copy there; their runtimes copy them to other nodes");
    repairs.push_back(std::move(r));
    repairs_seen_seq = listing_seq - 1;  // check at the next tick
  }

  // Follows the re-replications under way in the listings; logs their progress and end.
  // Caller holds mu.
  void follow_repairs() {
    if (repairs_seen_seq == listing_seq) return;
    repairs_seen_seq = listing_seq;
    std::set<uint64_t> live_procs;
    for (auto& [id, rec] : nodes) {
      if (rec.state == kLost) continue;
      for (auto& sp : rec.spaces) live_procs.insert(sp.entry.process_key);
    }
    const auto t = Clock::now();
    for (auto it = process_replicas.begin(); it != process_replicas.end();) {
      const bool stale = live_procs.count(it->first) == 0 &&
                         t - it->second.second > 2 * kPendingHeartbeats * options.heartbeat;
      it = stale ? process_replicas.erase(it) : std::next(it);
    }
    if (repairs.empty()) return;
    const std::map<VKey, uint32_t> now = full_copies();
    for (auto it = repairs.begin(); it != repairs.end();) {
      Repair& r = *it;
      for (auto w = r.want.begin(); w != r.want.end();) {
        auto c = now.find(w->first);
        if (c != now.end() && c->second >= w->second) {
          r.restored++;
          s.vregions_rereplicated++;
          w = r.want.erase(w);
        } else if (c == now.end() && live_procs.count(w->first.first) == 0) {
          r.gone++;  // its process ended (or lost every copy): nothing left to copy
          w = r.want.erase(w);
        } else {
          ++w;
        }
      }
      r.progress->update(r.restored + r.gone, r.total);
      if (!r.want.empty()) {
        ++it;
        continue;
      }
      r.progress->finish();
      const double secs = std::chrono::duration<double>(Clock::now() - r.since).count();
      char line[256];
      snprintf(line, sizeof line,
               "re-replication after losing memory node %u done: %llu vRegion(s) back at their "
               "copies, %llu gone with their process, in %.1f s",
               r.lost, static_cast<unsigned long long>(r.restored),
               static_cast<unsigned long long>(r.gone), secs);
      r.progress->note(line);
      it = repairs.erase(it);
    }
  }

  void lister_loop() {
    std::unique_lock<std::mutex> g(mu);
    while (!stopping) {
      cv.wait_for(g, options.heartbeat);
      if (stopping) break;
      std::vector<std::pair<fit::NodeId, uint64_t>> want;  // node, its generation then
      std::vector<fit::NodeId> suspects;
      for (auto& [id, rec] : nodes) {
        if (rec.state == kAlive && rec.want_list) want.emplace_back(id, rec.usage.generation);
        if (rec.state == kSuspect) suspects.push_back(id);
      }
      g.unlock();
      for (fit::NodeId id : suspects) check_suspect(id);
      for (auto [id, generation] : want) {
        auto spaces = list_node(id);
        std::lock_guard<std::mutex> lg(mu);
        auto it = nodes.find(id);
        if (it == nodes.end()) continue;
        if (!spaces) {
          s.listing_errors++;
          continue;
        }
        s.listings++;
        listing_seq++;
        it->second.spaces = std::move(spaces).value();
        it->second.listed_generation = generation;
        it->second.want_list = it->second.usage.generation != generation;
      }
      g.lock();
    }
  }
};

Monitor::Monitor(MonitorOptions options) : impl_(std::make_unique<Impl>()) {
  if (sodium_init() < 0) abort();
  uint64_t seed = options.seed;
  while (seed == 0) randombytes_buf(&seed, sizeof(seed));
  impl_->rng = std::make_unique<placement::Rng>(seed);
}

Monitor::~Monitor() {
  stop();
}

void Monitor::stop() {
  {
    std::lock_guard<std::mutex> g(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->lister.joinable()) impl_->lister.join();
}

void Monitor::serve(fit::Node& node) {
  Impl* m = impl_.get();
  m->node = &node;
  m->options.heartbeat = node.config().heartbeat;
  m->options.lost_after = node.config().lost_after;
  node.handle(kRegister, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                             std::span<std::byte> rep) { return m->do_register(ctx, req, rep); });
  node.handle(kNodeHeartbeat, [m](const fit::RpcContext& ctx, std::span<const std::byte> req,
                                  std::span<std::byte>) { return m->heartbeat(ctx, req); });
  node.handle(kPlace, [m](const fit::RpcContext&, std::span<const std::byte> req,
                          std::span<std::byte> rep) { return m->place(req, rep); });
  node.handle(kReportLost, [m](const fit::RpcContext&, std::span<const std::byte> req,
                               std::span<std::byte>) { return m->report_lost(req); });
  node.handle(kView, [m](const fit::RpcContext&, std::span<const std::byte>,
                         std::span<std::byte> rep) { return m->view(rep); });
  node.handle(kStatus,
              [this](const fit::RpcContext&, std::span<const std::byte>,
                     std::span<std::byte> rep) -> Result<size_t> {
                std::string text = status_text();
                size_t n = std::min(text.size(), rep.size());
                memcpy(rep.data(), text.data(), n);
                return n;
              });
  m->lister = std::thread([m] { m->lister_loop(); });
}

void Monitor::tick() {
  std::lock_guard<std::mutex> g(impl_->mu);
  const auto now = Clock::now();
  for (auto& [id, rec] : impl_->nodes) {
    if (rec.state == kLost || now - rec.last_heard <= impl_->options.lost_after) continue;
    const auto ago = std::chrono::duration_cast<std::chrono::milliseconds>(now - rec.last_heard);
    impl_->declare_lost(id, rec, "not heard for " + std::to_string(ago.count()) + " ms");
  }
  impl_->follow_repairs();
}

MonitorStats Monitor::stats() const {
  std::lock_guard<std::mutex> g(impl_->mu);
  return impl_->s;
}

MonitorGauges Monitor::gauges() const {
  std::lock_guard<std::mutex> g(impl_->mu);
  MonitorGauges out;
  std::set<uint64_t> procs;
  std::set<Impl::VKey> vregions;
  for (auto& [id, rec] : impl_->nodes) {
    switch (rec.state) {
      case kAlive:
        out.nodes_alive++;
        out.capacity_bytes += rec.usage.capacity_bytes;
        out.reserved_bytes += rec.usage.reserved_bytes;
        out.stored_bytes += rec.usage.stored_bytes;
        break;
      case kSuspect:
        out.nodes_suspect++;
        break;
      default:
        out.nodes_declared_lost++;
        continue;
    }
    for (auto& sp : rec.spaces) {
      procs.insert(sp.entry.process_key);
      for (uint64_t v : sp.full) vregions.insert({sp.entry.process_key, v});
      out.vregions_copying += sp.copying.size();
    }
  }
  out.processes = procs.size();
  out.vregions = vregions.size();
  for (auto& r : impl_->repairs) out.vregions_degraded += r.want.size();
  return out;
}

std::string Monitor::status_text() const {
  std::lock_guard<std::mutex> g(impl_->mu);
  const auto now = Clock::now();
  std::ostringstream o;
  size_t alive = 0;
  for (auto& [id, rec] : impl_->nodes) alive += rec.state == kAlive;
  o << "monitor: " << impl_->nodes.size() << " memory nodes, " << alive << " alive, heartbeat "
    << impl_->options.heartbeat.count() << " ms, lost after " << impl_->options.lost_after.count()
    << " ms\n";
  // Processes: key -> (owner, pid, program, vRegion -> replicas), from the nodes not lost.
  struct Proc {
    uint32_t owner = 0, pid = 0;
    std::string program;
    std::map<uint64_t, std::set<std::string>> vregions;
  };
  std::map<std::pair<uint64_t, std::string>, Proc> procs;
  for (auto& [id, rec] : impl_->nodes) {
    o << "node " << id << " at " << address_of(rec.where) << " " << state_name(rec.state)
      << " incarnation " << hex16(rec.incarnation) << " capacity " << rec.usage.capacity_bytes
      << " reserved " << rec.usage.reserved_bytes << " stored " << rec.usage.stored_bytes
      << " last_heard_ms "
      << std::chrono::duration_cast<std::chrono::milliseconds>(now - rec.last_heard).count()
      << "\n";
    if (rec.state == kLost) continue;
    for (auto& sp : rec.spaces) {
      std::string program(sp.entry.program, strnlen(sp.entry.program, sizeof(sp.entry.program)));
      Proc& p = procs[{sp.entry.process_key, program}];
      p.owner = sp.entry.owner_node;
      p.pid = sp.entry.pid;
      p.program = program;
      for (uint64_t v : sp.full) p.vregions[v].insert(std::to_string(id));
      for (uint64_t v : sp.copying) p.vregions[v].insert(std::to_string(id) + "(copying)");
    }
  }
  for (auto& [key, p] : procs) {
    o << "process " << hex16(key.first) << " owner " << p.owner << " pid " << p.pid << " program "
      << (p.program.empty() ? "?" : p.program) << " vregions " << p.vregions.size() << "\n";
    for (auto& [v, where] : p.vregions) {
      o << "  vregion " << v << ":";
      for (auto& w : where) o << " " << w;
      o << "\n";
    }
  }
  for (const MonitorStatsField& f : kMonitorStatsFields) {
    o << f.name << " " << impl_->s.*(f.field) << "\n";
  }
  if (impl_->node != nullptr) o << fit::stats_text(impl_->node->stats());
  return o.str();
}

}  // namespace lego::mon
