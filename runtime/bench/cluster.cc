// lego-bench's cluster rows (runtime/bench/lego_bench.h): replication's cost, failover
// time and re-replication speed, each a lego-run of the random read-modify-write worker
// over a private cluster (--memory-nodes, --replicas).
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "runtime/bench/lego_bench.h"

namespace lego::bench {
namespace {

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000 + uint64_t(ts.tv_nsec);
}

// The first lego-memd whose parent is `parent` (lego-run starts its private ones), or -1.
pid_t child_memd(pid_t parent) {
  pid_t found = -1;
  DIR* d = opendir("/proc");
  if (d == nullptr) return -1;
  while (dirent* e = readdir(d)) {
    const pid_t p = static_cast<pid_t>(atoi(e->d_name));
    if (p <= 0) continue;
    std::ifstream f("/proc/" + std::string(e->d_name) + "/stat");
    std::string line;
    if (!std::getline(f, line)) continue;
    const size_t open = line.find('('), close = line.rfind(')');
    if (open == std::string::npos || close == std::string::npos) continue;
    const std::string comm = line.substr(open + 1, close - open - 1);
    std::istringstream rest(line.substr(close + 2));
    char state;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (comm == "lego-memd" && ppid == parent && (found < 0 || p < found)) found = p;
  }
  closedir(d);
  return found;
}

// "  NAME   VALUE" in lego-run --stats output: VALUE, or -1.
double stat_value(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    std::istringstream l(line);
    std::string k;
    double v;
    if (l >> k >> v && k == name) return v;
  }
  return -1;
}

double figure(const std::string& text, const std::string& key) {
  const size_t at = text.find(key + " ");
  return at == std::string::npos ? -1 : strtod(text.c_str() + at + key.size() + 1, nullptr);
}

// lego-run ARGS with the worker in failover mode: a memory node SIGKILLed once the loop
// runs. Fills the row's failover figures.
void failover_run(const std::vector<std::string>& argv, ClusterRow* row) {
  char dir[] = "/tmp/lego-bench-failover.XXXXXX";
  if (mkdtemp(dir) == nullptr) die("mkdtemp");
  const std::string file = std::string(dir) + "/kill", err = std::string(dir) + "/stderr";
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) die("pipe");
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (e >= 0) dup2(e, 2);
    setenv("LEGO_BENCH_FAILOVER", file.c_str(), 1);
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execv(a[0], a.data());
    _exit(127);
  }
  close(out[1]);
  // The loop runs (the heap is filled and placed): kill a memory node half a second in.
  for (int i = 0; i < 12000 && access((file + ".running").c_str(), F_OK) != 0; i++) {
    usleep(10000);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const pid_t memd = child_memd(pid);
  if (memd > 0) {
    const uint64_t t = now_ns();
    kill(memd, SIGKILL);
    std::ofstream(file + ".tmp") << t << "\n";
    rename((file + ".tmp").c_str(), file.c_str());
  }
  std::string text;
  char buf[512];
  for (ssize_t n; (n = read(out[0], buf, sizeof buf)) > 0;) text.append(buf, size_t(n));
  close(out[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  std::ifstream ef(err);
  std::stringstream es;
  es << ef.rdbuf();
  const std::string stats = es.str();
  if (memd <= 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    row->o.error =
        memd <= 0 ? "no lego-memd to kill"
                  : "exit status " + std::to_string(WIFEXITED(status) ? WEXITSTATUS(status)
                                                                      : 128 + WTERMSIG(status));
    fprintf(stderr, "%s", stats.c_str());
  } else {
    row->o.ok = true;
    row->o.us = figure(text, "us_per_access");
    row->failover_ms = figure(text, "failover_ms");
    row->before_us = figure(text, "us_per_access_before_kill");
    row->after_us = figure(text, "us_per_access_after_kill");
    const double bytes = stat_value(stats, "bytes_copied"), ms = stat_value(stats, "copy_ms");
    row->copied_mb = bytes / 1e6;
    row->copy_mb_s = ms > 0 ? bytes / 1e6 / (ms / 1e3) : -1;
  }
  unlink((file + ".running").c_str());
  unlink(file.c_str());
  unlink(err.c_str());
  rmdir(dir);
}

}  // namespace

std::vector<ClusterRow> run_cluster(const ClusterOptions& co, const std::string& self,
                                    const std::string& lego_run) {
  std::vector<ClusterRow> rows;
  const uint64_t heap = static_cast<uint64_t>(double(co.cap) / co.fraction) & ~uint64_t{kPage - 1};
  const std::vector<std::string> worker{self, "--worker", "random", std::to_string(heap),
                                        std::to_string(co.accesses)};
  auto lego = [&](const std::string& transport, int nodes, uint32_t replicas, bool stats) {
    std::vector<std::string> a{lego_run,
                               "--excache",
                               std::to_string(co.cap),
                               "--delivery",
                               "sigbus",
                               "--transport",
                               transport,
                               "--memory-nodes",
                               std::to_string(nodes),
                               "--replicas",
                               std::to_string(replicas),
                               "--memory-capacity",
                               std::to_string(heap * 2 + (256 << 20))};
    if (stats) a.push_back("--stats");
    a.push_back("--");
    a.insert(a.end(), worker.begin(), worker.end());
    return a;
  };
  // Replication's cost: the same run with 1 and with R copies, per transport.
  for (const std::string& t : co.transports) {
    for (uint32_t r : {uint32_t{1}, co.replicas}) {
      fprintf(stderr,
              "lego-bench: cluster, random, %.0f%% local, %s, %d memory nodes, %u "
              "replica%s...\n",
              co.fraction * 100, t.c_str(), co.memory_nodes, r, r == 1 ? "" : "s");
      ClusterRow row;
      row.what = "replication";
      row.transport = t;
      row.memory_nodes = co.memory_nodes;
      row.replicas = r;
      row.o = run(lego(t, co.memory_nodes, r, false), "");
      rows.push_back(row);
      if (co.replicas == 1) break;
    }
  }
  // Failover and re-replication: a memory node SIGKILLed mid-run (tcp: lego-run's default).
  if (co.replicas >= 2) {
    fprintf(stderr, "lego-bench: cluster, failover: SIGKILL of a memory node mid-run...\n");
    ClusterRow row;
    row.what = "failover";
    row.transport = "tcp";
    row.memory_nodes = co.memory_nodes;
    row.replicas = co.replicas;
    failover_run(lego("tcp", co.memory_nodes, co.replicas, true), &row);
    rows.push_back(row);
  }
  return rows;
}

void print_cluster(const ClusterOptions& co, const std::vector<ClusterRow>& rows) {
  printf("\nlego-bench: the cluster, random read-modify-write, %.0f%% local (cap %s)\n",
         co.fraction * 100, std::to_string(co.cap >> 20).append(" MiB").c_str());
  printf("%-12s %-9s %6s %8s %12s %10s\n", "row", "transport", "nodes", "replicas", "us/access",
         "vs R=1");
  for (const ClusterRow& r : rows) {
    if (r.what != "replication") continue;
    if (!r.o.ok) {
      printf("%-12s %-9s %6d %8u %12s  (%s)\n", r.what.c_str(), r.transport.c_str(), r.memory_nodes,
             r.replicas, "failed", r.o.error.c_str());
      continue;
    }
    double base = 0;
    for (const ClusterRow& p : rows) {
      if (p.what == r.what && p.transport == r.transport && p.replicas == 1 && p.o.ok) {
        base = p.o.us;
      }
    }
    char vs[32] = "-";
    if (base > 0) snprintf(vs, sizeof vs, "%.2fx", r.o.us / base);
    printf("%-12s %-9s %6d %8u %12.3f %10s\n", r.what.c_str(), r.transport.c_str(), r.memory_nodes,
           r.replicas, r.o.us, vs);
  }
  for (const ClusterRow& r : rows) {
    if (r.what != "failover") continue;
    if (!r.o.ok) {
      printf("failover: failed (%s)\n", r.o.error.c_str());
      continue;
    }
    printf(
        "failover (tcp, %d nodes, %u replicas): failover_ms %.1f (SIGKILL of a memory node "
        "to the end of the slowest access under way)\n",
        r.memory_nodes, r.replicas, r.failover_ms);
    printf(
        "re-replication: %.1f MB copied, %.1f MB/s while the program ran; the program's "
        "us/access %.3f in the second before the kill, %.3f in the 2 s after (%.2fx)\n",
        r.copied_mb, r.copy_mb_s, r.before_us, r.after_us,
        r.before_us > 0 ? r.after_us / r.before_us : 0.0);
  }
}

void write_cluster_csv(FILE* f, const ClusterOptions& co, const std::vector<ClusterRow>& rows) {
  fprintf(f,
          "cluster_row,transport,local_fraction,memory_nodes,replicas,us_per_access,failover_ms,"
          "rereplication_mb_per_s,us_per_access_before_kill,us_per_access_after_kill\n");
  for (const ClusterRow& r : rows) {
    if (!r.o.ok) {
      fprintf(f, "%s,%s,%.2f,%d,%u,failed,,,,\n", r.what.c_str(), r.transport.c_str(), co.fraction,
              r.memory_nodes, r.replicas);
      continue;
    }
    fprintf(f, "%s,%s,%.2f,%d,%u,%.4f", r.what.c_str(), r.transport.c_str(), co.fraction,
            r.memory_nodes, r.replicas, r.o.us);
    if (r.what == "failover") {
      fprintf(f, ",%.3f,%.2f,%.4f,%.4f\n", r.failover_ms, r.copy_mb_s, r.before_us, r.after_us);
    } else {
      fprintf(f, ",,,,\n");
    }
  }
}

}  // namespace lego::bench
