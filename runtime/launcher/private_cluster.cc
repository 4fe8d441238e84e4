// The private cluster (runtime/launcher/private_cluster.h).
#include "runtime/launcher/private_cluster.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include "lego/startup_trace.h"
#include "runtime/launcher/process.h"

namespace lego::launch {

Result<std::unique_ptr<PrivateCluster>> PrivateCluster::start(const PrivateClusterOptions& o) {
  if (o.transport != fit::Provider::kTcp && o.transport != fit::Provider::kShm) {
    return Status(EINVAL, std::string("transport '") + fit::provider_name(o.transport) +
                              "' is not tcp or shm");
  }
  if (access(o.memd_path.c_str(), X_OK) != 0) {
    return Status::from_errno(errno, "lego-memd at '" + o.memd_path + "'");
  }
  if (!o.export_dir.empty() && access(o.stord_path.c_str(), X_OK) != 0) {
    return Status::from_errno(errno, "lego-stord at '" + o.stord_path + "'");
  }
  std::unique_ptr<PrivateCluster> c(new PrivateCluster());
  Status st = c->launch(o);
  if (!st) return st;  // c's destructor stops what started
  return c;
}

Status PrivateCluster::launch(const PrivateClusterOptions& o) {
  options_ = o;
  if (sodium_init() < 0) return Status(EIO, "libsodium failed to initialise");
  config_.key.resize(32);
  randombytes_buf(config_.key.data(), config_.key.size());
  config_.origin = o.dir + "/cluster.toml";
  std::string proc_addr = "127.0.0.1", mem_addr = "127.0.0.1";
  if (o.transport == fit::Provider::kTcp && o.isolate) {
    // A veth pair from this namespace to the daemons' own.
    auto net = private_link(private_namespace(o.id), private_link_name(o.id), private_subnet(o.id));
    if (!net) {
      return net.status().with_context("cannot set up the memory node's network namespace " +
                                       private_namespace(o.id));
    }
    network_ = std::move(net.value());
    startup_mark("lego-run: network namespace made");
    namespace_ = network_->name(0);
    proc_addr = network_->host_address();
    mem_addr = network_->address(0);
  }
  const uint16_t port = static_cast<uint16_t>(30000 + o.id % 20000);
  const int nodes = o.export_dir.empty() ? 2 : 3;
  for (int id = 1; id <= nodes; id++) {
    fit::NodeConfig n;
    n.id = static_cast<fit::NodeId>(id);
    n.role = id == 1 ? fit::Role::kProcessor : id == 2 ? fit::Role::kMemory : fit::Role::kStorage;
    n.provider = o.transport;
    n.address = o.transport == fit::Provider::kShm ? private_namespace(o.id)
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
    config_.nodes.push_back(n);
  }
  config_path_ = config_.origin;
  {
    int fd = open(config_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return Status::from_errno(errno, "cannot write " + config_path_);
    const std::string text = config_.to_toml();
    const bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    const int e = errno;
    close(fd);
    if (!ok) return Status::from_errno(e, "cannot write " + config_path_);
  }
  memd_log_ = o.dir + "/lego-memd.log";
  memd_ = start_daemon(o.memd_path,
                       {"lego-memd", "--config", config_path_, "--node", "2", "--capacity",
                        std::to_string(o.memory_capacity)},
                       memd_log_, namespace_);
  if (memd_ < 0) {
    show_logs();
    return Status(EIO, "the private memory node did not start (its log is above)");
  }
  if (nodes == 3) {
    stord_log_ = o.dir + "/lego-stord.log";
    stord_ = start_daemon(
        o.stord_path,
        {"lego-stord", "--config", config_path_, "--node", "3", "--export", o.export_dir},
        stord_log_, namespace_);
    if (stord_ < 0) {
      show_logs();
      return Status(EIO, "the private storage node did not start (its log is above)");
    }
  }
  return Status::ok();
}

bool PrivateCluster::memory_exited() {
  if (memd_ > 0 && waitpid(memd_, nullptr, WNOHANG) == memd_) {
    memd_ = -1;
    memd_exited_ = true;
  }
  return memd_exited_;
}

void PrivateCluster::show_logs() const {
  if (!memd_log_.empty()) show_log(memd_log_, options_.who, "lego-memd");
  if (!stord_log_.empty()) show_log(stord_log_, options_.who, "lego-stord");
}

void PrivateCluster::stop() {
  stop_process(stord_);
  stord_ = -1;
  if (!stord_log_.empty()) unlink(stord_log_.c_str());
  stord_log_.clear();
  stop_process(memd_);
  memd_ = -1;
  // Deleting the namespace takes the veth pair with it: no link to remove here.
  network_.reset();
  namespace_.clear();
}

}  // namespace lego::launch
