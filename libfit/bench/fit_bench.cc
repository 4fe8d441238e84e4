// fit-bench: libfit's round-trip latency and throughput, side by side with the floors
// under it: libfabric's own fi_pingpong for the same provider and endpoint type, and a
// raw busy-polling TCP socket ping-pong. Prints each figure and the ratio libfit/floor.
//
// By default the server side runs in another network namespace (a veth pair away), as
// lego's nodes do; --loopback keeps everything in this namespace.
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fcntl.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "lego/flags.h"
#include "lego/netns.h"
#include "lego/progress.h"
#include "lego/units.h"
#include "libfit/bench/floors.h"

using namespace lego;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint16_t kEcho = 1;
constexpr uint16_t kRegion = 2;  // replies the RemoteRegion of the server's exposed buffer
constexpr uint16_t kGet = 3;     // uint64 offset, uint32 length: replies those region bytes
constexpr uint16_t kPut = 4;     // uint64 offset, uint32 length, the bytes: stored there
constexpr size_t kRegionBytes = 1 << 20;

const char* kUsage = R"(usage: fit-bench [options]

Measures libfit round trips (64 B and 4 KiB) and throughput, and in the same run the
floors for the same transport: libfabric's fi_pingpong and a busy-polled TCP socket.
Beside each send_reply round trip, the same bytes moved both ways into memory the server
registered: by request (get: a small request answered with SIZE bytes the server copies
from its region, as a memory node serves a fetch; put: SIZE bytes in a request the server
copies in, as a write-back) and one-sided (Node::rma_read / rma_write), each waited for:
what a data path would gain or lose with one-sided access.

options:
  --providers LIST   comma-separated: tcp,ofi_tcp,shm,verbs (default: tcp,ofi_tcp,shm);
                     tcp is libfit's own sockets, ofi_tcp libfabric's tcp provider
  --sizes LIST       message sizes in bytes (default: 64,4096)
  --iterations N     round trips per figure (default: 20000)
  --loopback         keep the server in this network namespace (default: a separate
                     namespace joined by veth; needs root)
  --addresses C,S    the client at address C and the server at S, both in this network
                     namespace: two NICs of this host, e.g. two soft-RoCE devices (rxe)
                     on the two ends of a veth pair (rxe cannot move into a namespace)
  --csv FILE         also write rows: transport,size_bytes,system,rtt_us
  --help             this text

internal:
  --serve --config FILE --node ID   run an echo server node (fit-bench starts these)
)";

struct Options {
  std::vector<fit::Provider> providers{fit::Provider::kTcp, fit::Provider::kOfiTcp,
                                       fit::Provider::kShm};
  std::vector<size_t> sizes{64, 4096};
  int iterations = 20000;
  bool loopback = false;
  std::string client_address, server_address;  // --addresses
  std::string csv;
  bool serve = false;
  std::string config;
  int node = -1;
};

// The client's and the server's network namespaces (none with --loopback or shm alone).
// Here, not in main(), so that die() removes them too: a run that fails half-way (a
// floor that timed out on a loaded host) left its namespaces behind.
std::unique_ptr<netns::Network> g_network;

[[noreturn]] void die(const std::string& msg) {
  fprintf(stderr, "fit-bench: %s\n", msg.c_str());
  g_network.reset();
  exit(2);
}

constexpr const char* kProviders[] = {"tcp", "ofi_tcp", "shm", "verbs"};

Options parse(int argc, char** argv) {
  Options o;
  const std::vector<flags::Flag> table = {
      {"providers", true,
       [&](const char* a) {
         o.providers.clear();
         for (const std::string& p : flags::list("--providers", a, kProviders)) {
           o.providers.push_back(*fit::parse_provider(p));
         }
       }},
      {"sizes", true,
       [&](const char* a) {
         o.sizes.clear();
         for (auto& s : lego::split_list(a)) {
           o.sizes.push_back(
               static_cast<size_t>(flags::number("--sizes", s.c_str(), 1, 128 * 1024)));
         }
       }},
      {"iterations", true,
       [&](const char* a) {
         o.iterations = static_cast<int>(flags::number("--iterations", a, 10, 100000000));
       }},
      {"loopback", false, [&](const char*) { o.loopback = true; }},
      {"addresses", true,
       [&](const char* a) {
         auto v = lego::split_list(a);
         if (v.size() != 2) die("--addresses takes CLIENT,SERVER (two IP addresses)");
         o.client_address = v[0];
         o.server_address = v[1];
       }},
      {"csv", true, [&](const char* a) { o.csv = a; }},
      {"serve", false, [&](const char*) { o.serve = true; }},
      {"config", true, [&](const char* a) { o.config = a; }},
      {"node", true,
       [&](const char* a) { o.node = static_cast<int>(flags::number("--node", a, 0, 65535)); }},
  };
  const int first = flags::parse(argc, argv, {"fit-bench", kUsage, 2, false}, table);
  if (first < argc) die(std::string("unexpected argument '") + argv[first] + "' (see --help)");
  if (o.serve && (o.config.empty() || o.node < 0)) die("--serve needs --config and --node");
  if (o.loopback && !o.client_address.empty()) die("--loopback and --addresses exclude each other");
  return o;
}

int serve(const Options& o) {
  auto config = fit::ClusterConfig::parse_file(o.config);
  if (!config) die(config.status().message());
  auto node = fit::Node::create(config.value(), static_cast<fit::NodeId>(o.node));
  if (!node) die(node.status().message());
  node.value()->handle(kEcho,
                       [](const fit::RpcContext&, std::span<const std::byte> req,
                          std::span<std::byte> rep) -> Result<size_t> {
                         size_t n = std::min(req.size(), rep.size());
                         memcpy(rep.data(), req.data(), n);
                         return n;
                       });
  // One-sided ops land here; registered after start() (the serving domain's), named by
  // kRegion, which is asked only after "ready".
  static std::vector<std::byte> exposed(kRegionBytes);
  static fit::RemoteRegion remote;
  node.value()->handle(kRegion,
                       [](const fit::RpcContext&, std::span<const std::byte>,
                          std::span<std::byte> rep) -> Result<size_t> {
                         if (rep.size() < sizeof(remote))
                           return Status(EMSGSIZE, "reply too small");
                         memcpy(rep.data(), &remote, sizeof(remote));
                         return sizeof(remote);
                       });
  // A region access's offset and length, checked.
  auto range = [](std::span<const std::byte> req, uint64_t* at, uint32_t* len) {
    if (req.size() < 12) return false;
    memcpy(at, req.data(), 8);
    memcpy(len, req.data() + 8, 4);
    return *at <= kRegionBytes && *len <= kRegionBytes - *at;
  };
  node.value()->handle(kGet,
                       [range](const fit::RpcContext&, std::span<const std::byte> req,
                               std::span<std::byte> rep) -> Result<size_t> {
                         uint64_t at;
                         uint32_t len;
                         if (!range(req, &at, &len) || len > rep.size())
                           return Status(EINVAL, "bad get");
                         memcpy(rep.data(), exposed.data() + at, len);
                         return size_t{len};
                       });
  node.value()->handle(kPut,
                       [range](const fit::RpcContext&, std::span<const std::byte> req,
                               std::span<std::byte>) -> Result<size_t> {
                         uint64_t at;
                         uint32_t len;
                         if (!range(req, &at, &len) || req.size() != 12 + size_t{len})
                           return Status(EINVAL, "bad put");
                         memcpy(exposed.data() + at, req.data() + 12, len);
                         return size_t{0};
                       });
  Status st = node.value()->start();
  if (!st) die(st.message());
  auto mr = node.value()->register_memory(exposed.data(), exposed.size(), true);
  if (!mr) die(mr.status().message());
  remote = mr->remote();
  printf("ready\n");
  fflush(stdout);
  // Serve until the parent closes our stdin (or kills us).
  char buf[16];
  while (read(0, buf, sizeof(buf)) > 0) {
  }
  return 0;
}

struct Row {
  std::string transport;
  size_t size;
  std::string system;
  double rtt_us;
};

// A libfit echo server in another process (and namespace), fed its config by file.
class EchoServer {
 public:
  ~EchoServer() { stop(); }
  Status start(const std::string& config_path, int node, const netns::Network* net, int host) {
    int in[2], out[2];
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) {
      return Status::from_errno(errno, "pipe");
    }
    pid_ = fork();
    if (pid_ < 0) return Status::from_errno(errno, "fork");
    if (pid_ == 0) {
      dup2(in[0], 0);
      dup2(out[1], 1);
      if (net != nullptr && !net->enter(host)) _exit(126);
      std::string node_s = std::to_string(node);
      execl("/proc/self/exe", "fit-bench", "--serve", "--config", config_path.c_str(), "--node",
            node_s.c_str(), nullptr);
      _exit(127);
    }
    close(in[0]);
    close(out[1]);
    stdin_ = in[1];
    char buf[8] = {};
    ssize_t n = read(out[0], buf, 6);
    close(out[0]);
    if (n != 6 || memcmp(buf, "ready\n", 6) != 0) {
      stop();
      return Status(EIO, "the fit-bench echo server did not start (see its error above)");
    }
    return Status();
  }
  void stop() {
    if (stdin_ >= 0) close(stdin_);
    stdin_ = -1;
    if (pid_ > 0) {
      int status;
      for (int i = 0; i < 200 && waitpid(pid_, &status, WNOHANG) == 0; i++) usleep(10000);
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
    }
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
  int stdin_ = -1;
};

double median(std::vector<double>& v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median over batches of the mean time of `one(i)`, after a warm-up: robust to the
// scheduling noise of a shared 2-core VM.
template <typename F>
Result<double> timed(int iterations, F&& one) {
  int warmup = std::max(100, iterations / 10);
  for (int i = 0; i < warmup; i++) LEGO_RETURN_IF_ERROR(one(i));
  std::vector<double> batches;
  int per_batch = std::max(10, iterations / 20);
  for (int done = 0; done < iterations; done += per_batch) {
    auto t0 = Clock::now();
    for (int i = 0; i < per_batch; i++) LEGO_RETURN_IF_ERROR(one(done + i));
    batches.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() /
                      per_batch);
  }
  return median(batches);
}

Status ok_or(const Result<size_t>& r) {
  return r ? Status() : r.status();
}

Result<double> libfit_rtt(fit::Node& client, size_t size, int iterations) {
  std::vector<std::byte> req(size, std::byte{7}), reply(size);
  return timed(iterations, [&](int) { return ok_or(client.send_reply(2, kEcho, req, reply)); });
}

// Where the i-th access of `size` bytes lands in the server's region: spread over it.
uint64_t spread(int i, size_t size) {
  return (static_cast<uint64_t>(i) * 4096 * 7) % (kRegionBytes - size + 1);
}

// The same bytes moved two ways, each waited for. One-sided: rma_read / rma_write of the
// server's region. As requests: kGet (a 12-byte request; the server copies `size` bytes
// of its region into the reply, as a memory node serves a fetch) and kPut (the bytes in
// the request, copied into the region; an empty reply, as a write-back).
Result<double> move_rtt(fit::Node& client, const fit::RemoteRegion& region, size_t size,
                        int iterations, bool write, bool one_sided) {
  std::vector<std::byte> buf(size + 12, std::byte{7});
  if (one_sided) {
    std::span<std::byte> data(buf.data(), size);
    return timed(iterations, [&](int i) {
      return write ? client.rma_write(region, spread(i, size), data)
                   : client.rma_read(region, spread(i, size), data);
    });
  }
  return timed(iterations, [&](int i) {
    uint64_t at = spread(i, size);
    uint32_t len = static_cast<uint32_t>(size);
    memcpy(buf.data(), &at, 8);
    memcpy(buf.data() + 8, &len, 4);
    if (write) return ok_or(client.send_reply(2, kPut, buf, {}));
    return ok_or(
        client.send_reply(2, kGet, std::span<const std::byte>(buf.data(), 12), {buf.data(), size}));
  });
}

// Messages per second with max_outstanding() async calls in flight.
Result<double> libfit_throughput(fit::Node& client, size_t size, int iterations) {
  constexpr int kDepth = fit::Node::max_outstanding();
  std::vector<std::byte> req(size, std::byte{7});
  std::vector<std::vector<std::byte>> replies(kDepth, std::vector<std::byte>(size));
  std::vector<fit::RpcFuture> inflight(kDepth);
  auto t0 = Clock::now();
  for (int i = 0; i < iterations; i++) {
    int k = i % kDepth;
    if (i >= kDepth) {
      auto r = inflight[k].wait();
      if (!r) return r.status();
    }
    inflight[k] = client.send_reply_async(2, kEcho, req, replies[k]);
  }
  for (int k = 0; k < std::min(kDepth, iterations); k++) {
    auto r = inflight[k].wait();
    if (!r) return r.status();
  }
  double s = std::chrono::duration<double>(Clock::now() - t0).count();
  return iterations / s;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  if (o.serve) return serve(o);
  signal(SIGPIPE, SIG_IGN);

  std::string client_addr = "127.0.0.1", server_addr = "127.0.0.1", server_ns;
  if (!o.client_address.empty()) {
    client_addr = o.client_address;
    server_addr = o.server_address;
  }
  bool need_ns = !o.loopback && o.client_address.empty() &&
                 std::any_of(o.providers.begin(), o.providers.end(),
                             [](fit::Provider p) { return p != fit::Provider::kShm; });
  if (need_ns) {
    if (geteuid() != 0) die("separate network namespaces need root (or use --loopback)");
    // Two namespaces on a bridge of their own, the client in the first: as lego's nodes.
    const unsigned me = static_cast<unsigned>(getpid());
    netns::NetworkSpec spec;
    spec.namespaces = {"fitb-" + std::to_string(me) + "-0", "fitb-" + std::to_string(me) + "-1"};
    auto t = netns::Network::create(spec);
    if (!t) die(t.status().message());
    g_network = std::move(t.value());
    client_addr = g_network->address(0);
    server_addr = g_network->address(1);
    server_ns = g_network->name(1);
    Status st = g_network->enter(0);
    if (!st) die(st.message());
  }

  std::vector<Row> rows;
  std::map<std::string, double> throughput;
  uint16_t port = static_cast<uint16_t>(20000 + getpid() % 20000);
  // One step per provider, system and size: a line that updates on a terminal, plain
  // lines in a log.
  size_t steps = 0;
  for (const fit::Provider p : o.providers)
    steps += o.sizes.size() * (p == fit::Provider::kShm ? 2 : 3);
  Progress progress("fit-bench", steps);
  for (const fit::Provider p : o.providers) {
    const std::string provider = fit::provider_name(p);
    bool shm = p == fit::Provider::kShm;
    fit::ClusterConfig config;
    config.key.resize(32);
    for (auto& b : config.key) b = static_cast<uint8_t>(rand());
    config.origin = "fit-bench";
    // A benchmark measures round trips, not timeouts: a call that waits seconds for a
    // descheduled server (a busy host, an emulated guest) must not end the run.
    config.timeout = std::chrono::milliseconds(30000);
    for (int id = 1; id <= 2; id++) {
      fit::NodeConfig n;
      n.id = static_cast<fit::NodeId>(id);
      n.role = id == 1 ? fit::Role::kProcessor : fit::Role::kMemory;
      n.address =
          shm ? "fit-bench-" + std::to_string(getpid()) : (id == 1 ? client_addr : server_addr);
      n.port = static_cast<uint16_t>(port + id);
      n.provider = p;
      n.progress = fit::Progress::kPolling;
      config.nodes.push_back(n);
    }
    port = static_cast<uint16_t>(port + 10);
    std::string path = "/tmp/fit-bench-" + std::to_string(getpid()) + "-" + provider + ".toml";
    {
      std::ofstream f(path);
      f << config.to_toml();
    }
    EchoServer server;
    Status st = server.start(path, 2, shm ? nullptr : g_network.get(), 1);
    if (!st) die(st.message());
    auto client = fit::Node::create(config, 1);
    if (!client) die(client.status().message());
    // Every channel up front: connecting (for verbs: loading libfabric, registering the
    // channel's buffers, the CM exchange) is not what a round trip costs, and under
    // emulation takes longer than a call's timeout.
    if (Status cst = client.value()->connect(2); !cst)
      die("libfit " + provider + ": " + cst.message());
    fit::RemoteRegion region;
    {
      std::vector<std::byte> reply(sizeof(region));
      auto r = client.value()->send_reply(2, kRegion, {}, reply);
      if (!r || r.value() != sizeof(region)) {
        die("libfit " + provider + ": asking for the server's region: " +
            (r ? std::string("short reply") : r.status().message()));
      }
      memcpy(&region, reply.data(), sizeof(region));
    }
    for (size_t size : o.sizes) {
      progress.step(provider + ": libfit, " + std::to_string(size) + " bytes");
      auto rtt = libfit_rtt(*client.value(), size, o.iterations);
      if (!rtt) die("libfit " + provider + ": " + rtt.status().message());
      rows.push_back({provider, size, "libfit", rtt.value()});
      for (bool write : {false, true}) {
        for (bool one_sided : {false, true}) {
          const char* what =
              one_sided ? (write ? "rma_write" : "rma_read") : (write ? "put" : "get");
          auto r = move_rtt(*client.value(), region, size, o.iterations, write, one_sided);
          if (!r) die("libfit " + provider + " " + what + ": " + r.status().message());
          rows.push_back({provider, size, what, r.value()});
        }
      }
      auto tput = libfit_throughput(*client.value(), size, o.iterations);
      if (!tput) die("libfit " + provider + " throughput: " + tput.status().message());
      throughput[provider + "/" + std::to_string(size)] = tput.value();
    }
    client.value().reset();
    server.stop();
    unlink(path.c_str());

    // fi_pingpong's server listens on the first device of its provider unless told which:
    // for verbs, the RDMA device on the server's address (the client's may come first).
    std::string server_domain;
    if (p == fit::Provider::kVerbs) {
      auto dev = bench::rdma_device_of(server_addr);
      if (!dev) die("fi_pingpong verbs: " + dev.status().message());
      server_domain = dev.value();
    }
    for (size_t size : o.sizes) {
      progress.step(provider + ": fi_pingpong, " + std::to_string(size) + " bytes");
      // libfabric's provider for this transport: libfit's own "tcp" is compared with
      // libfabric's tcp too.
      std::string ofi = p == fit::Provider::kShm     ? "shm"
                        : p == fit::Provider::kVerbs ? "verbs"
                                                     : "tcp";
      auto fp = bench::fi_pingpong_rtt_us(ofi, shm ? "rdm" : "msg", size, o.iterations,
                                          shm ? "" : server_ns, shm ? "127.0.0.1" : server_addr,
                                          static_cast<uint16_t>(port + 6), server_domain);
      if (!fp) die("fi_pingpong " + provider + ": " + fp.status().message());
      rows.push_back({provider, size, "fi_pingpong", fp.value()});
    }
    if (!shm) {
      for (size_t size : o.sizes) {
        progress.step(provider + ": busy-polled TCP socket, " + std::to_string(size) + " bytes");
        auto tcp = bench::tcp_busypoll_rtt_us(server_ns, server_addr,
                                              static_cast<uint16_t>(port + 5), size, o.iterations);
        if (!tcp) die("tcp busy-poll: " + tcp.status().message());
        rows.push_back({provider, size, "tcp_busypoll", tcp.value()});
      }
    }
  }

  progress.finish();
  const std::string where = g_network                  ? "server in another network namespace"
                            : o.client_address.empty() ? "loopback"
                                                       : client_addr + " -> " + server_addr;
  printf("\nfit-bench: round trips, median µs (%s; %d iterations)\n", where.c_str(), o.iterations);
  printf(
      "libfit: send_reply echo; get/put: SIZE bytes fetched by / sent in a request (the "
      "server copies them out of / into its registered region); rma_read/rma_write: the "
      "same bytes one-sided, each waited for\n");
  printf("%-7s %7s %9s %11s %12s %9s %9s %9s %9s %10s %9s\n", "xport", "bytes", "libfit",
         "fi_pingpong", "tcp_busypoll", "lf/best", "Mmsg/s", "get", "rma_read", "put", "rma_write");
  for (const fit::Provider p : o.providers) {
    const std::string provider = fit::provider_name(p);
    for (size_t size : o.sizes) {
      std::map<std::string, double> v;
      for (auto& r : rows) {
        if (r.transport == provider && r.size == size) v[r.system] = r.rtt_us;
      }
      double best = v["fi_pingpong"];
      if (v["tcp_busypoll"] > 0 && v["tcp_busypoll"] < best) best = v["tcp_busypoll"];
      char tcp_s[32] = "-";
      if (v["tcp_busypoll"] > 0) snprintf(tcp_s, sizeof(tcp_s), "%.2f", v["tcp_busypoll"]);
      printf("%-7s %7zu %9.2f %11.2f %12s %8.2fx %9.3f %9.2f %9.2f %10.2f %9.2f\n",
             provider.c_str(), size, v["libfit"], v["fi_pingpong"], tcp_s, v["libfit"] / best,
             throughput[provider + "/" + std::to_string(size)] / 1e6, v["get"], v["rma_read"],
             v["put"], v["rma_write"]);
    }
  }
  printf("one-sided vs request, same bytes (rma/request; below 1: one-sided is faster):\n");
  for (const fit::Provider p : o.providers) {
    const std::string provider = fit::provider_name(p);
    for (size_t size : o.sizes) {
      std::map<std::string, double> v;
      for (auto& r : rows) {
        if (r.transport == provider && r.size == size) v[r.system] = r.rtt_us;
      }
      printf("  %-7s %7zu  read %.2fx  write %.2fx\n", provider.c_str(), size,
             v["rma_read"] / v["get"], v["rma_write"] / v["put"]);
    }
  }
  if (!o.csv.empty()) {
    FILE* f = fopen(o.csv.c_str(), "w");
    if (f == nullptr) die("cannot write " + o.csv + ": " + strerror(errno));
    fprintf(f, "transport,size_bytes,system,rtt_us\n");
    for (auto& r : rows) {
      fprintf(f, "%s,%zu,%s,%.3f\n", r.transport.c_str(), r.size, r.system.c_str(), r.rtt_us);
    }
    fclose(f);
    printf("wrote %s\n", o.csv.c_str());
  }
  g_network.reset();
  return 0;
}
