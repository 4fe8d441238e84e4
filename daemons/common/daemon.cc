// The daemons' shared plumbing (include/lego/daemon.h).
#include "lego/daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>

#include "lego/startup_trace.h"

namespace lego::daemon {
namespace {

const char* g_program = "lego";
std::atomic<bool> g_stop{false};
// The self-pipe that wakes run_until_stopped(): the stop handler writes a byte to [1].
int g_wake[2] = {-1, -1};

void on_stop_signal(int) {
  g_stop = true;
  const int saved = errno;  // write() may change it under the interrupted code
  if (g_wake[1] >= 0) (void)!write(g_wake[1], "x", 1);
  errno = saved;
}

}  // namespace

void set_program(const char* name) {
  g_program = name;
}

void die(const std::string& msg, int code) {
  fprintf(stderr, "%s: %s\n", g_program, msg.c_str());
  exit(code);
}

long number(const char* flag, const char* text, long lo, long hi) {
  return flags::number(flag, text, lo, hi);
}

uint64_t size(const char* flag, const char* text) {
  return flags::size(flag, text);
}

int parse_flags(int argc, char** argv, const char* program, const char* usage,
                const std::vector<Flag>& table) {
  set_program(program);
  return flags::parse(argc, argv, {program, usage, kExitUsage, false}, table);
}

std::vector<Flag> node_flags(NodeFlags& f, bool with_status) {
  std::vector<Flag> flags = {
      {"config", true, [&f](const char* a) { f.config = a; }},
      {"node", true, [&f](const char* a) { f.node = number("--node", a, 0, 65535); }},
      {"ready-fd", true,
       [&f](const char* a) { f.ready_fd = static_cast<int>(number("--ready-fd", a, 0, 65535)); }},
  };
  if (with_status) {
    flags.push_back({"status", false, [&f](const char*) { f.status = true; }});
    flags.push_back({"as", true, [&f](const char* a) { f.as = number("--as", a, 0, 65535); }});
  }
  return flags;
}

fit::ClusterConfig load_config(const std::string& path) {
  auto config = fit::ClusterConfig::parse_file(path);
  if (!config) die(config.status().message(), kExitUsage);
  return std::move(config.value());
}

fit::ClusterConfig load_node_config(int argc, char** argv, int first, const NodeFlags& f) {
  if (first < argc) {
    die(std::string("unexpected argument '") + argv[first] + "' (see --help)", kExitUsage);
  }
  if (f.config.empty() || f.node < 0) {
    die("--config and --node are required (see --help)", kExitUsage);
  }
  fit::ClusterConfig config = load_config(f.config);
  if (config.find(static_cast<fit::NodeId>(f.node)) == nullptr) {
    die("node " + std::to_string(f.node) + " is not in " + f.config, kExitUsage);
  }
  return config;
}

const fit::NodeConfig& node_of_role(const fit::ClusterConfig& config, const std::string& path,
                                    long id, fit::Role role) {
  const fit::NodeConfig* n = config.find(static_cast<fit::NodeId>(id));
  if (n == nullptr) die("node " + std::to_string(id) + " is not in " + path, kExitUsage);
  if (n->role != role) {
    die("node " + std::to_string(id) + " is a " + fit::role_name(n->role) + " node in " + path +
            ", not a " + fit::role_name(role) + " node",
        kExitUsage);
  }
  return *n;
}

int print_status(const fit::ClusterConfig& config, fit::NodeId node, long as, uint16_t opcode,
                 const char* what) {
  fit::NodeId me;
  if (as >= 0) {
    me = static_cast<fit::NodeId>(as);
  } else {
    const fit::NodeConfig* p = config.first_of(fit::Role::kProcessor);
    if (p == nullptr) {
      die("--status needs --as ID: the cluster file has no processor node", kExitUsage);
    }
    me = p->id;
  }
  auto client = fit::Node::create(config, me);
  if (!client) die(client.status().message());
  std::vector<std::byte> reply(config.max_message_bytes);
  auto r = client.value()->send_reply(node, opcode, {}, reply);
  if (!r) die(std::string(what) + " " + std::to_string(node) + ": " + r.status().message());
  fwrite(reply.data(), 1, r.value(), stdout);
  return 0;
}

uint64_t raise_fd_limit() {
  struct rlimit nofile {};
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    (void)setrlimit(RLIMIT_NOFILE, &nofile);
  }
  (void)getrlimit(RLIMIT_NOFILE, &nofile);
  return nofile.rlim_cur;
}

void ignore_sigpipe() {
  signal(SIGPIPE, SIG_IGN);
}

void install_stop_handlers() {
  ignore_sigpipe();
  // Non-blocking: a handler never waits on a full pipe (one byte is enough to wake).
  if (g_wake[0] < 0 && pipe2(g_wake, O_CLOEXEC | O_NONBLOCK) != 0) {
    die(std::string("cannot make the stop pipe: ") + strerror(errno));
  }
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

bool stop_requested() {
  return g_stop.load();
}

void run_until_stopped(std::chrono::milliseconds period, const std::function<void()>& tick) {
  using Clock = std::chrono::steady_clock;
  auto next = Clock::now() + period;
  while (!stop_requested()) {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(next - Clock::now()).count();
    if (left > 0) {
      // Sleeps until the tick is due or a stop signal writes to the pipe (without
      // install_stop_handlers() there is no pipe: poll with no descriptor just sleeps).
      pollfd p{g_wake[0], POLLIN, 0};
      (void)poll(&p, g_wake[0] >= 0 ? 1 : 0, static_cast<int>(left));
      continue;  // stopped, interrupted or due: the loop's checks decide
    }
    if (tick) tick();
    next += period;
    // A tick that overran a whole period does not make the next ones come in a burst.
    if (next < Clock::now()) next = Clock::now() + period;
  }
}

void signal_ready(int fd) {
  if (fd < 0) return;
  (void)!write(fd, "ready\n", 6);
  close(fd);
}

int run_node(int argc, char** argv, const NodeDaemon& d) {
  startup_mark("node: start");
  NodeFlags f;
  std::vector<Flag> flags = node_flags(f, true);
  std::string metrics_address;
  flags.push_back({"metrics", true, [&](const char* a) { metrics_address = a; }});
  flags.insert(flags.end(), d.flags.begin(), d.flags.end());
  const int first = parse_flags(argc, argv, d.program, d.usage, flags);
  fit::ClusterConfig config = load_node_config(argc, argv, first, f);
  const auto id = static_cast<fit::NodeId>(f.node);
  const std::string what = std::string(fit::role_name(d.role)) + " node";
  if (f.status) return print_status(config, id, f.as, d.status_opcode, what.c_str());
  const fit::NodeConfig& me = node_of_role(config, f.config, f.node, d.role);
  if (!metrics_address.empty()) {
    if (Status st = metrics::MetricsServer::check_address(metrics_address); !st) {
      die(st.message(), kExitUsage);
    }
  }

  install_stop_handlers();
  // Every connection is a descriptor (and for lego-stord every open file of every
  // client): take all we may, so that clients are not refused while peers hold
  // connections open (at most 256 unauthenticated ones, see fit.h).
  const uint64_t fd_limit = raise_fd_limit();
  // Declared before the node: destroyed after it, so no handler outlives its service.
  Service service = d.start(me);
  auto node = fit::Node::create(config, id);
  if (!node) die(node.status().message());
  if (service.serve) service.serve(*node.value());
  Status st = node.value()->start();
  if (!st) die(st.message());
  fprintf(stderr, "%s: node %ld serving%s%s at %s:%u (%s, %s)%s, %llu descriptors\n", d.program,
          f.node, service.serving.empty() ? "" : " ", service.serving.c_str(), me.address.c_str(),
          me.port, fit::provider_name(me.provider), fit::progress_name(me.progress),
          service.details.c_str(), static_cast<unsigned long long>(fd_limit));
  // Metrics on a thread of their own: a scraper never holds up a FIT server thread.
  std::unique_ptr<metrics::MetricsServer> metrics_server;
  if (!metrics_address.empty()) {
    std::string prefix = d.program;  // "lego-memd" -> "lego_memd_"
    for (char& c : prefix) c = c == '-' ? '_' : c;
    prefix += "_";
    const fit::Node* n = node.value().get();
    auto render = [&service, n, prefix] {
      metrics::Exposition e(prefix);
      if (service.metrics) service.metrics(e);
      e.set_prefix(prefix + "fit_");
      const fit::FitStats s = n->stats();
#define LEGO_FIT_METRIC(name, type, doc) e.add(#name, #type, doc, s.name);
      LEGO_FIT_COUNTERS(LEGO_FIT_METRIC)
#undef LEGO_FIT_METRIC
      return e.text();
    };
    auto server = metrics::MetricsServer::start(metrics_address, render);
    if (!server) {
      die(server.status().message(), server.status().code() == EINVAL ? kExitUsage : kExitFailure);
    }
    metrics_server = std::move(server.value());
    fprintf(stderr, "%s: node %ld metrics at http://%s/metrics (port %u)\n", d.program, f.node,
            metrics_address.c_str(), metrics_server->port());
  }
  if (service.started) service.started(*node.value());
  startup_mark("node: serving");
  signal_ready(f.ready_fd);
  run_until_stopped(kTickPeriod, service.tick);
  startup_mark("node: stop requested");
  fprintf(stderr, "%s: node %ld stopping\n", d.program, f.node);
  if (service.stopping) service.stopping();
  metrics_server.reset();
  node.value()->stop();
  startup_mark("node: stopped");
  return 0;
}

}  // namespace lego::daemon
