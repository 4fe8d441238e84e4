// runtime/launcher/rereplication.h: lego-run's progress lines for re-replication.
#include "runtime/launcher/rereplication.h"

#include <cstdio>
#include <set>
#include <vector>

#include "runtime/stats_page.h"

namespace lego::launch {

namespace {

// "memory node 2 (10.1.2.3:18602)" / "memory nodes 2 (...), 5 (...)": the lost ones not
// named before (all of them when every one was), which are then added to `named`.
std::string lost_nodes(const ClusterSample& c, std::set<uint32_t>* named) {
  bool any_new = false;
  for (const auto& node : c.nodes) any_new |= node.lost && named->count(node.id) == 0;
  std::string o;
  int n = 0;
  for (const auto& node : c.nodes) {
    if (!node.lost || (any_new && named->count(node.id))) continue;
    named->insert(node.id);
    o += (n++ ? ", " : "") + std::to_string(node.id);
    if (!node.address.empty()) o += " (" + node.address + ")";
  }
  return (n > 1 ? "memory nodes " : "memory node ") + (n ? o : "?");
}

std::string mib_text(uint64_t bytes) {
  char b[32];
  snprintf(b, sizeof b, "%.0f MiB", static_cast<double>(bytes) / (1 << 20));
  return b;
}

}  // namespace

RereplicationWatch::RereplicationWatch(std::string run_dir, int fd,
                                       std::chrono::milliseconds period)
    : run_dir_(std::move(run_dir)), fd_(fd), period_(period) {}

RereplicationWatch::~RereplicationWatch() {
  finish();
}

void RereplicationWatch::poll() {
  const auto now = std::chrono::steady_clock::now();
  if (now < next_) return;
  next_ = now + period_;
  const std::vector<StatsSample> pages = read_stats_pages(nullptr, "/tmp", run_dir_);
  std::set<std::pair<pid_t, uint64_t>> present;
  for (const StatsSample& s : pages) {
    const ClusterSample& c = s.cluster;
    const std::pair<pid_t, uint64_t> key{s.pid, s.start};
    present.insert(key);
    Seen& seen =
        seen_.try_emplace(key, Seen{c.vregions_rereplicated, c.bytes_copied, {}}).first->second;
    auto it = tracks_.find(key);
    if (it == tracks_.end()) {
      if (c.vregions_degraded == 0 && c.vregions_rereplicated == seen.rereplicated) continue;
      // A re-replication began (or began and ended since the last look).
      Track t;
      t.program = s.program;
      t.since = now;
      t.at_start = seen;
      if (!progress_) progress_ = std::make_unique<Progress>("lego-run", 0, fd_);
      progress_->step(
          s.program + " (pid " + std::to_string(s.pid) + "): re-replicating " +
          std::to_string(c.vregions_degraded + c.vregions_rereplicated - seen.rereplicated) +
          " vRegions after losing " + lost_nodes(c, &seen.lost));
      it = tracks_.emplace(key, std::move(t)).first;
    }
    Track& t = it->second;
    const uint64_t done = c.vregions_rereplicated - t.at_start.rereplicated;
    t.last_done = done;
    t.last_total = done + c.vregions_degraded;
    progress_->update(t.last_done, t.last_total);
    if (c.vregions_degraded > 0) continue;
    const double secs = std::chrono::duration<double>(now - t.since).count();
    char line[256];
    snprintf(line, sizeof line,
             "%s (pid %d): %llu vRegions have %u copies again (%s copied, %.1f s)",
             t.program.c_str(), static_cast<int>(s.pid), static_cast<unsigned long long>(done),
             c.replicas, mib_text(c.bytes_copied - t.at_start.bytes).c_str(), secs);
    progress_->finish();
    progress_->note(line);
    seen.rereplicated = c.vregions_rereplicated;
    seen.bytes = c.bytes_copied;
    tracks_.erase(it);
  }
  // A process that ended while its memory was being copied: nothing more to say of it
  // but where it stopped.
  for (auto it = tracks_.begin(); it != tracks_.end();) {
    if (present.count(it->first)) {
      ++it;
      continue;
    }
    progress_->finish();
    progress_->note(it->second.program + " (pid " + std::to_string(it->first.first) +
                    "): ended while re-replicating (" + std::to_string(it->second.last_done) +
                    " of " + std::to_string(it->second.last_total) + " vRegions copied)");
    it = tracks_.erase(it);
  }
  for (auto it = seen_.begin(); it != seen_.end();) {
    it = present.count(it->first) ? std::next(it) : seen_.erase(it);
  }
}

void RereplicationWatch::finish() {
  if (progress_) progress_->finish();
}

}  // namespace lego::launch
