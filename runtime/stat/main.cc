// lego-stat: a live view of the lego processes on this node, like top: each process's
// ExCache use, misses, fetches and write-backs per second, miss latency percentiles and
// its memory node. It reads the stats page each process of a run publishes in its run
// directory (runtime/stats_page.h): nothing is asked of the processes themselves.
#include <time.h>
#include <unistd.h>

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "lego/excache.h"
#include "lego/flags.h"
#include "runtime/stats_page.h"

using namespace lego;

namespace {

const char* kUsage = R"(usage: lego-stat [options]

A live view of the lego processes on this node (those run under lego-run): for each,
its ExCache use (resident / capacity), misses, fetches and write-backs per second, the
miss latency percentiles of the interval, and the memory nodes holding its memory:
each with the vRegions (16 MiB) it holds a copy of, "lost" for one the process lost,
"+N" for copies coming in; R is the copies of each vRegion (--replicas), and
"re-replicating N" the vRegions still short of a copy after a loss.
Refreshes every --interval until interrupted; on a terminal the screen is redrawn,
elsewhere each refresh is a plain table.

options:
  --interval SECONDS  time between refreshes, and over which rates are measured
                      (default 1; 0.1 to 3600)
  --once              measure one interval, print once and exit (for scripts)
  --count N           print N refreshes and exit (default: until interrupted)
  --json              JSON instead of a table: with --once one document, otherwise
                      one document per line per refresh
  --pid PID           only this process (repeatable)
  --help              this text

Rates are per second over the interval, from the counters each process publishes
every 250 ms. p50/p99 are the upper bounds of the log2 histogram buckets holding the
interval's 50th/99th percentile miss ("-" when it had no miss). Processes you may not
read (another user's runs) are not shown.
)";

struct Options {
  double interval = 1.0;
  bool once = false;
  long count = -1;
  bool json = false;
  std::vector<long> pids;
};

// One process over an interval.
struct Row {
  launch::StatsSample now;
  bool have_rates = false;  // seen in the previous sample too
  double seconds = 0;
  double misses_s = 0, fetches_s = 0, write_backs_s = 0;
  uint64_t p50_ns = 0, p99_ns = 0;  // of the interval's misses; 0: none
};

std::vector<launch::StatsSample> sample(const Options& o, std::vector<std::string>* problems) {
  std::vector<launch::StatsSample> all = launch::read_stats_pages(problems);
  if (o.pids.empty()) return all;
  std::vector<launch::StatsSample> some;
  for (auto& s : all) {
    for (long p : o.pids) {
      if (s.pid == p) some.push_back(s);
    }
  }
  return some;
}

std::vector<Row> rows_between(const std::vector<launch::StatsSample>& before,
                              const std::vector<launch::StatsSample>& after) {
  std::map<std::pair<pid_t, uint64_t>, const launch::StatsSample*> earlier;
  for (auto& s : before) earlier[{s.pid, s.start}] = &s;
  std::vector<Row> rows;
  for (auto& s : after) {
    Row r;
    r.now = s;
    auto it = earlier.find({s.pid, s.start});
    if (it != earlier.end() && s.published_ns > it->second->published_ns) {
      const ExCacheStats& a = it->second->stats;
      const ExCacheStats& b = s.stats;
      r.have_rates = true;
      r.seconds = static_cast<double>(s.published_ns - it->second->published_ns) / 1e9;
      r.misses_s = static_cast<double>(b.misses - a.misses) / r.seconds;
      r.fetches_s = static_cast<double>(b.fetches - a.fetches) / r.seconds;
      r.write_backs_s = static_cast<double>(b.write_backs - a.write_backs) / r.seconds;
      uint64_t d[ExCacheStats::kLatencyBuckets];
      for (size_t i = 0; i < ExCacheStats::kLatencyBuckets; ++i) {
        d[i] = b.miss_latency_log2_ns[i] - a.miss_latency_log2_ns[i];
      }
      r.p50_ns = launch::latency_percentile_ns(d, ExCacheStats::kLatencyBuckets, 500);
      r.p99_ns = launch::latency_percentile_ns(d, ExCacheStats::kLatencyBuckets, 990);
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

std::string latency_text(uint64_t ns) {
  if (ns == 0) return "-";
  char b[32];
  if (ns < 10000) {
    snprintf(b, sizeof b, "%" PRIu64 "ns", ns);
  } else if (ns < 10000000) {
    snprintf(b, sizeof b, "%" PRIu64 "us", ns / 1000);
  } else {
    snprintf(b, sizeof b, "%" PRIu64 "ms", ns / 1000000);
  }
  return b;
}

std::string rate_text(bool have, double v) {
  if (!have) return "-";
  char b[32];
  snprintf(b, sizeof b, v >= 100 ? "%.0f" : "%.1f", v);
  return b;
}

// "2:12 3:12 4:lost 5:3+2": each memory node with the vRegions it holds ("+N": being
// copied in; "lost": the process lost it).
std::string nodes_text(const launch::ClusterSample& c) {
  std::string o;
  for (const auto& n : c.nodes) {
    if (!o.empty()) o += " ";
    o += std::to_string(n.id) + ":";
    if (n.lost) {
      o += "lost";
      continue;
    }
    o += std::to_string(n.vregions);
    if (n.copying) o += "+" + std::to_string(n.copying);
  }
  if (c.node_count > c.nodes.size()) {
    o += " (+" + std::to_string(c.node_count - c.nodes.size()) + " more)";
  }
  if (c.vregions_degraded) o += " re-replicating " + std::to_string(c.vregions_degraded);
  return o.empty() ? "-" : o;
}

std::string mib(uint64_t lines) {
  char b[32];
  snprintf(b, sizeof b, "%.1f", static_cast<double>(lines * kExCacheLineBytes) / (1 << 20));
  return b;
}

void print_table(const std::vector<Row>& rows, const std::vector<std::string>& problems) {
  char when[64];
  time_t t = time(nullptr);
  strftime(when, sizeof when, "%H:%M:%S", localtime(&t));
  printf("lego-stat %s: %zu lego process%s\n", when, rows.size(), rows.size() == 1 ? "" : "es");
  printf("%7s %-16s %19s %5s %9s %7s %7s %9s %9s %2s  %s\n", "PID", "PROGRAM", "EXCACHE MiB",
         "USE%", "MISS/s", "P50", "P99", "FETCH/s", "WBACK/s", "R", "MEMORY NODES (vRegions)");
  for (const Row& r : rows) {
    const ExCacheStats& s = r.now.stats;
    const std::string use = mib(s.resident_lines) + "/" + mib(s.capacity_lines);
    const double pct = s.capacity_lines ? 100.0 * static_cast<double>(s.resident_lines) /
                                              static_cast<double>(s.capacity_lines)
                                        : 0;
    printf("%7d %-16.16s %19s %4.0f%% %9s %7s %7s %9s %9s %2u  %s\n", r.now.pid,
           r.now.program.c_str(), use.c_str(), pct, rate_text(r.have_rates, r.misses_s).c_str(),
           latency_text(r.p50_ns).c_str(), latency_text(r.p99_ns).c_str(),
           rate_text(r.have_rates, r.fetches_s).c_str(),
           rate_text(r.have_rates, r.write_backs_s).c_str(), r.now.cluster.replicas,
           nodes_text(r.now.cluster).c_str());
  }
  for (const std::string& p : problems) printf("lego-stat: %s\n", p.c_str());
}

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += static_cast<char>(c);
    } else if (c < 0x20) {
      char b[8];
      snprintf(b, sizeof b, "\\u%04x", c);
      o += b;
    } else {
      o += static_cast<char>(c);
    }
  }
  return o + "\"";
}

std::string json_rate(bool have, double v) {
  if (!have) return "null";
  char b[32];
  snprintf(b, sizeof b, "%.3f", v);
  return b;
}

std::string json_ns(bool have, uint64_t ns) {
  return have && ns > 0 ? std::to_string(ns) : "null";
}

// [{"id":2,"address":"10.1.2.3:18602","state":"open","vregions":12,"copying":0},...]
std::string nodes_json(const launch::ClusterSample& c) {
  std::string o = "[";
  for (size_t i = 0; i < c.nodes.size(); ++i) {
    const auto& n = c.nodes[i];
    if (i) o += ",";
    o += "{\"id\":" + std::to_string(n.id) + ",\"address\":" + json_string(n.address) +
         ",\"state\":\"" + (n.lost ? "lost" : "open") +
         "\",\"vregions\":" + std::to_string(n.vregions) +
         ",\"copying\":" + std::to_string(n.copying) + "}";
  }
  return o + "]";
}

void print_json(const std::vector<Row>& rows, const std::vector<std::string>& problems,
                double interval) {
  std::string o = "{\"interval_s\":" + json_rate(true, interval) + ",\"processes\":[";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    const ExCacheStats& s = r.now.stats;
    if (i) o += ",";
    o += "{\"pid\":" + std::to_string(r.now.pid) + ",\"program\":" + json_string(r.now.program) +
         ",\"memory_node\":" + std::to_string(r.now.memory_node) +
         ",\"memory_address\":" + json_string(r.now.memory_address) +
         ",\"replicas\":" + std::to_string(r.now.cluster.replicas) +
         ",\"memory_nodes\":" + nodes_json(r.now.cluster) +
         ",\"vregions_placed\":" + std::to_string(r.now.cluster.vregions_placed) +
         ",\"vregions_degraded\":" + std::to_string(r.now.cluster.vregions_degraded) +
         ",\"vregions_rereplicated\":" + std::to_string(r.now.cluster.vregions_rereplicated) +
         ",\"bytes_rereplicated\":" + std::to_string(r.now.cluster.bytes_copied) +
         ",\"kernel_module\":" + (r.now.kernel_module ? "true" : "false") +
         ",\"resident_bytes\":" + std::to_string(s.resident_lines * kExCacheLineBytes) +
         ",\"capacity_bytes\":" + std::to_string(s.capacity_lines * kExCacheLineBytes) +
         ",\"misses_per_s\":" + json_rate(r.have_rates, r.misses_s) +
         ",\"fetches_per_s\":" + json_rate(r.have_rates, r.fetches_s) +
         ",\"write_backs_per_s\":" + json_rate(r.have_rates, r.write_backs_s) +
         ",\"miss_p50_ns\":" + json_ns(r.have_rates, r.p50_ns) +
         ",\"miss_p99_ns\":" + json_ns(r.have_rates, r.p99_ns) +
         ",\"total_miss_p50_ns\":" + json_ns(true, s.miss_p50_ns) +
         ",\"total_miss_p99_ns\":" + json_ns(true, s.miss_p99_ns) + ",\"counters\":{";
    bool first = true;
    for (const ExCacheStatsField& f : kExCacheStatsFields) {
      if (!first) o += ",";
      first = false;
      o += "\"" + std::string(f.name) + "\":" + std::to_string(s.*(f.field));
    }
    o += "}}";
  }
  o += "],\"problems\":[";
  for (size_t i = 0; i < problems.size(); ++i) o += (i ? "," : "") + json_string(problems[i]);
  o += "]}";
  printf("%s\n", o.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  std::vector<flags::Flag> table = {
      {"interval", true,
       [&](const char* a) {
         char* end = nullptr;
         o.interval = strtod(a, &end);
         if (end == a || *end != '\0' || !std::isfinite(o.interval) || o.interval < 0.1 ||
             o.interval > 3600) {
           flags::usage_error("--interval: '" + std::string(a) +
                              "' is not a number of seconds in " + "0.1..3600");
         }
       }},
      {"once", false, [&](const char*) { o.once = true; }},
      {"count", true, [&](const char* a) { o.count = flags::number("--count", a, 1, 1000000000); }},
      {"json", false, [&](const char*) { o.json = true; }},
      {"pid", true,
       [&](const char* a) { o.pids.push_back(flags::number("--pid", a, 1, 1l << 22)); }},
  };
  const int first = flags::parse(argc, argv, {"lego-stat", kUsage, 2, false}, table);
  if (first < argc) flags::usage_error(std::string("unexpected argument '") + argv[first] + "'");
  if (o.once) o.count = 1;
  const bool terminal = isatty(1) == 1 && !o.json;
  setvbuf(stdout, nullptr, _IOFBF, 1 << 16);

  std::vector<std::string> problems;
  std::vector<launch::StatsSample> before = sample(o, &problems);
  const auto period = std::chrono::duration<double>(o.interval);
  for (long n = 0; o.count < 0 || n < o.count; ++n) {
    std::this_thread::sleep_for(period);
    problems.clear();
    std::vector<launch::StatsSample> after = sample(o, &problems);
    const std::vector<Row> rows = rows_between(before, after);
    if (o.json) {
      print_json(rows, problems, o.interval);
    } else {
      if (terminal)
        printf("\033[H\033[2J");  // top's redraw
      else if (n > 0)
        printf("\n");
      print_table(rows, problems);
    }
    fflush(stdout);
    before = std::move(after);
  }
  return 0;
}
