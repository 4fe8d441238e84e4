// RmaChooser: for `lego-run --rma auto`, which way a one-line fetch from one memory node
// goes, by measurement: a request (kFetch, served by lego-memd's server thread) or a
// one-sided read of the node's granted pool block (rma_read, docs/rma.md).
//
// Neither way wins everywhere. In the soft-RoCE guest a one-line rma_read cost ~1.0-1.5x a
// kFetch while the memory node's CPU was free (rxe executes the read in the node's kernel),
// and 0.15-0.8x while lego-memd's server thread waited to be scheduled (a memory node
// serving other processors). So the choice follows what each way has cost lately: an
// exponentially weighted average of each way's observed time, the cheaper one taken, the
// other tried again in short bursts (kProbeBurst fetches in a row every kProbePeriod) so
// that a change of the memory node's load is seen from both sides. A way whose average
// rises past the other's last figure loses at once.
//
// Why bursts, and why a burst's first fetch is not counted: a request that follows a long
// run of one-sided reads finds lego-memd's server thread asleep (its idle poll budget
// spent: libfit's idle-poll spin budgets) and pays its wake-up, which a stream of requests
// does not; single probes measured that cold start and made requests look 1.5-2.5x dearer
// in the guest than they cost per access. The burst's later fetches meet a warm server.
//
// Thread-safety: any number of threads (the ExCache's handler thread, SIGBUS handlers) may
// call choose() and record() at once. Relaxed atomics only, no lock, nothing allocated
// (async-signal-safe): two racing record()s may lose one sample, which an average of many
// does not notice.
#pragma once

#include <atomic>
#include <cstdint>

namespace lego::runtime {

class RmaChooser {
 public:
  enum Path : int { kRequest = 0, kOneSided = 1 };

  // kProbeBurst fetches in a row of every kProbePeriod go the way the averages do not
  // favour: 1 in 64 of all fetches, whose cost on the slower way (~1.3x a fetch when idle,
  // several times when the memory node is busy) is ~0.5-8% of a fetch per fetch; a memory
  // node that became idle is noticed within a few hundred misses (one that became busy at
  // once: the way in use slows down).
  static constexpr uint32_t kProbeBurst = 4;
  static constexpr uint32_t kProbePeriod = 256;

  enum Kind : uint8_t {
    kFavoured = 0,  // the way the averages favour
    kProbe = 1,     // the other way (or a way not measured yet)
    kWarmup = 2,    // the other way, a burst's first fetch: taken, not counted
  };
  struct Choice {
    Path path;
    Kind kind;
    bool probe() const { return kind != kFavoured; }
  };

  // The way for the next one-line fetch. Each way is measured once before the averages
  // decide (a way without a figure is a probe).
  Choice choose() {
    const uint64_t request = estimate_ns(kRequest), one_sided = estimate_ns(kOneSided);
    if (request == 0) return {kRequest, one_sided != 0 ? kProbe : kFavoured};
    if (one_sided == 0) return {kOneSided, kProbe};
    const Path best = one_sided < request ? kOneSided : kRequest;
    const uint32_t phase = count_.fetch_add(1, std::memory_order_relaxed) % kProbePeriod;
    if (phase < kProbeBurst) {
      return {best == kOneSided ? kRequest : kOneSided, phase == 0 ? kWarmup : kProbe};
    }
    return {best, kFavoured};
  }

  // A fetch that went `path` took `ns` (a failed one is not recorded: its time says nothing
  // of the way; a warm-up fetch is not counted). Weights: 1/8 for the way in use (a sample
  // on nearly every fetch), 1/2 for a probe (a figure from a busier time, 25x too high,
  // must come down within two bursts). A sample counts for at most twice the current
  // average, so one preempted fetch (milliseconds on a loaded host) moves the way in use by
  // 1/8 at most and cannot flip a choice between ways 1.3x apart by itself (a probe only
  // pushes the way not taken further off); a real change passes in a handful of samples.
  void record(Path path, uint64_t ns, Kind kind) {
    if (kind == kWarmup) return;
    if (ns == 0) ns = 1;  // 0 means "no figure"
    std::atomic<uint64_t>& e = estimate_[path];
    const uint64_t old = e.load(std::memory_order_relaxed);
    if (old == 0) {
      e.store(ns, std::memory_order_relaxed);
      return;
    }
    if (ns > 2 * old) ns = 2 * old;
    const int shift = kind == kProbe ? 1 : 3;
    const int64_t delta = static_cast<int64_t>(ns) - static_cast<int64_t>(old);
    const uint64_t next = static_cast<uint64_t>(static_cast<int64_t>(old) + delta / (1 << shift));
    e.store(next == 0 ? 1 : next, std::memory_order_relaxed);
  }

  // The way the averages favour now (requests until both are measured): windows of several
  // lines follow it unmeasured (their time is not a one-line fetch's).
  Path favoured() const {
    const uint64_t request = estimate_ns(kRequest), one_sided = estimate_ns(kOneSided);
    return request != 0 && one_sided != 0 && one_sided < request ? kOneSided : kRequest;
  }

  // The average time of a one-line fetch that went `path`, ns (0: not measured yet).
  uint64_t estimate_ns(Path path) const { return estimate_[path].load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> estimate_[2] = {};
  std::atomic<uint32_t> count_{0};  // fetches chosen since the start (for the probe period)
};

}  // namespace lego::runtime
