// The run's reports and --stats (runtime/launcher/reports.h).
#include "runtime/launcher/reports.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <sstream>
#include <utility>

#include "lego/excache.h"
#include "runtime/launch_contract.h"

namespace lego::launch {

void Reports::feed(const char* data, size_t len, pid_t program) {
  partial_.append(data, len);
  size_t start = 0;
  for (size_t nl; (nl = partial_.find('\n', start)) != std::string::npos; start = nl + 1) {
    line(partial_.substr(start, nl - start), program);
  }
  partial_.erase(0, start);
}

void Reports::line(const std::string& l, pid_t program) {
  if (in_stats_) {
    if (l == "end") {
      stats_.push_back(block_);
      in_stats_ = false;
    } else {
      block_ += l + "\n";
    }
  } else if (l.rfind("stats ", 0) == 0) {
    in_stats_ = true;
    block_ = l.substr(6) + "\n";
  } else if (l.rfind("lost ", 0) == 0) {
    if (lost_.empty()) lost_ = l.substr(5);
  } else if (l.rfind("error ", 0) == 0) {
    // "error PID MESSAGE": said at once, as the process that failed would have.
    char* end = nullptr;
    const long pid = strtol(l.c_str() + 6, &end, 10);
    const std::string message = *end == ' ' ? end + 1 : l.substr(6);
    fprintf(stderr, "lego-run: %s (pid %ld)\n", message.c_str(), pid);
    program_error_ |= pid == program;
  }
}

void print_stats(const std::string& block) {
  const StatsReport r = parse_stats_report(block);
  fprintf(stderr, "lego-run: ExCache stats (%s)\n", r.head.c_str());
  fprintf(stderr, "  %-16s %s (resident accesses never trap)\n", "hits", "n/a");
  fprintf(
      stderr, "  %-16s %s\n", "kernel_module",
      r.number("kernel_module") ? "lego_pcache (batched evictions, accessed bits)" : "not used");
  for (const ExCacheStatsField& f : kExCacheStatsFields) {
    fprintf(stderr, "  %-16s %llu\n", f.name, static_cast<unsigned long long>(r.number(f.name)));
  }
  fprintf(stderr, "  %-16s %llu (fetched + written)\n", "bytes_moved",
          static_cast<unsigned long long>(r.number("bytes_fetched") + r.number("bytes_written")));
  fprintf(stderr, "  %-16s p50 < %.1f us, p99 < %.1f us\n", "miss_latency",
          static_cast<double>(r.number("miss_p50_ns")) / 1e3,
          static_cast<double>(r.number("miss_p99_ns")) / 1e3);
  // The backend's counters (runtime/preload/cluster_backend.h): what the report has after
  // the histogram, in its order.
  bool backend = false;
  for (const auto& [key, value] : r.values) {
    if (backend) fprintf(stderr, "  %-22s %s\n", key.c_str(), value.c_str());
    backend |= key == "miss_histogram";
  }
  // The histogram, with each bucket's share of misses and (estimated at the bucket's
  // middle) of the time spent in misses: a rare slow kind of miss shows up here.
  std::vector<std::pair<unsigned, unsigned long long>> hist;
  unsigned long long total = 0;
  double total_ns = 0;
  std::istringstream hs(r.text("miss_histogram"));
  for (std::string item; std::getline(hs, item, ',');) {
    unsigned b = 0;
    unsigned long long n = 0;
    if (sscanf(item.c_str(), "%u:%llu", &b, &n) != 2 || b > 63) continue;
    hist.emplace_back(b, n);
    total += n;
    total_ns += static_cast<double>(n) * 1.5 * static_cast<double>(1ull << b);
  }
  if (total == 0) return;
  fprintf(stderr, "  %-22s %10s %10s\n", "miss latency (us)", "% misses", "% time");
  for (auto [b, n] : hist) {
    const double lo = static_cast<double>(1ull << b) / 1e3;
    char range[32];
    snprintf(range, sizeof range, "%.1f-%.1f", lo, 2 * lo);
    fprintf(stderr, "    %-20s %9.1f%% %9.1f%%\n", range,
            100.0 * static_cast<double>(n) / static_cast<double>(total),
            100.0 * static_cast<double>(n) * 1.5 * static_cast<double>(1ull << b) / total_ns);
  }
}

void print_stats_summary(const std::vector<std::string>& blocks) {
  if (blocks.size() < 2) return;
  static const char* const kColumns[] = {"misses",    "fetches",     "zero_fills",
                                         "evictions", "write_backs", "resident_lines"};
  std::vector<StatsReport> reports;
  int width = 7;  // "process"
  for (const std::string& b : blocks) {
    reports.push_back(parse_stats_report(b));
    width = std::max(width, static_cast<int>(reports.back().head.size()));
  }
  fprintf(stderr, "lego-run: %zu processes, each with an ExCache of its own\n", blocks.size());
  fprintf(stderr, "  %-*s", width, "process");
  for (const char* c : kColumns) fprintf(stderr, " %14s", c);
  fprintf(stderr, "\n");
  unsigned long long sum[std::size(kColumns)] = {};
  for (const StatsReport& r : reports) {
    fprintf(stderr, "  %-*s", width, r.head.c_str());
    for (size_t i = 0; i < std::size(kColumns); i++) {
      const auto v = static_cast<unsigned long long>(r.number(kColumns[i]));
      sum[i] += v;
      fprintf(stderr, " %14llu", v);
    }
    fprintf(stderr, "\n");
  }
  fprintf(stderr, "  %-*s", width, "all");
  for (unsigned long long v : sum) fprintf(stderr, " %14llu", v);
  fprintf(stderr, "\n");
}

}  // namespace lego::launch
