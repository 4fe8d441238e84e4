// lego-bench --only startup: what lego-run adds to a program's start and end.
//
// /bin/true, side by side in each round: alone (local), under lego-run with the embedded
// default over tcp and over shm (a private lego-memd started and stopped by each run),
// with --config against an lego-memd already running (tcp, shm), and the embedded cluster
// of --memory-nodes 3 (tcp, shm: three lego-memd and a lego-mond per run). The median wall time
// of each, its difference from local, and where the time goes: every run is traced with
// LEGO_STARTUP_TRACE (include/lego/startup_trace.h) and the medians of its phases shown.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>

#include "runtime/bench/lego_bench.h"
#include "runtime/launcher/private_cluster.h"

namespace lego::bench {
namespace {

using Clock = std::chrono::steady_clock;

// A phase: from the first line whose text is `from` to the first `to` after it.
struct Phase {
  const char* name;
  const char* from;
  const char* to;
};
constexpr const char* kSpan = "lego-run, first to last mark";
constexpr Phase kPhases[] = {
    {kSpan, "lego-run: start", "lego-run: exit"},
    {"lego-run set-up", "lego-run: start", "lego-run: starting the program"},
    {"  netns+veth", "lego-run: start", "lego-run: network namespace made"},
    {"  lego-memd start", "node: start", "node: serving"},
    {"runtime start", "lego-run: starting the program", "runtime: ready"},
    {"  libfabric load", "runtime: node created", "libfit: libfabric loaded"},
    {"  connect+open", "runtime: node created", "runtime: space opened"},
    {"program", "runtime: ready", "runtime: exit"},
    {"end", "runtime: exit", "lego-run: exit"},
    {"  exit seen", "runtime: exit", "lego-run: the program exited"},
    {"  cluster stop", "lego-run: spaces freed", "lego-run: cluster stopped"},
    {"  memd stop", "node: stop requested", "node: stopped"},
};
// Not between two marks: the wall time outside lego-run's first and last (exec and
// loading of lego-run, its exit).
constexpr const char* kOutside = "outside the marks";

// Milliseconds of each phase in one run's trace (missing phases are absent).
std::map<std::string, double> phases_of(const std::string& trace) {
  std::ifstream in(trace);
  std::vector<std::pair<long long, std::string>> marks;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream s(line);
    long long ns = 0;
    int pid = 0;
    if (!(s >> ns >> pid)) continue;
    std::string what;
    std::getline(s >> std::ws, what);
    marks.emplace_back(ns, what);
  }
  std::map<std::string, double> out;
  for (const Phase& p : kPhases) {
    for (size_t i = 0; i < marks.size(); i++) {
      if (marks[i].second != p.from) continue;
      for (size_t j = i; j < marks.size(); j++) {
        if (marks[j].second == p.to) {
          out[p.name] = (marks[j].first - marks[i].first) / 1e6;
          break;
        }
      }
      break;
    }
  }
  return out;
}

double median(std::vector<double> v) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// Runs argv with LEGO_STARTUP_TRACE=trace (emptied first); wall milliseconds, or -1.
double timed_run(const std::vector<std::string>& argv, const std::string& trace,
                 std::string* error) {
  unlink(trace.c_str());
  std::vector<char*> a;
  for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
  a.push_back(nullptr);
  const auto t0 = Clock::now();
  pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    setenv("LEGO_STARTUP_TRACE", trace.c_str(), 1);
    int null = open("/dev/null", O_WRONLY);
    if (null >= 0) dup2(null, 1);
    execv(a[0], a.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    *error = argv[0] + " exited with status " + std::to_string(WEXITSTATUS(status));
    return -1;
  }
  return ms;
}

}  // namespace

std::vector<StartupRow> run_startup(const std::string& lego_run, int runs) {
  char tmpl[] = "/tmp/lego-bench-startup-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) die("mkdtemp failed");
  const std::string dir = tmpl;
  const std::string memd = lego_run.substr(0, lego_run.rfind('/')) + "/../daemons/memory/lego-memd";
  const char* env_memd = getenv("LEGO_MEMD");
  // The memory nodes the --config runs join, running all along (as a user's would).
  std::map<std::string, std::unique_ptr<launch::PrivateCluster>> clusters;
  for (const char* t : {"tcp", "shm"}) {
    const std::string sub = dir + "/" + t;
    mkdir(sub.c_str(), 0700);
    launch::PrivateClusterOptions o;
    o.dir = sub;
    o.transport = strcmp(t, "tcp") == 0 ? fit::Provider::kTcp : fit::Provider::kShm;
    o.memd_path = env_memd != nullptr ? env_memd : memd;
    o.memory_capacity = uint64_t{1} << 30;
    // Distinct names and ports from this process's (and any lego-run's) own.
    o.id = getpid() + (strcmp(t, "tcp") == 0 ? 1000003 : 2000003);
    o.who = "lego-bench";
    auto c = launch::PrivateCluster::start(o);
    if (!c)
      die("cannot start the memory node for --config " + std::string(t) + ": " +
          c.status().message());
    clusters[t] = std::move(c.value());
  }
  struct System {
    const char* name;
    std::vector<std::string> argv;
  };
  const std::vector<System> systems = {
      {"local", {"/bin/true"}},
      {"lego_tcp", {lego_run, "--transport", "tcp", "--", "/bin/true"}},
      {"lego_shm", {lego_run, "--transport", "shm", "--", "/bin/true"}},
      {"config_tcp", {lego_run, "--config", clusters["tcp"]->config_path(), "--", "/bin/true"}},
      {"config_shm", {lego_run, "--config", clusters["shm"]->config_path(), "--", "/bin/true"}},
      // The embedded cluster: three lego-memd and a lego-mond started and stopped per run.
      {"nodes3_tcp", {lego_run, "--memory-nodes", "3", "--transport", "tcp", "--", "/bin/true"}},
      {"nodes3_shm", {lego_run, "--memory-nodes", "3", "--transport", "shm", "--", "/bin/true"}},
  };
  std::vector<StartupRow> rows(systems.size());
  std::vector<std::vector<double>> wall(systems.size());
  std::vector<std::map<std::string, std::vector<double>>> parts(systems.size());
  const std::string trace = dir + "/trace";
  for (int r = 0; r < runs; r++) {
    fprintf(stderr, "lego-bench: startup, round %d of %d...\n", r + 1, runs);
    for (size_t i = 0; i < systems.size(); i++) {
      std::string error;
      const double ms = timed_run(systems[i].argv, trace, &error);
      if (ms < 0) {
        rows[i].error = error;
        continue;
      }
      wall[i].push_back(ms);
      auto ph = phases_of(trace);
      for (auto& [name, v] : ph) parts[i][name].push_back(v);
      if (auto span = ph.find(kSpan); span != ph.end()) {
        parts[i][kOutside].push_back(ms - span->second);
      }
    }
  }
  for (size_t i = 0; i < systems.size(); i++) {
    rows[i].system = systems[i].name;
    rows[i].runs = static_cast<int>(wall[i].size());
    rows[i].median_ms = median(wall[i]);
    for (const Phase& p : kPhases) {
      auto it = parts[i].find(p.name);
      if (it != parts[i].end()) rows[i].phases.emplace_back(p.name, median(it->second));
    }
    if (auto it = parts[i].find(kOutside); it != parts[i].end()) {
      rows[i].phases.emplace_back(kOutside, median(it->second));
    }
  }
  clusters.clear();
  unlink(trace.c_str());
  std::string rm = "rm -rf '" + dir + "'";
  if (system(rm.c_str()) != 0) fprintf(stderr, "lego-bench: could not remove %s\n", dir.c_str());
  return rows;
}

void print_startup(const std::vector<StartupRow>& rows) {
  double local = -1;
  for (auto& r : rows) {
    if (r.system == "local") local = r.median_ms;
  }
  printf("\nlego-bench: start-up, /bin/true, median wall ms of %d runs each (side by side)\n",
         rows.empty() ? 0 : rows[0].runs);
  printf("%-11s %10s %12s %9s\n", "system", "ms", "added ms", "vs local");
  for (auto& r : rows) {
    if (r.runs == 0) {
      printf("%-11s %10s  (%s)\n", r.system.c_str(), "failed", r.error.c_str());
      continue;
    }
    char added[32] = "-", ratio[32] = "-";
    if (local > 0 && r.system != "local") {
      snprintf(added, sizeof added, "%.1f", r.median_ms - local);
      snprintf(ratio, sizeof ratio, "%.1fx", r.median_ms / local);
    }
    printf("%-11s %10.1f %12s %9s\n", r.system.c_str(), r.median_ms, added, ratio);
  }
  printf(
      "\nwhere the time goes (median ms per phase, from LEGO_STARTUP_TRACE; indented: part "
      "of the phase above)\n");
  printf("%-20s", "phase");
  for (auto& r : rows) {
    if (r.system != "local") printf(" %11s", r.system.c_str());
  }
  printf("\n");
  std::vector<std::string> names;
  for (const Phase& p : kPhases) {
    if (strcmp(p.name, kSpan) != 0) names.push_back(p.name);
  }
  names.push_back(kOutside);
  for (auto& n : names) {
    bool any = false;
    for (auto& r : rows) {
      for (auto& [pn, pv] : r.phases) any = any || pn == n;
    }
    if (!any) continue;
    printf("%-20s", n.c_str());
    for (auto& r : rows) {
      if (r.system == "local") continue;
      double v = -1;
      for (auto& [pn, pv] : r.phases) {
        if (pn == n) v = pv;
      }
      if (v < 0) {
        printf(" %11s", "-");
      } else {
        printf(" %11.1f", v);
      }
    }
    printf("\n");
  }
}

}  // namespace lego::bench
