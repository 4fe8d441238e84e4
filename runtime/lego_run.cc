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
#include <dirent.h>
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
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "lego/memory_proto.h"
#include "lego/units.h"

using namespace lego;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kExitLegoError = 125;  // lego-run itself failed (like env(1), docker run)
constexpr int kExitCannotExec = 126;
constexpr int kExitNotFound = 127;
constexpr int kExitMemoryLost = 69;  // EX_UNAVAILABLE: the memory node went away

const char* kUsage = R"(usage: lego-run [options] [--] PROGRAM [ARGS...]

Runs PROGRAM (any dynamically linked Linux program, unchanged) with its anonymous memory
-- malloc, C++ new, anonymous mmap -- on a memory node. Locally only the ExCache holds it:
at most --excache bytes, in 4 KiB lines. PROGRAM's exit status is lego-run's.

options:
  --config FILE        the cluster file (README.md). Without it, lego-run starts a private
                       memory node on this host for the run and stops it afterwards.
  --node ID            this processor node's id in the cluster file (default: the first
                       processor node)
  --memory-node ID     the memory node to use (default: the first memory node)
  --excache SIZE       local memory for PROGRAM's anonymous memory (default 64M)
  --policy P           eviction policy: fifo (default) or clock
  --delivery D         how faults reach the runtime: handler (default; a runtime thread
                       serves them, system calls on evicted memory work) or sigbus (the
                       faulting thread serves itself: faster; system calls that touch
                       evicted memory may fail with EFAULT)
  --pcache M           lego_pcache.ko (kmod/): auto (default; use it when /dev/lego_pcache
                       exists), on (fail without it) or off. It batches evictions and gives
                       --policy clock the CPU's accessed bits.
  --prefetch N         lines fetched ahead of a miss that continues a sequential or
                       strided stream, in the same request (default 31, at most 31; 0: off)
  --stats              print the ExCache counters when PROGRAM exits
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

exit status: PROGRAM's; 128+N if it died of signal N; 69 if the memory node was lost
mid-run; 125 if lego-run itself failed; 126/127 if PROGRAM cannot be run / is not found.
)";

struct Options {
  std::string config;
  long node = -1, memory_node = -1;
  uint64_t excache = 64ull << 20;
  std::string policy = "fifo", delivery = "handler", transport = "tcp", pcache = "auto";
  uint64_t memory_capacity = 8ull << 30;
  long prefetch = 31;
  bool stats = false;
  std::string export_dir, mountpoint = "/lego";
  long storage_node = -1;
  bool no_storage = false;  // --storage-node none
  std::vector<std::string> argv;
};

[[noreturn]] void die(const std::string& msg, int code = kExitLegoError) {
  fprintf(stderr, "lego-run: %s\n", msg.c_str());
  exit(code);
}

long number(const char* flag, const char* text) {
  auto v = parse_int(text, flag, 0, 65535);
  if (!v) die(v.status().message() + " (a node id)", 2);
  return v.value();
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
        o.node = number("--node", optarg);
        break;
      case kMemory:
        o.memory_node = number("--memory-node", optarg);
        break;
      case kExcache: {
        auto v = parse_size(optarg, "--excache");
        if (!v) die(v.status().message(), 2);
        if (v.value() < 16 * 4096) die("--excache must be at least 64K (16 lines)", 2);
        o.excache = v.value();
        break;
      }
      case kPrefetch:
        o.prefetch = number("--prefetch", optarg);
        if (o.prefetch < 0 || o.prefetch > 31) die("--prefetch: 0 to 31 lines", 2);
        break;
      case kPolicy:
        o.policy = optarg;
        if (o.policy != "fifo" && o.policy != "clock") die("--policy: fifo or clock", 2);
        break;
      case kDelivery:
        o.delivery = optarg;
        if (o.delivery != "handler" && o.delivery != "sigbus") {
          die("--delivery: handler or sigbus", 2);
        }
        break;
      case kPcache:
        o.pcache = optarg;
        if (o.pcache != "auto" && o.pcache != "on" && o.pcache != "off") {
          die("--pcache: auto, on or off", 2);
        }
        break;
      case kStats:
        o.stats = true;
        break;
      case kTransport:
        o.transport = optarg;
        if (o.transport != "tcp" && o.transport != "shm") die("--transport: tcp or shm", 2);
        break;
      case kCap: {
        auto v = parse_size(optarg, "--memory-capacity");
        if (!v) die(v.status().message(), 2);
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
          o.storage_node = number("--storage-node", optarg);
        }
        break;
      case kMount:
        o.mountpoint = optarg;
        if (o.mountpoint.empty() || o.mountpoint[0] != '/') {
          die("--mount: an absolute path, like /lego", 2);
        }
        break;
      case 'h':
      case kHelp:
        fputs(kUsage, stdout);
        exit(0);
      default:
        fputs(kUsage, stderr);
        exit(2);
    }
  }
  for (int i = optind; i < argc; i++) o.argv.push_back(argv[i]);
  if (o.argv.empty()) die("no PROGRAM given (see --help)", 2);
  if (!o.export_dir.empty() && !o.config.empty()) {
    die("--export starts a private storage node: it does not go with --config (whose "
        "storage node serves its own export)",
        2);
  }
  if (!o.export_dir.empty()) {
    struct stat st;
    if (stat(o.export_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      die("--export " + o.export_dir + ": not a directory", 2);
    }
    char real[4096];
    if (realpath(o.export_dir.c_str(), real) != nullptr) o.export_dir = real;
  }
  return o;
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
    if (!config_path.empty()) unlink(config_path.c_str());
    if (!log_path.empty()) unlink(log_path.c_str());
    if (!dir.empty()) rmdir(dir.c_str());
    config_path.clear();
    dir.clear();
  }

  // Namespaces (and with them their veth pairs) of earlier lego-runs that were killed
  // (SIGKILL leaves no chance to clean up): removed when their lego-run is gone.
  static void sweep_stale_namespaces() {
    DIR* d = opendir("/var/run/netns");
    if (d == nullptr) return;
    while (dirent* e = readdir(d)) {
      const char* name = e->d_name;
      if (strncmp(name, "lego-run-", 9) != 0) continue;
      char* end = nullptr;
      const long pid = strtol(name + 9, &end, 10);
      if (end == name + 9 || *end != '\0' || pid <= 0) continue;
      if (kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
      run_quiet({"ip", "netns", "del", name});
    }
    closedir(d);
  }

  void start(const Options& o) {
    pid_t me = getpid();
    dir = "/tmp/lego-run-" + std::to_string(me);
    if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
      die("cannot create " + dir + ": " + strerror(errno));
    }
    config.key.resize(32);
    randombytes_buf(config.key.data(), config.key.size());
    config.origin = dir + "/cluster.toml";
    std::string proc_addr = "127.0.0.1", mem_addr = "127.0.0.1";
    bool isolate = o.transport == "tcp" && geteuid() == 0 && !g_userns.entered;
    if (isolate) {
      sweep_stale_namespaces();
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
                    fit::NodeId storage) {
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
    log = "/tmp/lego-run-" + std::to_string(getpid()) + "-lego-fs.log";
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

struct Report {
  struct Space {
    fit::NodeId node;
    mem::SpaceHandle handle;
  };
  std::vector<Space> spaces;
  std::vector<std::string> stats;  // one text block per process
  std::vector<pid_t> pids;         // the processes that reported
  std::string lost;
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

Report parse_report(const std::string& text) {
  Report r;
  std::istringstream in(text);
  std::string line;
  std::string block;
  bool in_stats = false;
  while (std::getline(in, line)) {
    if (in_stats) {
      if (line == "end") {
        r.stats.push_back(block);
        in_stats = false;
      } else {
        block += line + "\n";
      }
      continue;
    }
    if (line.rfind("space ", 0) == 0) {
      Report::Space s{};
      unsigned node = 0;
      unsigned long id = 0;
      char secret[64] = {};
      if (sscanf(line.c_str(), "space %u %lu %40s", &node, &id, secret) == 3 &&
          strlen(secret) == 32) {
        s.node = node;
        s.handle.id = id;
        for (int i = 0; i < 16; i++) {
          unsigned b = 0;
          sscanf(secret + 2 * i, "%2x", &b);
          s.handle.secret[i] = static_cast<uint8_t>(b);
        }
        r.spaces.push_back(s);
      }
    } else if (line.rfind("stats ", 0) == 0) {
      in_stats = true;
      block = line.substr(6) + "\n";
    } else if (line.rfind("lost ", 0) == 0) {
      r.lost = line.substr(5);
    }
  }
  return r;
}

void print_stats(const std::string& block) {
  std::map<std::string, std::string> kv;
  std::istringstream in(block);
  std::string head, line;
  std::getline(in, head);
  while (std::getline(in, line)) {
    size_t sp = line.find(' ');
    if (sp != std::string::npos) kv[line.substr(0, sp)] = line.substr(sp + 1);
  }
  auto num = [&](const char* k) { return kv.count(k) ? std::stoull(kv[k]) : 0ull; };
  fprintf(stderr, "lego-run: ExCache stats (%s)\n", head.c_str());
  fprintf(stderr, "  %-16s %s (resident accesses never trap)\n", "hits", "n/a");
  fprintf(stderr, "  %-16s %s\n", "kernel_module",
          num("kernel_module") ? "lego_pcache (batched evictions, accessed bits)" : "not used");
  const char* keys[] = {
      "misses",         "fetches",          "zero_fills",        "write_faults",    "evictions",
      "write_backs",    "clean_drops",      "discarded_lines",   "bytes_fetched",   "bytes_written",
      "resident_lines", "capacity_lines",   "module_calls",      "accessed_spared", "redirtied",
      "prefetches",     "prefetched_lines", "dirty_predictions", "unfenced_batches"};
  for (const char* k : keys) fprintf(stderr, "  %-16s %llu\n", k, num(k));
  fprintf(stderr, "  %-16s %llu (fetched + written)\n", "bytes_moved",
          num("bytes_fetched") + num("bytes_written"));
  fprintf(stderr, "  %-16s p50 < %.1f us, p99 < %.1f us\n", "miss_latency",
          num("miss_p50_ns") / 1e3, num("miss_p99_ns") / 1e3);
  // The histogram, with each bucket's share of misses and (estimated at the bucket's
  // middle) of the time spent in misses: a rare slow kind of miss shows up here.
  std::vector<std::pair<unsigned, unsigned long long>> hist;
  unsigned long long total = 0;
  double total_ns = 0;
  std::istringstream hs(kv.count("miss_histogram") ? kv["miss_histogram"] : "");
  for (std::string item; std::getline(hs, item, ',');) {
    unsigned b = 0;
    unsigned long long n = 0;
    if (sscanf(item.c_str(), "%u:%llu", &b, &n) != 2 || b > 63) continue;
    hist.emplace_back(b, n);
    total += n;
    total_ns += n * 1.5 * static_cast<double>(1ull << b);
  }
  if (total == 0) return;
  fprintf(stderr, "  %-22s %10s %10s\n", "miss latency (us)", "% misses", "% time");
  for (auto [b, n] : hist) {
    const double lo = static_cast<double>(1ull << b) / 1e3;
    char range[32];
    snprintf(range, sizeof range, "%.1f-%.1f", lo, 2 * lo);
    fprintf(stderr, "    %-20s %9.1f%% %9.1f%%\n", range, 100.0 * n / total,
            100.0 * n * 1.5 * static_cast<double>(1ull << b) / total_ns);
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

  EmbeddedMemoryNode embedded;
  fit::ClusterConfig config;
  std::string config_path;
  if (o.config.empty()) {
    if (!o.export_dir.empty() && geteuid() != 0) {
      // The private lego-stord runs in the run's user namespace too, as its root: the
      // user's files are then root's there, as FUSE needs to map their owner (a file
      // whose owner the kernel cannot map is read-only).
      std::string err = enter_user_namespace();
      if (!err.empty()) die(needs_root(err));
    }
    embedded.start(o);
    config = embedded.config;
    config_path = embedded.config_path;
  } else {
    auto c = fit::ClusterConfig::parse_file(o.config);
    if (!c) die(c.status().message(), 2);
    config = c.value();
    config_path = o.config;
  }
  const fit::NodeConfig* proc = o.node >= 0 ? config.find(static_cast<fit::NodeId>(o.node))
                                            : config.first_of(fit::Role::kProcessor);
  if (proc == nullptr)
    die("no processor node " + (o.node >= 0 ? std::to_string(o.node) : std::string("")) + " in " +
            config_path,
        2);
  const fit::NodeConfig* memory = o.memory_node >= 0
                                      ? config.find(static_cast<fit::NodeId>(o.memory_node))
                                      : config.first_of(fit::Role::kMemory);
  if (memory == nullptr || memory->role != fit::Role::kMemory) {
    die("no memory node " + (o.memory_node >= 0 ? std::to_string(o.memory_node) : std::string("")) +
            " in " + config_path,
        2);
  }
  // The storage node whose export PROGRAM sees at --mount, if any.
  const fit::NodeConfig* storage = o.no_storage ? nullptr
                                   : o.storage_node >= 0
                                       ? config.find(static_cast<fit::NodeId>(o.storage_node))
                                       : config.first_of(fit::Role::kStorage);
  if (o.storage_node >= 0 && (storage == nullptr || storage->role != fit::Role::kStorage)) {
    die("no storage node " + std::to_string(o.storage_node) + " in " + config_path, 2);
  }
  StorageMount files;
  if (storage != nullptr) {
    if (g_early_signal != 0) {
      embedded.stop();
      return 128 + g_early_signal;
    }
    std::string err = files.start(o, config_path, proc->id, storage->id);
    if (!err.empty()) {
      embedded.stop();
      die(err);
    }
  }
  std::string preload =
      find_part("LEGO_PRELOAD", "runtime/liblego_preload.so", "liblego_preload.so");
  if (preload.empty()) die("cannot find liblego_preload.so (set LEGO_PRELOAD)");
  std::string jemalloc = jemalloc_path();
  if (jemalloc.empty()) die("cannot find libjemalloc.so.2 (Debian package libjemalloc2)");
  char real[4096];
  if (realpath(preload.c_str(), real) != nullptr) preload = real;

  int report[2], exec_err[2];
  if (pipe2(report, O_CLOEXEC) != 0 || pipe2(exec_err, O_CLOEXEC) != 0) {
    die(std::string("pipe: ") + strerror(errno));
  }
  // The shell's job-control signals reach the program directly; lego-run waits.
  signal(SIGINT, SIG_IGN);
  signal(SIGQUIT, SIG_IGN);
  sigaction(SIGUSR1, &fw, nullptr);
  sigaction(SIGUSR2, &fw, nullptr);

  if (g_early_signal != 0) {
    files.stop();
    embedded.stop();
    return 128 + g_early_signal;
  }
  pid_t child = fork();
  if (child < 0) die(std::string("fork: ") + strerror(errno));
  if (child > 0) g_child = child;
  if (child > 0 && g_early_signal != 0) kill(child, g_early_signal);
  if (child == 0) {
    signal(SIGINT, SIG_DFL);
    signal(SIGQUIT, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    close(report[0]);
    close(exec_err[0]);
    int rfd = fcntl(report[1], F_DUPFD, 100);  // out of the program's usual fd range
    close(report[1]);
    std::string ld = preload + ":" + jemalloc;
    if (const char* old = getenv("LD_PRELOAD"); old != nullptr && *old)
      ld += std::string(":") + old;
    setenv("LD_PRELOAD", ld.c_str(), 1);
    setenv("LEGO_CONFIG", config_path.c_str(), 1);
    setenv("LEGO_NODE", std::to_string(proc->id).c_str(), 1);
    setenv("LEGO_MEMORY_NODE", std::to_string(memory->id).c_str(), 1);
    setenv("LEGO_EXCACHE", std::to_string(o.excache).c_str(), 1);
    setenv("LEGO_POLICY", o.policy.c_str(), 1);
    setenv("LEGO_PREFETCH", std::to_string(o.prefetch).c_str(), 1);
    setenv("LEGO_DELIVERY", o.delivery.c_str(), 1);
    setenv("LEGO_PCACHE", o.pcache.c_str(), 1);
    setenv("LEGO_REPORT_FD", std::to_string(rfd).c_str(), 1);
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
    std::vector<char*> a;
    for (auto& s : o.argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execvp(a[0], a.data());
    int e = errno;
    (void)!write(exec_err[1], &e, sizeof(e));
    _exit(e == ENOENT ? kExitNotFound : kExitCannotExec);
  }
  close(report[1]);
  close(exec_err[1]);
  int e = 0;
  if (read(exec_err[0], &e, sizeof(e)) == sizeof(e)) {
    waitpid(child, nullptr, 0);
    files.stop();
    embedded.stop();
    die(o.argv[0] + ": " + strerror(e), e == ENOENT ? kExitNotFound : kExitCannotExec);
  }
  close(exec_err[0]);

  // Read the runtime's reports until the program (and anything it exec'd) closes the pipe,
  // while watching the private memory node.
  std::string text;
  bool memory_died = false;
  int status = 0;
  bool child_done = false;
  bool report_open = true;  // until every writer closed it (a closed pipe polls ready forever)
  for (;;) {
    pollfd p{report_open ? report[0] : -1, POLLIN, 0};
    int pr = poll(&p, 1, 100);
    if (pr > 0) {
      char buf[4096];
      ssize_t n = read(report[0], buf, sizeof(buf));
      if (n > 0) {
        text.append(buf, static_cast<size_t>(n));
        continue;
      }
      if (n == 0) report_open = false;
      if (n == 0 && child_done) break;
    }
    if (child_done && !report_open) break;
    if (!child_done) {
      pid_t w = waitpid(child, &status, WNOHANG);
      if (w == child) child_done = true;
    }
    if (embedded.pid > 0 && !memory_died &&
        waitpid(embedded.pid, nullptr, WNOHANG) == embedded.pid) {
      memory_died = true;
      embedded.pid = -1;
    }
    if (child_done && pr == 0) {
      // Descendants may hold the pipe open; do not wait for them beyond a moment.
      pollfd q{report[0], POLLIN, 0};
      if (poll(&q, 1, 200) <= 0) break;
    }
  }
  close(report[0]);
  Report rep = parse_report(text);
  remove_shm_regions();

  // Free the program's address spaces now rather than when their leases run out.
  if (!memory_died && !rep.spaces.empty()) {
    auto client = fit::Node::create(config, proc->id);
    if (client) {
      for (auto& s : rep.spaces) {
        mem::SpaceRequest req{s.handle};
        (void)client.value()->send_reply(s.node, mem::kClose,
                                         {reinterpret_cast<const std::byte*>(&req), sizeof(req)},
                                         {}, std::chrono::milliseconds(2000));
      }
    }
  }
  if (o.stats) {
    for (auto& b : rep.stats) print_stats(b);
  }

  bool lost = memory_died || !rep.lost.empty() ||
              (WIFEXITED(status) && WEXITSTATUS(status) == kExitMemoryLost);
  files.stop();
  if (lost) embedded.show_log();
  embedded.stop();
  if (lost) {
    fprintf(stderr, "lego-run: memory node %u (%s:%u, %s) was lost while %s ran%s%s\n", memory->id,
            memory->address.c_str(), memory->port, memory->provider.c_str(), o.argv[0].c_str(),
            rep.lost.empty() ? "" : ": ", rep.lost.c_str());
    return kExitMemoryLost;
  }
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return WEXITSTATUS(status);
}
