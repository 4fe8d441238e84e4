// lego-bench's cluster rows (runtime/bench/lego_bench.h): replication's cost, failover
// time and re-replication speed, each a lego-run of the random read-modify-write worker
// over a private cluster (--memory-nodes, --replicas).
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
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

double figure(const std::string& text, const std::string& key) {
  const size_t at = text.find(key + " ");
  return at == std::string::npos ? -1 : strtod(text.c_str() + at + key.size() + 1, nullptr);
}

// ms from the kill to a runtime time counter (CLOCK_MONOTONIC ns in --stats), or -1 when
// the runtime did not record it (0) or recorded it before the kill (not this kill's).
double ms_after(double at_ns, double kill_ns) {
  return at_ns > 0 && at_ns >= kill_ns ? (at_ns - kill_ns) / 1e6 : -1;
}

// The worker's failover record (workers.cc): µs per access over [from, to) ns, from its
// accesses completed per 10 ms since loop_start; 0 when the window holds no whole bucket.
double rate(const std::string& text, double loop_start, double from, double to) {
  const size_t at = text.find("buckets");
  if (at == std::string::npos || to <= from) return 0;
  std::istringstream in(text.substr(at + 7, text.find('\n', at) - at - 7));
  std::vector<uint64_t> buckets;
  for (uint64_t n; in >> n;) buckets.push_back(n);
  const double bucket_ns = 10e6;
  const size_t b0 = from > loop_start ? size_t((from - loop_start) / bucket_ns) : 0;
  const size_t b1 = std::min(buckets.size(), size_t((to - loop_start) / bucket_ns));
  uint64_t n = 0;
  for (size_t b = b0; b < b1; b++) n += buckets[b];
  return n == 0 ? 0 : double(b1 - b0) * bucket_ns / 1e3 / double(n);
}

// lego-run ARGS with the worker in failover mode: a memory node SIGKILLed once the loop
// runs. Fills the row's failover figures. The kill's time is taken here, just before
// kill(); every other time is recorded by the program (its accesses) or by the runtime
// (--stats), all on CLOCK_MONOTONIC: how long lego-bench waits before killing changes none.
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
  // The loop runs (the heap is filled and placed): kill a memory node a second in, so that
  // the second before the kill is the program's pace with every node up.
  for (int i = 0; i < 12000 && access((file + ".running").c_str(), F_OK) != 0; i++) {
    usleep(10000);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  const pid_t memd = child_memd(pid);
  uint64_t kill_ns = 0;
  if (memd > 0) {
    kill_ns = now_ns();
    kill(memd, SIGKILL);
    std::ofstream(file + ".tmp") << kill_ns << "\n";
    rename((file + ".tmp").c_str(), file.c_str());
  }
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = read(out[0], buf, sizeof buf)) > 0;) text.append(buf, size_t(n));
  close(out[0]);
  int status = 0;
  rusage ru{};
  wait4(pid, &status, 0, &ru);
  row->o.cpu_user_s = double(ru.ru_utime.tv_sec) + double(ru.ru_utime.tv_usec) / 1e6;
  row->o.cpu_sys_s = double(ru.ru_stime.tv_sec) + double(ru.ru_stime.tv_usec) / 1e6;
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
    const double k = double(kill_ns), loop_start = figure(text, "loop_start_ns");
    if (figure(text, "kill_ns") != k)
      fprintf(stderr, "lego-bench: the worker read another kill time: %s\n", text.c_str());
    row->stall_ms = figure(text, "stall_ms");
    row->detect_ms = ms_after(stat_value(stats, "first_loss_ns"), k);
    row->failover_ms = ms_after(stat_value(stats, "first_failover_ns"), k);
    const double bytes = stat_value(stats, "bytes_copied");
    const double c0 = stat_value(stats, "rereplication_start_ns");
    const double c1 = stat_value(stats, "rereplication_end_ns");
    row->copied_mb = bytes / 1e6;
    if (c0 > 0 && c1 > c0) {
      row->copy_wall_ms = (c1 - c0) / 1e6;
      row->copy_mb_s = bytes / 1e6 / ((c1 - c0) / 1e9);
      row->during_us = rate(text, loop_start, c0, c1);
    }
    row->before_us = rate(text, loop_start, k - 1e9, k);
  }
  unlink((file + ".running").c_str());
  unlink(file.c_str());
  unlink(err.c_str());
  rmdir(dir);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// The ratio R=r to R=1 of run `run` on `transport` (0: either failed).
double pair_ratio(const std::vector<ClusterRow>& rows, const ClusterRow& r) {
  double base = 0;
  for (const ClusterRow& p : rows) {
    if (p.what == "replication" && p.transport == r.transport && p.run == r.run &&
        p.replicas == 1 && p.o.ok) {
      base = p.o.us;
    }
  }
  return base > 0 && r.o.ok ? r.o.us / base : 0;
}

}  // namespace

std::vector<ClusterRow> run_cluster(const ClusterOptions& co, const std::string& self,
                                    const std::string& lego_run) {
  std::vector<ClusterRow> rows;
  const uint64_t heap = static_cast<uint64_t>(double(co.cap) / co.fraction) & ~uint64_t{kPage - 1};
  const std::vector<std::string> worker{
      self, "--worker", "random", std::to_string(heap), std::to_string(co.accesses), "1"};
  auto lego = [&](const std::string& transport, int nodes, uint32_t replicas, bool stats) {
    std::vector<std::string> a{lego_run,
                               "--excache",
                               std::to_string(co.cap),
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
  // Replication's cost: the same run with 1 and with R copies, alternating, per transport.
  const int total = int(co.transports.size()) * co.runs * (co.replicas == 1 ? 1 : 2);
  int step = 0;
  for (const std::string& t : co.transports) {
    for (int k = 1; k <= co.runs; k++) {
      for (uint32_t r : {uint32_t{1}, co.replicas}) {
        fprintf(stderr,
                "lego-bench: [%d/%d] cluster, random, %.0f%% local, %s, %d memory nodes, %u "
                "replica%s, run %d of %d...\n",
                ++step, total, co.fraction * 100, t.c_str(), co.memory_nodes, r, r == 1 ? "" : "s",
                k, co.runs);
        ClusterRow row;
        row.what = "replication";
        row.transport = t;
        row.memory_nodes = co.memory_nodes;
        row.replicas = r;
        row.run = k;
        row.o = run(lego(t, co.memory_nodes, r, false), "");
        // Each figure as it comes: a run cut short (a busy host) still leaves what it measured.
        if (row.o.ok) {
          fprintf(stderr, "lego-bench:   %.3f us/access, cpu %.2f s user %.2f s system\n", row.o.us,
                  row.o.cpu_user_s, row.o.cpu_sys_s);
        } else {
          fprintf(stderr, "lego-bench:   failed (%s)\n", row.o.error.c_str());
        }
        rows.push_back(row);
        if (co.replicas == 1) break;
      }
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
    fprintf(stderr,
            "lego-bench:   found lost %.1f ms, failover_ms %.1f, longest access %.1f ms after the "
            "kill; re-replication %.1f MB in %.0f ms\n",
            row.detect_ms, row.failover_ms, row.stall_ms, row.copied_mb, row.copy_wall_ms);
    rows.push_back(row);
  }
  return rows;
}

void print_cluster(const ClusterOptions& co, const std::vector<ClusterRow>& rows) {
  printf(
      "\nlego-bench: the cluster, random read-modify-write, %.0f%% local (cap %s), %ld "
      "accesses per run\n",
      co.fraction * 100, std::to_string(co.cap >> 20).append(" MiB").c_str(), co.accesses);
  // CPU: the whole run's (heap fill included), the program's, lego-run's and the private
  // nodes' together, user and system: what replication costs this host beyond the time.
  printf("%-12s %-9s %6s %8s %4s %12s %10s %9s %9s\n", "row", "transport", "nodes", "replicas",
         "run", "us/access", "vs R=1", "cpu usr s", "cpu sys s");
  for (const ClusterRow& r : rows) {
    if (r.what != "replication") continue;
    if (!r.o.ok) {
      printf("%-12s %-9s %6d %8u %4d %12s  (%s)\n", r.what.c_str(), r.transport.c_str(),
             r.memory_nodes, r.replicas, r.run, "failed", r.o.error.c_str());
      continue;
    }
    const double ratio = pair_ratio(rows, r);
    char vs[32] = "-";
    if (ratio > 0 && r.replicas > 1) snprintf(vs, sizeof vs, "%.2fx", ratio);
    printf("%-12s %-9s %6d %8u %4d %12.3f %10s %9.2f %9.2f\n", r.what.c_str(), r.transport.c_str(),
           r.memory_nodes, r.replicas, r.run, r.o.us, vs, r.o.cpu_user_s, r.o.cpu_sys_s);
  }
  for (const std::string& t : co.transports) {
    std::vector<double> ratios;
    for (const ClusterRow& r : rows) {
      if (r.what == "replication" && r.transport == t && r.replicas > 1 && pair_ratio(rows, r) > 0)
        ratios.push_back(pair_ratio(rows, r));
    }
    if (ratios.empty()) continue;
    auto [lo, hi] = std::minmax_element(ratios.begin(), ratios.end());
    printf(
        "replication's cost over %s: R=%u/R=1 median %.2fx (%.2f-%.2fx over %zu runs; "
        "target <= 1.15x)\n",
        t.c_str(), co.replicas, median(ratios), *lo, *hi, ratios.size());
  }
  for (const ClusterRow& r : rows) {
    if (r.what != "failover") continue;
    if (!r.o.ok) {
      printf("failover: failed (%s)\n", r.o.error.c_str());
      continue;
    }
    printf(
        "failover (tcp, %d nodes, %u replicas), from the SIGKILL of a memory node:\n"
        "  found lost after %.1f ms; failover_ms %.1f (the first miss that met the lost node "
        "done by the others; target <= 1000); the program's longest access after the kill "
        "%.1f ms\n",
        r.memory_nodes, r.replicas, r.detect_ms, r.failover_ms, r.stall_ms);
    printf(
        "re-replication: %.1f MB in %.0f ms, %.1f MB/s while the program ran; the program's "
        "us/access %.3f in the second before the kill, %.3f while re-replicating (%.2fx)\n",
        r.copied_mb, r.copy_wall_ms, r.copy_mb_s, r.before_us, r.during_us,
        r.before_us > 0 && r.during_us > 0 ? r.during_us / r.before_us : 0.0);
  }
}

void write_cluster_csv(FILE* f, const ClusterOptions& co, const std::vector<ClusterRow>& rows) {
  fprintf(f,
          "cluster_row,transport,local_fraction,memory_nodes,replicas,run,us_per_access,"
          "vs_replicas_1,detect_ms,failover_ms,stall_ms,rereplication_mb,rereplication_ms,"
          "rereplication_mb_per_s,us_per_access_before_kill,us_per_access_during_rereplication,"
          "cpu_user_s,cpu_sys_s\n");
  for (const ClusterRow& r : rows) {
    fprintf(f, "%s,%s,%.2f,%d,%u,%d,", r.what.c_str(), r.transport.c_str(), co.fraction,
            r.memory_nodes, r.replicas, r.run);
    if (!r.o.ok) {
      fprintf(f, "failed,,,,,,,,,,,\n");
      continue;
    }
    fprintf(f, "%.4f,", r.o.us);
    if (r.what == "failover") {
      fprintf(f, ",%.3f,%.3f,%.3f,%.2f,%.1f,%.2f,%.4f,%.4f", r.detect_ms, r.failover_ms, r.stall_ms,
              r.copied_mb, r.copy_wall_ms, r.copy_mb_s, r.before_us, r.during_us);
    } else {
      const double ratio = r.replicas > 1 ? pair_ratio(rows, r) : 0;
      if (ratio > 0) fprintf(f, "%.4f", ratio);
      fprintf(f, ",,,,,,,,");
    }
    fprintf(f, ",%.3f,%.3f\n", r.o.cpu_user_s, r.o.cpu_sys_s);
  }
}

}  // namespace lego::bench
