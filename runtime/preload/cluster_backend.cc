// ClusterBackend (runtime/preload/cluster_backend.h).
//
// Lock order: none on the miss path (atomics only). The placer and repair threads change
// vRegion map entries by compare-and-swap; node slots move FREE -> OPENING -> OPEN -> LOST
// (or CLOSED), each step by one thread, published with release stores.
//
// Why a write-back can never be missed by a replica that joins (repair step 2 -> 3): every
// write-back and release reads the map after entering the current epoch's in-flight count;
// the repair thread publishes the joining replica, flips the epoch and waits for the old
// epoch's count to drain before it asks a survivor to copy. So every write-back either saw
// the joining replica (and was sent to it) or was stored on the survivor before the copy
// started (and the copy carries it).
#include "runtime/preload/cluster_backend.h"

#include <linux/futex.h>
#include <sodium.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <optional>

#include "lego/placement.h"
#include "lego/retry.h"
#include "runtime/preload/rma_chooser.h"

namespace lego::runtime {
namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kLine = kExCacheLineBytes;
constexpr int kMaxNodes = 64;
constexpr uint8_t kNoSlot = 0xff;
constexpr uint32_t kMaxReplicas = mon::kMaxReplicas;
// Distinct memory nodes one write-back job sends to at once; more are sent in rounds.
constexpr int kCallsPerJob = 16;
constexpr int kJobs = 8;
constexpr int kFetchJobs = 32;
constexpr int kPlaceRequests = 64;

// A vRegion map entry, one atomic word: replica i's node slot + 1 in byte i (0: none),
// bit 32 + i: replica i is JOINING (receives write-backs, is never read), bit 40: placed.
// An unplaced vRegion's word is 0: the map needs no initialising (pages never touched stay
// unmapped, however large the region).
struct Entry {
  uint8_t slot[kMaxReplicas];
  uint8_t joining = 0;
  bool placed = false;
  static Entry decode(uint64_t w) {
    Entry e;
    for (uint32_t i = 0; i < kMaxReplicas; i++) {
      e.slot[i] = static_cast<uint8_t>(static_cast<uint8_t>(w >> (8 * i)) - 1);  // 0 -> kNoSlot
    }
    e.joining = static_cast<uint8_t>((w >> 32) & 0xf);
    e.placed = (w >> 40) & 1;
    return e;
  }
  uint64_t encode() const {
    uint64_t w = 0;
    for (uint32_t i = 0; i < kMaxReplicas; i++) {
      w |= uint64_t{static_cast<uint8_t>(slot[i] + 1)} << (8 * i);  // kNoSlot -> 0
    }
    w |= uint64_t{joining & 0xfu} << 32;
    if (placed) w |= uint64_t{1} << 40;
    return w;
  }
  static Entry empty() {
    Entry e;
    memset(e.slot, kNoSlot, sizeof e.slot);
    return e;
  }
  bool full(uint32_t i) const { return slot[i] != kNoSlot && !(joining & (1u << i)); }
};
// An unplaced vRegion's word.
const uint64_t kEmptyEntry = Entry::empty().encode();

enum SlotState : int { kFree = 0, kOpening, kOpen, kLost, kClosed };

struct NodeSlot {
  std::atomic<int> state{kFree};
  fit::NodeId id = 0;
  mem::SpaceHandle space{};
  uint32_t lease_ms = 0;
  std::atomic<int> timeouts{0};
  std::atomic<int> lost_error{0};
  bool reported = false;  // repair thread: kReportLost sent
  // All of the node's channels are connected (open_node connects one: "Lazy channels").
  std::atomic<bool> channels_ready{false};
  // Snapshot spaces on this node (kFork), valid when snap_valid.
  mem::SpaceHandle snaps[ClusterBackend::kMaxSnapshots] = {};
  std::atomic<bool> snap_valid[ClusterBackend::kMaxSnapshots] = {};
  // --rma auto: how long one-line fetches from this node took each way lately.
  RmaChooser chooser;
};

// One started request of a write-back job.
struct Call {
  int slot = -1;
  fit::Node::PendingCall pending;
  std::byte* buffer = nullptr;
  size_t length = 0;
  bool started = false;
};

struct WriteJob {
  std::atomic<bool> busy{false};
  int epoch = 0;
  int ncalls = 0;
  bool replica_failed = false;  // a replica failed this write-back (it was marked lost)
  Call calls[kCallsPerJob];
  uint64_t addrs[mem::kMaxBatch];
  size_t nlines = 0;
};

struct FetchJob {
  std::atomic<bool> busy{false};
  int slot = -1;
  uint64_t addrs[LineBackend::kMaxFetchBatch];
  fit::Node::PendingCall pending;
};

// --rma auto's timing of a one-line miss started by start_fetch_batch, kept in its ticket
// (FetchTicket::opaque, after the fetch job's index) by the ticket's thread. Either way is
// timed from the start to the first fetch_ready() that finds it done (or its finish, if no
// poll came first): what the ExCache's handler thread waits for. Between the two the
// handler evicts for the miss: a request's round trip overlaps that work, a one-sided read
// (waited for in start) does not, and a fair choice counts both alike.
struct TicketTiming {
  uint64_t start_ns = 0;
  int32_t slot = -1;
  uint8_t path = 0, kind = 0, timed = 0, pad = 0;
};
constexpr size_t kTicketTimingAt = 8;
static_assert(kTicketTimingAt + sizeof(TicketTiming) <= sizeof(LineBackend::FetchTicket::opaque));

// --rma auto's way for a one-line fetch from slot `slot`, chosen (and counted) by
// start_fetch_batch before it fell back to fetch_lines; `timed`: the fetch is to be timed.
struct Chosen {
  int slot = -1;
  RmaChooser::Choice way{RmaChooser::kRequest, RmaChooser::kFavoured};
  bool timed = false;
};

// A memory node's grant of one-sided reads of one replica of a vRegion (kPlaceRma), read by
// the miss path without a lock: `tag` is the node slot + 1 the grant belongs to (0: none),
// cleared before key and base change and set after (release), and read before and after
// them (a seqlock: a reader that sees it change, or sees another slot, asks by kFetch).
struct Grant {
  std::atomic<uint32_t> tag{0};
  std::atomic<uint64_t> key{0};
  std::atomic<uint64_t> base{0};
};

struct PlaceRequest {
  std::atomic<uint32_t> state{0};  // 0 free, 1 filling, 2 posted, 3 done
  uint64_t first = 0, last = 0;
  int result = 0;
};

long futex(std::atomic<uint32_t>* word, int op, uint32_t val, const timespec* timeout) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, val, timeout, nullptr, 0);
}

void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void say(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0) (void)!write(2, buf, std::min<size_t>(static_cast<size_t>(n), sizeof buf - 1));
}

void* map_anonymous(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

}  // namespace

struct ClusterBackend::Impl {
  fit::Node* node = nullptr;
  ClusterBackendOptions options;
  ClusterBackend::UsedFn used = nullptr;
  uint64_t process_key = 0;
  char loss_message[512] = {};

  NodeSlot slots[kMaxNodes];
  std::atomic<int> nslots{0};

  uint64_t region_base = 0;
  uint64_t nvregions = 0;
  std::atomic<uint64_t>* map = nullptr;  // nvregions words, mmap'd
  // nvregions * kMaxReplicas grants (replica i of vRegion v at v * kMaxReplicas + i), mmap'd
  // (zero: none) when options.rma; else null.
  Grant* grants = nullptr;
  // Snapshot maps: the map as it was at each snapshot (mmap'd at snapshot()).
  uint64_t* snap_map[kMaxSnapshots] = {};
  std::atomic<int> snap_state[kMaxSnapshots] = {};  // 0 free, 1 filling, 2 alive
  // Test only: LEGO_TEST_SNAPSHOT_RELEASE_DELAY_MS=N in the environment (read once, when
  // the backend starts) makes release_snapshot sleep N ms after finding the snapshot alive
  // on a node, before sending that node its release, as a thread descheduled there would.
  // tests/lego_run uses it to check that a parent's discard during a fork cannot release
  // lines a child wrote after adopting the snapshot (runtime/excache/fork.cc, "Adoption"
  // d). Unset (0), it costs one test per release sent into a snapshot.
  int test_release_delay_ms = 0;

  std::atomic<uint64_t> version{0};
  // Write-backs and releases in flight, by epoch parity (the file comment).
  std::atomic<int> epoch{0};
  std::atomic<int64_t> inflight[2] = {};

  size_t buffer_bytes = 0;
  WriteJob jobs[kJobs];
  FetchJob fetch_jobs[kFetchJobs];

  PlaceRequest place_requests[kPlaceRequests];
  std::atomic<uint32_t> place_wake{0};
  std::atomic<uint32_t> repair_wake{0};
  std::atomic<uint32_t> lost_generation{0};

  std::atomic<bool> stop{false};
  std::thread heartbeat, placer, repairer;

  // Lazy channels. A space opens over one channel (Node::connect_one: over shm each channel
  // maps and touches a region of its own, ~4 ms, and a program such as /bin/true never
  // needs a second one). The heartbeat thread connects the node's other channels:
  // kConnectDelay after open() (a program that has ended by then never pays for them), or
  // at once when a slot is opened later or a call that must not connect (the miss path:
  // it may run in a SIGBUS handler or inside jemalloc's hooks, where connecting, which
  // allocates, is not allowed) waits for them in await_channels(). libfit's channel_for
  // prefers a connected channel, so the other threads share the first one meanwhile.
  static constexpr auto kConnectDelay = std::chrono::milliseconds(50);
  std::atomic<uint32_t> channels_pending{0};  // open slots not channels_ready (a futex)
  std::atomic<uint32_t> connect_wake{0};      // the heartbeat thread's futex
  std::atomic<bool> connect_now{false};       // a caller waits in await_channels()
  std::atomic<bool> connecting{false};        // the heartbeat thread is inside connect()
  std::atomic<bool> exiting{false};           // quiesce(): no more connections

  // Counters: atomics (events are rare next to misses, except failovers).
#define LEGO_CLUSTER_ATOMIC(name, doc) std::atomic<uint64_t> name{0};
  LEGO_CLUSTER_COUNTERS(LEGO_CLUSTER_ATOMIC)
#undef LEGO_CLUSTER_ATOMIC

  ~Impl() {
    if (map != nullptr) munmap(map, nvregions * sizeof(uint64_t));
    if (grants != nullptr) munmap(grants, nvregions * kMaxReplicas * sizeof(Grant));
    for (auto* m : snap_map) {
      if (m != nullptr) munmap(m, nvregions * sizeof(uint64_t));
    }
  }

  // CLOCK_MONOTONIC now, in ns (async-signal-safe: the miss path stamps events with it).
  static uint64_t mono_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return uint64_t(ts.tv_sec) * 1000000000 + uint64_t(ts.tv_nsec);
  }
  // Sets a time counter (first_loss_ns, ...) to now if it is still 0.
  static void stamp_once(std::atomic<uint64_t>& at) {
    uint64_t zero = 0;
    if (at.load(std::memory_order_relaxed) == 0) at.compare_exchange_strong(zero, mono_ns());
  }

  // --- node slots

  std::string describe(fit::NodeId id) const {
    const std::optional<fit::NodeConfig> n = node->peer(id);
    if (!n) return std::to_string(id);
    return std::to_string(id) + " (" + n->address + ":" + std::to_string(n->port) + ", " +
           fit::provider_name(n->provider) + ")";
  }
  int slot_of(fit::NodeId id) const {
    const int n = nslots.load(std::memory_order_acquire);
    for (int i = 0; i < n; i++) {
      if (slots[i].id == id && slots[i].state.load(std::memory_order_acquire) != kFree) return i;
    }
    return -1;
  }
  bool live(int s) const {
    return s >= 0 && s < kMaxNodes && slots[s].state.load(std::memory_order_acquire) == kOpen;
  }

  // Opens a space on memory node `id` (placer or repair thread, or open()): connects every
  // channel, kOpen. Returns the slot, or an error naming the node.
  std::mutex open_mutex;  // one opener at a time (the miss path only reads slots)
  Result<int> open_node(fit::NodeId id) {
    std::lock_guard<std::mutex> guard(open_mutex);
    if (int s = slot_of(id); s >= 0) {
      if (slots[s].state.load() == kLost) {
        return Status(EHOSTDOWN, "memory node " + describe(id) + " was lost by this process");
      }
      return s;
    }
    const int s = nslots.load();
    if (s >= kMaxNodes) {
      return Status(ENOSPC, "more than " + std::to_string(kMaxNodes) + " memory nodes");
    }
    NodeSlot& n = slots[s];
    n.id = id;
    n.channels_ready.store(true);  // false (and counted in channels_pending) once open
    n.state.store(kOpening);
    nslots.store(s + 1, std::memory_order_release);
    // One channel now (the rest later: "Lazy channels").
    Status st = node->connect_one(id);
    if (!st) {
      n.state.store(kLost);
      return st.with_context("connecting to memory node " + describe(id));
    }
    mem::OpenRequest req{};
    req.version = mem::kProtoVersion;
    req.pid = static_cast<uint32_t>(getpid());
    req.process_key = process_key;
    strncpy(req.program, options.program.c_str(), sizeof(req.program) - 1);
    mem::OpenReply rep{};
    auto r =
        node->send_reply(id, mem::kOpen, {reinterpret_cast<const std::byte*>(&req), sizeof(req)},
                         {reinterpret_cast<std::byte*>(&rep), sizeof(rep)});
    if (!r || r.value() != sizeof(rep) || rep.line_bytes != kLine) {
      n.state.store(kLost);
      if (!r) {
        return r.status().with_context("opening an address space on memory node " + describe(id));
      }
      return Status(EPROTO, "memory node " + describe(id) +
                                " answered open with an unexpected layout (protocol version " +
                                std::to_string(rep.version) + ", this runtime speaks " +
                                std::to_string(mem::kProtoVersion) + ")");
    }
    n.space = rep.handle;
    n.lease_ms = rep.lease_ms;
    n.channels_ready.store(false);
    channels_pending.fetch_add(1);
    n.state.store(kOpen, std::memory_order_release);
    memory_nodes_used.fetch_add(1);
    if (options.observer != nullptr) options.observer(id, rep.handle, true);
    return s;
  }

  // Marks slot s lost (once) and wakes the repair thread. Async-signal-safe.
  void mark_lost(int s, int error) {
    int expected = kOpen;
    if (!slots[s].state.compare_exchange_strong(expected, kLost)) return;
    slots[s].lost_error.store(error);
    stamp_once(first_loss_ns);
    nodes_lost.fetch_add(1);
    lost_generation.fetch_add(1);
    repair_wake.fetch_add(1);
    futex(&repair_wake, FUTEX_WAKE_PRIVATE, 1, nullptr);
  }

  // After a call to slot s failed with st: whether to send it again to the same node.
  // Marks the node lost where the design says so (cluster_backend.h). `others`: another
  // replica could serve instead. `caller_retries`: the ExCache sends the call again itself
  // (a fetch, a synchronous write-back); not so for the end of an asynchronous write-back,
  // which it cannot repeat: that is resent here, kAttempts tries in all, as lego/retry.h says.
  bool again(int s, const Status& st, int attempt, bool others, bool caller_retries = true) {
    const int code = st.code();
    switch (classify(code)) {
      case ErrorClass::kPeerGone:
        mark_lost(s, code);
        return false;
      case ErrorClass::kRefused:
        // EACCES: the node no longer knows our space (it restarted empty).
        if (code == EACCES) mark_lost(s, code);
        return false;
      case ErrorClass::kRetry:
        if (!others) {
          // Alone, the node is waited for as before the cluster: the ExCache's retries, or
          // ours for what it cannot repeat. A reset is tried once more at once (libfit
          // reconnects; a dead lego-memd then refuses: "peer gone").
          if (!caller_retries) return attempt < kAttempts;
          return code != ETIMEDOUT && attempt < 2;
        }
        if (code == ETIMEDOUT) {
          // With another copy, kAttempts timeouts in a row make the node lost.
          if (slots[s].timeouts.fetch_add(1) + 1 >= kAttempts) {
            mark_lost(s, code);
            return false;
          }
          return attempt < kAttempts;
        }
        // A reset connection failing again: the node is gone.
        if (attempt >= 2) {
          mark_lost(s, code);
          return false;
        }
        return true;
      default:
        return false;
    }
  }
  void call_ok(int s) {
    if (slots[s].timeouts.load(std::memory_order_relaxed) != 0) slots[s].timeouts.store(0);
  }

  // Whether the process keeps more than one copy: then a node that fails is given up
  // sooner, since another serves meanwhile.
  bool replicated() const {
    return options.replicas > 1;
  }

  // --- the map

  uint64_t vregion_of(uint64_t addr) const {
    return (addr - region_base) / mem::kVRegionBytes;
  }
  bool in_region(uint64_t addr) const {
    return addr >= region_base && addr - region_base < nvregions * mem::kVRegionBytes;
  }
  Entry entry(uint64_t v) const {
    return Entry::decode(map[v].load(std::memory_order_acquire));
  }

  // "2 (10.1.2.3:18602, tcp)" into buf, from the cluster file (a learned peer's lookup
  // would allocate). Async-signal-safe.
  void node_text(fit::NodeId id, char* buf, size_t cap) const {
    const fit::NodeConfig* n = node->config().find(id);
    if (n != nullptr) {
      snprintf(buf, cap, "%u (%s:%u, %s)", id, n->address.c_str(), n->port,
               fit::provider_name(n->provider));
    } else {
      snprintf(buf, cap, "%u", id);
    }
  }

  // A call to slot s failed with `code` and is given back to the ExCache (which retries
  // what may pass, and otherwise ends the process): loss_message names the node, should
  // the process end of it.
  void note_failure(int s, int code) {
    char text[160];
    node_text(slots[s].id, text, sizeof text);
    snprintf(loss_message, sizeof loss_message, "memory node %s failed: %s", text,
             strerrorname_np(code) != nullptr ? strerrorname_np(code) : "error");
  }

  // Records that vRegion v (with entry e) has no full copy left; returns EHOSTDOWN.
  Status lost_vregion(uint64_t v, const Entry& e) {
    int s = -1;
    for (uint32_t i = 0; i < kMaxReplicas; i++) {
      if (e.slot[i] != kNoSlot) s = e.slot[i];
    }
    const fit::NodeId id = s >= 0 ? slots[s].id : 0;
    const int err = s >= 0 ? slots[s].lost_error.load() : 0;
    char text[160];
    node_text(id, text, sizeof text);
    snprintf(loss_message, sizeof loss_message,
             "memory node %s: vRegion %lu (%#lx) had its last copy there (%s)", text,
             static_cast<unsigned long>(v),
             static_cast<unsigned long>(region_base + v * mem::kVRegionBytes),
             err != 0 ? strerrorname_np(err) : "lost");
    return Status(EHOSTDOWN, loss_message);
  }

  // --- fetch

  static size_t fetch_request(const mem::SpaceHandle& h, std::span<const uint64_t> addrs,
                              std::byte* buf) {
    mem::FetchRequest r{h, static_cast<uint32_t>(addrs.size()), 0};
    memcpy(buf, &r, sizeof r);
    memcpy(buf + sizeof r, addrs.data(), addrs.size() * sizeof(uint64_t));
    return sizeof r + addrs.size() * sizeof(uint64_t);
  }
  static std::span<std::byte> reply_span(size_t n, std::byte* out) {
    const size_t head = mem::fetch_reply_head_bytes(static_cast<uint32_t>(n));
    return {out - head, head + n * kLine};
  }
  Status unpack(size_t len, size_t n, std::byte* out, int s) const {
    if (n == 1) {
      if (len == 0) {
        memset(out, 0, kLine);
      } else if (len != kLine) {
        return Status(EPROTO, "fetch reply of " + std::to_string(len) +
                                  " bytes for one line from memory node " + describe(slots[s].id));
      }
      return Status();
    }
    mem::FetchReply head;
    memcpy(&head, out - sizeof head, sizeof head);
    const size_t stored = static_cast<size_t>(__builtin_popcountll(head.stored_mask));
    if (len != sizeof head + stored * kLine || (n < 64 && (head.stored_mask >> n) != 0)) {
      return Status(EPROTO, "malformed fetch reply from memory node " + describe(slots[s].id));
    }
    if (stored == n) return Status();
    size_t from = stored;
    for (size_t i = n; i-- > 0;) {
      std::byte* slot = out + i * kLine;
      if (head.stored_mask & (uint64_t{1} << i)) {
        --from;
        if (from != i) memmove(slot, out + from * kLine, kLine);
      } else {
        memset(slot, 0, kLine);
      }
    }
    return Status();
  }

  // Fetches lines (all in vRegion v, whose entry is `map_word`) from the first full live
  // replica, failing over; `snap` >= 0 reads that snapshot's spaces.
  Status fetch_run(uint64_t map_word, std::span<const uint64_t> addrs, std::byte* out, int snap,
                   const Chosen* chosen = nullptr) {
    const Entry e = Entry::decode(map_word);
    if (!e.placed) {
      memset(out, 0, addrs.size() * kLine);  // never placed: never written
      return Status();
    }
    alignas(8) std::byte req[sizeof(mem::FetchRequest) + kMaxFetchBatch * sizeof(uint64_t)];
    bool failed_over = false;
    Status last;
    for (uint32_t i = 0; i < kMaxReplicas; i++) {
      if (!e.full(i)) continue;
      const int s = e.slot[i];
      if (!live(s)) {
        failed_over = true;
        continue;
      }
      const mem::SpaceHandle* h = &slots[s].space;
      if (snap >= 0) {
        if (!slots[s].snap_valid[snap].load(std::memory_order_acquire)) continue;
        h = &slots[s].snaps[snap];
      }
      // One-sided where there is a grant (and, under --rma auto, where it has been the
      // faster way); else, or when the read fails, by kFetch.
      fit::RemoteRegion region;
      RmaChooser::Choice way{RmaChooser::kRequest, RmaChooser::kFavoured};
      const bool granted = snap < 0 && grant_of(v_of(addrs), i, s, &region);
      const bool was_chosen = chosen != nullptr && chosen->slot == s;
      if (granted) way = was_chosen ? chosen->way : choose(s, addrs.size());
      const bool timed =
          granted && options.rma_adaptive && addrs.size() == 1 && (!was_chosen || chosen->timed);
      // Served `path` way from t0 on: its time for --rma auto (when it is the way chosen),
      // and a failover counted.
      auto served = [&](RmaChooser::Path path, uint64_t t0) {
        if (timed && way.path == path) slots[s].chooser.record(path, mono_ns() - t0, way.kind);
        if (failed_over) {
          failovers.fetch_add(1, std::memory_order_relaxed);
          stamp_once(first_failover_ns);
        }
      };
      if (way.path == RmaChooser::kOneSided) {
        const uint64_t t0 = mono_ns();
        if (rma_fetch(region, v_of(addrs), addrs, out)) {
          served(RmaChooser::kOneSided, t0);
          return Status();
        }
      }
      const uint64_t t0 = mono_ns();
      const size_t len = fetch_request(*h, addrs, req);
      bool others = false;
      for (uint32_t j = i + 1; j < kMaxReplicas; j++) others |= e.full(j) && live(e.slot[j]);
      for (int attempt = 1;; attempt++) {
        auto r =
            node->send_reply(slots[s].id, mem::kFetch, {req, len}, reply_span(addrs.size(), out));
        if (r) {
          call_ok(s);
          served(RmaChooser::kRequest, t0);
          return unpack(r.value(), addrs.size(), out, s);
        }
        last = r.status();
        if (!again(s, last, attempt, others)) break;
      }
      if (live(s)) {  // an answer, or a timeout the ExCache retries
        note_failure(s, last.code());
        return last;
      }
      failed_over = true;
    }
    return lost_vregion(vregion_of(addrs[0]), e);
  }

  uint64_t v_of(std::span<const uint64_t> addrs) const {
    return vregion_of(addrs[0]);
  }

  // The grant of replica i of vRegion v if it belongs to node slot s; false when there is
  // none (or it changed while read).
  bool grant_of(uint64_t v, uint32_t i, int s, fit::RemoteRegion* out) const {
    if (grants == nullptr) return false;
    const Grant& g = grants[v * kMaxReplicas + i];
    const uint32_t tag = g.tag.load(std::memory_order_acquire);
    if (tag != static_cast<uint32_t>(s) + 1) return false;
    out->node = slots[s].id;
    out->key = g.key.load(std::memory_order_relaxed);
    out->base = g.base.load(std::memory_order_relaxed);
    out->length = mem::kVRegionBytes;
    std::atomic_thread_fence(std::memory_order_acquire);
    return g.tag.load(std::memory_order_relaxed) == tag;
  }
  // Placer and repair threads: replica i of vRegion v on slot s has `rep`'s grant (or none).
  void set_grant(uint64_t v, uint32_t i, int s, const mem::PlaceReply& rep) {
    if (grants == nullptr) return;
    Grant& g = grants[v * kMaxReplicas + i];
    g.tag.store(0, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    if (rep.rma_granted == 0) return;
    g.key.store(rep.rma_key, std::memory_order_relaxed);
    g.base.store(rep.rma_base, std::memory_order_relaxed);
    g.tag.store(static_cast<uint32_t>(s) + 1, std::memory_order_release);
  }

  // Which way a fetch of n lines of a granted vRegion from slot s goes: one-sided, unless
  // --rma auto's figures for the node say requests (one-line fetches are timed and now and
  // then sent the other way; windows follow the figures). Counts the requests and probes.
  RmaChooser::Choice choose(int s, size_t n) {
    if (!options.rma_adaptive) return {RmaChooser::kOneSided, RmaChooser::kFavoured};
    RmaChooser& c = slots[s].chooser;
    const RmaChooser::Choice way =
        n == 1 ? c.choose() : RmaChooser::Choice{c.favoured(), RmaChooser::kFavoured};
    if (way.probe()) rma_probes.fetch_add(1, std::memory_order_relaxed);
    if (n == 1 && way.path == RmaChooser::kRequest) {
      rma_requests.fetch_add(1, std::memory_order_relaxed);
    }
    return way;
  }

  // Reads `addrs` (all in vRegion v) through grant `r` one-sided, each run of consecutive
  // lines in one rma_read (a vRegion's lines lie in order in the memory node's block:
  // memory_proto.h). False, with nothing decided, when a read failed: the caller then asks
  // by kFetch, whose answer (or error) is the one that counts (a key revoked by kUnplace or
  // a lost lease fails here; kFetch then says why).
  bool rma_fetch(const fit::RemoteRegion& r, uint64_t v, std::span<const uint64_t> addrs,
                 std::byte* out) {
    const uint64_t vstart = region_base + v * mem::kVRegionBytes;
    for (size_t k = 0; k < addrs.size();) {
      size_t n = 1;
      while (k + n < addrs.size() && addrs[k + n] == addrs[k] + n * kLine) n++;
      Status st = node->rma_read(r, addrs[k] - vstart, {out + k * kLine, n * kLine});
      if (!st) {
        rma_fallbacks.fetch_add(1, std::memory_order_relaxed);
        return false;
      }
      k += n;
    }
    rma_lines.fetch_add(addrs.size(), std::memory_order_relaxed);
    return true;
  }

  const std::atomic<uint64_t>* map_for(int snap) const {
    return snap >= 0 ? reinterpret_cast<const std::atomic<uint64_t>*>(snap_map[snap]) : map;
  }

  // Splits addrs into runs of one vRegion; fetches the runs last first (a run's reply
  // header lands in the 8 bytes before it: the previous run's line, fetched after).
  // `chosen`: --rma auto's way for a one-line fetch, already chosen (and counted) by its
  // caller for that slot; else each run chooses its own.
  Status fetch_lines(std::span<const uint64_t> addrs, std::byte* out, int snap,
                     const Chosen* chosen = nullptr) {
    const std::atomic<uint64_t>* m = map_for(snap);
    size_t end = addrs.size();
    while (end > 0) {
      for (size_t a = 0; a < end; a++) {
        if (!in_region(addrs[a])) return Status(EINVAL, "fetch outside the region");
      }
      const uint64_t v = vregion_of(addrs[end - 1]);
      size_t start = end - 1;
      while (start > 0 && vregion_of(addrs[start - 1]) == v) start--;
      Status st = fetch_run(m[v].load(std::memory_order_acquire), addrs.subspan(start, end - start),
                            out + start * kLine, snap, chosen);
      if (!st) return st;
      end = start;
    }
    return Status();
  }

  // --- write-back

  WriteJob* acquire_job() {
    for (;;) {
      for (auto& j : jobs) {
        bool expected = false;
        if (!j.busy.load(std::memory_order_relaxed) &&
            j.busy.compare_exchange_strong(expected, true, std::memory_order_acquire)) {
          return &j;
        }
      }
      sched_yield();
    }
  }
  int enter_epoch() {
    for (;;) {
      const int e = epoch.load();
      inflight[e & 1].fetch_add(1);
      if (epoch.load() == e) return e;
      inflight[e & 1].fetch_sub(1);
    }
  }
  void leave_epoch(int e) {
    inflight[e & 1].fetch_sub(1);
  }

  // Encodes the lines of `lines` that slot s holds a replica of (per `m`) into buf.
  size_t encode(std::span<const WriteBack> lines, const std::atomic<uint64_t>* m, int s,
                const mem::SpaceHandle& h, uint64_t ver, std::byte* buf) const {
    uint32_t n = 0;
    uint64_t addrs[mem::kMaxBatch];
    const std::byte* data[mem::kMaxBatch];
    for (const WriteBack& wb : lines) {
      const Entry e = Entry::decode(m[vregion_of(wb.addr)].load(std::memory_order_acquire));
      if (!e.placed) continue;
      for (uint32_t i = 0; i < kMaxReplicas; i++) {
        if (e.slot[i] == s) {
          addrs[n] = wb.addr;
          data[n] = wb.data;
          n++;
          break;
        }
      }
    }
    if (n == 0) return 0;
    mem::WriteBackRequest head{h, n, 0, ver, 0};
    memcpy(buf, &head, sizeof head);
    memcpy(buf + sizeof head, addrs, n * sizeof(uint64_t));
    std::byte* d = buf + sizeof head + n * sizeof(uint64_t);
    for (uint32_t i = 0; i < n; i++) memcpy(d + size_t{i} * kLine, data[i], kLine);
    return sizeof head + n * (sizeof(uint64_t) + kLine);
  }

  // The distinct live slots that hold a replica (full or joining) of any of the lines.
  int targets(std::span<const WriteBack> lines, const std::atomic<uint64_t>* m, int snap,
              int* out) const {
    int n = 0;
    for (const WriteBack& wb : lines) {
      const Entry e = Entry::decode(m[vregion_of(wb.addr)].load(std::memory_order_acquire));
      if (!e.placed) continue;
      for (uint32_t i = 0; i < kMaxReplicas; i++) {
        const int s = e.slot[i];
        if (s == kNoSlot || !live(s)) continue;
        if (snap >= 0 && !slots[s].snap_valid[snap].load(std::memory_order_acquire)) continue;
        bool seen = false;
        for (int k = 0; k < n; k++) seen |= out[k] == s;
        if (!seen && n < kMaxNodes) out[n++] = s;
      }
    }
    return n;
  }

  // Every vRegion of the lines still has a full live replica; else the loss.
  Status check_kept(const uint64_t* addrs, size_t n, const std::atomic<uint64_t>* m) {
    for (size_t k = 0; k < n; k++) {
      const uint64_t v = vregion_of(addrs[k]);
      const Entry e = Entry::decode(m[v].load(std::memory_order_acquire));
      if (!e.placed) continue;
      bool kept = false;
      for (uint32_t i = 0; i < kMaxReplicas; i++) kept |= e.full(i) && live(e.slot[i]);
      if (!kept) return lost_vregion(v, e);
    }
    return Status();
  }

  // Finishes one started call of a write-back: resends as again() allows. Not ok only for
  // an answer (EINVAL, ENOMEM) or a failure of the last replica; a node found lost is ok
  // here (check_kept decides whether its vRegions kept a copy).
  Status finish(WriteJob* j, Call& c, bool others, bool caller_retries) {
    auto r = node->finish_call(&c.pending);
    const bool busy = c.pending.request_busy;
    for (int attempt = 1; !r && again(c.slot, r.status(), attempt, others, caller_retries);
         attempt++) {
      r = node->send_reply(slots[c.slot].id, mem::kWriteBack, {c.buffer, c.length}, {});
    }
    if (busy) {
      // A zero-copy send may still read the buffer: leave it to the transport for good and
      // take a fresh one (mmap is async-signal-safe).
      void* p =
          mmap(nullptr, buffer_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      c.buffer = p == MAP_FAILED ? nullptr : static_cast<std::byte*>(p);
    }
    c.started = false;
    if (r) {
      call_ok(c.slot);
      return Status();
    }
    if (!live(c.slot)) {
      replica_write_failures.fetch_add(1, std::memory_order_relaxed);
      j->replica_failed = true;
      return Status();
    }
    note_failure(c.slot, r.status().code());
    return r.status();
  }

  bool ensure_buffer(Call& c) {
    if (c.buffer != nullptr) return true;
    void* p =
        mmap(nullptr, buffer_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    c.buffer = static_cast<std::byte*>(p);
    return true;
  }

  // Starts the job's requests to slots[first..n) (at most kCallsPerJob); the job's calls.
  Status start_calls(WriteJob* j, std::span<const WriteBack> lines, const std::atomic<uint64_t>* m,
                     int snap, const int* tslots, int n, uint64_t ver) {
    j->ncalls = 0;
    for (int k = 0; k < n; k++) {
      Call& c = j->calls[j->ncalls];
      if (!ensure_buffer(c)) return Status(ENOMEM, "no memory for a write-back buffer");
      const int s = tslots[k];
      const mem::SpaceHandle& h = snap >= 0 ? slots[s].snaps[snap] : slots[s].space;
      c.length = encode(lines, m, s, h, ver, c.buffer);
      if (c.length == 0) continue;
      c.slot = s;
      new (&c.pending) fit::Node::PendingCall();
      c.pending.zero_copy = true;
      Status st =
          node->start_call(&c.pending, slots[s].id, mem::kWriteBack, {c.buffer, c.length}, {});
      if (!st) {
        // Nothing in flight for this node. Lost: the other replicas carry the lines;
        // otherwise the caller writes the whole batch back again (a failed start is a try).
        (void)again(s, st, 1, replicated());
        if (live(s)) {
          note_failure(s, st.code());
          return st;
        }
        replica_write_failures.fetch_add(1, std::memory_order_relaxed);
        j->replica_failed = true;
        continue;
      }
      c.started = true;
      j->ncalls++;
    }
    return Status();
  }

  // caller_retries: a synchronous write-back (the ExCache repeats it on a retry-class error);
  // not the end of an asynchronous one.
  Status finish_calls(WriteJob* j, bool caller_retries) {
    Status first;
    for (int k = 0; k < j->ncalls; k++) {
      Call& c = j->calls[k];
      if (!c.started) continue;
      Status st = finish(j, c, replicated(), caller_retries);
      if (!st && first.is_ok()) first = st;
    }
    j->ncalls = 0;
    return first;
  }

  // The whole write-back of `lines` to every live replica: started in rounds of
  // kCallsPerJob nodes; the last round left in flight when `leave_started`.
  Status write(std::span<const WriteBack> lines, int snap, WriteJob* j, bool leave_started) {
    if (lines.size() > mem::kMaxBatch) return Status(EINVAL, "write-back of over 32 lines");
    const std::atomic<uint64_t>* m = map_for(snap);
    j->nlines = lines.size();
    for (size_t k = 0; k < lines.size(); k++) {
      if (!in_region(lines[k].addr)) return Status(EINVAL, "write-back outside the region");
      j->addrs[k] = lines[k].addr;
    }
    const uint64_t ver = version.fetch_add(1, std::memory_order_relaxed) + 1;
    j->replica_failed = false;
    int ts[kMaxNodes];
    const int n = targets(lines, m, snap, ts);
    for (int done = 0; done < n;) {
      const int now = std::min(n - done, kCallsPerJob);
      Status st = start_calls(j, lines, m, snap, ts + done, now, ver);
      done += now;
      if (!st) {
        (void)finish_calls(j, !leave_started);
        return st;
      }
      if (done < n || !leave_started) {
        st = finish_calls(j, !leave_started);
        if (!st) return st;
      }
    }
    if (!leave_started) return kept(j, m);
    return Status();
  }

  // The end of a write-back: check_kept, and the first one done by the survivors of a
  // lost replica stamps first_failover_ns.
  Status kept(WriteJob* j, const std::atomic<uint64_t>* m) {
    Status st = check_kept(j->addrs, j->nlines, m);
    if (st && j->replica_failed) stamp_once(first_failover_ns);
    return st;
  }

  // --- placement (placer and repair threads: may allocate, may wait)

  // Free capacity of each candidate (kUsage), for the local weighted choice.
  Result<std::vector<fit::NodeId>> choose_local(uint32_t want,
                                                const std::vector<fit::NodeId>& exclude) {
    std::vector<placement::Candidate> cands;
    for (fit::NodeId id : options.memory_nodes) {
      if (std::find(exclude.begin(), exclude.end(), id) != exclude.end()) continue;
      const int s = slot_of(id);
      if (s >= 0 && !live(s)) continue;
      mem::UsageReply u{};
      auto r = node->send_reply(id, mem::kUsage, {}, {reinterpret_cast<std::byte*>(&u), sizeof u});
      if (!r || r.value() != sizeof u) continue;  // unreachable: not a candidate now
      cands.push_back(
          {id, u.capacity_bytes > u.reserved_bytes ? u.capacity_bytes - u.reserved_bytes : 0});
    }
    uint64_t seed = 0;
    randombytes_buf(&seed, sizeof seed);
    placement::Rng rng(seed);
    return placement::choose(cands, want, mem::kVRegionBytes, exclude, rng);
  }

  // Asks the monitor for `want` nodes for vRegion v, waiting while it does not answer.
  Result<std::vector<fit::NodeId>> choose_monitor(uint64_t v, uint32_t want,
                                                  const std::vector<fit::NodeId>& exclude) {
    mon::PlaceRequest req{};
    req.process_key = process_key;
    req.owner_node = node->id();
    req.pid = static_cast<uint32_t>(getpid());
    req.vregion = v;
    req.replicas = want;
    for (fit::NodeId id : exclude) {
      if (req.exclude_count < mon::kMaxExclude) req.exclude[req.exclude_count++] = id;
    }
    const auto start = Clock::now();
    bool told = false, waited = false;
    for (;;) {
      mon::PlaceReply rep{};
      auto r = node->send_reply(options.monitor, mon::kPlace,
                                {reinterpret_cast<const std::byte*>(&req), sizeof req},
                                {reinterpret_cast<std::byte*>(&rep), sizeof rep});
      if (r) {
        if (r.value() != sizeof rep || rep.count != want) {
          return Status(EPROTO, "monitor " + describe(options.monitor) + " answered kPlace with " +
                                    std::to_string(rep.count) + " nodes for " +
                                    std::to_string(want));
        }
        std::vector<fit::NodeId> ids;
        for (uint32_t i = 0; i < rep.count; i++) {
          const mon::NodeAddress& a = rep.nodes[i];
          if (!node->peer(a.id)) {
            // A memory node that joined after our cluster file was written (hot-plug).
            fit::NodeConfig nc;
            nc.id = a.id;
            nc.role = fit::Role::kMemory;
            nc.address = std::string(a.address, strnlen(a.address, sizeof a.address));
            nc.port = a.port;
            nc.provider = static_cast<fit::Provider>(a.provider);
            Status st = node->add_peer(nc);
            if (!st) return st.with_context("learning memory node " + std::to_string(a.id));
          }
          ids.push_back(a.id);
        }
        if (told)
          say("lego: %s: monitor node %s answers again\n", options.program.c_str(),
              describe(options.monitor).c_str());
        return ids;
      }
      if (!transport_failure(classify(r.status()))) {
        return r.status().with_context("monitor " + describe(options.monitor));
      }
      if (!waited) {
        monitor_waits.fetch_add(1);
        waited = true;
      }
      const auto waited_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
      if (!told && waited_ms >= node->config().timeout.count()) {
        say("lego: %s: monitor node %s does not answer (%s): placing memory waits for it\n",
            options.program.c_str(), describe(options.monitor).c_str(),
            r.status().message().c_str());
        told = true;
      }
      if (waited_ms >= options.monitor_wait_ms) {
        return Status(ENOMEM, "monitor node " + describe(options.monitor) + " did not answer for " +
                                  std::to_string(options.monitor_wait_ms) +
                                  " ms: no memory can be placed");
      }
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
  }

  Result<std::vector<fit::NodeId>> choose(uint64_t v, uint32_t want,
                                          const std::vector<fit::NodeId>& exclude) {
    if (options.monitor != 0) return choose_monitor(v, want, exclude);
    return choose_local(want, exclude);
  }

  // kPlace (or kUnplace) of vRegion v in slot s's space. A full node answers kPlace with
  // PlaceReply::error ENOMEM (an answer, not a failed call: memory_proto.h).
  Status place_on(int s, uint64_t v, uint32_t flags, uint16_t opcode = mem::kPlace,
                  mem::PlaceReply* granted = nullptr) {
    if (opcode == mem::kPlace && grants != nullptr) flags |= mem::kPlaceRma;
    mem::PlaceRequest req{slots[s].space, v, region_base, flags, 0};
    mem::PlaceReply rep{};
    std::span<std::byte> out;
    if (opcode == mem::kPlace) out = {reinterpret_cast<std::byte*>(&rep), sizeof rep};
    auto r = node->send_reply(slots[s].id, opcode,
                              {reinterpret_cast<const std::byte*>(&req), sizeof req}, out);
    if (!r) {
      (void)again(s, r.status(), 1, replicated());  // judges the node; the caller retries
      return r.status().with_context("memory node " + describe(slots[s].id));
    }
    if (opcode != mem::kPlace) return Status();
    if (r.value() != sizeof rep) {
      return Status(EPROTO, "memory node " + describe(slots[s].id) + " answered kPlace with " +
                                std::to_string(r.value()) + " bytes");
    }
    if (rep.error != 0) {
      return Status(rep.error, "memory node " + describe(slots[s].id) +
                                   " cannot promise another vRegion (" +
                                   std::to_string(rep.reserved_bytes >> 20) + " of " +
                                   std::to_string(rep.capacity_bytes >> 20) + " MiB promised)");
    }
    if (granted != nullptr) *granted = rep;
    return Status();
  }

  // Where node `id` listens, for a copy's target (the source may not know it yet).
  mem::NodeAddress address_of(fit::NodeId id) const {
    mem::NodeAddress a{};
    a.id = id;
    if (const std::optional<fit::NodeConfig> n = node->peer(id)) {
      a.port = n->port;
      a.provider = static_cast<uint8_t>(n->provider);
      strncpy(a.address, n->address.c_str(), sizeof a.address - 1);
    }
    return a;
  }

  std::vector<fit::NodeId> lost_nodes() const {
    std::vector<fit::NodeId> ids;
    for (int i = 0; i < nslots.load(); i++) {
      if (slots[i].state.load() == kLost) ids.push_back(slots[i].id);
    }
    return ids;
  }

  // Places vRegion v on `replicas` nodes (placer thread).
  Status place(uint64_t v) {
    std::vector<fit::NodeId> exclude = lost_nodes();
    Status last;
    for (int round = 0; round < 8; round++) {
      auto pick = choose(v, options.replicas, exclude);
      if (!pick) return pick.status();
      Entry e = Entry::empty();
      uint32_t placed = 0;
      for (fit::NodeId id : pick.value()) {
        auto s = open_node(id);
        mem::PlaceReply granted{};
        if (s) last = place_on(s.value(), v, 0, mem::kPlace, &granted);
        if (s && last) set_grant(v, placed, s.value(), granted);
        if (!s || !last) {
          if (!s) last = s.status();
          exclude.push_back(id);  // full now, or gone: choose again without it
          break;
        }
        e.slot[placed++] = static_cast<uint8_t>(s.value());
      }
      if (placed == options.replicas) {
        e.placed = true;
        map[v].store(e.encode(), std::memory_order_release);
        vregions_placed.fetch_add(1);
        return Status();
      }
      for (uint32_t i = 0; i < placed; i++) (void)place_on(e.slot[i], v, 0, mem::kUnplace);
    }
    return last.is_ok() ? Status(ENOMEM, "no memory node can take another vRegion") : last;
  }

  void unplace(uint64_t v) {
    for (;;) {
      uint64_t w = map[v].load();
      const Entry e = Entry::decode(w);
      if (!e.placed) return;
      if (!map[v].compare_exchange_strong(w, kEmptyEntry)) continue;
      for (uint32_t i = 0; i < kMaxReplicas; i++) {
        if (e.slot[i] != kNoSlot && live(e.slot[i])) {
          (void)place_on(e.slot[i], v, 0, mem::kUnplace);
        }
      }
      vregions_unplaced.fetch_add(1);
      return;
    }
  }

  void placer_loop() {
    while (!stop.load()) {
      const uint32_t seen = place_wake.load();
      bool any = false;
      for (auto& pr : place_requests) {
        if (pr.state.load(std::memory_order_acquire) != 2) continue;
        any = true;
        int result = 0;
        for (uint64_t v = pr.first; v <= pr.last && v < nvregions; v++) {
          const bool want = used == nullptr || used(v);
          const bool has = entry(v).placed;
          if (want && !has) {
            Status st = place(v);
            if (!st) {
              // No room is malloc's ordinary failure (NULL, MemoryError): the program decides
              // what to say. Anything else is news.
              if (st.code() != ENOSPC && st.code() != ENOMEM) {
                say("lego: %s: cannot place 16 MiB of memory (vRegion %lu): %s\n",
                    options.program.c_str(), static_cast<unsigned long>(v), st.message().c_str());
              }
              result = ENOMEM;
              break;
            }
          } else if (!want && has) {
            unplace(v);
          }
        }
        pr.result = result;
        pr.state.store(3, std::memory_order_release);
        futex(&pr.state, FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr);
      }
      if (any) continue;
      const timespec tick{0, 100 * 1000 * 1000};
      futex(&place_wake, FUTEX_WAIT_PRIVATE, seen, &tick);
    }
  }

  // --- repair

  // Re-replicates vRegion v, whose replica i is on a lost node. False to try again later.
  bool repair(uint64_t v, uint32_t i) {
    const auto t0 = Clock::now();
    stamp_once(rereplication_start_ns);
    uint64_t w = map[v].load();
    Entry e = Entry::decode(w);
    if (!e.placed || e.slot[i] == kNoSlot || live(e.slot[i])) return true;
    bool any_full = false;
    for (uint32_t k = 0; k < kMaxReplicas; k++) any_full |= e.full(k) && live(e.slot[k]);
    if (!any_full) {
      (void)lost_vregion(v, e);
      return true;  // nothing to copy from; the next miss in it reports the loss
    }
    // 1. A replacement, excluding every node of the set and every lost one.
    std::vector<fit::NodeId> exclude = lost_nodes();
    for (uint32_t k = 0; k < kMaxReplicas; k++) {
      if (e.slot[k] != kNoSlot) exclude.push_back(slots[e.slot[k]].id);
    }
    auto pick = choose(v, 1, exclude);
    if (!pick) return false;
    auto ys = open_node(pick.value()[0]);
    if (!ys) return false;
    const int y = ys.value();
    mem::PlaceReply granted{};
    if (!place_on(y, v, mem::kPlaceIncomingCopy, mem::kPlace, &granted)) return false;
    // Replica i is never read while joining; its grant is tagged with y, so the old
    // replica's is not used either way.
    set_grant(v, i, y, granted);
    // 2. Y joins: write-backs and releases of v go to it from now on.
    Entry joined = e;
    joined.slot[i] = static_cast<uint8_t>(y);
    joined.joining |= static_cast<uint8_t>(1u << i);
    if (!map[v].compare_exchange_strong(w, joined.encode())) {
      (void)place_on(y, v, 0, mem::kUnplace);
      return false;
    }
    // Every write-back that did not see Y has been stored before the copy starts.
    const int old = epoch.fetch_add(1);
    while (inflight[old & 1].load() != 0 && !stop.load()) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    // 3, 4. A survivor pushes its copy; poll it; another survivor if it dies.
    for (uint32_t k = 0; k < kMaxReplicas && !stop.load(); k++) {
      if (!joined.full(k) || !live(joined.slot[k])) continue;
      const int src = joined.slot[k];
      mem::CopyRequest cr{slots[src].space, v, slots[y].space, address_of(slots[y].id)};
      mem::CopyReply job{};
      auto r = node->send_reply(slots[src].id, mem::kCopyRange,
                                {reinterpret_cast<const std::byte*>(&cr), sizeof cr},
                                {reinterpret_cast<std::byte*>(&job), sizeof job});
      if (!r) {
        (void)again(src, r.status(), 1, true);
        continue;
      }
      // Polled after 1 ms, then twice as long each time up to 100 ms: a vRegion with few
      // lines stored copies in a few ms, and a fixed 100 ms poll made every copy (they run
      // one after another) last at least that long. A status call is one small round trip.
      for (int wait_ms = 1;; wait_ms = std::min(2 * wait_ms, 100)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(wait_ms));
        mem::CopyStatusRequest sr{slots[src].space, job.job};
        mem::CopyStatusReply st{};
        auto q = node->send_reply(slots[src].id, mem::kCopyStatus,
                                  {reinterpret_cast<const std::byte*>(&sr), sizeof sr},
                                  {reinterpret_cast<std::byte*>(&st), sizeof st});
        if (!q) {
          if (again(src, q.status(), 1, true)) continue;
          break;  // the source is gone: another survivor
        }
        if (st.state == 0) continue;
        if (st.state == 2) {
          say("lego: %s: copying vRegion %lu from memory node %s to %s failed: %s\n",
              options.program.c_str(), static_cast<unsigned long>(v),
              describe(slots[src].id).c_str(), describe(slots[y].id).c_str(), strerror(st.error));
          break;
        }
        // Done: Y becomes full.
        for (;;) {
          uint64_t now = map[v].load();
          Entry p = Entry::decode(now);
          if (p.slot[i] != y) return true;  // unplaced meanwhile
          p.joining &= static_cast<uint8_t>(~(1u << i));
          if (map[v].compare_exchange_strong(now, p.encode())) break;
        }
        vregions_rereplicated.fetch_add(1);
        rereplication_end_ns.store(mono_ns());
        bytes_copied.fetch_add(st.lines_copied * kLine);
        copy_ms.fetch_add(static_cast<uint64_t>(
            std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count()));
        return true;
      }
      if (!live(y)) break;
    }
    // Not copied: Y leaves the set again (the lost replica's place stays for a later try).
    for (;;) {
      uint64_t now = map[v].load();
      Entry p = Entry::decode(now);
      if (p.slot[i] != y) break;
      p.slot[i] = e.slot[i];
      p.joining &= static_cast<uint8_t>(~(1u << i));
      if (map[v].compare_exchange_strong(now, p.encode())) break;
    }
    if (live(y)) (void)place_on(y, v, 0, mem::kUnplace);
    return false;
  }

  void report_lost() {
    if (options.monitor == 0) return;
    for (int s = 0; s < nslots.load(); s++) {
      NodeSlot& n = slots[s];
      if (n.state.load() != kLost || n.reported) continue;
      mon::ReportLost rl{n.id, node->id(), n.lost_error.load(), 0};
      auto r = node->send_reply(options.monitor, mon::kReportLost,
                                {reinterpret_cast<const std::byte*>(&rl), sizeof rl}, {});
      n.reported = r.is_ok();
    }
  }

  void repair_loop() {
    uint32_t done_generation = 0;
    auto next_try = Clock::now();
    while (!stop.load()) {
      const uint32_t seen = repair_wake.load();
      const uint32_t gen = lost_generation.load();
      if (gen != done_generation && Clock::now() >= next_try) {
        report_lost();
        bool all = true;
        for (uint64_t v = 0; v < nvregions && !stop.load(); v++) {
          const Entry e = entry(v);
          if (!e.placed) continue;
          for (uint32_t i = 0; i < kMaxReplicas; i++) {
            if (e.slot[i] == kNoSlot || live(e.slot[i])) continue;
            all &= repair(v, i);
          }
        }
        if (all) {
          done_generation = gen;
        } else {
          next_try = Clock::now() + std::chrono::seconds(1);  // no replacement yet
        }
        continue;
      }
      const timespec tick{0, 200 * 1000 * 1000};
      futex(&repair_wake, FUTEX_WAIT_PRIVATE, seen, &tick);
    }
  }

  // --- heartbeats

  // Connects the other channels of every open slot not channels_ready (the heartbeat
  // thread). A channel that fails to connect is left to the first call that takes it,
  // which connects it again and reports the error as any call would (a node lost meanwhile
  // is found so). Stops early for quiesce().
  void connect_rest() {
    for (int s = 0; s < nslots.load() && channels_pending.load() != 0; s++) {
      NodeSlot& n = slots[s];
      if (n.channels_ready.load()) continue;
      const int state = n.state.load(std::memory_order_acquire);
      if (state == kOpening) continue;  // counted, not yet open: the next round
      if (state == kOpen) {
        connecting.store(true);
        if (exiting.load()) {
          connecting.store(false);
          return;
        }
        (void)node->connect(n.id);
        connecting.store(false);
      }
      n.channels_ready.store(true);  // connected, or lost or closed since
      channels_pending.fetch_sub(1);
      futex(&channels_pending, FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr);
    }
  }
  // The miss path's gate: returns once every open slot's channels are connected (at once,
  // after start-up). Allocates nothing; may wait for the heartbeat thread (~4 ms per node
  // over shm, once per run). After quiesce() (the process is exiting) it returns at once:
  // a call then connects a channel it takes itself, as a reconnect after a reset does.
  void await_channels() {
    for (;;) {
      const uint32_t pending = channels_pending.load(std::memory_order_acquire);
      if (pending == 0 || exiting.load(std::memory_order_relaxed)) return;
      if (!connect_now.load(std::memory_order_relaxed)) {
        connect_now.store(true);
        connect_wake.fetch_add(1);
        futex(&connect_wake, FUTEX_WAKE_PRIVATE, 1, nullptr);
      }
      const timespec ts{0, 10 * 1000 * 1000};
      futex(&channels_pending, FUTEX_WAIT_PRIVATE, pending, &ts);
    }
  }
  // Sleeps `ms` on connect_wake (or until stop, or a caller needs the channels).
  void nap(std::chrono::milliseconds ms) {
    const uint32_t seen = connect_wake.load();
    if (stop.load() || connect_now.load()) return;
    const timespec ts{static_cast<time_t>(ms.count() / 1000),
                      static_cast<long>(ms.count() % 1000) * 1000000};
    futex(&connect_wake, FUTEX_WAIT_PRIVATE, seen, &ts);
  }

  void heartbeat_loop() {
    // Start-up's deferred channels: kConnectDelay after open(), or sooner when needed.
    const auto connect_at = Clock::now() + kConnectDelay;
    while (!stop.load() && !connect_now.load() && Clock::now() < connect_at) {
      nap(std::chrono::duration_cast<std::chrono::milliseconds>(connect_at - Clock::now()) +
          std::chrono::milliseconds(1));
    }
    while (!stop.load()) {
      connect_rest();
      // The shortest lease of the spaces open now (more open as placements go on).
      uint32_t lease = 0;
      for (int s = 0; s < nslots.load(); s++) {
        if (live(s) && (lease == 0 || slots[s].lease_ms < lease)) lease = slots[s].lease_ms;
      }
      const auto period =
          std::chrono::milliseconds(lease == 0 ? 200 : std::max<uint32_t>(lease / 4, 50));
      auto wake = Clock::now() + period;
      while (!stop.load() && Clock::now() < wake) {
        nap(std::chrono::milliseconds(20));
        // Slots opened since (placements) get their other channels at once.
        if (channels_pending.load() != 0) connect_rest();
        connect_now.store(false);
      }
      if (stop.load()) break;
      for (int s = 0; s < nslots.load(); s++) {
        if (!live(s)) continue;
        mem::SpaceRequest hb{slots[s].space};
        // At most one resend (a reset connection): a node that does not answer must not
        // hold up the other nodes' heartbeats past their leases.
        for (int attempt = 1; attempt <= 2; attempt++) {
          auto r = node->send_reply(slots[s].id, mem::kHeartbeat,
                                    {reinterpret_cast<const std::byte*>(&hb), sizeof hb}, {});
          if (r) {
            call_ok(s);
            break;
          }
          if (!again(s, r.status(), attempt, replicated()) || r.status().code() == ETIMEDOUT) {
            break;
          }
        }
        for (uint32_t i = 0; i < kMaxSnapshots && live(s); i++) {
          if (!slots[s].snap_valid[i].load(std::memory_order_acquire)) continue;
          mem::SpaceRequest shb{slots[s].snaps[i]};
          (void)node->send_reply(slots[s].id, mem::kHeartbeat,
                                 {reinterpret_cast<const std::byte*>(&shb), sizeof shb}, {});
        }
      }
    }
  }

  void service(void (Impl::*loop)()) {
    excache_service_thread_begin();
    if (options.on_thread_start != nullptr) options.on_thread_start();
    (this->*loop)();
    excache_service_thread_end();
  }
};

ClusterBackend::ClusterBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Result<std::unique_ptr<ClusterBackend>> ClusterBackend::open(fit::Node* node,
                                                             const ClusterBackendOptions& options) {
  if (options.replicas < 1 || options.replicas > kMaxReplicas) {
    return Status(EINVAL, "replicas " + std::to_string(options.replicas) + ": 1 to " +
                              std::to_string(kMaxReplicas));
  }
  if (options.memory_nodes.empty() && options.monitor == 0) {
    return Status(EINVAL, "the cluster has no memory node");
  }
  if (options.monitor == 0 && options.memory_nodes.size() < options.replicas) {
    return Status(EINVAL, "replicas " + std::to_string(options.replicas) + " but the cluster has " +
                              std::to_string(options.memory_nodes.size()) + " memory node" +
                              (options.memory_nodes.size() == 1 ? "" : "s"));
  }
  if (sodium_init() < 0) return Status(EIO, "libsodium failed to initialise");
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.node = node;
  m.options = options;
  randombytes_buf(&m.process_key, sizeof m.process_key);
  m.buffer_bytes = mem::write_back_request_bytes(mem::kMaxBatch, 0);
  if (m.buffer_bytes > node->config().max_message_bytes) {
    return Status(EMSGSIZE, "max_message_bytes " +
                                std::to_string(node->config().max_message_bytes) +
                                " cannot carry a batch of " + std::to_string(mem::kMaxBatch) +
                                " lines; raise it to at least " + std::to_string(m.buffer_bytes));
  }
  if (options.monitor != 0) {
    // One channel: only the placer and repair threads call the monitor.
    Status st = node->connect_one(options.monitor);
    // A monitor down now only delays placements (they wait for it); say so once.
    if (!st) {
      say("lego: %s: monitor node %s: %s (placements wait for it)\n", options.program.c_str(),
          m.describe(options.monitor).c_str(), st.message().c_str());
    }
  }
  // With a monitor, spaces open as placements reach their nodes (the placer thread);
  // without one, every node of the file is a candidate for every placement: opened now.
  for (fit::NodeId id : options.monitor == 0 ? options.memory_nodes : std::vector<fit::NodeId>{}) {
    auto s = m.open_node(id);
    // Without a monitor every node of the file is a placement candidate; one that does not
    // answer now is left out (it is lost for this process), as long as enough answer.
    if (!s && options.memory_nodes.size() == 1) return s.status();
    if (!s) say("lego: %s: %s\n", options.program.c_str(), s.status().message().c_str());
  }
  int open_nodes = 0;
  for (int s = 0; s < m.nslots.load(); s++) open_nodes += m.live(s);
  if (options.monitor == 0 && open_nodes < static_cast<int>(options.replicas)) {
    return Status(EHOSTUNREACH, "only " + std::to_string(open_nodes) + " of the cluster's " +
                                    std::to_string(options.memory_nodes.size()) +
                                    " memory nodes answer: fewer than replicas " +
                                    std::to_string(options.replicas));
  }
  return start(std::move(impl));
}

void ClusterBackend::quiesce() {
  Impl& m = *impl_;
  m.exiting.store(true);
  while (m.connecting.load()) usleep(100);
  // Replies still on their way (the ExCache's prefetch windows in flight) are taken in
  // before the process ends: over shm, a memory node's reply that nobody takes stalls that
  // node for every other process (fit::Node::drain) — a forked child's end would leave its
  // parent and siblings unanswered. Over tcp this returns as soon as the replies are in.
  m.node->drain();
}

ClusterBackend::~ClusterBackend() {
  Impl& m = *impl_;
  m.stop = true;
  m.connect_wake.fetch_add(1);
  futex(&m.connect_wake, FUTEX_WAKE_PRIVATE, 1, nullptr);
  m.place_wake.fetch_add(1);
  futex(&m.place_wake, FUTEX_WAKE_PRIVATE, 1, nullptr);
  m.repair_wake.fetch_add(1);
  futex(&m.repair_wake, FUTEX_WAKE_PRIVATE, 1, nullptr);
  for (std::thread* t : {&m.heartbeat, &m.placer, &m.repairer}) {
    if (t->joinable()) t->join();
  }
}

Status ClusterBackend::set_region(uint64_t base, uint64_t bytes) {
  Impl& m = *impl_;
  if (m.map != nullptr) return Status(EINVAL, "the region is set already");
  // vRegions count from the region's base rounded down to a vRegion (memory_proto.h: the
  // base every request names is vRegion aligned); the first may start before the region.
  const uint64_t origin = base & ~(mem::kVRegionBytes - 1);
  m.nvregions = (base + bytes - origin + mem::kVRegionBytes - 1) / mem::kVRegionBytes;
  void* p = map_anonymous(m.nvregions * sizeof(uint64_t));
  if (p == nullptr) return Status::from_errno(errno, "mmap of the vRegion map");
  m.map = static_cast<std::atomic<uint64_t>*>(p);  // zero-filled: every vRegion unplaced
  if (m.options.rma) {
    void* g = map_anonymous(m.nvregions * kMaxReplicas * sizeof(Grant));
    if (g == nullptr) return Status::from_errno(errno, "mmap of the one-sided read grants");
    m.grants = static_cast<Grant*>(g);  // zero-filled: no grants
  }
  m.region_base = origin;
  return Status();
}

void ClusterBackend::set_used_fn(UsedFn used) {
  impl_->used = used;
}
const char* ClusterBackend::loss_message() const {
  return impl_->loss_message;
}
uint64_t ClusterBackend::process_key() const {
  return impl_->process_key;
}

ClusterBackend::PlacementView ClusterBackend::placement_view() const {
  const Impl& m = *impl_;
  PlacementView pv;
  pv.replicas = m.options.replicas;
  const int n = m.nslots.load(std::memory_order_acquire);
  pv.nodes.resize(static_cast<size_t>(n));
  for (int s = 0; s < n; s++) {
    NodeView& nv = pv.nodes[static_cast<size_t>(s)];
    nv.id = m.slots[s].id;
    nv.lost = m.slots[s].state.load(std::memory_order_acquire) == kLost;
    if (const std::optional<fit::NodeConfig> c = m.node->peer(nv.id)) {
      nv.address = c->address + ":" + std::to_string(c->port);
    }
  }
  for (uint64_t v = 0; m.map != nullptr && v < m.nvregions; v++) {
    const Entry e = m.entry(v);
    if (!e.placed) continue;
    pv.vregions_placed++;
    bool short_of_copies = false, any_full = false;
    for (uint32_t i = 0; i < kMaxReplicas; i++) {
      if (e.slot[i] == kNoSlot || e.slot[i] >= n) continue;
      NodeView& nv = pv.nodes[e.slot[i]];
      if (!m.live(e.slot[i])) {
        short_of_copies = true;
      } else if (e.full(i)) {
        nv.vregions++;
        any_full = true;
      } else {
        nv.copying++;
        short_of_copies = true;  // its new copy is not whole yet
      }
    }
    // One with no full copy left is lost, not waiting for a copy (the repair gave it up).
    pv.vregions_degraded += short_of_copies && any_full;
  }
  return pv;
}

ClusterStats ClusterBackend::stats() const {
  ClusterStats s;
#define LEGO_CLUSTER_READ(name, doc) s.name = impl_->name.load(std::memory_order_relaxed);
  LEGO_CLUSTER_COUNTERS(LEGO_CLUSTER_READ)
#undef LEGO_CLUSTER_READ
  if (impl_->options.rma_adaptive && impl_->nslots.load(std::memory_order_acquire) > 0) {
    const RmaChooser& c = impl_->slots[0].chooser;
    s.rma_request_ns = c.estimate_ns(RmaChooser::kRequest);
    s.rma_one_sided_ns = c.estimate_ns(RmaChooser::kOneSided);
  }
  return s;
}

Status ClusterBackend::sync_placement(uint64_t first, uint64_t last) {
  Impl& m = *impl_;
  for (;;) {
    for (auto& pr : m.place_requests) {
      uint32_t expected = 0;
      if (!pr.state.compare_exchange_strong(expected, 1)) continue;
      pr.first = first;
      pr.last = last;
      pr.state.store(2, std::memory_order_release);
      m.place_wake.fetch_add(1);
      futex(&m.place_wake, FUTEX_WAKE_PRIVATE, 1, nullptr);
      for (uint32_t s; (s = pr.state.load(std::memory_order_acquire)) != 3;) {
        futex(&pr.state, FUTEX_WAIT_PRIVATE, s, nullptr);
      }
      const int result = pr.result;
      pr.state.store(0, std::memory_order_release);
      return result == 0 ? Status() : Status(result, "no memory node can take the allocation");
    }
    sched_yield();  // every request slot busy: 64 threads placing at once
  }
}

Status ClusterBackend::fetch(uint64_t line_addr, std::span<std::byte, kExCacheLineBytes> out) {
  impl_->await_channels();
  const uint64_t a[1] = {line_addr};
  return impl_->fetch_lines(a, out.data(), -1);
}

Status ClusterBackend::fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out) {
  impl_->await_channels();
  static_assert(kMaxFetchBatch <= mem::kMaxBatch && kMaxFetchBatch <= 64);
  static_assert(sizeof(mem::FetchReply) <= kFetchHeadroom);
  if (line_addrs.empty()) return Status();
  if (line_addrs.size() > kMaxFetchBatch) return Status(EINVAL, "fetch_batch of over 32 lines");
  return impl_->fetch_lines(line_addrs, out, -1);
}

// Started only when every line is in one vRegion with a live full replica; otherwise
// fetched whole in start (the ticket then says done).
Status ClusterBackend::start_fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out,
                                         FetchTicket* ticket) {
  impl_->await_channels();
  Impl& m = *impl_;
  const size_t n = line_addrs.size();
  if (n == 0 || n > kMaxFetchBatch) return Status(EINVAL, "start_fetch_batch: 1 to 32 lines");
  ticket->count = n;
  ticket->out = out;
  int job_index = -1;
  memcpy(ticket->opaque, &job_index, sizeof job_index);
  for (uint64_t a : line_addrs) {
    if (!m.in_region(a)) return Status(EINVAL, "fetch outside the region");
  }
  const uint64_t v = m.vregion_of(line_addrs[0]);
  const Entry e = m.entry(v);
  int s = -1;
  uint32_t replica = 0;
  for (uint32_t i = 0; i < kMaxReplicas && s < 0; i++) {
    if (e.full(i) && m.live(e.slot[i])) {
      s = e.slot[i];
      replica = i;
    }
  }
  bool one_vregion = true;
  for (uint64_t a : line_addrs) one_vregion &= m.vregion_of(a) == v;
  if (!e.placed || s < 0 || !one_vregion) return m.fetch_lines(line_addrs, out, -1);
  // A one-line miss of a granted vRegion is read one-sided at once (libfit's rma_read waits
  // for its completion), unless --rma auto has found requests faster from this node. A
  // window of several lines stays a pipelined kFetch: the ExCache starts the next prefetch
  // window and lets the program work through this one meanwhile, an overlap a waited-for
  // read would lose. (In the verbs guest the sequential A/B was within its noise both ways,
  // docs/rma.md.)
  TicketTiming timing;
  memcpy(ticket->opaque + kTicketTimingAt, &timing, sizeof timing);  // not timed
  // Once auto has chosen (and counted) this fetch, a fallback to fetch_lines goes the way
  // chosen instead of choosing again.
  Chosen chosen;
  const Chosen* fallback_way = nullptr;
  if (fit::RemoteRegion r; n == 1 && m.grant_of(v, replica, s, &r)) {
    if (!m.options.rma_adaptive) return m.fetch_lines(line_addrs, out, -1);
    const RmaChooser::Choice way = m.choose(s, 1);
    timing = {Impl::mono_ns(), s, static_cast<uint8_t>(way.path), way.kind, 1, 0};
    chosen = {s, way, true};
    fallback_way = &chosen;
    if (way.path == RmaChooser::kOneSided) {
      if (m.rma_fetch(r, v, line_addrs, out)) {
        memcpy(ticket->opaque + kTicketTimingAt, &timing, sizeof timing);
        return Status();
      }
      timing.timed = 0;  // failed (counted): asked for by kFetch below, not timed
      chosen = {s, {RmaChooser::kRequest, way.kind}, false};
    }
  }
  // After quiesce() no call is left in flight: the process may end before anyone would
  // take its reply (quiesce() says why that matters).
  if (m.exiting.load(std::memory_order_relaxed)) {
    return m.fetch_lines(line_addrs, out, -1, fallback_way);
  }
  for (int k = 0; k < kFetchJobs; k++) {
    FetchJob& j = m.fetch_jobs[k];
    bool expected = false;
    if (j.busy.load(std::memory_order_relaxed) ||
        !j.busy.compare_exchange_strong(expected, true, std::memory_order_acquire)) {
      continue;
    }
    j.slot = s;
    memcpy(j.addrs, line_addrs.data(), n * sizeof(uint64_t));
    alignas(8) std::byte req[sizeof(mem::FetchRequest) + kMaxFetchBatch * sizeof(uint64_t)];
    const size_t len = Impl::fetch_request(m.slots[s].space, line_addrs, req);
    new (&j.pending) fit::Node::PendingCall();
    Status st = m.node->start_call(&j.pending, m.slots[s].id, mem::kFetch, {req, len},
                                   Impl::reply_span(n, out));
    if (!st) {
      j.busy.store(false, std::memory_order_release);
      return m.fetch_lines(line_addrs, out, -1, fallback_way);
    }
    memcpy(ticket->opaque, &k, sizeof k);
    memcpy(ticket->opaque + kTicketTimingAt, &timing, sizeof timing);
    return Status();
  }
  return m.fetch_lines(line_addrs, out, -1, fallback_way);  // every job busy
}

// --rma auto: the ticket's one-line miss is done (its time is taken once).
static void note_fetch_done(ClusterBackend::Impl& m, LineBackend::FetchTicket* ticket) {
  TicketTiming t;
  memcpy(&t, ticket->opaque + kTicketTimingAt, sizeof t);
  if (!t.timed) return;
  m.slots[t.slot].chooser.record(static_cast<RmaChooser::Path>(t.path),
                                 ClusterBackend::Impl::mono_ns() - t.start_ns,
                                 static_cast<RmaChooser::Kind>(t.kind));
  t.timed = 0;
  memcpy(ticket->opaque + kTicketTimingAt, &t, sizeof t);
}

Status ClusterBackend::finish_fetch_batch(FetchTicket* ticket) {
  Impl& m = *impl_;
  int k = -1;
  memcpy(&k, ticket->opaque, sizeof k);
  if (k < 0) {  // fetched in start
    note_fetch_done(m, ticket);
    return Status();
  }
  FetchJob& j = m.fetch_jobs[k];
  auto r = m.node->finish_call(&j.pending);
  const int s = j.slot;
  uint64_t addrs[kMaxFetchBatch];
  memcpy(addrs, j.addrs, ticket->count * sizeof(uint64_t));
  j.busy.store(false, std::memory_order_release);
  if (r) {
    m.call_ok(s);
    note_fetch_done(m, ticket);
    return m.unpack(r.value(), ticket->count, ticket->out, s);
  }
  // Failed: a node found lost is read around at once; otherwise the ExCache retries (with
  // fetch_batch, which fails over as well).
  const Status st = r.status();
  const Entry e = m.entry(m.vregion_of(addrs[0]));
  bool others = false;
  for (uint32_t i = 0; i < kMaxReplicas; i++)
    others |= e.full(i) && e.slot[i] != s && m.live(e.slot[i]);
  (void)m.again(s, st, 1, others);
  if (m.live(s)) {
    m.note_failure(s, st.code());
    return st;
  }
  return m.fetch_lines({addrs, ticket->count}, ticket->out, -1);
}

// A fetch done in start (fetched whole, or failed) is ready; a started one when libfit says
// its call is (one receive poll of its channel; false while another thread polls it).
bool ClusterBackend::fetch_ready(FetchTicket* ticket) {
  int k = -1;
  memcpy(&k, ticket->opaque, sizeof k);
  if (k >= 0 && !impl_->node->call_done(&impl_->fetch_jobs[k].pending)) return false;
  note_fetch_done(*impl_, ticket);  // its reply (rarely an error) is in: the time it took
  return true;
}

Status ClusterBackend::write_back(std::span<const WriteBack> lines) {
  impl_->await_channels();
  Impl& m = *impl_;
  size_t done = 0;
  while (done < lines.size()) {
    const size_t n = std::min<size_t>(lines.size() - done, mem::kMaxBatch);
    WriteJob* j = m.acquire_job();
    j->epoch = m.enter_epoch();
    Status st = m.write(lines.subspan(done, n), -1, j, /*leave_started=*/false);
    m.leave_epoch(j->epoch);
    j->busy.store(false, std::memory_order_release);
    if (!st) return st;
    done += n;
  }
  return Status();
}

Status ClusterBackend::start_write_back(std::span<const WriteBack> lines, WriteBackTicket* ticket) {
  impl_->await_channels();
  Impl& m = *impl_;
  ticket->buffer = nullptr;
  if (lines.empty() || lines.size() > mem::kMaxBatch) return write_back(lines);
  WriteJob* j = m.acquire_job();
  j->epoch = m.enter_epoch();
  Status st = m.write(lines, -1, j, /*leave_started=*/true);
  if (!st) {
    m.leave_epoch(j->epoch);
    j->busy.store(false, std::memory_order_release);
    return st;
  }
  ticket->buffer = j;
  return Status();
}

Status ClusterBackend::finish_write_back(WriteBackTicket* ticket) {
  Impl& m = *impl_;
  auto* j = static_cast<WriteJob*>(ticket->buffer);
  if (j == nullptr) return Status();
  ticket->buffer = nullptr;
  Status st = m.finish_calls(j, /*caller_retries=*/false);
  if (st) st = m.kept(j, m.map);
  m.leave_epoch(j->epoch);
  j->busy.store(false, std::memory_order_release);
  return st;
}

Status ClusterBackend::release(uint64_t addr, uint64_t length) {
  impl_->await_channels();
  Impl& m = *impl_;
  if (length == 0) return Status();
  if (!m.in_region(addr) || !m.in_region(addr + length - 1)) {
    return Status(EINVAL, "release outside the region");
  }
  const int epoch = m.enter_epoch();
  // Covers every write-back numbered up to it (memory_proto.h).
  const uint64_t ver = m.version.load();
  Status first;
  // Per vRegion: to each of its live replicas (full and joining).
  for (uint64_t a = addr; a < addr + length;) {
    const uint64_t v = m.vregion_of(a);
    const uint64_t end = std::min(addr + length, m.region_base + (v + 1) * mem::kVRegionBytes);
    const Entry e = m.entry(v);
    int live_replicas = 0;
    for (uint32_t i = 0; e.placed && i < kMaxReplicas; i++) {
      live_replicas += e.slot[i] != kNoSlot && m.live(e.slot[i]);
    }
    for (uint32_t i = 0; e.placed && i < kMaxReplicas; i++) {
      const int s = e.slot[i];
      if (s == kNoSlot || !m.live(s)) continue;
      mem::ReleaseRequest req{m.slots[s].space, a, end - a, ver};
      for (int attempt = 1;; attempt++) {
        auto r = m.node->send_reply(m.slots[s].id, mem::kRelease,
                                    {reinterpret_cast<const std::byte*>(&req), sizeof req}, {});
        if (r) break;
        if (!m.again(s, r.status(), attempt, live_replicas > 1)) {
          if (m.live(s) && first.is_ok()) first = r.status();
          break;
        }
      }
    }
    a = end;
  }
  m.leave_epoch(epoch);
  return first;
}

Result<uint32_t> ClusterBackend::snapshot() {
  impl_->await_channels();
  Impl& m = *impl_;
  uint32_t id = kMaxSnapshots;
  for (uint32_t i = 0; i < kMaxSnapshots; i++) {
    int expected = 0;
    if (m.snap_state[i].compare_exchange_strong(expected, 1)) {
      id = i;
      break;
    }
  }
  if (id == kMaxSnapshots) {
    return Status(EAGAIN,
                  "more than " + std::to_string(kMaxSnapshots) + " forked children alive at once");
  }
  if (m.snap_map[id] == nullptr) {
    m.snap_map[id] = static_cast<uint64_t*>(map_anonymous(m.nvregions * sizeof(uint64_t)));
    if (m.snap_map[id] == nullptr) {
      m.snap_state[id].store(0);
      return Status::from_errno(errno, "mmap of a snapshot's vRegion map");
    }
  }
  for (uint64_t v = 0; v < m.nvregions; v++) m.snap_map[id][v] = m.map[v].load();
  for (int s = 0; s < m.nslots.load(); s++) {
    if (!m.live(s)) continue;
    NodeSlot& n = m.slots[s];
    mem::SpaceRequest req{n.space};
    mem::OpenReply rep{};
    auto r =
        m.node->send_reply(n.id, mem::kFork, {reinterpret_cast<const std::byte*>(&req), sizeof req},
                           {reinterpret_cast<std::byte*>(&rep), sizeof rep});
    if (r && r.value() == sizeof rep) {
      n.snaps[id] = rep.handle;
      n.snap_valid[id].store(true, std::memory_order_release);
      if (m.options.observer != nullptr) m.options.observer(n.id, rep.handle, true);
      continue;
    }
    if (!r && !m.again(s, r.status(), 1, m.replicated()) && !m.live(s)) continue;  // lost
    drop_snapshot(id);
    if (!r) return r.status().with_context("memory node " + m.describe(n.id));
    return Status(EPROTO,
                  "memory node " + m.describe(n.id) + " answered fork with an unexpected layout");
  }
  m.snap_state[id].store(2, std::memory_order_release);
  return id;
}

Status ClusterBackend::fetch_snapshot(uint32_t id, uint64_t line_addr,
                                      std::span<std::byte, kExCacheLineBytes> out) {
  impl_->await_channels();
  Impl& m = *impl_;
  if (id >= kMaxSnapshots || m.snap_state[id].load(std::memory_order_acquire) != 2) {
    return Status(ENOENT, "no snapshot " + std::to_string(id));
  }
  const uint64_t a[1] = {line_addr};
  return m.fetch_lines(a, out.data(), static_cast<int>(id));
}

Status ClusterBackend::write_back_snapshot(uint32_t id, std::span<const WriteBack> lines) {
  impl_->await_channels();
  Impl& m = *impl_;
  if (id >= kMaxSnapshots || m.snap_state[id].load(std::memory_order_acquire) == 0) {
    return Status(ENOENT, "no snapshot " + std::to_string(id));
  }
  size_t done = 0;
  while (done < lines.size()) {
    const size_t n = std::min<size_t>(lines.size() - done, mem::kMaxBatch);
    WriteJob* j = m.acquire_job();
    Status st = m.write(lines.subspan(done, n), static_cast<int>(id), j, false);
    j->busy.store(false, std::memory_order_release);
    if (!st) return st;
    done += n;
  }
  return Status();
}

Status ClusterBackend::release_snapshot(uint32_t id, uint64_t addr, uint64_t length) {
  impl_->await_channels();
  Impl& m = *impl_;
  if (id >= kMaxSnapshots || m.snap_state[id].load(std::memory_order_acquire) == 0) {
    return Status(ENOENT, "no snapshot " + std::to_string(id));
  }
  const uint64_t ver = m.version.load();
  for (uint64_t a = addr; a < addr + length;) {
    const uint64_t v = m.vregion_of(a);
    const uint64_t end = std::min(addr + length, m.region_base + (v + 1) * mem::kVRegionBytes);
    const Entry e = Entry::decode(m.snap_map[id][v]);
    for (uint32_t i = 0; e.placed && i < kMaxReplicas; i++) {
      const int s = e.slot[i];
      if (s == kNoSlot || !m.live(s) || !m.slots[s].snap_valid[id].load()) continue;
      if (m.test_release_delay_ms > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(m.test_release_delay_ms));
      }
      mem::ReleaseRequest req{m.slots[s].snaps[id], a, end - a, ver};
      auto r = m.node->send_reply(m.slots[s].id, mem::kRelease,
                                  {reinterpret_cast<const std::byte*>(&req), sizeof req}, {});
      if (!r) (void)m.again(s, r.status(), 1, m.replicated());
    }
    a = end;
  }
  return Status();
}

void ClusterBackend::drop_snapshot(uint32_t id) {
  Impl& m = *impl_;
  if (id >= kMaxSnapshots || m.snap_state[id].load() == 0) return;
  m.snap_state[id].store(1);  // no new users; the slot is reused after the closes
  for (int s = 0; s < m.nslots.load(); s++) {
    NodeSlot& n = m.slots[s];
    if (!n.snap_valid[id].load()) continue;
    n.snap_valid[id].store(false);
    mem::SpaceRequest req{n.snaps[id]};
    if (m.live(s)) {
      (void)m.node->send_reply(n.id, mem::kClose,
                               {reinterpret_cast<const std::byte*>(&req), sizeof req}, {});
    }
    if (m.options.observer != nullptr) m.options.observer(n.id, req.handle, false);
  }
  m.snap_state[id].store(0, std::memory_order_release);
}

void ClusterBackend::disown_snapshot(uint32_t id) {
  Impl& m = *impl_;
  if (id >= kMaxSnapshots || m.snap_state[id].load() == 0) return;
  m.snap_state[id].store(1);
  for (int s = 0; s < m.nslots.load(); s++) {
    NodeSlot& n = m.slots[s];
    if (!n.snap_valid[id].load()) continue;
    n.snap_valid[id].store(false);  // no more heartbeats from here: the child sends its own
    if (m.options.observer != nullptr) m.options.observer(n.id, n.snaps[id], false);
  }
  m.snap_state[id].store(0, std::memory_order_release);
}

Result<std::unique_ptr<ClusterBackend>> ClusterBackend::adopt_snapshot(
    const ClusterBackend& parent, uint32_t id, fit::Node* node,
    const ClusterBackendOptions& options) {
  const Impl& p = *parent.impl_;
  if (id >= kMaxSnapshots || p.snap_state[id].load() != 2 || p.snap_map[id] == nullptr) {
    return Status(ENOENT, "no snapshot " + std::to_string(id) + " to adopt");
  }
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.node = node;
  m.options = options;
  m.used = p.used;
  randombytes_buf(&m.process_key, sizeof m.process_key);
  m.buffer_bytes = p.buffer_bytes;
  // The parent numbered its write-backs with its counter, and went on numbering them while
  // the fork was under way (some went into the snapshot): stay far above all of them.
  m.version.store(p.version.load() + (uint64_t{1} << 40));
  m.region_base = p.region_base;
  m.nvregions = p.nvregions;
  void* map = map_anonymous(m.nvregions * sizeof(uint64_t));
  if (map == nullptr) return Status::from_errno(errno, "mmap of the vRegion map");
  m.map = static_cast<std::atomic<uint64_t>*>(map);
  for (uint64_t v = 0; v < m.nvregions; v++) m.map[v].store(p.snap_map[id][v]);
  // The same slots at the same indices (the map names them by index).
  const int nslots = p.nslots.load();
  for (int s = 0; s < nslots; s++) {
    const NodeSlot& from = p.slots[s];
    NodeSlot& n = m.slots[s];
    n.id = from.id;
    n.lease_ms = from.lease_ms;
    n.channels_ready.store(true);
    n.state.store(kLost);
    n.reported = from.reported;  // the parent told the monitor of the nodes it lost
    if (from.state.load() != kOpen || !from.snap_valid[id].load()) continue;
    n.space = from.snaps[id];
    Status st = node->connect_one(n.id);
    if (!st) {
      // The parent's snapshot space there is unreachable from here: with replicas, the
      // others serve (and the repair thread copies); alone, the child cannot start.
      say("lego: %s: memory node %s: %s (lost for the forked child)\n", options.program.c_str(),
          m.describe(n.id).c_str(), st.message().c_str());
      continue;
    }
    n.channels_ready.store(false);
    m.channels_pending.fetch_add(1);
    n.state.store(kOpen, std::memory_order_release);
    m.memory_nodes_used.fetch_add(1);
    if (options.observer != nullptr) options.observer(n.id, n.space, true);
  }
  m.nslots.store(nslots, std::memory_order_release);
  int open_nodes = 0;
  for (int s = 0; s < nslots; s++) open_nodes += m.live(s);
  if (open_nodes == 0) return Status(EHOSTUNREACH, "no memory node of the snapshot answers");
  if (options.monitor != 0) {
    if (Status st = node->connect_one(options.monitor); !st) {
      say("lego: %s: monitor node %s: %s (placements wait for it)\n", options.program.c_str(),
          m.describe(options.monitor).c_str(), st.message().c_str());
    }
  }
  // A vRegion with a copy on a node lost for the child is re-replicated by its repair thread.
  m.lost_generation.fetch_add(1);
  return start(std::move(impl));
}

std::unique_ptr<ClusterBackend> ClusterBackend::start(std::unique_ptr<Impl> impl) {
  std::unique_ptr<ClusterBackend> b(new ClusterBackend(std::move(impl)));
  Impl* self = b->impl_.get();
  if (const char* knob = getenv("LEGO_TEST_SNAPSHOT_RELEASE_DELAY_MS")) {  // test only (Impl)
    self->test_release_delay_ms = atoi(knob);
  }
  self->heartbeat = std::thread([self] { self->service(&Impl::heartbeat_loop); });
  self->placer = std::thread([self] { self->service(&Impl::placer_loop); });
  self->repairer = std::thread([self] { self->service(&Impl::repair_loop); });
  return b;
}

void ClusterBackend::close() {
  Impl& m = *impl_;
  for (int s = 0; s < m.nslots.load(); s++) {
    NodeSlot& n = m.slots[s];
    const bool was_live = m.live(s);
    n.state.store(kClosed);
    if (!was_live) continue;
    mem::SpaceRequest req{n.space};
    auto r = m.node->send_reply(n.id, mem::kClose,
                                {reinterpret_cast<const std::byte*>(&req), sizeof req}, {});
    if (r && m.options.observer != nullptr) m.options.observer(n.id, n.space, false);
  }
}

}  // namespace lego::runtime
