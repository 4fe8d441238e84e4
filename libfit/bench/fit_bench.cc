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
#include "lego/units.h"
#include "libfit/bench/floors.h"

using namespace lego;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint16_t kEcho = 1;

const char* kUsage = R"(usage: fit-bench [options]

Measures libfit round trips (64 B and 4 KiB) and throughput, and in the same run the
floors for the same transport: libfabric's fi_pingpong and a busy-polled TCP socket.

options:
  --providers LIST   comma-separated: tcp,ofi_tcp,shm,verbs (default: tcp,ofi_tcp,shm);
                     tcp is libfit's own sockets, ofi_tcp libfabric's tcp provider
  --sizes LIST       message sizes in bytes (default: 64,4096)
  --iterations N     round trips per figure (default: 20000)
  --loopback         keep the server in this network namespace (default: a separate
                     namespace joined by veth; needs root)
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
      {"csv", true, [&](const char* a) { o.csv = a; }},
      {"serve", false, [&](const char*) { o.serve = true; }},
      {"config", true, [&](const char* a) { o.config = a; }},
      {"node", true,
       [&](const char* a) { o.node = static_cast<int>(flags::number("--node", a, 0, 65535)); }},
  };
  const int first = flags::parse(argc, argv, {"fit-bench", kUsage, 2, false}, table);
  if (first < argc) die(std::string("unexpected argument '") + argv[first] + "' (see --help)");
  if (o.serve && (o.config.empty() || o.node < 0)) die("--serve needs --config and --node");
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
  Status st = node.value()->start();
  if (!st) die(st.message());
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

Result<double> libfit_rtt(fit::Node& client, size_t size, int iterations) {
  std::vector<std::byte> req(size, std::byte{7}), reply(size);
  int warmup = std::max(100, iterations / 10);
  for (int i = 0; i < warmup; i++) {
    auto r = client.send_reply(2, kEcho, req, reply);
    if (!r) return r.status();
  }
  // Median of batches: robust to the scheduling noise of a shared 2-core VM.
  std::vector<double> batches;
  int per_batch = std::max(10, iterations / 20);
  for (int done = 0; done < iterations; done += per_batch) {
    auto t0 = Clock::now();
    for (int i = 0; i < per_batch; i++) {
      auto r = client.send_reply(2, kEcho, req, reply);
      if (!r) return r.status();
    }
    batches.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() /
                      per_batch);
  }
  return median(batches);
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
  bool need_ns =
      !o.loopback && std::any_of(o.providers.begin(), o.providers.end(),
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
  for (const fit::Provider p : o.providers) {
    const std::string provider = fit::provider_name(p);
    bool shm = p == fit::Provider::kShm;
    fit::ClusterConfig config;
    config.key.resize(32);
    for (auto& b : config.key) b = static_cast<uint8_t>(rand());
    config.origin = "fit-bench";
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
    fprintf(stderr, "fit-bench: %s: measuring libfit...\n", provider.c_str());
    for (size_t size : o.sizes) {
      auto rtt = libfit_rtt(*client.value(), size, o.iterations);
      if (!rtt) die("libfit " + provider + ": " + rtt.status().message());
      rows.push_back({provider, size, "libfit", rtt.value()});
      auto tput = libfit_throughput(*client.value(), size, o.iterations);
      if (!tput) die("libfit " + provider + " throughput: " + tput.status().message());
      throughput[provider + "/" + std::to_string(size)] = tput.value();
    }
    client.value().reset();
    server.stop();
    unlink(path.c_str());

    fprintf(stderr, "fit-bench: %s: measuring fi_pingpong...\n", provider.c_str());
    for (size_t size : o.sizes) {
      // libfabric's provider for this transport: libfit's own "tcp" is compared with
      // libfabric's tcp too.
      std::string ofi = p == fit::Provider::kShm     ? "shm"
                        : p == fit::Provider::kVerbs ? "verbs"
                                                     : "tcp";
      auto fp = bench::fi_pingpong_rtt_us(ofi, shm ? "rdm" : "msg", size, o.iterations,
                                          shm ? "" : server_ns, shm ? "127.0.0.1" : server_addr,
                                          static_cast<uint16_t>(port + 6));
      if (!fp) die("fi_pingpong " + provider + ": " + fp.status().message());
      rows.push_back({provider, size, "fi_pingpong", fp.value()});
    }
    if (!shm) {
      fprintf(stderr, "fit-bench: %s: measuring a busy-polled TCP socket...\n", provider.c_str());
      for (size_t size : o.sizes) {
        auto tcp = bench::tcp_busypoll_rtt_us(server_ns, server_addr,
                                              static_cast<uint16_t>(port + 5), size, o.iterations);
        if (!tcp) die("tcp busy-poll: " + tcp.status().message());
        rows.push_back({provider, size, "tcp_busypoll", tcp.value()});
      }
    }
  }

  printf("\nfit-bench: round trips, median µs (%s; %d iterations)\n",
         g_network ? "server in another network namespace" : "loopback", o.iterations);
  printf("%-6s %8s %12s %12s %12s %14s %12s\n", "xport", "bytes", "libfit", "fi_pingpong",
         "tcp_busypoll", "libfit/best", "libfit Mmsg/s");
  for (const fit::Provider p : o.providers) {
    const std::string provider = fit::provider_name(p);
    for (size_t size : o.sizes) {
      double lf = 0, fp = 0, tcp = 0;
      for (auto& r : rows) {
        if (r.transport != provider || r.size != size) continue;
        if (r.system == "libfit") lf = r.rtt_us;
        if (r.system == "fi_pingpong") fp = r.rtt_us;
        if (r.system == "tcp_busypoll") tcp = r.rtt_us;
      }
      double best = fp;
      if (tcp > 0 && tcp < best) best = tcp;
      char tcp_s[32] = "-";
      if (tcp > 0) snprintf(tcp_s, sizeof(tcp_s), "%.2f", tcp);
      printf("%-6s %8zu %12.2f %12.2f %12s %13.2fx %12.3f\n", provider.c_str(), size, lf, fp, tcp_s,
             lf / best, throughput[provider + "/" + std::to_string(size)] / 1e6);
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
