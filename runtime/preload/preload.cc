// liblego_preload.so: makes an unmodified program's anonymous memory live on a memory node.
//
// lego-run starts the program with LD_PRELOAD="liblego_preload.so libjemalloc.so.2" and
// LEGO_* variables (runtime/launch_contract.h). At load time this library:
//   1. joins the cluster as a FIT client and opens an address space on its memory nodes
//      (ClusterBackend: placement of 16 MiB vRegions, replication, failover), connecting
//      every channel up front;
//   2. creates the ExCache: a large userfaultfd-registered region of which at most
//      --excache bytes are resident;
//   3. gives jemalloc's arenas extent hooks that carve their memory out of the region, so
//      malloc/calloc/realloc/free/posix_memalign/aligned_alloc/memalign and C++ new/delete
//      all land there (jemalloc because its extent-hook API hands us every byte it maps;
//      see README "Allocator");
//   4. interposes mmap/munmap/mremap/madvise so anonymous private read-write mappings the
//      program makes itself come from the region too.
// Runtime-internal memory stays local: runtime threads allocate from a jemalloc arena of
// their own with default hooks, and an mmap whose caller is jemalloc, libfabric or this
// library goes to the kernel (the caller's return address tells).
//
// What is not disaggregated: thread stacks, static data (.data/.bss), file mappings, shared
// mappings, and memory allocated before this library's constructor ran.
//
// Talking to lego-run (runtime/launch_contract.h, the one description of it): each
// opened space is registered as a file in the run directory (LEGO_RUN_DIR), so lego-run
// frees it as soon as the process is gone, even a process that closed every inherited
// descriptor; counters at exit ("stats"), a lost memory node ("lost") and a runtime that
// cannot start ("error", exit 125) go to the run directory's report FIFO.
#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <jemalloc/jemalloc.h>
#include <link.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lego/excache.h"
#include "lego/fit.h"
#include "lego/startup_trace.h"
#include "lego/units.h"
#include "runtime/launch_contract.h"
#include "runtime/preload/cluster_backend.h"
#include "runtime/preload/region_allocator.h"
#include "runtime/stats_page.h"

namespace lego::runtime {
namespace {

constexpr uintptr_t kPage = 4096;

struct Runtime {
  std::unique_ptr<fit::Node> node;
  std::unique_ptr<ClusterBackend> backend;
  std::unique_ptr<ExCache> cache;
  RegionAllocator va;
  unsigned local_arena = 0;
  std::string program;
  // What a forked child needs to become a process of its own (adopt_in_child).
  std::unique_ptr<fit::ClusterConfig> config;
  fit::NodeId self = 0;
  ClusterBackendOptions backend_options;
  std::string memory_address;  // the stats page's
  bool children_adopt = true;  // lego-run --fork-children own
};

Runtime* g_rt = nullptr;
std::atomic<bool> g_active{false};  // redirecting allocations into the region
// In a forked child that has not become a process of its own (adopt_in_child failed or
// was refused): the region is served by the parent's ExCache (runtime/excache/fork.cc),
// and nothing of the runtime may be used here (its threads are gone; its sockets and
// userfaultfd belong to the parent). New memory is local; freeing region memory zeroes it.
std::atomic<bool> g_forked_child{false};

// Text ranges of libraries whose mmaps are runtime-internal.
struct TextRange {
  uintptr_t start, end;
};
TextRange g_internal[32];
int g_internal_count = 0;

void say(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  if (n > 0) (void)!write(2, buf, std::min<size_t>(static_cast<size_t>(n), sizeof(buf) - 1));
}

// The run directory's report FIFO and this process's name, set before anything can fail:
// fixed buffers, so that on_fatal (maybe in a SIGBUS handler) needs no allocation.
char g_report_path[4096];
char g_program[64] = "?";

// Appends `text` to buf[*used..cap) (truncating): async-signal-safe string building.
void append(char* buf, size_t cap, size_t* used, const char* text) {
  size_t n = strlen(text);
  if (*used + n >= cap) n = cap - 1 - *used;
  memcpy(buf + *used, text, n);
  *used += n;
  buf[*used] = '\0';
}

// Writes one report (whole lines, at most PIPE_BUF bytes: one write, never interleaved
// with another process's) to lego-run. Opened by name each time: a process that closed
// its inherited descriptors still reports. False when lego-run is not there to read it.
// Async-signal-safe.
bool report(const char* text, size_t len) {
  if (g_report_path[0] == '\0') return false;
  int fd = open(g_report_path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = write(fd, text, len) == static_cast<ssize_t>(len);
  close(fd);
  return ok;
}

bool internal_caller(const void* ret) {
  auto a = reinterpret_cast<uintptr_t>(ret);
  for (int i = 0; i < g_internal_count; i++) {
    if (a >= g_internal[i].start && a < g_internal[i].end) return true;
  }
  return false;
}

int collect_internal(dl_phdr_info* info, size_t, void*) {
  const char* name = info->dlpi_name ? info->dlpi_name : "";
  static const char* kInternal[] = {
      "jemalloc", "libfabric", "lego_preload", "libsodium", "libibverbs", "librdmacm", "libnl",
      "libpsm",   "libefa",    "tomlplusplus", "libnuma",   "libucp",     "libuct",    "libucs"};
  bool internal = false;
  for (const char* k : kInternal) internal |= strstr(name, k) != nullptr;
  if (!internal) return 0;
  for (int i = 0; i < info->dlpi_phnum && g_internal_count < 32; i++) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X)) {
      uintptr_t start = info->dlpi_addr + ph.p_vaddr;
      g_internal[g_internal_count++] = {start, start + ph.p_memsz};
    }
  }
  return 0;
}

void discard(uintptr_t addr, size_t len) {
  if (g_forked_child.load(std::memory_order_relaxed)) {
    // Discarded memory reads as zeros; in a child, zero it in place.
    memset(reinterpret_cast<void*>(addr), 0, len);
    return;
  }
  Status st = g_rt->cache->discard(reinterpret_cast<void*>(addr), len);
  if (!st) say("lego: discarding %zu bytes at %#lx: %s\n", len, addr, st.message().c_str());
}

// A range of the region whose vRegions are placed on memory nodes (which promise them
// space), or 0 (errno ENOMEM) when no memory node can take them, the monitor did not
// answer in time, or the region has no room: the allocation fails.
uintptr_t take(size_t size, size_t align) {
  size = (size + kPage - 1) & ~(kPage - 1);
  if (g_forked_child.load(std::memory_order_relaxed)) {
    // Local memory, aligned by over-mapping and trimming.
    const size_t over = size + (align > kPage ? align : 0);
    auto p = static_cast<uintptr_t>(syscall(SYS_mmap, nullptr, over, PROT_READ | PROT_WRITE,
                                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (p > static_cast<uintptr_t>(-4096)) {
      errno = ENOMEM;
      return 0;
    }
    const uintptr_t a = align > kPage ? (p + align - 1) & ~(align - 1) : p;
    if (a > p) syscall(SYS_munmap, p, a - p);
    if (p + over > a + size) syscall(SYS_munmap, a + size, p + over - (a + size));
    return a;
  }
  uintptr_t a = g_rt->va.allocate(size, align);
  if (a == 0) {
    errno = ENOMEM;
    return 0;
  }
  uint64_t first = 0, last = 0;
  g_rt->va.vregions(a, size, &first, &last);
  if (!g_rt->backend->sync_placement(first, last)) {
    g_rt->va.release(a, size);
    (void)g_rt->backend->sync_placement(first, last);  // unplaces what it placed
    errno = ENOMEM;
    return 0;
  }
  return a;
}

// Frees a range taken with take(): its lines, its address space, and the placement of
// every vRegion that holds no allocated byte any more.
void give(uintptr_t addr, size_t size) {
  size = (size + kPage - 1) & ~(kPage - 1);
  if (g_forked_child.load(std::memory_order_relaxed)) {
    if (!g_rt->va.contains(addr)) {
      syscall(SYS_munmap, addr, size);  // taken locally in this child
    }
    // Region memory stays mapped in a child (only the parent's runtime can drop it).
    return;
  }
  discard(addr, size);
  g_rt->va.release(addr, size);
  uint64_t first = 0, last = 0;
  g_rt->va.vregions(addr, size, &first, &last);
  (void)g_rt->backend->sync_placement(first, last);
}

// Whether vRegion v holds allocated bytes (ClusterBackend: keep it placed).
bool vregion_used(uint64_t v) {
  return g_rt->va.vregion_bytes_used(v) > 0;
}

// --- jemalloc extent hooks for the program's arenas: memory from the region.

void* region_alloc(extent_hooks_t*, void* new_addr, size_t size, size_t alignment, bool* zero,
                   bool* commit, unsigned) {
  if (new_addr != nullptr) return nullptr;  // no growing in place; jemalloc copes
  uintptr_t a = take(size, alignment);
  if (a == 0) return nullptr;  // memory node full or region exhausted: malloc fails
  *zero = true;                // fresh or discarded ranges read as zeros
  *commit = true;
  return reinterpret_cast<void*>(a);
}
// Opting out of dalloc makes jemalloc retain the range for reuse.
bool region_dalloc(extent_hooks_t*, void*, size_t, bool, unsigned) {
  return true;
}
// jemalloc also hands these hooks extents it mapped before they were installed (local
// memory): those get what jemalloc's default hooks would do.
bool local_extent(const void* addr) {
  return !g_rt->va.contains(reinterpret_cast<uintptr_t>(addr));
}
void region_destroy(extent_hooks_t*, void* addr, size_t size, bool, unsigned) {
  if (local_extent(addr)) {
    syscall(SYS_munmap, addr, size);
    return;
  }
  give(reinterpret_cast<uintptr_t>(addr), size);
}
bool region_commit(extent_hooks_t*, void*, size_t, size_t, size_t, unsigned) {
  return false;
}
bool region_purge(extent_hooks_t*, void* addr, size_t, size_t offset, size_t length, unsigned) {
  if (g_forked_child.load(std::memory_order_relaxed) && !local_extent(addr)) {
    return true;  // not purged: jemalloc then keeps treating the pages as dirty, correctly
  }
  if (local_extent(addr)) {
    return syscall(SYS_madvise, static_cast<char*>(addr) + offset, length, MADV_DONTNEED) != 0;
  }
  discard(reinterpret_cast<uintptr_t>(addr) + offset, length);
  return false;
}
bool region_split(extent_hooks_t*, void*, size_t, size_t, size_t, bool, unsigned) {
  return false;
}
bool region_merge(extent_hooks_t*, void*, size_t, void*, size_t, bool, unsigned) {
  return false;
}

extent_hooks_t g_region_hooks = {
    region_alloc, region_dalloc, region_destroy, region_commit, region_purge,
    region_purge, region_purge,  region_split,   region_merge,
};

// Runtime threads (the fault handler, heartbeats) allocate from the local arena. They
// must switch before the program's arenas get region hooks: switching takes jemalloc's
// control lock, which the main thread holds while an arena it initialises faults on the
// region, and only the handler thread can serve that fault.
// The constructor sleeps on the counter (a futex) until they have: a 1 ms sleep-and-look
// loop cost ~1 ms per process start, most of it asleep after the threads were ready.
std::atomic<int> g_runtime_threads_ready{0};
static_assert(sizeof(std::atomic<int>) == sizeof(int), "a futex is an int");
int* runtime_threads_futex() {
  return reinterpret_cast<int*>(&g_runtime_threads_ready);
}
void use_local_arena() {
  if (g_rt == nullptr) return;
  unsigned a = g_rt->local_arena;
  mallctl("thread.arena", nullptr, nullptr, &a, sizeof(a));
  g_runtime_threads_ready.fetch_add(1);
  syscall(SYS_futex, runtime_threads_futex(), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

// Waits until `expect` runtime threads switched arenas, at most `limit`.
bool wait_for_runtime_threads(int expect, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    const int now = g_runtime_threads_ready.load();
    if (now >= expect) return true;
    const auto left = deadline - std::chrono::steady_clock::now();
    if (left <= std::chrono::nanoseconds(0)) return false;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    // Returns at once when the count changed since the load above (EAGAIN): no wake lost.
    syscall(SYS_futex, runtime_threads_futex(), FUTEX_WAIT_PRIVATE, now, &ts, nullptr, 0);
  }
}

// A miss could not be served: tell lego-run which memory node was lost (or, without
// lego-run to read it, stderr), then die with its exit code. Async-signal-safe (may run
// in the SIGBUS handler): no stdio, no malloc.
void on_fatal(const char* message) {
  char line[1024];
  size_t used = 0;
  append(line, sizeof line - 1, &used, "lost ");
  // The backend names the node and the vRegion whose last copy went with it.
  const char* loss = g_rt != nullptr && g_rt->backend ? g_rt->backend->loss_message() : "";
  if (loss[0] != '\0') {
    append(line, sizeof line - 1, &used, loss);
    append(line, sizeof line - 1, &used, "; ");
  }
  append(line, sizeof line - 1, &used, message);
  append(line, sizeof line, &used, "\n");
  if (!report(line, used)) {
    used = 0;
    append(line, sizeof line - 1, &used, "lego: ");
    append(line, sizeof line - 1, &used, g_program);
    append(line, sizeof line - 1, &used, ": memory node lost: ");
    if (loss[0] != '\0') {
      append(line, sizeof line - 1, &used, loss);
      append(line, sizeof line - 1, &used, "; ");
    }
    append(line, sizeof line - 1, &used, message);
    append(line, sizeof line, &used, "\n");
    (void)!write(2, line, used);
  }
  _exit(launch::kExitMemoryLost);
}

// The runtime cannot start in this process: lego-run prints why and exits 125 (when this
// is PROGRAM itself); without lego-run to read it, stderr says it.
[[noreturn]] void fail(const std::string& what) {
  char line[1024];
  size_t used = 0;
  append(line, sizeof line - 1, &used,
         ("error " + std::to_string(getpid()) + " " + g_program + ": ").c_str());
  append(line, sizeof line - 1, &used, what.c_str());
  append(line, sizeof line, &used, "\n");
  if (!report(line, used)) say("lego: %s: %s\n", g_program, what.c_str());
  _exit(launch::kExitLegoError);
}

// The counters at exit, to lego-run (--stats).
void write_stats() {
  char buf[3584];  // within PIPE_BUF: one write
  const ClusterStats cs = g_rt->backend->stats();
  launch::StatsValue extra[std::size(kClusterStatsFields)];
  size_t k = 0;
  for (const ClusterStatsField& f : kClusterStatsFields) extra[k++] = {f.name, cs.*f.field};
  const int n = launch::format_stats_report(buf, sizeof buf, getpid(), g_rt->program.c_str(),
                                            g_rt->cache->stats(), g_rt->cache->uses_kernel_module(),
                                            extra, k);
  if (n > 0) report(buf, static_cast<size_t>(n));
}

// The run directory (LEGO_RUN_DIR; empty: none) and this process's name in it: its pid
// and start time (launch::process_info), which together no other process has. Set once
// at start; read where nothing may be allocated.
char g_run_dir[4096];
pid_t g_pid = 0;
uint64_t g_start_time = 0;

// The file name's ID for space `id` on memory node `node`: space ids are per node.
uint64_t space_file_id(fit::NodeId node, uint64_t id) {
  return (uint64_t{node} << 48) | (id & ((uint64_t{1} << 48) - 1));
}

// "<run dir>/<prefix>space.PID.START.ID" into buf; false when it does not fit.
bool space_path(char* buf, size_t cap, const char* prefix, uint64_t id) {
  char name[128];
  if (launch::format_space_file_name(name, sizeof name, g_pid, g_start_time, id) < 0) return false;
  const int n = snprintf(buf, cap, "%s/%s%s", g_run_dir, prefix, name);
  return n > 0 && static_cast<size_t>(n) < cap;
}

// Registers or unregisters a space of this process in the run directory, so that lego-run
// frees it once the process is gone (launch_contract.h). The file appears whole (written
// under a '.' name, then renamed). Allocates nothing (ClusterBackendOptions::observer).
void registry_observer(fit::NodeId node, const mem::SpaceHandle& h, bool opened) {
  if (g_run_dir[0] == '\0') return;
  char path[4200], tmp[4200];
  const uint64_t id = space_file_id(node, h.id);
  if (!space_path(path, sizeof path, "", id)) return;
  if (!opened) {
    unlink(path);
    return;
  }
  char line[128];
  const int len = launch::format_space_line(line, sizeof line, node, h);
  if (len < 0 || !space_path(tmp, sizeof tmp, ".", id)) return;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  bool ok = fd >= 0 && write(fd, line, static_cast<size_t>(len)) == len;
  const int err = errno;
  if (fd >= 0) close(fd);
  ok = ok && rename(tmp, path) == 0;
  if (!ok) {
    unlink(tmp);
    say("lego: %s: cannot register its memory-node space in %s (%s): it is freed only when "
        "its lease runs out\n",
        g_program, g_run_dir, strerror(err));
  }
}

// Frees the spaces an earlier image of this process registered (same pid and start time:
// it exec'd, and nothing can use them any more). Before this image opens its own.
void close_earlier_images(fit::Node* node) {
  DIR* d = opendir(g_run_dir);
  if (d == nullptr) return;
  while (dirent* e = readdir(d)) {
    pid_t p = 0;
    uint64_t start = 0, id = 0;
    if (!launch::parse_space_file_name(e->d_name, &p, &start, &id) || p != g_pid ||
        start != g_start_time) {
      continue;
    }
    const std::string path = std::string(g_run_dir) + "/" + e->d_name;
    char text[128] = {};
    int f = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (f < 0) continue;
    const ssize_t n = read(f, text, sizeof text - 1);
    close(f);
    uint32_t old_node = 0;
    mem::SpaceHandle old{};
    if (n > 0 && launch::parse_space_line(text, &old_node, &old)) {
      mem::SpaceRequest req{old};
      (void)node->send_reply(old_node, mem::kClose,
                             {reinterpret_cast<const std::byte*>(&req), sizeof(req)}, {});
    }
    unlink(path.c_str());
  }
  closedir(d);
}

// The live stats page (runtime/stats_page.h): this thread sums the ExCache's counters
// into it every kPublishInterval, so the miss path pays nothing for lego-stat. Its page
// is removed at exit (lego_stop).
std::atomic<launch::StatsPublisher*> g_stats_page{nullptr};
// The memory node lego-stat names for this process: its only one, or the first of the
// cluster's it may use.
fit::NodeId g_memory_node = 0;

// The page's view of where the memory is: every memory node, the re-replication.
launch::ClusterSample cluster_sample() {
  const ClusterBackend::PlacementView pv = g_rt->backend->placement_view();
  const ClusterStats cs = g_rt->backend->stats();
  launch::ClusterSample c;
  c.replicas = pv.replicas;
  c.vregions_placed = pv.vregions_placed;
  c.vregions_degraded = pv.vregions_degraded;
  c.vregions_rereplicated = cs.vregions_rereplicated;
  c.bytes_copied = cs.bytes_copied;
  c.rereplication_start_ns = cs.rereplication_start_ns;
  c.node_count = static_cast<uint32_t>(pv.nodes.size());
  for (const ClusterBackend::NodeView& n : pv.nodes) {
    c.nodes.push_back({n.id, n.lost, n.vregions, n.copying, n.address});
  }
  std::sort(c.nodes.begin(), c.nodes.end(),
            [](const auto& a, const auto& b) { return a.id < b.id; });
  return c;
}

void start_stats_publisher(const std::string& memory_address) {
  if (g_run_dir[0] == '\0') return;
  const int before = g_runtime_threads_ready.load();
  std::thread([memory_address] {
    use_local_arena();
    excache_service_thread_begin();
    prctl(PR_SET_NAME, "lego-stats");
    auto page = launch::StatsPublisher::create(g_run_dir, g_pid, g_start_time, g_program,
                                               g_memory_node, memory_address);
    if (!page) {
      say("lego: %s: %s (lego-stat will not show it)\n", g_program,
          page.status().message().c_str());
      excache_service_thread_end();
      return;
    }
    g_stats_page = page.value().release();  // lives as long as the process
    for (;;) {
      g_stats_page.load()->publish(g_rt->cache->stats(), g_rt->cache->uses_kernel_module(),
                                   cluster_sample());
      std::this_thread::sleep_for(launch::kPublishInterval);
    }
  }).detach();
  // Like the other runtime threads, it takes the local arena before the program's arenas
  // get region hooks (see use_local_arena): a futex wait, no polling.
  if (!wait_for_runtime_threads(before + 1, std::chrono::seconds(1))) {
    say("lego: %s: the stats thread did not start within 1 s (lego-stat may not show it)\n",
        g_program);
  }
}

// The cluster file's `replicas` (lego-run --replicas overrides it through LEGO_REPLICAS)
// and `monitor_wait_ms`.
uint32_t cluster_replicas(const fit::ClusterConfig& config) {
  return static_cast<uint32_t>(config.replicas);
}
uint32_t cluster_monitor_wait_ms(const fit::ClusterConfig& config) {
  return static_cast<uint32_t>(config.monitor_wait.count());
}

__attribute__((constructor(102))) void lego_start() {
  if (!launch::under_lego_run()) return;  // a plain program
  startup_mark("runtime: start");
  // First: where to report, should anything below fail.
  if (const std::string dir = launch::run_dir_from_environment(); !dir.empty()) {
    snprintf(g_run_dir, sizeof g_run_dir, "%s", dir.c_str());
    snprintf(g_report_path, sizeof g_report_path, "%s/%s", dir.c_str(), launch::kReportFifo);
  }
  auto rt = std::make_unique<Runtime>();
  {
    char exe[256] = {};
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    rt->program = n > 0 ? basename(exe) : "?";
    snprintf(g_program, sizeof g_program, "%s", rt->program.c_str());
  }
  auto settings = launch::settings_from_environment();
  if (!settings) fail(settings.status().message());
  const launch::Settings& run = settings.value();
  g_pid = getpid();
  g_start_time = launch::process_info(g_pid).start;
  auto config = fit::ClusterConfig::parse_file(run.config);
  if (!config) fail(config.status().message());
  const fit::NodeId self = static_cast<fit::NodeId>(run.node);
  // Where this process's memory may go: one memory node (LEGO_MEMORY_NODE), or all of
  // the file's (placed by its monitor, if it has one, or by this runtime).
  ClusterBackendOptions bo;
  bo.program = rt->program;
  bo.observer = registry_observer;
  bo.on_thread_start = use_local_arena;
  bo.replicas = run.replicas != 0 ? run.replicas : cluster_replicas(config.value());
  bo.monitor_wait_ms = cluster_monitor_wait_ms(config.value());
  // One-sided reads can pay only where the NIC moves the bytes (verbs); on tcp and shm they
  // are requests by another name (docs/rma.md). Even on verbs they pay only while the
  // memory node's CPU is busy: auto chooses per node and miss by measured latency.
  const bool verbs = !config.value().nodes.empty() &&
                     config.value().nodes.front().provider == fit::Provider::kVerbs;
  bo.rma = run.rma == "on" || (run.rma == "auto" && verbs);
  bo.rma_adaptive = run.rma == "auto" && verbs;
  if (run.memory_node != 0) {
    bo.memory_nodes = {static_cast<fit::NodeId>(run.memory_node)};
  } else {
    for (const fit::NodeConfig& n : config.value().nodes) {
      if (n.role == fit::Role::kMemory) bo.memory_nodes.push_back(n.id);
    }
    if (const fit::NodeConfig* m = config.value().first_of(fit::Role::kMonitor)) {
      bo.monitor = m->id;
    }
  }

  rt->self = self;
  rt->backend_options = bo;
  rt->children_adopt = run.fork_children == "own";

  ExCacheOptions opt = launch::excache_options(run);
  opt.on_thread_start = use_local_arena;
  opt.on_fatal = on_fatal;

  // The runtime's own arena, default hooks: its memory is local.
  unsigned local = 0;
  size_t sz = sizeof(local);
  if (mallctl("arenas.create", &local, &sz, nullptr, 0) != 0) {
    fail("jemalloc is not the allocator (LD_PRELOAD must name libjemalloc.so.2)");
  }
  rt->local_arena = local;
  g_rt = rt.get();

  auto node = fit::Node::create(config.value(), self);
  if (!node) fail(node.status().message());
  rt->node = std::move(node.value());
  startup_mark("runtime: node created");
  close_earlier_images(rt->node.get());
  // Each space is registered as it opens: a process that exits from here on has its
  // spaces freed by lego-run at once.
  auto backend = ClusterBackend::open(rt->node.get(), bo);
  if (!backend) fail(backend.status().message());
  startup_mark("runtime: space opened");
  rt->backend = std::move(backend.value());
  auto cache = ExCache::create(opt, rt->backend.get());
  if (!cache) fail(cache.status().message());
  rt->cache = std::move(cache.value());
  const auto base = reinterpret_cast<uintptr_t>(rt->cache->region_base());
  startup_mark("runtime: excache created");
  Status st = rt->backend->set_region(base, rt->cache->region_size());
  if (!st) fail(st.message());
  st = rt->va.init(base, rt->cache->region_size(), size_t{1} << 18, mem::kVRegionBytes);
  if (!st) fail(st.message());
  rt->backend->set_used_fn(vregion_used);

  dl_iterate_phdr(collect_internal, nullptr);
  rt->config = std::make_unique<fit::ClusterConfig>(config.value());
  rt.release();

  const int expect = ClusterBackend::kServiceThreads +
                     (opt.delivery == ExCacheOptions::Delivery::kHandlerThread ? 1 : 0);
  if (!wait_for_runtime_threads(expect, std::chrono::seconds(10))) {
    fail("the runtime's threads did not start");
  }
  startup_mark("runtime: threads ready");
  {
    g_memory_node = bo.memory_nodes.empty() ? 0 : bo.memory_nodes.front();
    std::string address;
    for (const fit::NodeConfig& n : config.value().nodes) {
      if (n.id == g_memory_node) address = n.address + ":" + std::to_string(n.port);
    }
    g_rt->memory_address = address;
    start_stats_publisher(address);
  }

  // Every arena but ours now takes its memory from the region: the automatic ones and
  // any huge arena (lego-run sets oversize_threshold:0 so there is none).
  unsigned narenas = 0;
  sz = sizeof(narenas);
  mallctl("arenas.narenas", &narenas, &sz, nullptr, 0);
  extent_hooks_t* hooks = &g_region_hooks;
  for (unsigned i = 0; i < narenas; i++) {
    if (i == local) continue;
    std::string name = "arena." + std::to_string(i) + ".extent_hooks";
    mallctl(name.c_str(), nullptr, nullptr, &hooks, sizeof(hooks));
  }
  // Later mallocs by this thread go to the program's arenas.
  g_active = true;
  startup_mark("runtime: ready");
}

// fork(): the parent sends the child its userfaultfd (ExCache::take_fork_uffd) over a
// socket pair made for the fork, with the slot and snapshot the child adopts.
struct ForkHandover {
  int32_t slot;
  uint32_t snapshot;
};

// One ForkHandover and one file descriptor, as a message for sendmsg/recvmsg. Not
// copyable: msg points into the object.
struct HandoverMessage {
  ForkHandover h{};
  iovec iov{&h, sizeof h};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};

  HandoverMessage() {
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
  }
  HandoverMessage(const HandoverMessage&) = delete;
  HandoverMessage& operator=(const HandoverMessage&) = delete;
};

void send_fork_uffd(int sock) {
  HandoverMessage m;
  ForkHandover& h = m.h;
  const int fd = g_rt->cache->take_fork_uffd(&h.slot, &h.snapshot);
  if (fd < 0) return;  // closing the socket tells the child: stay served by the parent
  cmsghdr* c = CMSG_FIRSTHDR(&m.msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  memcpy(CMSG_DATA(c), &fd, sizeof fd);
  if (sendmsg(sock, &m.msg, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof h)) {
    say("lego: %s: fork(): cannot hand the child its memory (%s): its parent serves it\n",
        g_program, strerror(errno));
  }
  close(fd);
}

// The regions of the region allocator that may hold resident lines: every vRegion with
// allocated bytes (ExCache::adopt_fork scans them).
std::vector<ExCache::Range> used_ranges() {
  std::vector<ExCache::Range> ranges;
  const auto base = reinterpret_cast<uint64_t>(g_rt->cache->region_base());
  const uint64_t end = base + g_rt->cache->region_size();
  const uint64_t origin = base & ~(mem::kVRegionBytes - 1);
  for (uint64_t v = 0; origin + v * mem::kVRegionBytes < end; v++) {
    if (g_rt->va.vregion_bytes_used(v) == 0) continue;
    const uint64_t from = std::max(base, origin + v * mem::kVRegionBytes);
    const uint64_t to = std::min(end, origin + (v + 1) * mem::kVRegionBytes);
    if (!ranges.empty() && ranges.back().start + ranges.back().length == from) {
      ranges.back().length += to - from;
    } else {
      ranges.push_back({from, to - from});
    }
  }
  return ranges;
}

// The forked child becomes a lego process of its own (runtime/excache/fork.cc,
// "Adoption"), as LegoOS gives each process its own pcache: fresh libfit channels (nothing
// of libfabric's may be shared across fork), the fork snapshot as its own memory on the
// memory nodes, its own ExCache of --excache bytes with its own handler thread, its own
// counters (reported at its exit) and stats page. Runs in the child's only thread, right
// after fork(). False: it stays served by its parent (as before adoption existed), and
// says why.
bool adopt_in_child(int sock) {
  HandoverMessage m;
  const ForkHandover& h = m.h;
  const timeval wait{10, 0};  // the parent sends right after fork() returns there
  setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof wait);
  ssize_t n;
  do {
    n = recvmsg(sock, &m.msg, MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  const cmsghdr* c = n == static_cast<ssize_t>(sizeof h) ? CMSG_FIRSTHDR(&m.msg) : nullptr;
  if (c == nullptr || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int))) {
    return false;  // the parent had nothing to hand over (it said why, if it is an error)
  }
  int uffd = -1;
  memcpy(&uffd, CMSG_DATA(c), sizeof uffd);
  startup_mark("runtime: child: userfaultfd received");

  // This thread allocates from the runtime's arena meanwhile (as runtime threads do).
  // Its thread cache holds objects of the program's arenas (region memory, which nobody
  // serves between the parent letting go and our handler thread starting): flushed.
  unsigned program_arena = 0, local = g_rt->local_arena;
  size_t sz = sizeof program_arena;
  mallctl("thread.arena", &program_arena, &sz, &local, sizeof local);
  mallctl("thread.tcache.flush", nullptr, nullptr, nullptr, 0);
  auto program_arena_again = [&] {
    mallctl("thread.tcache.flush", nullptr, nullptr, nullptr, 0);
    mallctl("thread.arena", nullptr, nullptr, &program_arena, sizeof program_arena);
  };
  auto give_up = [&](const std::string& why) {
    say("lego: %s: forked child %d: %s; its parent serves its memory\n", g_program,
        static_cast<int>(getpid()), why.c_str());
    program_arena_again();
    return false;
  };
  const pid_t parent_pid = g_pid;
  const uint64_t parent_start = g_start_time;
  g_pid = getpid();
  g_start_time = launch::process_info(g_pid).start;
  auto node = fit::Node::create(*g_rt->config, g_rt->self);
  if (!node) {
    close(uffd);
    return give_up(node.status().message());
  }
  startup_mark("runtime: child: node created");
  const int before = g_runtime_threads_ready.load();
  auto backend = ClusterBackend::adopt_snapshot(*g_rt->backend, h.snapshot, node.value().get(),
                                                g_rt->backend_options);
  if (!backend) {
    close(uffd);
    return give_up(backend.status().message());
  }
  // Its service threads take the local arena now, while the parent still serves the
  // region (a thread's first allocation may touch it): between the parent letting go and
  // our handler thread starting nobody would, and adopting may wait for the heartbeat
  // thread's channels.
  if (!wait_for_runtime_threads(before + ClusterBackend::kServiceThreads,
                                std::chrono::seconds(30))) {
    fail("the forked child's memory-node threads did not start within 30 s");
  }
  // The snapshot's spaces are registered under this process now (adopt_snapshot told the
  // registry): the parent's registration of them goes, so that lego-run does not free them
  // when the parent ends.
  g_pid = parent_pid;
  g_start_time = parent_start;
  g_rt->backend->disown_snapshot(h.snapshot);  // this process's copy of the parent's
  g_pid = getpid();
  g_start_time = launch::process_info(g_pid).start;

  startup_mark("runtime: child: spaces adopted");
  auto cache =
      ExCache::adopt_fork(*g_rt->cache, uffd, h.slot, backend.value().get(), used_ranges());
  if (!cache) {
    if (cache.status().code() == ENOTRECOVERABLE) fail(cache.status().message());
    return give_up(cache.status().message());
  }
  startup_mark("runtime: child: excache adopted");
  if (!wait_for_runtime_threads(before + ClusterBackend::kServiceThreads + 1,
                                std::chrono::seconds(30))) {
    fail("the forked child's fault handler thread did not start within 30 s");
  }
  // The parent's objects stay as they are in this process's memory, never used or
  // destroyed: their threads, channels and descriptors are the parent's.
  (void)g_rt->node.release();
  (void)g_rt->backend.release();
  (void)g_rt->cache.release();
  g_rt->node = std::move(node.value());
  g_rt->backend = std::move(backend.value());
  g_rt->cache = std::move(cache.value());
  g_rt->backend->set_used_fn(vregion_used);
  g_stats_page.store(nullptr);
  start_stats_publisher(g_rt->memory_address);
  g_forked_child.store(false);
  program_arena_again();
  startup_mark("runtime: child: ready");
  return true;
}

// Whether this process reports its counters at its end: a lego process of its own (not a
// forked child its parent serves, nor a vfork child sharing its parent's memory), once.
std::atomic<bool> g_reported{false};
bool reports_at_exit() {
  return g_rt != nullptr && !g_forked_child.load() && getpid() == g_pid &&
         !g_reported.exchange(true);
}

__attribute__((destructor(101))) void lego_stop() {
  if (!reports_at_exit()) return;
  startup_mark("runtime: exit");
  // No channel connection under way while libfabric's destructor runs.
  g_rt->backend->quiesce();
  // The region stays mapped and the space open: libc still flushes stdio buffers (in the
  // region) after destructors. lego-run frees the space once the process is gone.
  write_stats();
  if (launch::StatsPublisher* page = g_stats_page.load()) page->remove();
}

// _exit() (a forked worker's usual end: stress-ng's, a shell's subshells') runs no
// destructor: the counters are reported here. exit() reaches the kernel through libc's own
// _exit, not this one.
// A process alone with the runtime's threads (a forked worker, the common case) also
// closes its spaces here: no code of it runs after this, and its parent's next fork()
// finds the memory nodes' capacity free again at once rather than after lego-run's sweep.
// With other program threads still running (they could fault on the region until
// exit_group stops them) the spaces are left to lego-run's sweep as at any exit.
bool alone_with_runtime_threads() {
  char buf[512];
  const int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  const char* p = strrchr(buf, ')');  // after the command name, which may hold spaces
  long threads = 0;
  for (int field = 2; p != nullptr && field < 20; field++) p = strchr(p + 1, ' ');
  if (p != nullptr) threads = strtol(p + 1, nullptr, 10);
  // This thread, the backend's service threads, the handler thread and the stats thread.
  return threads > 0 && threads <= 1 + ClusterBackend::kServiceThreads + 2;
}

[[noreturn]] void exit_now(int status) {
  if (reports_at_exit()) {
    g_rt->backend->quiesce();  // no reply left in flight (quiesce says why)
    write_stats();
    if (launch::StatsPublisher* page = g_stats_page.load()) page->remove();
    if (alone_with_runtime_threads()) g_rt->backend->close();
  }
  syscall(SYS_exit_group, status);
  __builtin_unreachable();
}

// A program's call on region memory (the ExCache's own madvise/munmap go to the kernel).
bool in_region(const void* p, const void* caller) {
  return g_active.load(std::memory_order_relaxed) &&
         g_rt->va.contains(reinterpret_cast<uintptr_t>(p)) && !internal_caller(caller);
}

}  // namespace
}  // namespace lego::runtime

using lego::runtime::g_active;
using lego::runtime::g_rt;
using lego::runtime::in_region;
using lego::runtime::internal_caller;
using lego::runtime::kPage;

extern "C" {

void* mmap(void* addr, size_t len, int prot, int flags, int fd, off_t off) {
  constexpr int kPlain = MAP_PRIVATE | MAP_ANONYMOUS;
  constexpr int kAllowed = kPlain | MAP_NORESERVE | MAP_POPULATE;
  if (g_active.load(std::memory_order_relaxed) && !lego::runtime::g_forked_child.load() &&
      addr == nullptr && fd == -1 && (flags & kPlain) == kPlain && (flags & ~kAllowed) == 0 &&
      prot == (PROT_READ | PROT_WRITE) && len > 0 &&
      !internal_caller(__builtin_return_address(0))) {
    uintptr_t a = lego::runtime::take(len, kPage);
    if (a == 0) return MAP_FAILED;
    return reinterpret_cast<void*>(a);
  }
  return reinterpret_cast<void*>(syscall(SYS_mmap, addr, len, prot, flags, fd, off));
}

void* mmap64(void* addr, size_t len, int prot, int flags, int fd, off_t off)
    __attribute__((alias("mmap")));

int munmap(void* addr, size_t len) {
  if (in_region(addr, __builtin_return_address(0))) {
    if (reinterpret_cast<uintptr_t>(addr) % kPage != 0 || len == 0) {
      errno = EINVAL;
      return -1;
    }
    lego::runtime::give(reinterpret_cast<uintptr_t>(addr), len);
    return 0;
  }
  return static_cast<int>(syscall(SYS_munmap, addr, len));
}

void* mremap(void* old, size_t old_len, size_t new_len, int flags, ...) {
  if (in_region(old, __builtin_return_address(0))) {
    auto o = reinterpret_cast<uintptr_t>(old);
    size_t old_r = (old_len + kPage - 1) & ~(kPage - 1);
    size_t new_r = (new_len + kPage - 1) & ~(kPage - 1);
    if ((flags & MREMAP_FIXED) || o % kPage != 0 || new_len == 0) {
      errno = EINVAL;
      return MAP_FAILED;
    }
    if (new_r <= old_r) {
      if (new_r < old_r) lego::runtime::give(o + new_r, old_r - new_r);
      return old;
    }
    if (!(flags & MREMAP_MAYMOVE)) {
      errno = ENOMEM;
      return MAP_FAILED;
    }
    uintptr_t n = lego::runtime::take(new_r, kPage);
    if (n == 0) return MAP_FAILED;
    memcpy(reinterpret_cast<void*>(n), old, old_len);
    lego::runtime::give(o, old_r);
    return reinterpret_cast<void*>(n);
  }
  va_list ap;
  va_start(ap, flags);
  void* new_addr = (flags & MREMAP_FIXED) ? va_arg(ap, void*) : nullptr;
  va_end(ap);
  return reinterpret_cast<void*>(syscall(SYS_mremap, old, old_len, new_len, flags, new_addr));
}

// fork(): the parent's ExCache snapshots the heap on the memory node and serves the
// child's region from it (runtime/excache/fork.cc); the child stops using the runtime. Forks are
// serialized: one snapshot is under way at a time. posix_spawn, vfork and system() do not
// copy the address space and need none of this.
pid_t fork() {
  static pid_t (*real_fork)() = reinterpret_cast<pid_t (*)()>(dlsym(RTLD_NEXT, "fork"));
  if (!g_active.load(std::memory_order_relaxed) || lego::runtime::g_forked_child.load()) {
    return real_fork();
  }
  static std::mutex fork_mutex;
  std::lock_guard<std::mutex> guard(fork_mutex);
  // The child's userfaultfd goes to it over this pair (adopt_in_child); without one the
  // child is served by this process, as it is until it adopts.
  int sv[2] = {-1, -1};
  if (g_rt->children_adopt && socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    sv[0] = sv[1] = -1;
  }
  lego::Status st = g_rt->cache->prepare_fork();
  if (!st) {
    for (int fd : sv) {
      if (fd >= 0) close(fd);
    }
    lego::runtime::say("lego: fork() failed: %s\n", st.message().c_str());
    errno = st.code() == EOPNOTSUPP ? ENOSYS : st.code();
    return -1;
  }
  const pid_t pid = real_fork();
  if (pid == 0) {
    lego::runtime::g_forked_child.store(true);
    if (sv[0] >= 0) close(sv[0]);
    if (sv[1] >= 0) {
      lego::runtime::adopt_in_child(sv[1]);
      close(sv[1]);
    }
    return 0;
  }
  const int saved = errno;
  if (sv[1] >= 0) close(sv[1]);
  g_rt->cache->finish_fork(pid);
  if (pid > 0 && sv[0] >= 0) lego::runtime::send_fork_uffd(sv[0]);
  if (sv[0] >= 0) close(sv[0]);
  errno = saved;
  return pid;
}

void _exit(int status) {
  lego::runtime::exit_now(status);
}
void _Exit(int status) {
  lego::runtime::exit_now(status);
}

int madvise(void* addr, size_t len, int advice) {
  if (in_region(addr, __builtin_return_address(0))) {
    if (reinterpret_cast<uintptr_t>(addr) % kPage != 0) {
      errno = EINVAL;  // as the kernel says
      return -1;
    }
    if (advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_REMOVE) {
      lego::runtime::discard(reinterpret_cast<uintptr_t>(addr), len);
    }
    return 0;  // other advice (hugepages, merging, ...) does not apply to the region
  }
  return static_cast<int>(syscall(SYS_madvise, addr, len, advice));
}

}  // extern "C"
