// lego-run: runs an unmodified program whose anonymous memory lives on a memory node.
//
// With --config it joins that cluster as a processor node. Without it, it is a complete
// single-host system: it starts a private lego-memd for the run (in its own network
// namespace when run as root and --transport tcp), and stops it afterwards.
//
// Files: when the cluster has a storage node (or --export DIR gives the private cluster
// one, lego-stord serving DIR), lego-run moves itself into a mount namespace of its own
// and mounts the storage node's export there with lego-fs (at --mount, default /lego):
// PROGRAM, which inherits the namespace, reads and writes those files on the storage
// node; nothing else on the host sees the mount, and it vanishes with the run.
//
// The run: lego-run and the runtime it preloads into every process of the run agree on
// runtime/launch_contract.h (environment, run directory, reports, exit statuses). Each
// process registers its memory-node space in the run directory; lego-run frees the space
// of every process that is gone while the run goes on, and the rest at the end.
//
// A killed lego-run (kill -9) cleans up what it can: PROGRAM gets SIGKILL with it
// (PR_SET_PDEATHSIG), its private daemons SIGTERM, and the next lego-run to start removes
// what is left (sweep_stale_runs): the run directory, the private cluster's network
// namespace and veth, shm regions, and, with --config, the dead processes' spaces.
#include <dirent.h>
#include <elf.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sodium.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lego/excache.h"
#include "lego/fit.h"
#include "lego/memory_proto.h"
#include "lego/pcache_abi.h"
#include "lego/units.h"
#include "runtime/launch_contract.h"

using namespace lego;
using Clock = std::chrono::steady_clock;

namespace {

using launch::kExitCannotExec;
using launch::kExitLegoError;
using launch::kExitMemoryLost;
using launch::kExitNotFound;

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
  --memory-node ID     the memory node to use (default: the first memory node)
  --excache SIZE       local memory for PROGRAM's anonymous memory (default 64M; at least
                       64K, at most this host's memory and 64G)
  --policy P           eviction policy: fifo (default) or clock
  --delivery D         how faults reach the runtime: handler (default; a runtime thread
                       serves them, system calls on evicted memory work) or sigbus (the
                       faulting thread serves itself: faster; system calls that touch
                       evicted memory may fail with EFAULT)
  --pcache M           lego_pcache.ko (kmod/): auto (default; use it when /dev/lego_pcache
                       exists), on (refuse to run without it) or off. It batches evictions
                       and gives --policy clock the CPU's accessed bits.
  --prefetch N         lines fetched ahead of a miss that continues a sequential or
                       strided stream, in the same request (0..31, default 31; 0: off)
  --stats              print the ExCache counters when PROGRAM exits (and say so when no
                       process of the run had its memory on the memory node)
  --allow-local        run PROGRAM even when the runtime cannot be preloaded into it (a
                       statically linked, 32-bit or set-user-ID program): its memory is
                       then all local, and lego-run warns. Without it lego-run refuses
  --transport T        without --config: tcp (default; the memory node runs in its own
                       network namespace when lego-run is root) or shm (same host)
  --memory-capacity SIZE  without --config: the private memory node's capacity (default 8G)
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

exit status: PROGRAM's (69 included); 128+N if it died of signal N; 69 if the memory
node was lost mid-run (with a message naming it); 125 if lego-run or the runtime failed
(bad flags or cluster file, memory node unreachable or refusing the key, ...); 126/127
if PROGRAM cannot be run / is not found.
)";

struct Options {
  std::string config;
  long node = -1, memory_node = -1;
  uint64_t excache = launch::kDefaultExcacheBytes;
  std::string policy = launch::kDefaultPolicy, delivery = launch::kDefaultDelivery,
              transport = "tcp", pcache = launch::kDefaultPcache;
  uint64_t memory_capacity = 8ull << 30;
  long prefetch = launch::kDefaultPrefetchLines;
  bool stats = false;
  bool allow_local = false;
  std::string export_dir, mountpoint = "/lego";
  long storage_node = -1;
  bool no_storage = false;  // --storage-node none
  std::vector<std::string> argv;
};

// What die() undoes before lego-run exits, whichever step failed (set by main).
void undo_setup();

[[noreturn]] void die(const std::string& msg, int code = kExitLegoError) {
  fprintf(stderr, "lego-run: %s\n", msg.c_str());
  undo_setup();
  exit(code);
}

long number(const char* flag, const char* text, long lo, long hi) {
  auto v = parse_int(text, flag, lo, hi);
  if (!v) die(v.status().message());
  return v.value();
}

// Node ids are 0..65535 in the cluster file.
long node_id(const char* flag, const char* text) {
  return number(flag, text, 0, 65535);
}

Options parse(int argc, char** argv) {
  Options o;
  enum {
    kConfig = 1,
    kNode,
    kMemory,
    kExcache,
    kPolicy,
    kDelivery,
    kPcache,
    kStats,
    kAllowLocal,
    kTransport,
    kCap,
    kExport,
    kStorageNode,
    kMount,
    kPrefetch,
    kHelp
  };
  static const option longopts[] = {{"config", required_argument, nullptr, kConfig},
                                    {"node", required_argument, nullptr, kNode},
                                    {"memory-node", required_argument, nullptr, kMemory},
                                    {"excache", required_argument, nullptr, kExcache},
                                    {"policy", required_argument, nullptr, kPolicy},
                                    {"delivery", required_argument, nullptr, kDelivery},
                                    {"pcache", required_argument, nullptr, kPcache},
                                    {"stats", no_argument, nullptr, kStats},
                                    {"allow-local", no_argument, nullptr, kAllowLocal},
                                    {"transport", required_argument, nullptr, kTransport},
                                    {"memory-capacity", required_argument, nullptr, kCap},
                                    {"export", required_argument, nullptr, kExport},
                                    {"storage-node", required_argument, nullptr, kStorageNode},
                                    {"mount", required_argument, nullptr, kMount},
                                    {"prefetch", required_argument, nullptr, kPrefetch},
                                    {"help", no_argument, nullptr, kHelp},
                                    {nullptr, 0, nullptr, 0}};
  int c;
  // "+": stop at the first non-option, so PROGRAM's own flags are left alone.
  while ((c = getopt_long(argc, argv, "+h", longopts, nullptr)) != -1) {
    switch (c) {
      case kConfig:
        o.config = optarg;
        break;
      case kNode:
        o.node = node_id("--node", optarg);
        break;
      case kMemory:
        o.memory_node = node_id("--memory-node", optarg);
        break;
      case kExcache: {
        auto v = parse_size(optarg, "--excache");
        if (!v) die(v.status().message());
        if (v.value() < launch::kMinExcacheBytes) {
          die("--excache: " + std::string(optarg) + " is less than 64K (16 lines)");
        }
        o.excache = v.value();
        break;
      }
      case kPrefetch:
        o.prefetch = number("--prefetch", optarg, 0, launch::kMaxPrefetchLines);
        break;
      case kPolicy:
        o.policy = optarg;
        if (o.policy != "fifo" && o.policy != "clock") {
          die("--policy: '" + o.policy + "' is not fifo or clock");
        }
        break;
      case kDelivery:
        o.delivery = optarg;
        if (o.delivery != "handler" && o.delivery != "sigbus") {
          die("--delivery: '" + o.delivery + "' is not handler or sigbus");
        }
        break;
      case kPcache:
        o.pcache = optarg;
        if (o.pcache != "auto" && o.pcache != "on" && o.pcache != "off") {
          die("--pcache: '" + o.pcache + "' is not auto, on or off");
        }
        break;
      case kStats:
        o.stats = true;
        break;
      case kAllowLocal:
        o.allow_local = true;
        break;
      case kTransport:
        o.transport = optarg;
        if (o.transport != "tcp" && o.transport != "shm") {
          die("--transport: '" + o.transport + "' is not tcp or shm");
        }
        break;
      case kCap: {
        auto v = parse_size(optarg, "--memory-capacity");
        if (!v) die(v.status().message());
        o.memory_capacity = v.value();
        break;
      }
      case kExport:
        o.export_dir = optarg;
        break;
      case kStorageNode:
        if (strcmp(optarg, "none") == 0) {
          o.no_storage = true;
        } else {
          o.storage_node = node_id("--storage-node", optarg);
        }
        break;
      case kMount:
        o.mountpoint = optarg;
        if (o.mountpoint.empty() || o.mountpoint[0] != '/') {
          die("--mount: an absolute path, like /lego");
        }
        break;
      case 'h':
      case kHelp:
        fputs(kUsage, stdout);
        exit(0);
      default:  // getopt named the flag
        fputs(kUsage, stderr);
        exit(kExitLegoError);
    }
  }
  for (int i = optind; i < argc; i++) o.argv.push_back(argv[i]);
  if (o.argv.empty()) die("no PROGRAM given (see --help)");
  if (!o.export_dir.empty() && !o.config.empty()) {
    die("--export starts a private storage node: it does not go with --config (whose "
        "storage node serves its own export)");
  }
  if (!o.export_dir.empty()) {
    struct stat st;
    if (stat(o.export_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      die("--export " + o.export_dir + ": not a directory");
    }
    char real[4096];
    if (realpath(o.export_dir.c_str(), real) != nullptr) o.export_dir = real;
  }
  if (!o.config.empty()) {
    // Absolute: every process of the run reads it, also after a cd.
    char real[4096];
    if (realpath(o.config.c_str(), real) == nullptr) {
      die("--config " + o.config + ": cannot open cluster file: " + strerror(errno));
    }
    o.config = real;
  }
  return o;
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

// What lego-run can check before anything starts: a value the runtime would refuse in
// every process fails here, once, with the flag's name.
void check_options(const Options& o) {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  const uint64_t phys = pages > 0 && page > 0 ? uint64_t(pages) * uint64_t(page) : 0;
  if (phys > 0 && o.excache > phys) {
    die("--excache " + human_size(o.excache) + ": more than this host's memory (" +
        human_size(phys) + "); the ExCache is local memory");
  }
  if (o.excache > launch::kDefaultRegionBytes) {
    die("--excache " + human_size(o.excache) + ": at most " +
        human_size(launch::kDefaultRegionBytes) + " (the ExCache's virtual region)");
  }

  if (o.pcache == "on" && access(LEGO_PCACHE_DEVICE, R_OK | W_OK) != 0) {
    die(std::string("--pcache on: ") + LEGO_PCACHE_DEVICE + ": " + strerror(errno) +
        " (load the module: modprobe lego_pcache, see kmod/README.md; or --pcache auto)");
  }
}

// Where execvp will find `name`: itself when it holds a '/', else the first executable
// regular file of that name along PATH (glibc's default when PATH is unset). "" when
// there is none: exec then says what is wrong.
std::string resolve_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* env = getenv("PATH");
  const std::string path = env != nullptr ? env : "/bin:/usr/bin";
  size_t start = 0;
  for (;;) {
    const size_t end = path.find(':', start);
    std::string dir = path.substr(start, end == std::string::npos ? end : end - start);
    if (dir.empty()) dir = ".";
    const std::string candidate = dir + "/" + name;
    struct stat st;
    if (stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
    if (end == std::string::npos) return "";
    start = end + 1;
  }
}

// Why the runtime could not be preloaded into `path` (its memory would all be local), or
// "" when it can: LD_PRELOAD reaches only dynamically linked programs of lego's ELF class,
// and the loader ignores it in secure-execution mode (set-user-ID or set-group-ID to
// another user or group, file capabilities). A "#!" script is judged by its interpreter.
std::string local_only_reason(const std::string& path, int depth = 0) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  unsigned char head[256] = {};
  const ssize_t n = pread(fd, head, sizeof head - 1, 0);
  std::string why;
  if (n >= 2 && head[0] == '#' && head[1] == '!') {
    // "#! /path/interp arg": the kernel runs the interpreter (nested up to 4 times).
    const char* p = reinterpret_cast<const char*>(head) + 2;
    while (*p == ' ' || *p == '\t') p++;
    const char* e = p;
    while (*e != '\0' && *e != ' ' && *e != '\t' && *e != '\n') e++;
    const std::string interp(p, e);
    if (!interp.empty() && depth < 4) {
      const std::string inner = local_only_reason(interp, depth + 1);
      if (!inner.empty()) why = "runs on " + interp + ", which " + inner;
    }
  } else if (n >= static_cast<ssize_t>(sizeof(Elf64_Ehdr)) && memcmp(head, ELFMAG, SELFMAG) == 0) {
    if (head[EI_CLASS] == ELFCLASS32) {
      why = "is a 32-bit program (lego's runtime is 64-bit)";
    } else if (head[EI_CLASS] == ELFCLASS64) {
      Elf64_Ehdr eh;
      memcpy(&eh, head, sizeof eh);
      bool interp = false;
      for (unsigned i = 0; i < eh.e_phnum && eh.e_phentsize >= sizeof(Elf64_Phdr); i++) {
        Elf64_Phdr ph;
        if (pread(fd, &ph, sizeof ph, static_cast<off_t>(eh.e_phoff + i * eh.e_phentsize)) !=
            sizeof ph) {
          break;
        }
        interp |= ph.p_type == PT_INTERP;
      }
      struct stat st;
      const bool have_stat = fstat(fd, &st) == 0;
      if (eh.e_type != ET_EXEC && eh.e_type != ET_DYN) {
        // Not a program: exec says so.
      } else if (!interp) {
        why = "is statically linked";
      } else if (have_stat && (st.st_mode & S_ISUID) && st.st_uid != geteuid()) {
        why = "is set-user-ID (the loader ignores LD_PRELOAD for it)";
      } else if (have_stat && (st.st_mode & S_ISGID) && st.st_gid != getegid()) {
        why = "is set-group-ID (the loader ignores LD_PRELOAD for it)";
      } else if (geteuid() != 0 && fgetxattr(fd, "security.capability", nullptr, 0) > 0) {
        why = "has file capabilities (the loader ignores LD_PRELOAD for it)";
      }
    }
  }
  close(fd);
  return why;
}

// Refuses a PROGRAM the runtime cannot reach, unless --allow-local (then warns once).
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

std::string dirname_of(const std::string& p) {
  size_t s = p.rfind('/');
  return s == std::string::npos ? "." : p.substr(0, s);
}

bool executable(const std::string& p) {
  return access(p.c_str(), X_OK) == 0;
}
bool readable(const std::string& p) {
  return access(p.c_str(), R_OK) == 0;
}

// Finds a file shipped with lego: $ENV, Bazel runfiles, beside lego-run, or installed.
std::string find_part(const char* env, const std::string& workspace_path, const std::string& name) {
  if (const char* v = getenv(env)) return v;
  char exe[4096] = {};
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  std::string self = n > 0 ? std::string(exe, static_cast<size_t>(n)) : "";
  std::string dir = dirname_of(self);
  std::vector<std::string> candidates = {
      self + ".runfiles/lego/" + workspace_path,
      dir + "/" + name,
      // bazel-bin/runtime/lego-run -> bazel-bin/<workspace_path>
      dir + "/../" + workspace_path,
      dir + "/../lib/lego/" + name,
      "/usr/local/lib/lego/" + name,
      "/usr/lib/lego/" + name,
  };
  for (auto& c : candidates) {
    if (readable(c)) return c;
  }
  return "";
}

std::string jemalloc_path() {
  for (const char* p : {"/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2",
                        "/usr/lib64/libjemalloc.so.2"}) {
    if (readable(p)) return p;
  }
  return "";
}

// Runs argv (no shell); true when it exits 0.
bool run_quiet(const std::vector<std::string>& argv) {
  pid_t pid = fork();
  if (pid == 0) {
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    dup2(devnull, 2);
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execvp(a[0], a.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// The private memory node of a run without --config.
// Starts a daemon of the private cluster (in netns when set) with --ready-fd 3 appended,
// its stderr to log_path, and waits until it is ready. Returns its pid, or -1.
pid_t start_daemon(const std::string& path, std::vector<std::string> args,
                   const std::string& log_path, const std::string& netns) {
  int ready[2];
  if (pipe(ready) != 0) die(std::string("pipe: ") + strerror(errno));
  args.push_back("--ready-fd");
  args.push_back("3");
  pid_t pid = fork();
  if (pid < 0) die(std::string("fork: ") + strerror(errno));
  if (pid == 0) {
    close(ready[0]);
    if (ready[1] != 3) {
      dup2(ready[1], 3);
      close(ready[1]);
    }
    if (!netns.empty()) {
      std::string ns = "/var/run/netns/" + netns;
      int fd = open(ns.c_str(), O_RDONLY);
      if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) _exit(kExitLegoError);
    }
    // Its own process group: a ^C at the terminal goes to the program, not to it. And it
    // must not outlive lego-run, however lego-run ends.
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    // Its messages go to a log lego-run shows only when something went wrong, so the
    // program's own stderr stays the program's.
    int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (log >= 0) dup2(log, 2);
    if (getppid() == 1) _exit(kExitLegoError);
    std::vector<char*> a;
    for (auto& s : args) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execv(path.c_str(), a.data());
    _exit(kExitNotFound);
  }
  close(ready[1]);
  pollfd p{ready[0], POLLIN, 0};
  char buf[8] = {};
  int pr;
  auto deadline = Clock::now() + std::chrono::seconds(20);
  do {  // a forwarded signal interrupts the wait; keep waiting
    pr = poll(&p, 1, 200);
  } while ((pr == 0 || (pr < 0 && errno == EINTR)) && Clock::now() < deadline);
  bool up = pr == 1 && read(ready[0], buf, 6) == 6 && memcmp(buf, "ready\n", 6) == 0;
  close(ready[0]);
  if (!up) {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    return -1;
  }
  return pid;
}

void show_log(const std::string& path, const char* who) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) fprintf(stderr, "lego-run: %s: %s\n", who, line.c_str());
}

// Without root, lego-run mounts in a user namespace of its own: it becomes root there
// (uid 0 mapped to the user, so the mount namespace and the FUSE mount are its own) and
// PROGRAM, in a namespace nested in that one, is the user again (its uid and gid mapped
// back, no capabilities). Programs see the export's files owned by root on the storage
// node as their own, and other owners as nobody (read-only: the kernel refuses writes to
// a file whose owner it cannot map); supplementary groups read as nogroup. With
// --export, the private storage node runs in that namespace too, so the user's files
// are root's to it.
struct UserNamespace {
  bool entered = false;
  uid_t uid = 0;  // the user's, outside
  gid_t gid = 0;
} g_userns;

bool write_proc(const char* path, const std::string& text) {
  int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  close(fd);
  return ok;
}

// Maps `inside` to the caller's ids in the namespace above (after unshare(CLONE_NEWUSER)).
bool map_ids(uid_t uid_inside, uid_t uid_outside, gid_t gid_inside, gid_t gid_outside) {
  // setgroups must be denied before an unprivileged gid_map (it is inherited when nested).
  (void)write_proc("/proc/self/setgroups", "deny");
  return write_proc("/proc/self/uid_map",
                    std::to_string(uid_inside) + " " + std::to_string(uid_outside) + " 1\n") &&
         write_proc("/proc/self/gid_map",
                    std::to_string(gid_inside) + " " + std::to_string(gid_outside) + " 1\n");
}

// Returns "" or what failed. Call before any thread is started.
std::string enter_user_namespace() {
  uid_t uid = geteuid();
  gid_t gid = getegid();
  if (unshare(CLONE_NEWUSER) != 0) return std::string("unshare(CLONE_NEWUSER): ") + strerror(errno);
  if (!map_ids(0, uid, 0, gid)) return std::string("writing uid_map/gid_map: ") + strerror(errno);
  g_userns = {true, uid, gid};
  return "";
}

std::string needs_root(const std::string& why) {
  return "mounting the storage node's files needs root, or unprivileged user namespaces (" + why +
         "); run as root, or give --storage-node none to run without the files";
}

// In PROGRAM's child before exec: the user again, in a namespace nested in lego-run's.
bool leave_user_namespace() {
  if (!g_userns.entered) return true;
  return unshare(CLONE_NEWUSER) == 0 && map_ids(g_userns.uid, 0, g_userns.gid, 0);
}

struct EmbeddedMemoryNode {
  std::string dir, config_path, log_path, netns, veth, stord_log;
  pid_t pid = -1;
  pid_t stord = -1;  // the private storage node, with --export
  fit::ClusterConfig config;

  ~EmbeddedMemoryNode() { stop(); }

  void show_log() const {
    ::show_log(log_path, "lego-memd");
    if (!stord_log.empty()) ::show_log(stord_log, "lego-stord");
  }

  void stop() {
    if (stord > 0) {
      kill(stord, SIGTERM);
      for (int i = 0; i < 300 && waitpid(stord, nullptr, WNOHANG) == 0; i++) usleep(10000);
      kill(stord, SIGKILL);
      waitpid(stord, nullptr, 0);
      stord = -1;
    }
    if (!stord_log.empty()) unlink(stord_log.c_str());
    stord_log.clear();
    if (pid > 0) {
      kill(pid, SIGTERM);
      for (int i = 0; i < 300 && waitpid(pid, nullptr, WNOHANG) == 0; i++) usleep(10000);
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      pid = -1;
    }
    if (!netns.empty()) run_quiet({"ip", "netns", "del", netns});  // takes the veth pair too
    netns.clear();
    if (!veth.empty()) run_quiet({"ip", "link", "del", veth});
    veth.clear();
    // The cluster file (with its key) and the log go with the run directory.
    config_path.clear();
  }

  // Starts the private cluster, its files in the run directory `run_dir`.
  void start(const Options& o, const std::string& run_dir) {
    pid_t me = getpid();
    dir = run_dir;
    config.key.resize(32);
    randombytes_buf(config.key.data(), config.key.size());
    config.origin = dir + "/cluster.toml";
    std::string proc_addr = "127.0.0.1", mem_addr = "127.0.0.1";
    bool isolate = o.transport == "tcp" && geteuid() == 0 && !g_userns.entered;
    if (isolate) {
      // A veth pair from this namespace to the memory node's own: the program keeps its
      // network, and the memory node is "remote".
      unsigned net = static_cast<unsigned>(me) % 16000;
      std::string subnet =
          "10." + std::to_string(64 + net / 250) + "." + std::to_string(net % 250) + ".";
      proc_addr = subnet + "1";
      mem_addr = subnet + "2";
      netns = "lego-run-" + std::to_string(me);
      veth = "lgo" + std::to_string(me) + "a";
      std::string peer = "lgo" + std::to_string(me) + "b";
      bool ok = run_quiet({"ip", "netns", "add", netns}) &&
                // 64 KiB frames, as on loopback: a 4 KiB line crosses as one packet, not
                // three (misses over tcp ~4% cheaper).
                run_quiet({"ip", "link", "add", veth, "mtu", "65535", "type", "veth", "peer",
                           "name", peer, "mtu", "65535"}) &&
                run_quiet({"ip", "link", "set", peer, "netns", netns}) &&
                run_quiet({"ip", "addr", "add", proc_addr + "/30", "dev", veth}) &&
                run_quiet({"ip", "link", "set", veth, "up"}) &&
                run_quiet({"ip", "-n", netns, "addr", "add", mem_addr + "/30", "dev", peer}) &&
                run_quiet({"ip", "-n", netns, "link", "set", peer, "up"}) &&
                run_quiet({"ip", "-n", netns, "link", "set", "lo", "up"});
      if (!ok) die("cannot set up the memory node's network namespace " + netns + " (ip failed)");
    }
    uint16_t port = static_cast<uint16_t>(30000 + me % 20000);
    // Node 3, with --export: the storage node, beside the memory node.
    int nodes = o.export_dir.empty() ? 2 : 3;
    for (int id = 1; id <= nodes; id++) {
      fit::NodeConfig n;
      n.id = static_cast<fit::NodeId>(id);
      n.role = id == 1 ? fit::Role::kProcessor : id == 2 ? fit::Role::kMemory : fit::Role::kStorage;
      n.provider = o.transport;
      n.address = o.transport == "shm" ? "lego-run-" + std::to_string(me)
                                       : (id == 1 ? proc_addr : mem_addr);
      n.port = static_cast<uint16_t>(port + id);
      n.progress = fit::Progress::kPolling;
      n.server_threads = 1;
      if (n.role == fit::Role::kStorage) {
        // File requests wait for system calls and the disk, and a FUSE request already
        // costs kernel crossings and wake-ups: a spinning server saves little and takes
        // a core the program and lego-fs need (sequential throughput through the mount
        // doubled on a loaded 2-vCPU host when it stopped spinning). Two threads: one
        // can serve a request while the other waits for the disk.
        n.progress = fit::Progress::kBlocking;
        n.server_threads = 2;
      }
      config.nodes.push_back(n);
    }
    config_path = config.origin;
    log_path = dir + "/lego-memd.log";
    {
      int fd = open(config_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (fd < 0) die("cannot write " + config_path + ": " + strerror(errno));
      std::string text = config.to_toml();
      if (write(fd, text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
        die("cannot write " + config_path);
      }
      close(fd);
    }
    std::string memd = find_part("LEGO_MEMD", "daemons/memory/lego-memd", "lego-memd");
    if (memd.empty() || !executable(memd)) {
      die("cannot find lego-memd (set LEGO_MEMD, or install it beside lego-run)");
    }
    std::string capacity = std::to_string(o.memory_capacity);
    pid = start_daemon(
        memd, {"lego-memd", "--config", config_path, "--node", "2", "--capacity", capacity},
        log_path, netns);
    if (pid < 0) {
      show_log();
      stop();
      die("the private memory node did not start (its log is above)");
    }
    if (nodes == 3) {
      std::string stord_path = find_part("LEGO_STORD", "daemons/storage/lego-stord", "lego-stord");
      if (stord_path.empty() || !executable(stord_path)) {
        stop();
        die("cannot find lego-stord (set LEGO_STORD, or install it beside lego-run)");
      }
      stord_log = dir + "/lego-stord.log";
      stord = start_daemon(
          stord_path,
          {"lego-stord", "--config", config_path, "--node", "3", "--export", o.export_dir},
          stord_log, netns);
      if (stord < 0) {
        show_log();
        stop();
        die("the private storage node did not start (its log is above)");
      }
    }
  }
};

// lego-fs serving the storage node's export at the mount point, in lego-run's own mount
// namespace (which PROGRAM inherits).
struct StorageMount {
  pid_t pid = -1;
  std::string mountpoint, log;

  // Returns "" or what went wrong.
  std::string start(const Options& o, const std::string& config_path, fit::NodeId self,
                    fit::NodeId storage, const std::string& run_dir) {
    std::string fs = find_part("LEGO_FS", "runtime/fs/lego-fs", "lego-fs");
    if (fs.empty() || !executable(fs)) {
      return "cannot find lego-fs (set LEGO_FS, or install it beside lego-run)";
    }
    if (geteuid() != 0) {
      std::string err = enter_user_namespace();
      if (!err.empty()) return needs_root(err);
    }
    // A mount namespace of our own: the mount is the run's, invisible to the host.
    if (unshare(CLONE_NEWNS) != 0) return std::string("unshare(CLONE_NEWNS): ") + strerror(errno);
    if (mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
      return std::string("making / private in the run's mount namespace: ") + strerror(errno);
    }
    struct stat st;
    if (stat(o.mountpoint.c_str(), &st) != 0) {
      if (mkdir(o.mountpoint.c_str(), 0755) != 0) {
        std::string err = "cannot create the mount point " + o.mountpoint + ": " + strerror(errno);
        if (g_userns.entered) err += " (as a user: mkdir it once as root, or give --mount DIR)";
        return err;
      }
    } else if (!S_ISDIR(st.st_mode)) {
      return "--mount " + o.mountpoint + ": not a directory";
    }
    mountpoint = o.mountpoint;
    log = run_dir + "/lego-fs.log";
    pid = start_daemon(fs,
                       {"lego-fs", "--config", config_path, "--node", std::to_string(self),
                        "--storage", std::to_string(storage), mountpoint},
                       log, "");
    if (pid < 0) {
      show_log(log, "lego-fs");
      stop();
      return "cannot mount storage node " + std::to_string(storage) + " at " + o.mountpoint +
             " (lego-fs's messages are above)";
    }
    return "";
  }

  void stop() {
    if (pid > 0) {
      kill(pid, SIGTERM);  // lego-fs unmounts and exits
      for (int i = 0; i < 300 && waitpid(pid, nullptr, WNOHANG) == 0; i++) usleep(10000);
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      pid = -1;
    }
    if (!mountpoint.empty()) umount2(mountpoint.c_str(), MNT_DETACH);
    // A mount point we created stays (empty, like /mnt): another lego-run may have mounted
    // on it in its own namespace, and rmdir of a directory that is a mount point only in
    // another namespace succeeds and detaches that run's mount.
    mountpoint.clear();
    if (!log.empty()) unlink(log.c_str());
    log.clear();
  }
};

// libfit names the shm endpoints of a process "lego-<pid>-<nonce>:<uid>:<n>" in /dev/shm
// (libfit/node.cc: shm_source_name), and libfabric unlinks them when an endpoint is closed.
// The runtime never closes its node (a program's exit just ends the process), so such
// regions of processes that are gone are removed here, after the program: its own, its
// children's, and any that earlier runs killed before they could clean up left behind.
void remove_shm_regions() {
  DIR* d = opendir("/dev/shm");
  if (d == nullptr) return;
  while (dirent* e = readdir(d)) {
    unsigned long pid = 0, uid = 0, ep = 0;
    char nonce[16] = {};
    int used = 0;
    if (sscanf(e->d_name, "lego-%lu-%8[0-9a-f]:%lu:%lu%n", &pid, nonce, &uid, &ep, &used) != 4 ||
        e->d_name[used] != '\0' || pid == 0) {
      continue;
    }
    if (kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // still running
    unlinkat(dirfd(d), e->d_name, 0);
  }
  closedir(d);
}

// Removes the files in `dir` (the run directory has no subdirectories), then `dir`.
void remove_tree(const std::string& dir) {
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) {
        unlinkat(dirfd(d), e->d_name, 0);
      }
    }
    closedir(d);
  }
  rmdir(dir.c_str());
}

std::string read_small_file(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return "";
  char buf[8192];
  const ssize_t n = read(fd, buf, sizeof buf);
  close(fd);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
}

// Whether a kClose failure means the memory node could not be asked (try again later)
// rather than that it answered (the space is gone: freed by its lease, or never ours).
bool transport_error(int code) {
  return code == ETIMEDOUT || code == ECONNREFUSED || code == ECONNRESET || code == EAGAIN ||
         code == EHOSTUNREACH || code == ENETUNREACH || code == EPIPE || code == EPROTO;
}

// The spaces registered in a run directory (launch_contract.h: space.PID.START.ID),
// closed on the memory node (mem::kClose) once their process is gone.
class SpaceRegistry {
 public:
  SpaceRegistry(std::string dir, fit::Node* node) : dir_(std::move(dir)), node_(node) {}

  // Closes the spaces of processes that are gone, or (all) every space, and removes
  // their files. A file is claimed by renaming it first, so that two lego-runs sweeping
  // one dead run never close a space twice. Without a node (none could be made, or the
  // private memory node died with the spaces) the files are only removed. After the
  // memory node could not be reached, leaves the rest for `backoff`.
  void reap(bool all, std::chrono::milliseconds backoff = std::chrono::milliseconds(5000)) {
    if (!all && Clock::now() < retry_after_) return;
    DIR* d = opendir(dir_.c_str());
    if (d == nullptr) return;
    live_ = 0;
    std::vector<std::string> gone;
    while (dirent* e = readdir(d)) {
      pid_t pid = 0;
      uint64_t start = 0, id = 0;
      if (!launch::parse_space_file_name(e->d_name, &pid, &start, &id)) continue;
      registered_.insert(e->d_name);
      if (!all && !launch::process_gone(pid, start)) {
        live_++;
        continue;
      }
      gone.push_back(e->d_name);
    }
    closedir(d);
    for (const std::string& name : gone) {
      const std::string path = dir_ + "/" + name;
      const std::string claimed = dir_ + "/.closing-" + std::to_string(getpid()) + "-" + name;
      if (rename(path.c_str(), claimed.c_str()) != 0) continue;  // another sweeper has it
      uint32_t node = 0;
      mem::SpaceHandle h{};
      if (node_ != nullptr && launch::parse_space_line(read_small_file(claimed), &node, &h)) {
        mem::SpaceRequest req{h};
        auto r = node_->send_reply(node, mem::kClose,
                                   {reinterpret_cast<const std::byte*>(&req), sizeof(req)}, {},
                                   std::chrono::milliseconds(2000));
        if (r) closed_++;
        if (!r && transport_error(r.status().code())) {
          // Unreachable: keep the file (a later pass, or the lease, frees the space) and
          // do not spend a timeout on each of the others now.
          rename(claimed.c_str(), path.c_str());
          retry_after_ = Clock::now() + backoff;
          if (all) node_ = nullptr;
          if (!all) break;
          continue;
        }
      }
      unlink(claimed.c_str());
    }
  }

  // Registered processes found alive by the last reap(false).
  int live() const { return live_; }
  // Spaces ever seen registered (--stats says when there were none).
  size_t registered() const { return registered_.size(); }
  // Spaces this registry closed.
  int closed() const { return closed_; }

 private:
  std::string dir_;
  fit::Node* node_;
  std::set<std::string> registered_;
  int live_ = 0, closed_ = 0;
  Clock::time_point retry_after_{};
};

// The run directory (launch_contract.h). Created before anything else of the run, so
// that everything the run leaves in /tmp is in it, and removed last.
struct RunDir {
  std::string path;
  int report_fd = -1;  // the report FIFO, read end (opened read-write: never EOF)

  void create() {
    path = launch::run_dir_for(getpid());
    if (mkdir(path.c_str(), 0700) != 0) {
      if (errno != EEXIST) die("cannot create " + path + ": " + strerror(errno));
      // Left by an earlier process with this pid (the sweep removes dead runs' directories,
      // but it runs beside us): ours to remove when it is this user's directory, never
      // when someone else made it (it would hold the private cluster's key).
      struct stat st;
      if (lstat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid()) {
        std::string p = path;
        path.clear();
        die(p + " exists and is not this user's directory: remove it");
      }
      remove_tree(path);
      if (mkdir(path.c_str(), 0700) != 0) die("cannot create " + path + ": " + strerror(errno));
    }
    const std::string fifo = path + "/" + launch::kReportFifo;
    if (mkfifo(fifo.c_str(), 0600) != 0) die("cannot create " + fifo + ": " + strerror(errno));
    report_fd = open(fifo.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (report_fd < 0) die("cannot open " + fifo + ": " + strerror(errno));
  }

  void write_info(const launch::RunInfo& info) {
    const std::string tmp = path + "/." + launch::kRunFile, text = launch::format_run_info(info);
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    const bool ok =
        fd >= 0 && write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    if (fd >= 0) close(fd);
    if (!ok || rename(tmp.c_str(), (path + "/" + launch::kRunFile).c_str()) != 0) {
      die("cannot write " + path + "/" + launch::kRunFile + ": " + strerror(errno));
    }
  }

  void remove() {
    if (report_fd >= 0) close(report_fd);
    report_fd = -1;
    if (!path.empty()) remove_tree(path);
    path.clear();
  }
};

bool pid_alive(long pid) {
  return kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH;
}

// "PREFIX<pid>SUFFIX" -> pid, or -1.
long pid_in_name(const char* name, const char* prefix, const char* suffix) {
  const size_t p = strlen(prefix), s = strlen(suffix), n = strlen(name);
  if (n <= p + s || strncmp(name, prefix, p) != 0 || strcmp(name + n - s, suffix) != 0) return -1;
  long pid = 0;
  for (size_t i = p; i < n - s; i++) {
    if (name[i] < '0' || name[i] > '9' || pid > (1l << 31)) return -1;
    pid = pid * 10 + (name[i] - '0');
  }
  return pid > 0 ? pid : -1;
}

// A dead run's directory: with --config, the spaces of its processes that are gone are
// closed (its cluster file and node are in its run file); a private memory node died
// with its lego-run, and its spaces with it. Removed unless some process of the run
// still runs (an orphaned grandchild, say: its space is in use); a later sweep then
// comes back for it.
void sweep_run_dir(const std::string& dir) {
  launch::RunInfo info;
  const bool have_info =
      launch::parse_run_info(read_small_file(dir + "/" + launch::kRunFile), &info);
  if (have_info ? !launch::process_gone(info.pid, info.start)
                : pid_alive(pid_in_name(dir.c_str(), launch::kRunDirPrefix, ""))) {
    return;  // alive (or its pid is someone else's now, and its own start time unknown)
  }
  std::unique_ptr<fit::Node> node;
  if (have_info && !info.private_memory) {
    auto config = fit::ClusterConfig::parse_file(info.config);
    if (config) {
      auto n = fit::Node::create(config.value(), info.node);
      if (n) node = std::move(n.value());
    }
  }
  SpaceRegistry spaces(dir, node.get());
  spaces.reap(have_info && info.private_memory);
  if (spaces.live() == 0) remove_tree(dir);
}

// Leftovers of lego-runs that were killed (kill -9 leaves no chance to clean up), found
// by the dead lego-run's pid in their names: run directories (sweep_run_dir; this user's
// only), and as root the private memory node's network namespace and the host's end of
// its veth pair (the pair goes with the namespace, but an end whose namespace was never
// made, or was removed apart, stays), lego-fs logs of older versions, and shm regions of
// dead processes. Anything of a live lego-run is left alone. Runs in a child process
// (sweeper()): closing spaces joins another cluster, and libfabric's state must not
// stay in lego-run.

void sweep_stale_runs() {
  if (DIR* d = opendir("/tmp")) {
    while (dirent* e = readdir(d)) {
      struct stat st;
      const std::string path = std::string("/tmp/") + e->d_name;
      const long run_pid = pid_in_name(e->d_name, "lego-run-", "");
      const long log_pid = pid_in_name(e->d_name, "lego-run-", "-lego-fs.log");
      if ((run_pid < 0 && log_pid < 0) || lstat(path.c_str(), &st) != 0 || st.st_uid != geteuid()) {
        continue;
      }
      if (run_pid > 0 && S_ISDIR(st.st_mode)) sweep_run_dir(path);
      if (log_pid > 0 && S_ISREG(st.st_mode) && !pid_alive(log_pid)) unlink(path.c_str());
    }
    closedir(d);
  }
  if (geteuid() == 0) {
    if (DIR* d = opendir("/var/run/netns")) {
      while (dirent* e = readdir(d)) {
        const long pid = pid_in_name(e->d_name, "lego-run-", "");
        if (pid > 0 && !pid_alive(pid)) run_quiet({"ip", "netns", "del", e->d_name});
      }
      closedir(d);
    }
    if (DIR* d = opendir("/sys/class/net")) {
      while (dirent* e = readdir(d)) {
        const long pid = pid_in_name(e->d_name, "lgo", "a");
        if (pid > 0 && !pid_alive(pid)) run_quiet({"ip", "link", "del", e->d_name});
      }
      closedir(d);
    }
  }
  remove_shm_regions();
}

// Starts sweep_stale_runs in a child process; lego-run waits for it before it exits.
pid_t sweeper() {
  pid_t pid = fork();
  if (pid == 0) {
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    int devnull = open("/dev/null", O_WRONLY);
    if (devnull >= 0) dup2(devnull, 2);  // libfit's messages about a dead run's cluster
    sweep_stale_runs();
    _exit(0);
  }
  return pid;
}

// What the run's processes reported through the run directory's FIFO.
struct Reports {
  std::string partial;  // text after the last complete line
  bool in_stats = false;
  std::string block;
  std::vector<std::string> stats;  // one block per process
  std::string lost;                // the first "lost" message
  bool program_error = false;      // the runtime could not start in PROGRAM itself

  void feed(const char* data, size_t len, pid_t program) {
    partial.append(data, len);
    size_t start = 0;
    for (size_t nl; (nl = partial.find('\n', start)) != std::string::npos; start = nl + 1) {
      line(partial.substr(start, nl - start), program);
    }
    partial.erase(0, start);
  }

  void line(const std::string& l, pid_t program) {
    if (in_stats) {
      if (l == "end") {
        stats.push_back(block);
        in_stats = false;
      } else {
        block += l + "\n";
      }
    } else if (l.rfind("stats ", 0) == 0) {
      in_stats = true;
      block = l.substr(6) + "\n";
    } else if (l.rfind("lost ", 0) == 0) {
      if (lost.empty()) lost = l.substr(5);
    } else if (l.rfind("error ", 0) == 0) {
      // "error PID MESSAGE": said at once, as the process that failed would have.
      char* end = nullptr;
      const long pid = strtol(l.c_str() + 6, &end, 10);
      const std::string message = *end == ' ' ? end + 1 : l.substr(6);
      fprintf(stderr, "lego-run: %s (pid %ld)\n", message.c_str(), pid);
      program_error |= pid == program;
    }
  }
};

// lego-run's own place in the cluster, as the processor node: it closes the run's spaces.
// With --config it first connects to the memory node (authenticating with the file's
// key), so that a wrong key or an unreachable node is said before PROGRAM starts,
// naming the node and its address, rather than by every process of the run.
std::unique_ptr<fit::Node> join_cluster(const fit::ClusterConfig& config,
                                        const fit::NodeConfig& proc, const fit::NodeConfig& memory,
                                        const std::string& file, bool probe) {
  auto node = fit::Node::create(config, proc.id);
  if (!node) {
    die("cannot join " + file + " as processor node " + std::to_string(proc.id) + ": " +
        node.status().message());
  }
  if (probe) {
    Status st = node.value()->connect(memory.id);
    if (!st) {
      const std::string who = "memory node " + std::to_string(memory.id) + " (" + memory.address +
                              ":" + std::to_string(memory.port) + ", " + memory.provider + ")";
      if (st.code() == EACCES) {
        die(who + " refused processor node " + std::to_string(proc.id) + ": the cluster key in " +
            file + " is not the memory node's (" + st.message() + ")");
      }
      die("cannot reach " + who + " from processor node " + std::to_string(proc.id) + ": " +
          strerror(st.code()) + " (" + st.message() + ")");
    }
  }
  return std::move(node.value());
}

// The node `id` of `role` (or, with id -1, the first of that role) in the cluster file.
const fit::NodeConfig* pick_node(const fit::ClusterConfig& config, long id, fit::Role role,
                                 const char* flag, const std::string& file) {
  const std::string want = fit::role_name(role);
  if (id < 0) {
    const fit::NodeConfig* n = config.first_of(role);
    if (n == nullptr) die("no " + want + " node in " + file);
    return n;
  }
  const fit::NodeConfig* n = config.find(static_cast<fit::NodeId>(id));
  const std::string what = std::string(flag) + " " + std::to_string(id) + ": ";
  if (n == nullptr) die(what + "no node " + std::to_string(id) + " in " + file);
  if (n->role != role) {
    die(what + "node " + std::to_string(id) + " is a " + fit::role_name(n->role) + " node in " +
        file + ", not a " + want + " node");
  }
  return n;
}

void print_stats(const std::string& block) {
  const launch::StatsReport r = launch::parse_stats_report(block);
  fprintf(stderr, "lego-run: ExCache stats (%s)\n", r.head.c_str());
  fprintf(stderr, "  %-16s %s (resident accesses never trap)\n", "hits", "n/a");
  fprintf(
      stderr, "  %-16s %s\n", "kernel_module",
      r.number("kernel_module") ? "lego_pcache (batched evictions, accessed bits)" : "not used");
  for (const ExCacheStatsField& f : kExCacheStatsFields) {
    fprintf(stderr, "  %-16s %llu\n", f.name, static_cast<unsigned long long>(r.number(f.name)));
  }
  fprintf(stderr, "  %-16s %llu (fetched + written)\n", "bytes_moved",
          static_cast<unsigned long long>(r.number("bytes_fetched") + r.number("bytes_written")));
  fprintf(stderr, "  %-16s p50 < %.1f us, p99 < %.1f us\n", "miss_latency",
          static_cast<double>(r.number("miss_p50_ns")) / 1e3,
          static_cast<double>(r.number("miss_p99_ns")) / 1e3);
  // The histogram, with each bucket's share of misses and (estimated at the bucket's
  // middle) of the time spent in misses: a rare slow kind of miss shows up here.
  std::vector<std::pair<unsigned, unsigned long long>> hist;
  unsigned long long total = 0;
  double total_ns = 0;
  std::istringstream hs(r.text("miss_histogram"));
  for (std::string item; std::getline(hs, item, ',');) {
    unsigned b = 0;
    unsigned long long n = 0;
    if (sscanf(item.c_str(), "%u:%llu", &b, &n) != 2 || b > 63) continue;
    hist.emplace_back(b, n);
    total += n;
    total_ns += static_cast<double>(n) * 1.5 * static_cast<double>(1ull << b);
  }
  if (total == 0) return;
  fprintf(stderr, "  %-22s %10s %10s\n", "miss latency (us)", "% misses", "% time");
  for (auto [b, n] : hist) {
    const double lo = static_cast<double>(1ull << b) / 1e3;
    char range[32];
    snprintf(range, sizeof range, "%.1f-%.1f", lo, 2 * lo);
    fprintf(stderr, "    %-20s %9.1f%% %9.1f%%\n", range,
            100.0 * static_cast<double>(n) / static_cast<double>(total),
            100.0 * static_cast<double>(n) * 1.5 * static_cast<double>(1ull << b) / total_ns);
  }
}

volatile pid_t g_child = -1;
volatile sig_atomic_t g_early_signal = 0;  // a signal that came before the program ran
void forward(int sig) {
  if (g_child > 0) {
    kill(g_child, sig);
  } else {
    g_early_signal = sig;
  }
}
void child_exited(int) {}  // only interrupts ppoll

StorageMount* g_files = nullptr;
EmbeddedMemoryNode* g_embedded = nullptr;
RunDir* g_run = nullptr;

void undo_setup() {
  static bool done = false;
  if (done) return;
  done = true;
  if (g_files != nullptr) g_files->stop();
  if (g_embedded != nullptr) g_embedded->stop();
  if (g_run != nullptr) g_run->remove();
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  if (sodium_init() < 0) die("libsodium failed to initialise");
  signal(SIGPIPE, SIG_IGN);
  // From here on a SIGTERM/SIGHUP is forwarded to the program, or, before it runs,
  // remembered so that set-up is undone before lego-run exits.
  struct sigaction fw {};
  fw.sa_handler = forward;
  sigaction(SIGTERM, &fw, nullptr);
  sigaction(SIGHUP, &fw, nullptr);

  // Before any namespace or thread: the sweeper must see the host as the user does.
  const pid_t sweep = sweeper();
  check_options(o);
  check_program(o);

  RunDir run;
  EmbeddedMemoryNode embedded;
  StorageMount files;
  g_run = &run;
  g_embedded = &embedded;
  g_files = &files;
  run.create();

  fit::ClusterConfig config;
  std::string config_path, cluster_name;
  if (o.config.empty()) {
    if (!o.export_dir.empty() && geteuid() != 0) {
      // The private lego-stord runs in the run's user namespace too, as its root: the
      // user's files are then root's there, as FUSE needs to map their owner (a file
      // whose owner the kernel cannot map is read-only).
      std::string err = enter_user_namespace();
      if (!err.empty()) die(needs_root(err));
    }
    embedded.start(o, run.path);
    config = embedded.config;
    config_path = embedded.config_path;
    cluster_name = "the private cluster";
  } else {
    auto c = fit::ClusterConfig::parse_file(o.config);
    if (!c) die(c.status().message());
    config = c.value();
    config_path = o.config;
    cluster_name = config_path;
  }
  const fit::NodeConfig* proc =
      pick_node(config, o.node, fit::Role::kProcessor, "--node", cluster_name);
  const fit::NodeConfig* memory =
      pick_node(config, o.memory_node, fit::Role::kMemory, "--memory-node", cluster_name);
  // The storage node whose export PROGRAM sees at --mount, if any.
  const fit::NodeConfig* storage =
      o.no_storage ? nullptr
      : o.storage_node >= 0
          ? pick_node(config, o.storage_node, fit::Role::kStorage, "--storage-node", cluster_name)
          : config.first_of(fit::Role::kStorage);
  launch::RunInfo info;
  info.pid = getpid();
  info.start = launch::process_info(info.pid).start;
  info.config = config_path;
  info.node = proc->id;
  info.memory_node = memory->id;
  info.private_memory = o.config.empty();
  run.write_info(info);
  if (storage != nullptr) {
    if (g_early_signal != 0) {
      undo_setup();
      return 128 + g_early_signal;
    }
    std::string err = files.start(o, config_path, proc->id, storage->id, run.path);
    if (!err.empty()) die(err);
  }
  // After the namespaces: a Node may start threads, and unshare(CLONE_NEWUSER) refuses a
  // process that has more than one.
  std::unique_ptr<fit::Node> self =
      join_cluster(config, *proc, *memory, config_path, /*probe=*/!o.config.empty());
  std::string preload =
      find_part("LEGO_PRELOAD", "runtime/liblego_preload.so", "liblego_preload.so");
  if (preload.empty()) die("cannot find liblego_preload.so (set LEGO_PRELOAD)");
  std::string jemalloc = jemalloc_path();
  if (jemalloc.empty()) die("cannot find libjemalloc.so.2 (Debian package libjemalloc2)");
  char real[4096];
  if (realpath(preload.c_str(), real) != nullptr) preload = real;

  int exec_err[2];
  if (pipe2(exec_err, O_CLOEXEC) != 0) die(std::string("pipe: ") + strerror(errno));
  // The shell's job-control signals reach the program directly; lego-run waits.
  signal(SIGINT, SIG_IGN);
  signal(SIGQUIT, SIG_IGN);
  sigaction(SIGUSR1, &fw, nullptr);
  sigaction(SIGUSR2, &fw, nullptr);

  if (g_early_signal != 0) {
    undo_setup();
    return 128 + g_early_signal;
  }
  const pid_t lego_run = getpid();
  pid_t child = fork();
  if (child < 0) die(std::string("fork: ") + strerror(errno));
  if (child > 0) g_child = child;
  if (child > 0 && g_early_signal != 0) kill(child, g_early_signal);
  if (child == 0) {
    signal(SIGINT, SIG_DFL);
    signal(SIGQUIT, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    close(exec_err[0]);
    std::string ld = preload + ":" + jemalloc;
    if (const char* old = getenv("LD_PRELOAD"); old != nullptr && *old)
      ld += std::string(":") + old;
    setenv("LD_PRELOAD", ld.c_str(), 1);
    setenv(launch::kEnvConfig, config_path.c_str(), 1);
    setenv(launch::kEnvNode, std::to_string(proc->id).c_str(), 1);
    setenv(launch::kEnvMemoryNode, std::to_string(memory->id).c_str(), 1);
    setenv(launch::kEnvExcache, std::to_string(o.excache).c_str(), 1);
    setenv(launch::kEnvPolicy, o.policy.c_str(), 1);
    setenv(launch::kEnvPrefetch, std::to_string(o.prefetch).c_str(), 1);
    setenv(launch::kEnvDelivery, o.delivery.c_str(), 1);
    setenv(launch::kEnvPcache, o.pcache.c_str(), 1);
    setenv(launch::kEnvRunDir, run.path.c_str(), 1);
    // jemalloc would serve allocations above 8 MiB from a "huge" arena created later with
    // default hooks, i.e. from local memory: keep every size in the hooked arenas.
    std::string conf = "oversize_threshold:0";
    if (const char* old = getenv("MALLOC_CONF"); old != nullptr && *old) {
      conf = std::string(old) + "," + conf;
    }
    setenv("MALLOC_CONF", conf.c_str(), 1);
    if (!leave_user_namespace()) {
      fprintf(stderr, "lego-run: cannot give PROGRAM back its own user id: %s\n", strerror(errno));
      _exit(kExitLegoError);
    }
    // PROGRAM must not outlive lego-run (a kill -9 of lego-run would leave it running, its
    // space waiting for the lease). Set last: changing credentials clears it. The check
    // closes the race with a lego-run that died before the prctl.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != lego_run) _exit(kExitLegoError);
    std::vector<char*> a;
    for (auto& s : o.argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execvp(a[0], a.data());
    int e = errno;
    (void)!write(exec_err[1], &e, sizeof(e));
    _exit(e == ENOENT ? kExitNotFound : kExitCannotExec);
  }
  close(exec_err[1]);
  int e = 0;
  if (read(exec_err[0], &e, sizeof(e)) == sizeof(e)) {
    waitpid(child, nullptr, 0);
    die(o.argv[0] + ": " + strerror(e), e == ENOENT ? kExitNotFound : kExitCannotExec);
  }
  close(exec_err[0]);

  // While the program runs: read the reports, free the spaces of processes that ended,
  // watch the private memory node. SIGCHLD (blocked but while waiting in ppoll) ends a
  // wait at once when the program exits.
  struct sigaction chld {};
  chld.sa_handler = child_exited;
  chld.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &chld, nullptr);
  sigset_t block, before, wait_mask;
  sigemptyset(&block);
  sigaddset(&block, SIGCHLD);
  sigprocmask(SIG_BLOCK, &block, &before);
  wait_mask = before;
  sigdelset(&wait_mask, SIGCHLD);

  SpaceRegistry spaces(run.path, self.get());
  Reports rep;
  bool memory_died = false;
  int status = 0;
  bool child_done = false;
  Clock::time_point next_reap = Clock::now(), done_at{};
  for (;;) {
    pollfd p{run.report_fd, POLLIN, 0};
    const timespec tick{0, 100 * 1000 * 1000};
    ppoll(&p, 1, &tick, &wait_mask);
    char buf[4096];
    for (ssize_t n; (n = read(run.report_fd, buf, sizeof buf)) > 0;) {
      rep.feed(buf, static_cast<size_t>(n), child);
    }
    if (!child_done && waitpid(child, &status, WNOHANG) == child) {
      child_done = true;
      done_at = Clock::now();
      next_reap = done_at;
    }
    if (embedded.pid > 0 && !memory_died &&
        waitpid(embedded.pid, nullptr, WNOHANG) == embedded.pid) {
      memory_died = true;
      embedded.pid = -1;
    }
    if (Clock::now() >= next_reap) {
      // A process's reports precede its end: read what a process found gone wrote.
      if (!memory_died) spaces.reap(false);
      for (ssize_t n; (n = read(run.report_fd, buf, sizeof buf)) > 0;) {
        rep.feed(buf, static_cast<size_t>(n), child);
      }
      next_reap = Clock::now() + std::chrono::milliseconds(100);
      // Done when no process of the run is left to report; descendants that outlive the
      // program get a moment (they lose their memory-node space with the run).
      if (child_done &&
          (spaces.live() == 0 || Clock::now() - done_at > std::chrono::milliseconds(200))) {
        break;
      }
    }
  }
  sigprocmask(SIG_SETMASK, &before, nullptr);
  remove_shm_regions();

  // Free what is left now rather than when the leases run out.
  if (!memory_died) spaces.reap(true);
  self.reset();
  if (o.stats) {
    for (auto& b : rep.stats) print_stats(b);
    if (spaces.registered() == 0) {
      fprintf(stderr,
              "lego-run: no process of this run had its memory on the memory node: %s's "
              "memory was all local (a static program, or one that cleared LD_PRELOAD?)\n",
              o.argv[0].c_str());
    }
  }

  bool lost = memory_died || !rep.lost.empty();
  files.stop();
  if (lost) embedded.show_log();
  embedded.stop();
  run.remove();
  // The sweep is done long before in all but odd cases (a dead run's memory node that
  // does not answer); it is not worth keeping the user waiting more than a moment for.
  for (int i = 0; sweep > 0 && i < 300 && waitpid(sweep, nullptr, WNOHANG) == 0; i++) {
    usleep(10000);
  }
  if (lost) {
    fprintf(stderr, "lego-run: memory node %u (%s:%u, %s) was lost while %s ran%s%s\n", memory->id,
            memory->address.c_str(), memory->port, memory->provider.c_str(), o.argv[0].c_str(),
            rep.lost.empty() ? "" : ": ", rep.lost.c_str());
    return kExitMemoryLost;
  }
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return WEXITSTATUS(status);
}
