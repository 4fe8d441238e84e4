// lego-run's command line (runtime/launcher/cli.h).
#include "runtime/launcher/cli.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "lego/flags.h"
#include "lego/pcache_abi.h"
#include "lego/status.h"
#include "runtime/excache/pcache_dev.h"
#include "runtime/launcher/die.h"
#include "runtime/launcher/program_check.h"

namespace lego::launch {
namespace {

const char* kUsage = R"(usage: lego-run [options] [--] PROGRAM [ARGS...]

Runs PROGRAM (any dynamically linked Linux program, unchanged) with its anonymous memory
-- malloc, C++ new, anonymous mmap -- on a memory node. Locally only the ExCache holds it:
at most --excache bytes, in 4 KiB lines. PROGRAM's exit status is lego-run's.

options:
  --config FILE        the cluster file (README.md). Without it, lego-run starts a private
                       memory node on this host for the run and stops it afterwards.
                       lego-run first connects to the memory node with the file's key:
                       a wrong key or an unreachable node is reported before PROGRAM runs
  --node ID            this processor node's id in the cluster file (default: the first
                       processor node); it must be a processor node
  --memory-node ID     keep all of PROGRAM's memory on this one memory node (default:
                       spread over every memory node of the cluster file, in 16 MiB
                       vRegions placed by its monitor, or by lego-run's runtime when the
                       file has none)
  --replicas R         copies of each vRegion, each on another memory node (1..4; default:
                       the cluster file's `replicas`, else 1). Every write-back is stored on
                       all R before it counts; when a memory node is lost the program goes
                       on from another copy, and the lost copies are made again elsewhere.
                       With 1, losing the memory node ends the run with 69
  --excache SIZE       local memory for PROGRAM's anonymous memory (default 64M; at least
                       64K, at most this host's memory and 64G). Per process: a forked
                       child is a lego process of its own with an ExCache of this size
                       (as LegoOS gives each process its own pcache)
  --policy P           eviction policy: refault (default; second chance for lines
                       missed again soon after their eviction: fewer misses where
                       lines are re-used), fifo (evict in fill order) or clock (second
                       chance for lines written after a read or shared by threads)
  --delivery D         how faults reach the runtime: handler (default; a runtime thread
                       serves them, system calls on evicted memory work) or sigbus (the
                       faulting thread serves itself: faster; system calls that touch
                       evicted memory may fail with EFAULT)
  --pcache M           lego_pcache.ko (kmod/): auto (default; use it when /dev/lego_pcache
                       exists), on (refuse to run without it) or off. It batches evictions
                       and gives --policy clock the CPU's accessed bits. A module of
                       another ABI major version is refused: auto warns and runs without
                       it, on fails.
  --rma M              how lines are fetched from the memory nodes: auto (default; on verbs,
                       each one-line miss goes the way, one-sided read or request, that
                       has been faster lately from its memory node, the other tried 1
                       miss in 64: one-sided reads pay while the node's CPU is busy, not
                       while it is idle; requests on other providers), on (one-sided
                       reads on any provider: on tcp and shm they are requests served by
                       libfit, for A/B runs) or off (requests). Write-backs are requests
                       either way (docs/rma.md)
  --prefetch N         lines fetched ahead of a miss that continues a sequential or
                       strided stream, in the same request (0..31, default 31; 0: off)
  --fork-children M    own (default): a forked child becomes a lego process of its own:
                       its memory, old and new, on the memory nodes behind an ExCache of
                       its own (--excache bytes), its counters its own. parent: it stays
                       served by its parent's ExCache from a copy taken at the fork, and
                       its new memory is local (cheaper for children that exec at once)
  --stats              print the ExCache counters when PROGRAM exits (and say so when no
                       process of the run had its memory on the memory node): one block
                       per process of the run that had its own (PROGRAM, forked
                       children), then with several a table of them and their sum
  --syscalls           when the run ends, print PROGRAM's system calls and its
                       descendants' like strace -c: per call the time spent in it, calls
                       and errors, sorted by time (ptrace: each call costs two stops
                       while on; nothing when off). Time includes the tracing's own cost
  --allow-local        run PROGRAM even when the runtime cannot be preloaded into it (a
                       statically linked, 32-bit or set-user-ID program): its memory is
                       then all local, and lego-run warns. Without it lego-run refuses
  --transport T        without --config: tcp (default; the memory node runs in its own
                       network namespace when lego-run is root) or shm (same host)
  --memory-nodes N     without --config: start N private memory nodes (1..16, default 1),
                       each in its own network namespace on one bridge (as root, over
                       tcp), and with N > 1 a monitor (lego-mond) that places memory
                       over them. With --replicas 2 or more, killing any one of them does
                       not disturb PROGRAM
  --memory-capacity SIZE  without --config: each private memory node's capacity (default 8G)
  --export DIR         without --config: also start a private storage node (lego-stord)
                       serving DIR, mounted for PROGRAM at --mount
  --storage-node ID    with --config: the storage node to mount (default: the first
                       storage node in the cluster file; none there, no mount); `none`:
                       do not mount one
  --mount DIR          where PROGRAM sees the storage node's files (default /lego; created
                       if missing, and left in place, empty). The mount lives in a
                       mount namespace private to the run: root's, or without root a
                       user namespace's, where PROGRAM keeps its own uid (files owned by
                       root on the storage node look like its own; DIR must exist or
                       be creatable by the user)
  --help               this text

Each process's memory-node space is freed when the process ends (python's subprocess
children included). If lego-run is killed (kill -9), PROGRAM is killed with it; the next
lego-run removes what was left (run directory, network namespace, spaces).

exit status: PROGRAM's (69 included); 128+N if it died of signal N; 69 if a memory node
was lost mid-run with the only copy of some of PROGRAM's memory (with a message naming
it); 125 if lego-run or the runtime failed
(bad flags or cluster file, memory node unreachable or refusing the key, ...); 126/127
if PROGRAM cannot be run / is not found.
)";

constexpr const char* kTransports[] = {"tcp", "shm"};

// Node ids are 0..65535 in the cluster file.
long node_id(const char* flag, const char* text) {
  return flags::number(flag, text, 0, 65535);
}

// "23.4 GiB": for messages about sizes that are not round.
std::string human_size(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 6) {
    v /= 1024;
    u++;
  }
  char buf[32];
  snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

}  // namespace

Options parse_command_line(int argc, char** argv) {
  Options o;
  const std::vector<flags::Flag> table = {
      {"config", true, [&](const char* a) { o.config = a; }},
      {"node", true, [&](const char* a) { o.node = node_id("--node", a); }},
      {"memory-node", true, [&](const char* a) { o.memory_node = node_id("--memory-node", a); }},
      {"excache", true,
       [&](const char* a) {
         o.runtime.excache_bytes = flags::size("--excache", a, kMinExcacheBytes, "64K (16 lines)");
       }},
      {"policy", true,
       [&](const char* a) { o.runtime.policy = flags::choice("--policy", a, kPolicies); }},
      {"delivery", true,
       [&](const char* a) { o.runtime.delivery = flags::choice("--delivery", a, kDeliveries); }},
      {"rma", true, [&](const char* a) { o.runtime.rma = flags::choice("--rma", a, kRmaModes); }},
      {"pcache", true,
       [&](const char* a) { o.runtime.pcache = flags::choice("--pcache", a, kPcacheModes); }},
      {"fork-children", true,
       [&](const char* a) {
         o.runtime.fork_children = flags::choice("--fork-children", a, kForkModes);
       }},
      {"stats", false, [&](const char*) { o.stats = true; }},
      {"syscalls", false, [&](const char*) { o.syscalls = true; }},
      {"allow-local", false, [&](const char*) { o.allow_local = true; }},
      {"transport", true,
       [&](const char* a) {
         o.transport = *fit::parse_provider(flags::choice("--transport", a, kTransports));
       }},
      {"memory-nodes", true,
       [&](const char* a) {
         o.memory_nodes =
             static_cast<int>(flags::number("--memory-nodes", a, 1, kMaxPrivateMemoryNodes));
       }},
      {"replicas", true,
       [&](const char* a) {
         o.replicas = static_cast<uint32_t>(flags::number("--replicas", a, 1, 4));
       }},
      {"memory-capacity", true,
       [&](const char* a) { o.memory_capacity = flags::size("--memory-capacity", a); }},
      {"export", true, [&](const char* a) { o.export_dir = a; }},
      {"storage-node", true,
       [&](const char* a) {
         if (strcmp(a, "none") == 0) {
           o.no_storage = true;
         } else {
           o.storage_node = node_id("--storage-node", a);
         }
       }},
      {"mount", true,
       [&](const char* a) {
         o.mountpoint = a;
         if (o.mountpoint.empty() || o.mountpoint[0] != '/') {
           flags::usage_error("--mount: an absolute path, like /lego");
         }
       }},
      {"prefetch", true,
       [&](const char* a) {
         o.runtime.prefetch_lines = flags::number("--prefetch", a, 0, kMaxPrefetchLines);
       }},
  };
  // PROGRAM's own flags are PROGRAM's: stop at the first operand.
  const int first = flags::parse(argc, argv, {"lego-run", kUsage, kExitLegoError, true}, table);
  for (int i = first; i < argc; i++) o.argv.push_back(argv[i]);
  if (o.argv.empty()) die("no PROGRAM given (see --help)");
  if (!o.export_dir.empty() && !o.config.empty()) {
    die("--export starts a private storage node: it does not go with --config (whose "
        "storage node serves its own export)");
  }
  if (o.memory_nodes > 1 && !o.config.empty()) {
    die("--memory-nodes starts private memory nodes: it does not go with --config (whose "
        "memory nodes are the cluster's)");
  }
  if (o.config.empty() && o.replicas > static_cast<uint32_t>(o.memory_nodes)) {
    die("--replicas " + std::to_string(o.replicas) + " needs at least as many memory nodes: " +
        "give --memory-nodes " + std::to_string(o.replicas) + " or more");
  }
  if (!o.export_dir.empty()) {
    struct stat st;
    if (stat(o.export_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      die("--export " + o.export_dir + ": not a directory");
    }
    char real[PATH_MAX];
    if (realpath(o.export_dir.c_str(), real) != nullptr) o.export_dir = real;
  }
  if (!o.config.empty()) {
    // Absolute: every process of the run reads it, also after a cd.
    char real[PATH_MAX];
    if (realpath(o.config.c_str(), real) == nullptr) {
      die("--config " + o.config + ": cannot open cluster file: " + strerror(errno));
    }
    o.config = real;
  }
  return o;
}

void check_options(const Options& o) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const uint64_t phys = pages > 0 && page > 0 ? uint64_t(pages) * uint64_t(page) : 0;
  if (phys > 0 && o.runtime.excache_bytes > phys) {
    die("--excache " + human_size(o.runtime.excache_bytes) + ": more than this host's memory (" +
        human_size(phys) + "); the ExCache is local memory");
  }
  if (o.runtime.excache_bytes > kDefaultRegionBytes) {
    die("--excache " + human_size(o.runtime.excache_bytes) + ": at most " +
        human_size(kDefaultRegionBytes) + " (the ExCache's virtual region)");
  }
}

void check_pcache(Options& o) {
  if (o.runtime.pcache == "off") return;
  if (access(LEGO_PCACHE_DEVICE, R_OK | W_OK) != 0) {
    if (o.runtime.pcache == "on") {
      die(std::string("--pcache on: ") + LEGO_PCACHE_DEVICE + ": " + strerror(errno) +
          " (load the module: modprobe lego_pcache, see kmod/README.md; or --pcache auto)");
    }
    return;  // auto, and no module (or not ours to use): the usual case, nothing to say
  }
  uint32_t max_lines = 0;
  uint64_t features = 0;
  Result<int> fd = excache_internal::PcacheDevice::open_checked(&max_lines, &features);
  if (fd) {
    close(fd.value());
    return;
  }
  // The module is there but the runtime would not use it: another ABI, missing features,
  // or not lego_pcache at all (its INFO ioctl failed).
  const std::string why = fd.status().to_string() +
                          " (install the lego_pcache of this lego release: make -C kmod "
                          "dkms-install; modprobe -r lego_pcache; modprobe lego_pcache)";
  if (o.runtime.pcache == "on") die("--pcache on: " + why);
  fprintf(stderr,
          "lego-run: warning: lego_pcache refused: %s; running without it, on the "
          "userfaultfd path\n",
          why.c_str());
  o.runtime.pcache = "off";
}

void check_program(const Options& o) {
  const std::string path = resolve_program(o.argv[0]);
  if (path.empty()) return;
  const std::string why = local_only_reason(path);
  if (why.empty()) return;
  const std::string what = o.argv[0] + (path == o.argv[0] ? "" : " (" + path + ")") + " " + why +
                           ": lego's runtime cannot be loaded into it, so its memory would all "
                           "be local, none on the memory node";
  if (!o.allow_local) die(what + "; give --allow-local to run it anyway");
  fprintf(stderr, "lego-run: warning: %s (--allow-local)\n", what.c_str());
}

}  // namespace lego::launch
