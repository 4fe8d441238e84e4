// The run directory, the spaces registered in it, and the sweep of killed runs
// (runtime/launcher/run_dir.h).
#include "runtime/launcher/run_dir.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "lego/memory_proto.h"
#include "lego/netns.h"
#include "lego/retry.h"
#include "runtime/launcher/private_link.h"

namespace lego::launch {
namespace {

using Clock = std::chrono::steady_clock;

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
  return transport_failure(classify(code));
}

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
  RunInfo info;
  const bool have_info = parse_run_info(read_small_file(dir + "/" + kRunFile), &info);
  if (have_info ? !process_gone(info.pid, info.start)
                : pid_alive(pid_in_name(dir.c_str(), kRunDirPrefix, ""))) {
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
    // The namespace takes its veth pair with it; an end whose namespace was never made,
    // or was removed apart, is removed by its own name below.
    if (DIR* d = opendir("/var/run/netns")) {
      while (dirent* e = readdir(d)) {
        // "lego-run-PID", or a private cluster's other members "lego-run-PID-m10",
        // "lego-run-PID-mon", "lego-run-PID-sw" (private_cluster.h).
        std::string name = e->d_name;
        const size_t dash = name.find('-', strlen(kPrivateNamespacePrefix));
        if (dash != std::string::npos) name.resize(dash);
        const long pid = pid_in_name(name.c_str(), kPrivateNamespacePrefix, "");
        if (pid > 0 && !pid_alive(pid)) (void)netns::delete_namespace(e->d_name);
      }
      closedir(d);
    }
    if (DIR* d = opendir("/sys/class/net")) {
      while (dirent* e = readdir(d)) {
        const long pid = pid_in_name(e->d_name, kPrivateLinkPrefix, kPrivateLinkSuffix);
        if (pid > 0 && !pid_alive(pid)) (void)netns::delete_link(e->d_name);
      }
      closedir(d);
    }
  }
  remove_shm_regions();
}

}  // namespace

Status RunDir::create() {
  path_ = run_dir_for(getpid());
  if (mkdir(path_.c_str(), 0700) != 0) {
    if (errno != EEXIST) return Status::from_errno(errno, "cannot create " + path_);
    // Left by an earlier process with this pid (the sweep removes dead runs' directories,
    // but it runs beside us): ours to remove when it is this user's directory, never
    // when someone else made it (it would hold the private cluster's key).
    struct stat st;
    if (lstat(path_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid()) {
      std::string p = path_;
      path_.clear();
      return Status(EEXIST, p + " exists and is not this user's directory: remove it");
    }
    remove_tree(path_);
    if (mkdir(path_.c_str(), 0700) != 0) return Status::from_errno(errno, "cannot create " + path_);
  }
  const std::string fifo = path_ + "/" + kReportFifo;
  if (mkfifo(fifo.c_str(), 0600) != 0) return Status::from_errno(errno, "cannot create " + fifo);
  report_fd_ = open(fifo.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (report_fd_ < 0) return Status::from_errno(errno, "cannot open " + fifo);
  return Status::ok();
}

Status RunDir::write_info(const RunInfo& info) {
  const std::string tmp = path_ + "/." + kRunFile, text = format_run_info(info);
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  const bool ok =
      fd >= 0 && write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  if (fd >= 0) close(fd);
  if (!ok || rename(tmp.c_str(), (path_ + "/" + kRunFile).c_str()) != 0) {
    return Status::from_errno(errno, "cannot write " + path_ + "/" + kRunFile);
  }
  return Status::ok();
}

void RunDir::remove() {
  if (report_fd_ >= 0) close(report_fd_);
  report_fd_ = -1;
  if (!path_.empty()) remove_tree(path_);
  path_.clear();
}

void SpaceRegistry::reap(bool all, std::chrono::milliseconds backoff) {
  if (!all && Clock::now() < retry_after_) return;
  DIR* d = opendir(dir_.c_str());
  if (d == nullptr) return;
  live_ = 0;
  std::vector<std::string> gone;
  while (dirent* e = readdir(d)) {
    pid_t pid = 0;
    uint64_t start = 0, id = 0;
    if (!parse_space_file_name(e->d_name, &pid, &start, &id)) continue;
    registered_.insert(e->d_name);
    if (!all && !process_gone(pid, start)) {
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
    if (node_ != nullptr && parse_space_line(read_small_file(claimed), &node, &h)) {
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

void remove_shm_regions() {
  DIR* d = opendir("/dev/shm");
  if (d == nullptr) return;
  while (dirent* e = readdir(d)) {
    unsigned long pid = 0, uid = 0, ep = 0;
    char nonce[16] = {};
    int used = 0;
    // A private cluster's shm doorbell (libfit/doorbell.h), named after the node's
    // address "lego-run-<lego-run's pid>": its server removes it, unless it was killed.
    if (sscanf(e->d_name, "lego-fit-bell-lego-run-%lu-%n", &pid, &used) == 1 && used > 0 &&
        pid != 0) {
      if (!pid_alive(static_cast<long>(pid))) unlinkat(dirfd(d), e->d_name, 0);
      continue;
    }
    // A private shm node's own region (16 MiB), named after its address and port
    // "lego-run-<lego-run's pid>:<port>": libfabric removes it when the node closes, not
    // when it is killed with its lego-run.
    unsigned long port = 0;
    if (sscanf(e->d_name, "lego-run-%lu:%lu%n", &pid, &port, &used) == 2 &&
        e->d_name[used] == '\0' && pid != 0) {
      if (!pid_alive(static_cast<long>(pid))) unlinkat(dirfd(d), e->d_name, 0);
      continue;
    }
    if (sscanf(e->d_name, "lego-%lu-%8[0-9a-f]:%lu:%lu%n", &pid, nonce, &uid, &ep, &used) != 4 ||
        e->d_name[used] != '\0' || pid == 0) {
      continue;
    }
    if (pid_alive(static_cast<long>(pid))) continue;  // still running
    unlinkat(dirfd(d), e->d_name, 0);
  }
  closedir(d);
}

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

}  // namespace lego::launch
