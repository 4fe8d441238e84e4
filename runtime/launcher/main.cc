// lego-run: runs an unmodified program whose anonymous memory lives on a memory node.
//
// With --config it joins that cluster as a processor node. Without it, it is a complete
// single-host system: it starts a private cluster for the run (private_cluster.h: lego-memd,
// in its own network namespace when run as root and --transport tcp), and stops it
// afterwards.
//
// Files: when the cluster has a storage node (or --export DIR gives the private cluster
// one, lego-stord serving DIR), lego-run moves itself into a mount namespace of its own
// and mounts the storage node's export there with lego-fs (storage_mount.h, at --mount,
// default /lego): PROGRAM, which inherits the namespace, reads and writes those files on
// the storage node; nothing else on the host sees the mount, and it vanishes with the run.
//
// The run: lego-run and the runtime it preloads into every process of the run agree on
// runtime/launch_contract.h (environment, run directory, reports, exit statuses). Each
// process registers its memory-node space in the run directory; lego-run frees the space
// of every process that is gone while the run goes on, and the rest at the end
// (run_dir.h). It forwards SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 to PROGRAM; the terminal's
// SIGINT and SIGQUIT reach PROGRAM directly.
//
// A killed lego-run (kill -9) cleans up what it can: PROGRAM gets SIGKILL with it
// (PR_SET_PDEATHSIG), its private daemons SIGTERM, and the next lego-run to start removes
// what is left (run_dir.h: sweeper): the run directory, the private cluster's network
// namespace and veth, shm regions, and, with --config, the dead processes' spaces.
//
// The parts: cli.cc (flags, checks), program_check.cc, private_cluster.cc, userns.cc,
// storage_mount.cc, run_dir.cc, reports.cc (--stats), process.cc; this file puts them in
// order and runs PROGRAM.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "lego/fit.h"
#include "lego/startup_trace.h"
#include "runtime/launch_contract.h"
#include "runtime/launcher/cli.h"
#include "runtime/launcher/die.h"
#include "runtime/launcher/private_cluster.h"
#include "runtime/launcher/process.h"
#include "runtime/launcher/reports.h"
#include "runtime/launcher/rereplication.h"
#include "runtime/launcher/run_dir.h"
#include "runtime/launcher/storage_mount.h"
#include "runtime/launcher/syscalls.h"
#include "runtime/launcher/userns.h"

using namespace lego;
using namespace lego::launch;
using Clock = std::chrono::steady_clock;

namespace {

// Whether this process (and so the program, which runs with its credentials) may register
// kernel-mode userfaults: root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1.
bool kernel_faults_allowed() {
  const int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0) return false;
  close(fd);
  return true;
}

volatile pid_t g_child = -1;
// --syscalls: the tracer of PROGRAM and its descendants (syscalls.h), or null.
std::unique_ptr<SyscallTracer> g_tracer;
volatile sig_atomic_t g_early_signal = 0;  // a signal that came before the program ran
void forward(int sig) {
  if (g_child > 0) {
    kill(g_child, sig);
  } else {
    g_early_signal = sig;
  }
}
void child_exited(int) {}  // only interrupts ppoll

// The run's parts, for undo_setup (die() calls it, whichever step failed).
StorageMount* g_files = nullptr;
std::unique_ptr<PrivateCluster>* g_cluster = nullptr;
RunDir* g_run = nullptr;

void undo_setup() {
  if (g_files != nullptr) g_files->stop();
  if (g_cluster != nullptr && *g_cluster) (*g_cluster)->stop();
  if (g_run != nullptr) g_run->remove();
}

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
    // One channel: the run's calls from here (closing spaces) are few, and over shm
    // each channel costs a shared-memory region mapped and touched on both sides.
    Status st = node.value()->connect_one(memory.id);
    if (!st) {
      const std::string who = "memory node " + std::to_string(memory.id) + " (" + memory.address +
                              ":" + std::to_string(memory.port) + ", " +
                              fit::provider_name(memory.provider) + ")";
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

// The private cluster of a run without --config, in the run directory.
std::unique_ptr<PrivateCluster> start_private_cluster(const Options& o, const std::string& dir) {
  PrivateClusterOptions pc;
  pc.dir = dir;
  pc.transport = o.transport;
  // Its own network namespace needs root; in the run's user namespace lego-run is root
  // only there.
  pc.isolate = o.transport == fit::Provider::kTcp && geteuid() == 0 && !in_user_namespace();
  pc.memory_capacity = o.memory_capacity;
  pc.memory_nodes = o.memory_nodes;
  pc.replicas = o.replicas != 0 ? o.replicas : 1;
  if (o.memory_nodes > 1) {
    pc.mond_path = find_part("LEGO_MOND", "daemons/monitor/lego-mond", "lego-mond");
    if (pc.mond_path.empty() || access(pc.mond_path.c_str(), X_OK) != 0) {
      die("cannot find lego-mond (set LEGO_MOND, or install it beside lego-run)");
    }
  }
  pc.export_dir = o.export_dir;
  pc.id = getpid();
  pc.memd_path = find_part("LEGO_MEMD", "daemons/memory/lego-memd", "lego-memd");
  if (pc.memd_path.empty() || access(pc.memd_path.c_str(), X_OK) != 0) {
    die("cannot find lego-memd (set LEGO_MEMD, or install it beside lego-run)");
  }
  if (!o.export_dir.empty()) {
    pc.stord_path = find_part("LEGO_STORD", "daemons/storage/lego-stord", "lego-stord");
    if (pc.stord_path.empty() || access(pc.stord_path.c_str(), X_OK) != 0) {
      die("cannot find lego-stord (set LEGO_STORD, or install it beside lego-run)");
    }
  }
  auto cluster = PrivateCluster::start(pc);
  if (!cluster) die(cluster.status().message());
  return std::move(cluster.value());
}

// Forks PROGRAM with the runtime preloaded and `settings` in its environment. Returns its
// pid once it exec'd; dies when it could not (126, or 127 when not found).
pid_t run_program(const Options& o, const Settings& settings) {
  std::string preload =
      find_part("LEGO_PRELOAD", "runtime/liblego_preload.so", "liblego_preload.so");
  if (preload.empty()) die("cannot find liblego_preload.so (set LEGO_PRELOAD)");
  std::string jemalloc = jemalloc_path();
  if (jemalloc.empty()) die("cannot find libjemalloc.so.2 (Debian package libjemalloc2)");
  char real[PATH_MAX];
  if (realpath(preload.c_str(), real) != nullptr) preload = real;

  int exec_err[2];
  if (pipe2(exec_err, O_CLOEXEC) != 0) die(std::string("pipe: ") + strerror(errno));
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
    if (const char* old = getenv("LD_PRELOAD"); old != nullptr && *old) {
      ld += std::string(":") + old;
    }
    setenv("LD_PRELOAD", ld.c_str(), 1);
    export_settings(settings);
    // jemalloc would serve allocations above 8 MiB from a "huge" arena created later with
    // default hooks, i.e. from local memory: keep every size in the hooked arenas. And with
    // retain (its default) each arena grows its address space geometrically, 2 MiB then 4,
    // 8 ... 64 MiB and more, most of it never touched: every such range is placed on memory
    // nodes, which promise it room, so a 60 MiB heap of 4 threads held 128 MiB of promises
    // and a cluster filled at half its capacity. Without retain an arena asks for what it
    // needs (freed extents are still kept for reuse: the hooks opt out of dalloc).
    // Only where the program's kernel-mode faults on the region are served, though: without
    // root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1 a system call that writes into a
    // heap line not resident fails with EFAULT (excache.h), and without retain an
    // unprivileged `cat` read into a fresh buffer did (tests/storage's user runs); with it
    // they ran. Serving those faults without privilege (prefaulting the buffers of system
    // calls) is what would lift this.
    std::string conf = "oversize_threshold:0";
    if (kernel_faults_allowed()) conf += ",retain:false";
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
    // --syscalls: stopped until lego-run's tracer thread has seized it, so that the
    // exec and everything after it is traced.
    if (o.syscalls) raise(SIGSTOP);
    std::vector<char*> a;
    for (auto& s : o.argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execvp(a[0], a.data());
    int e = errno;
    (void)!write(exec_err[1], &e, sizeof(e));
    _exit(e == ENOENT ? kExitNotFound : kExitCannotExec);
  }
  close(exec_err[1]);
  if (o.syscalls) {
    std::string err;
    g_tracer = SyscallTracer::start(child, &err);
    if (!g_tracer) {
      kill(child, SIGKILL);
      waitpid(child, nullptr, 0);
      die(err);
    }
  }
  int e = 0;
  if (read(exec_err[0], &e, sizeof(e)) == sizeof(e)) {
    waitpid(child, nullptr, 0);
    die(o.argv[0] + ": " + strerror(e), e == ENOENT ? kExitNotFound : kExitCannotExec);
  }
  close(exec_err[0]);
  return child;
}

// How the run ended, for the end of main.
struct Ending {
  int status = 0;            // PROGRAM's wait status
  bool memory_died = false;  // the private memory node died, and with it the only copy
};

// While PROGRAM runs: reads the reports, frees the spaces of processes that ended,
// watches the private memory node. SIGCHLD (blocked but while waiting in ppoll) ends a
// wait at once when the program exits.
Ending wait_for_run(pid_t child, const RunDir& run, SpaceRegistry& spaces, Reports& rep,
                    PrivateCluster* cluster) {
  struct sigaction chld {};
  chld.sa_handler = child_exited;
  chld.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &chld, nullptr);
  sigset_t block, before, wait_mask;
  sigemptyset(&block);
  sigaddset(&block, SIGCHLD);
  sigprocmask(SIG_BLOCK, &block, &before);
  wait_mask = before;
  // Traced, every stop of every tracee raises SIGCHLD: the tick notices the program's end
  // instead (within 100 ms) rather than waking lego-run for each system call.
  if (g_tracer == nullptr) sigdelset(&wait_mask, SIGCHLD);

  Ending end;
  bool child_done = false;
  // Re-replication's progress (rereplication.h), in a run with more than one memory node.
  std::unique_ptr<launch::RereplicationWatch> rereplication;
  if (cluster == nullptr || cluster->memory_nodes() > 1) {
    rereplication = std::make_unique<launch::RereplicationWatch>(run.path());
  }
  Clock::time_point next_reap = Clock::now(), done_at{};
  char buf[4096];
  auto drain = [&] {
    for (ssize_t n; (n = read(run.report_fd(), buf, sizeof buf)) > 0;) {
      rep.feed(buf, static_cast<size_t>(n), child);
    }
  };
  for (;;) {
    pollfd p{run.report_fd(), POLLIN, 0};
    const timespec tick{0, 100 * 1000 * 1000};
    ppoll(&p, 1, &tick, &wait_mask);
    drain();
    if (rereplication) rereplication->poll();
    // Traced, the tracer thread reaps the program (a waitpid here would take its stops).
    if (!child_done && (g_tracer ? g_tracer->program_ended(&end.status)
                                 : waitpid(child, &end.status, WNOHANG) == child)) {
      startup_mark("lego-run: the program exited");
      child_done = true;
      // A private memory node stops with the run: what is left of the run is its
      // descendants' last moments, not worth a connection (over shm lego-run's first).
      if (cluster != nullptr) spaces.stop_closing();
      done_at = Clock::now();
      next_reap = done_at;
    }
    // One private memory node holds the only copy of everything; with several, only the
    // runtime knows whether a vRegion lost its last copy (its "lost" report says so).
    if (cluster != nullptr && !end.memory_died) {
      const int exited = cluster->memory_exited();  // reaps them either way
      end.memory_died = cluster->memory_nodes() == 1 && exited > 0;
    }
    if (Clock::now() >= next_reap) {
      // A process's reports precede its end: read what a process found gone wrote.
      if (!end.memory_died) spaces.reap(false);
      drain();
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
  return end;
}

}  // namespace

int main(int argc, char** argv) {
  startup_mark("lego-run: start");
  Options o = parse_command_line(argc, argv);
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
  check_pcache(o);
  check_program(o);

  RunDir run;
  std::unique_ptr<PrivateCluster> cluster;
  StorageMount files;
  g_run = &run;
  g_cluster = &cluster;
  g_files = &files;
  set_undo(undo_setup);
  if (Status st = run.create(); !st) die(st.message());

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
    cluster = start_private_cluster(o, run.path());
    startup_mark("lego-run: private cluster up");
    config = cluster->config();
    config_path = cluster->config_path();
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
  RunInfo info;
  info.pid = getpid();
  info.start = process_info(info.pid).start;
  info.config = config_path;
  info.node = proc->id;
  info.memory_node = memory->id;
  info.private_memory = o.config.empty();
  if (Status st = run.write_info(info); !st) die(st.message());
  if (storage != nullptr) {
    if (g_early_signal != 0) {
      undo_setup();
      return 128 + g_early_signal;
    }
    std::string err = files.start(o.mountpoint, config_path, proc->id, storage->id, run.path());
    if (!err.empty()) die(err);
  }
  // After the namespaces: a Node may start threads, and unshare(CLONE_NEWUSER) refuses a
  // process that has more than one.
  std::unique_ptr<fit::Node> self =
      join_cluster(config, *proc, *memory, config_path, /*probe=*/!o.config.empty());

  // The shell's job-control signals reach the program directly; lego-run waits.
  signal(SIGINT, SIG_IGN);
  signal(SIGQUIT, SIG_IGN);
  sigaction(SIGUSR1, &fw, nullptr);
  sigaction(SIGUSR2, &fw, nullptr);
  if (g_early_signal != 0) {
    undo_setup();
    return 128 + g_early_signal;
  }
  Settings settings = o.runtime;
  settings.config = config_path;
  settings.node = proc->id;
  // An explicit --memory-node keeps everything there; otherwise the runtime places over
  // every memory node of the file.
  settings.memory_node = o.memory_node >= 0 ? memory->id : 0;
  settings.replicas = o.replicas;
  settings.run_dir = run.path();
  startup_mark("lego-run: starting the program");
  const pid_t child = run_program(o, settings);

  SpaceRegistry spaces(run.path(), self.get());
  Reports rep;
  const Ending end = wait_for_run(child, run, spaces, rep, cluster.get());
  startup_mark("lego-run: the program's run is over");
  remove_shm_regions();

  // Free what is left now rather than when the leases run out.
  if (!end.memory_died) spaces.reap(true);
  self.reset();
  startup_mark("lego-run: spaces freed");
  if (o.stats) {
    for (auto& b : rep.stats()) print_stats(b);
    print_stats_summary(rep.stats());
    if (spaces.registered() == 0) {
      fprintf(stderr,
              "lego-run: no process of this run had its memory on the memory node: %s's "
              "memory was all local (a static program, or one that cleared LD_PRELOAD?)\n",
              o.argv[0].c_str());
    }
  }

  if (g_tracer) g_tracer->print(stderr);

  const bool lost = end.memory_died || !rep.lost().empty();
  files.stop();
  if (cluster) {
    if (lost) cluster->show_logs();
    cluster->stop();
  }
  startup_mark("lego-run: cluster stopped");
  run.remove();
  // The sweep is done long before in all but odd cases (a dead run's memory node that
  // does not answer); it is not worth keeping the user waiting more than a moment for.
  (void)wait_exit(sweep, std::chrono::seconds(3));
  startup_mark("lego-run: exit");
  if (lost && !rep.lost().empty() && settings.memory_node == 0) {
    // The runtime's report names the node and what was lost there.
    fprintf(stderr, "lego-run: %s lost memory while it ran: %s\n", o.argv[0].c_str(),
            rep.lost().c_str());
    return kExitMemoryLost;
  }
  if (lost) {
    fprintf(stderr, "lego-run: memory node %u (%s:%u, %s) was lost while %s ran%s%s\n", memory->id,
            memory->address.c_str(), memory->port, fit::provider_name(memory->provider),
            o.argv[0].c_str(), rep.lost().empty() ? "" : ": ", rep.lost().c_str());
    return kExitMemoryLost;
  }
  if (WIFSIGNALED(end.status)) return 128 + WTERMSIG(end.status);
  return WEXITSTATUS(end.status);
}
