// The private cluster (runtime/launcher/private_cluster.h).
#include "runtime/launcher/private_cluster.h"

#include <fcntl.h>
#include <signal.h>
#include <sodium.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "lego/startup_trace.h"
#include "runtime/launcher/process.h"

namespace lego::launch {

fit::NodeId private_memory_node(int index) {
  return index == 0 ? 2 : static_cast<fit::NodeId>(9 + index);
}

Result<std::unique_ptr<PrivateCluster>> PrivateCluster::start(const PrivateClusterOptions& o) {
  if (o.transport != fit::Provider::kTcp && o.transport != fit::Provider::kShm) {
    return Status(EINVAL, std::string("transport '") + fit::provider_name(o.transport) +
                              "' is not tcp or shm");
  }
  if (access(o.memd_path.c_str(), X_OK) != 0) {
    return Status::from_errno(errno, "lego-memd at '" + o.memd_path + "'");
  }
  if (o.memory_nodes < 1 || o.memory_nodes > kMaxPrivateMemoryNodes) {
    return Status(EINVAL, "memory nodes: 1 to " + std::to_string(kMaxPrivateMemoryNodes));
  }
  if (o.replicas < 1 || o.replicas > static_cast<uint32_t>(o.memory_nodes)) {
    return Status(EINVAL, "replicas " + std::to_string(o.replicas) + " with " +
                              std::to_string(o.memory_nodes) + " memory node" +
                              (o.memory_nodes == 1 ? "" : "s") +
                              ": each copy of a vRegion needs a memory node of its own");
  }
  if (o.memory_nodes > 1 && access(o.mond_path.c_str(), X_OK) != 0) {
    return Status::from_errno(errno, "lego-mond at '" + o.mond_path + "'");
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
  const int mems = o.memory_nodes;
  const bool monitor = mems > 1;
  // Each daemon's address and namespace: memory nodes 0..mems-1, then the monitor.
  std::vector<std::string> addr(static_cast<size_t>(mems + 1), "127.0.0.1"), ns(addr.size());
  std::string proc_addr = "127.0.0.1";
  if (o.transport == fit::Provider::kTcp && o.isolate && mems > 1) {
    // A bridge that every daemon's namespace and this one are attached to.
    netns::NetworkSpec spec;
    spec.namespaces.push_back(private_namespace(o.id));
    for (int i = 1; i < mems; i++) {
      spec.namespaces.push_back(private_namespace(o.id) + "-m" +
                                std::to_string(private_memory_node(i)));
    }
    spec.namespaces.push_back(private_namespace(o.id) + "-mon");
    spec.attach_host = true;
    spec.host_link = private_link_name(o.id);
    spec.subnet = private_subnet(o.id);
    auto net = netns::Network::create(spec);
    if (!net) {
      return net.status().with_context("cannot set up the memory nodes' network namespaces " +
                                       private_namespace(o.id) + "-*");
    }
    network_ = std::move(net.value());
    namespace_ = network_->name(0);
    proc_addr = network_->host_address();
    for (int i = 0; i <= mems; i++) {
      addr[static_cast<size_t>(i)] = network_->address(i);
      ns[static_cast<size_t>(i)] = network_->name(i);
    }
  } else if (o.transport == fit::Provider::kTcp && o.isolate) {
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
    addr[0] = network_->address(0);
    ns[0] = namespace_;
  }
  const uint16_t port = static_cast<uint16_t>(30000 + o.id % 20000);
  // (id, role, address): the processor, the memory nodes, the storage node, the monitor.
  struct Member {
    fit::NodeId id;
    fit::Role role;
    std::string address;
  };
  std::vector<Member> members = {{1, fit::Role::kProcessor, proc_addr}};
  for (int i = 0; i < mems; i++) {
    members.push_back({private_memory_node(i), fit::Role::kMemory, addr[static_cast<size_t>(i)]});
  }
  if (!o.export_dir.empty()) members.push_back({3, fit::Role::kStorage, addr[0]});
  if (monitor) {
    members.push_back({kPrivateMonitorNode, fit::Role::kMonitor, addr[static_cast<size_t>(mems)]});
  }
  config_.replicas = o.replicas;
  // A spinning memory node answers a miss a wake-up sooner but keeps a core busy even when
  // idle. With more memory nodes than the host has cores beside the program's, spinning
  // nodes take turns on the cores and a miss waits for the scheduler instead (three spinning
  // nodes on a 2-vCPU host made every miss of the cluster suite ~10x slower): they block.
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  const bool memory_nodes_spin = mems + 1 <= std::max(cores, 1L);
  for (const Member& m : members) {
    fit::NodeConfig n;
    n.id = m.id;
    n.role = m.role;
    n.provider = o.transport;
    n.address = o.transport == fit::Provider::kShm ? private_namespace(o.id) : m.address;
    n.port = static_cast<uint16_t>(port + m.id);
    n.progress = memory_nodes_spin ? fit::Progress::kPolling : fit::Progress::kBlocking;
    n.server_threads = 1;
    // The monitor answers heartbeats and placements, none of them on a miss's path.
    if (n.role == fit::Role::kMonitor) n.progress = fit::Progress::kBlocking;
    // The processor's threads wait for their own replies: they spin, as with one node.
    if (n.role == fit::Role::kProcessor) n.progress = fit::Progress::kPolling;
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
  if (monitor) {
    // First: the memory nodes register with it as they start.
    mond_log_ = o.dir + "/lego-mond.log";
    mond_ = start_daemon(
        o.mond_path,
        {"lego-mond", "--config", config_path_, "--node", std::to_string(kPrivateMonitorNode)},
        mond_log_, ns[static_cast<size_t>(mems)]);
    if (mond_ < 0) {
      show_logs();
      return Status(EIO, "the private monitor did not start (its log is above)");
    }
  }
  for (int i = 0; i < mems; i++) {
    const std::string id = std::to_string(private_memory_node(i));
    memd_logs_.push_back(o.dir + "/lego-memd" + (i == 0 ? "" : "-" + id) + ".log");
    memd_.push_back(start_daemon(o.memd_path,
                                 {"lego-memd", "--config", config_path_, "--node", id, "--capacity",
                                  std::to_string(o.memory_capacity)},
                                 memd_logs_.back(), ns[static_cast<size_t>(i)]));
    if (memd_.back() < 0) {
      show_logs();
      return Status(EIO, "private memory node " + id + " did not start (its log is above)");
    }
  }
  if (!o.export_dir.empty()) {
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

int PrivateCluster::memory_exited() {
  for (pid_t& p : memd_) {
    if (p > 0 && waitpid(p, nullptr, WNOHANG) == p) {
      p = -1;
      memd_exited_++;
    }
  }
  return memd_exited_;
}

std::string PrivateCluster::memory_namespace(int index) const {
  if (network_ == nullptr) return "";
  return network_->name(memd_.size() > 1 ? index : 0);
}

void PrivateCluster::show_logs() const {
  for (size_t i = 0; i < memd_logs_.size(); i++) {
    show_log(memd_logs_[i], options_.who,
             i == 0 ? "lego-memd" : "lego-memd " + std::to_string(private_memory_node(int(i))));
  }
  if (!mond_log_.empty()) show_log(mond_log_, options_.who, "lego-mond");
  if (!stord_log_.empty()) show_log(stord_log_, options_.who, "lego-stord");
}

void PrivateCluster::stop() {
  // Told all at once, then waited for: each takes a few ms to stop (libfabric's teardown),
  // which one after another cost --memory-nodes 3 ~30 ms per run. The monitor last: the
  // memory nodes may still talk to it as they stop.
  if (stord_ > 0) kill(stord_, SIGTERM);
  for (pid_t p : memd_) {
    if (p > 0) kill(p, SIGTERM);
  }
  stop_process(stord_);
  stord_ = -1;
  if (!stord_log_.empty()) unlink(stord_log_.c_str());
  stord_log_.clear();
  for (pid_t& p : memd_) {
    stop_process(p);
    p = -1;
  }
  stop_process(mond_);
  mond_ = -1;
  // Deleting the namespace takes the veth pair with it: no link to remove here.
  network_.reset();
  namespace_.clear();
}

}  // namespace lego::launch
