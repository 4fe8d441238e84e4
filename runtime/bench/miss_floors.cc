// lego-bench's miss floors (runtime/bench/lego_bench.h): what random and sequential
// misses cannot cost less than on this host with userfaultfd and the transport alone,
// measured in the same run (--help says what each part is).
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "lego/status.h"
#include "libfit/bench/floors.h"
#include "runtime/bench/fault_floor.h"
#include "runtime/bench/lego_bench.h"
#include "runtime/launcher/private_link.h"

namespace lego::bench {
namespace {

// A fetch on the wire (libfit frame header + FetchRequest + one address; frame header +
// the bare line), for the tcp floor's exchange; and a prefetch window's (32 addresses;
// frame header + FetchReply + 32 lines).
constexpr size_t kFetchRequestBytes = 72;
constexpr size_t kFetchReplyBytes = 32 + kPage;
constexpr size_t kWindowLines = 32;
constexpr size_t kWindowRequestBytes = 32 + 32 + 8 * kWindowLines;
constexpr size_t kWindowReplyBytes = 32 + 8 + kWindowLines * kPage;
// A fetch whose request also carries the dirty victim the miss evicts (4 KiB): the least a
// random miss into a full cache of stored-to lines moves over the wire.
constexpr size_t kFetchWithVictimRequestBytes = kFetchRequestBytes + kPage;

struct MissFloors {
  Result<FaultFloor> fault = Status(ENODATA, "not measured");
  Result<double> tcp_rtt = Status(ENODATA, "not measured");
  Result<double> shm_rtt = Status(ENODATA, "not measured");
  // A line's share of moving a 32-line window (round trip of a window fetch / 32).
  Result<double> tcp_window_line = Status(ENODATA, "not measured");
  Result<double> shm_window_line = Status(ENODATA, "not measured");
  // random_mt's threads over tcp: round trips per second of that many client threads
  // against one server thread, both sides busy-polling and both blocking.
  // And the miss floor at that many threads (measure_threaded_miss_floor), each way of
  // waiting: the fetch alone, and with the victim's write-back riding each fetch.
  using ByWait = std::vector<std::pair<Wait, Result<ThreadedMissFloor>>>;
  struct Concurrent {
    int threads = 0;
    Result<double> spin = Status(ENODATA, "not measured");
    Result<double> block = Status(ENODATA, "not measured");
    ByWait misses;
    ByWait misses_with_victims;
  };
  std::vector<Concurrent> tcp_threads;
};

Result<double> per_window_line(Result<double> rtt) {
  if (!rtt) return rtt;
  return rtt.value() / kWindowLines;
}

// `windows`: also a 32-line window's round trips (the sequential workload's floor).
MissFloors measure_miss_floors(uint64_t cap, bool tcp, bool shm, bool windows,
                               const std::vector<int>& tcp_threads) {
  MissFloors f;
  fprintf(stderr, "lego-bench: miss floors: userfaultfd fault...\n");
  f.fault = measure_fault_floor(cap / kPage, 5);
  const uint16_t port = static_cast<uint16_t>(20000 + getpid() % 10000);
  if (tcp) {
    fprintf(stderr, "lego-bench: miss floors: tcp round trip...\n");
    // The link lego-run gives its private memory node (its own names and subnet).
    const pid_t me = getpid();
    const uint32_t subnet = (10u << 24) | (63u << 16) | ((static_cast<uint32_t>(me) % 250) << 8);
    auto link = launch::private_link("lego-bench-floor-" + std::to_string(me),
                                     "lgbf" + std::to_string(me) + "a", subnet);
    if (link) {
      const std::string ns = link.value()->name(0), remote = link.value()->address(0);
      f.tcp_rtt =
          tcp_busypoll_rtt_us(ns, remote, port, kFetchRequestBytes, kFetchReplyBytes, 20000);
      if (windows) {
        f.tcp_window_line =
            per_window_line(tcp_busypoll_rtt_us(ns, remote, static_cast<uint16_t>(port + 2),
                                                kWindowRequestBytes, kWindowReplyBytes, 2000));
      }
      uint16_t next_port = static_cast<uint16_t>(port + 4);
      for (int t : tcp_threads) {
        fprintf(stderr, "lego-bench: miss floors: tcp round trips, %d thread%s...\n", t,
                t > 1 ? "s" : "");
        MissFloors::Concurrent c;
        c.threads = t;
        c.spin = tcp_concurrent_round_trips_per_s(ns, remote, next_port++, kFetchRequestBytes,
                                                  kFetchReplyBytes, t, 20000, Wait::kSpin);
        c.block = tcp_concurrent_round_trips_per_s(ns, remote, next_port++, kFetchRequestBytes,
                                                   kFetchReplyBytes, t, 20000, Wait::kBlock);
        fprintf(stderr,
                "lego-bench: miss floors: misses with a tcp round trip each, with and without "
                "write-backs, %d thread%s...\n",
                t, t > 1 ? "s" : "");
        for (size_t request : {kFetchRequestBytes, kFetchWithVictimRequestBytes}) {
          auto& by_wait = request == kFetchRequestBytes ? c.misses : c.misses_with_victims;
          for (Wait wait : {Wait::kSpin, Wait::kYield, Wait::kBlock}) {
            auto server =
                RoundTripServer::start(ns, remote, next_port++, request, kFetchReplyBytes, t, wait);
            by_wait.emplace_back(
                wait, server ? measure_threaded_miss_floor(*server.value(), t, 20000 / t, wait)
                             : Result<ThreadedMissFloor>(server.status()));
          }
        }
        f.tcp_threads.push_back(std::move(c));
      }
    } else {
      f.tcp_rtt = f.tcp_window_line = link.status();
    }
  }
  if (shm) {
    fprintf(stderr, "lego-bench: miss floors: shm round trip...\n");
    f.shm_rtt = fi_pingpong_rtt_us("shm", "rdm", kPage, 20000, "", "127.0.0.1",
                                   static_cast<uint16_t>(port + 1));
    if (windows) {
      // fi_pingpong sends the same size both ways: half its round trip is one window's way.
      auto window = fi_pingpong_rtt_us("shm", "rdm", kWindowLines * kPage, 2000, "", "127.0.0.1",
                                       static_cast<uint16_t>(port + 3));
      f.shm_window_line = window ? Result<double>(window.value() / 2 / kWindowLines) : window;
    }
  }
  return f;
}

// A row's floor per access, from the parts it needs:
//   random: an access misses with probability 1 - local fraction; a miss costs a fault,
//     its zap share and a round trip;
//   sequential: every access misses (the scan is larger than the cache); a line costs its
//     share of a window's fault and zap and of fetching the window, and half a window
//     line's transfer again to write it back (the write pass dirties every line).
Result<double> floor_per_access(const MemoryRow& r, const MissFloors& f) {
  if (!f.fault) return f.fault.status();
  const bool tcp = r.system == "lego_tcp";
  if (r.workload == "random") {
    const Result<double>& rtt = tcp ? f.tcp_rtt : f.shm_rtt;
    if (!rtt) return rtt;
    return (1 - r.fraction) * (f.fault->fault_us + f.fault->zap_us + rtt.value());
  }
  const Result<double>& moved = tcp ? f.tcp_window_line : f.shm_window_line;
  if (!moved) return moved;
  return f.fault->window_fault_us + f.fault->window_zap_us + 1.5 * moved.value();
}

bool has_floor(const MemoryRow& r) {
  return (r.workload == "random" || r.workload == "sequential") && r.o.ok &&
         (r.system == "lego_tcp" || r.system == "lego_shm");
}

// The best of the miss floor's ways of waiting at one thread count (nullptr if none
// measured).
const ThreadedMissFloor* best_miss_floor(const MissFloors::ByWait& by_wait, Wait* how) {
  const ThreadedMissFloor* best = nullptr;
  for (auto& [wait, m] : by_wait) {
    if (m && (best == nullptr || m->misses_per_s > best->misses_per_s)) {
      best = &m.value();
      *how = wait;
    }
  }
  return best;
}

// A lego row's misses per second: accesses per second x misses per access.
double lego_misses_per_s(const MemoryRow& r) {
  return 1e6 / r.o.us * r.misses_per_access;
}

// random_mt's miss floor by threads over tcp (measure_threaded_miss_floor) beside lego_tcp's
// misses per second: what more threads can gain on this host when each miss needs a round
// trip and the memory node's end runs on the same two vCPUs. `victims`: the floor whose
// fetches also carry the dirty line each miss evicts (random_mt stores to every line it
// touches, so each of lego's misses writes one back).
void print_threaded_miss_floor(const std::vector<MemoryRow>& rows, const MissFloors& f,
                               bool victims) {
  auto by_wait = [victims](const MissFloors::Concurrent& c) -> const MissFloors::ByWait& {
    return victims ? c.misses_with_victims : c.misses;
  };
  double best1 = 0;
  for (auto& c : f.tcp_threads) {
    Wait how = Wait::kSpin;
    if (const ThreadedMissFloor* b = best_miss_floor(by_wait(c), &how);
        b != nullptr && c.threads == 1) {
      best1 = b->misses_per_s;
    }
  }
  if (!victims) {
    printf(
        "\nrandom_mt's miss floor over tcp: misses/s of THREADS threads, each storing to "
        "missing lines of\nits own (SIGBUS delivery) with one round trip (72 B / 4128 B) per "
        "miss on its own connection\nto one server thread over the same veth link, and a "
        "32-line zap per 32 misses; both ends\nspinning, spinning with sched_yield, or "
        "blocking; the best of the three against the best at\n1 thread, the CPUs the best kept "
        "busy (of %ld), and lego_tcp's misses/s (accesses/s x misses\nper access), each against "
        "its own 1-thread misses/s\n",
        sysconf(_SC_NPROCESSORS_ONLN));
  } else {
    printf(
        "\nrandom_mt's miss floor over tcp with write-backs: the same, each request also "
        "carrying the\n4 KiB of a line the thread dropped in its last batch (%zu B / %zu B): "
        "the dirty victim each\nmiss of random_mt evicts, written back on the fetch's own "
        "round trip\n",
        kFetchWithVictimRequestBytes, kFetchReplyBytes);
  }
  printf("%7s %9s %9s %9s %9s %6s %5s   %s\n", "threads", "spin/s", "yield/s", "block/s", "best/s",
         "vs 1", "CPUs", "lego_tcp misses/s, vs 1");
  for (auto& c : f.tcp_threads) {
    char spin[32] = "-", yield[32] = "-", block[32] = "-";
    for (auto& [wait, m] : by_wait(c)) {
      if (!m) continue;
      char* column = wait == Wait::kSpin ? spin : wait == Wait::kYield ? yield : block;
      snprintf(column, sizeof spin, "%.0f", m->misses_per_s);
    }
    Wait how = Wait::kSpin;
    const ThreadedMissFloor* best = best_miss_floor(by_wait(c), &how);
    char b[32] = "-", bv[32] = "-", cpus[32] = "-";
    if (best != nullptr) {
      snprintf(b, sizeof b, "%.0f", best->misses_per_s);
      if (best1 > 0) snprintf(bv, sizeof bv, "%.2fx", best->misses_per_s / best1);
      snprintf(cpus, sizeof cpus, "%.2f", best->cpus_busy);
    }
    std::string lego;
    for (auto& r : rows) {
      if (r.workload != "random_mt" || r.system != "lego_tcp" || r.threads != c.threads ||
          !r.o.ok || r.misses_per_access <= 0) {
        continue;
      }
      const double misses = lego_misses_per_s(r);
      char each[128];
      snprintf(each, sizeof each, "%s%s %.0f", lego.empty() ? "" : ", ", system_label(r).c_str(),
               misses);
      lego += each;
      if (const MemoryRow* one = one_thread_row(rows, r);
          one != nullptr && one->misses_per_access > 0) {
        snprintf(each, sizeof each, " %.2fx", misses / lego_misses_per_s(*one));
        lego += each;
      }
    }
    printf("%7d %9s %9s %9s %9s %6s %5s   %s\n", c.threads, spin, yield, block, b, bv, cpus,
           lego.empty() ? "-" : lego.c_str());
    for (auto& [wait, m] : by_wait(c)) {
      if (!m) printf("        %s: %s\n", wait_name(wait), m.status().message().c_str());
    }
  }
  // The most more threads could give lego here: the floor's best at N threads over lego's
  // own misses/s at 1 (lego's N-thread misses cannot outrun the floor's).
  for (auto& r1 : rows) {
    if (r1.workload != "random_mt" || r1.system != "lego_tcp" || r1.threads != 1 || !r1.o.ok ||
        r1.misses_per_access <= 0) {
      continue;
    }
    const double lego1 = lego_misses_per_s(r1);
    for (auto& c : f.tcp_threads) {
      Wait how = Wait::kSpin;
      const ThreadedMissFloor* best = best_miss_floor(by_wait(c), &how);
      if (c.threads == 1 || best == nullptr) continue;
      printf(
          "  %d threads: the floor's best%s (%s, %.0f misses/s) is %.2fx %s's 1-thread %.0f: "
          "the most\n  %d threads could give it here if it ran at the floor itself\n",
          c.threads, victims ? " with write-backs" : "", wait_name(how), best->misses_per_s,
          best->misses_per_s / lego1, system_label(r1).c_str(), lego1, c.threads);
    }
  }
}

// random_mt's scaling over tcp beside the transport's own: what that many threads, each
// waiting on one round trip at a time, do over this host's TCP against one server thread,
// with both ends on the same CPUs (as lego-run's memory node is here). lego's ratio to its
// 1-thread row cannot be expected above the better of the two floors' ratios.
void print_thread_floors(const std::vector<MemoryRow>& rows, const MissFloors& f) {
  if (f.tcp_threads.empty()) return;
  double spin1 = 0, block1 = 0;
  for (auto& c : f.tcp_threads) {
    if (c.threads == 1 && c.spin) spin1 = c.spin.value();
    if (c.threads == 1 && c.block) block1 = c.block.value();
  }
  printf(
      "\nrandom_mt over tcp against the transport's own scaling: round trips/s of THREADS "
      "clients\n(72 B / 4128 B, one in flight each) against one server thread, both "
      "busy-polling (spin)\nor both blocking (block), and lego_tcp's accesses/s, each vs its "
      "own 1-thread figure\n");
  printf("%7s %12s %7s %12s %7s   %s\n", "threads", "spin rt/s", "vs 1", "block rt/s", "vs 1",
         "lego_tcp vs 1");
  for (auto& c : f.tcp_threads) {
    char s[32] = "-", sv[32] = "-", b[32] = "-", bv[32] = "-";
    if (c.spin) snprintf(s, sizeof s, "%.0f", c.spin.value());
    if (c.spin && spin1 > 0) snprintf(sv, sizeof sv, "%.2fx", c.spin.value() / spin1);
    if (c.block) snprintf(b, sizeof b, "%.0f", c.block.value());
    if (c.block && block1 > 0) snprintf(bv, sizeof bv, "%.2fx", c.block.value() / block1);
    std::string lego;
    for (auto& r : rows) {
      if (r.workload != "random_mt" || r.system != "lego_tcp" || r.threads != c.threads ||
          !r.o.ok) {
        continue;
      }
      const double one = one_thread_us(rows, r);
      if (one <= 0) continue;
      char vs1[96];
      snprintf(vs1, sizeof vs1, "%s%s %.2fx", lego.empty() ? "" : ", ", system_label(r).c_str(),
               one / r.o.us);
      lego += vs1;
    }
    printf("%7d %12s %7s %12s %7s   %s\n", c.threads, s, sv, b, bv,
           lego.empty() ? "-" : lego.c_str());
    if (!c.spin) printf("        spin: %s\n", c.spin.status().message().c_str());
    if (!c.block) printf("        block: %s\n", c.block.status().message().c_str());
  }
  print_threaded_miss_floor(rows, f, false);
  print_threaded_miss_floor(rows, f, true);
}

// The random workload's handler delivery against its sigbus delivery, per miss (µs per
// access / the row's misses per access, --stats fetches: the hits' few ns counted in), beside
// the same ratio at the floor. What a handler thread adds to a miss at the floor, the handler
// fault floor less the SIGBUS one, is added to lego's own sigbus miss: the ratio lego's
// handler delivery would reach if its handler cost nothing beyond the delivery itself.
void print_handler_floor(const std::vector<MemoryRow>& rows, const FaultFloor& f) {
  bool header = false;
  for (auto& s : rows) {
    if (s.workload != "random" || s.delivery != "sigbus" || !has_floor(s) || s.busy > 0 ||
        s.misses_per_access <= 0) {
      continue;
    }
    if (!header) {
      printf(
          "\nrandom, the handler delivery over the sigbus delivery per miss (µs per access / "
          "misses per\naccess): lego's measured, and the floor's: (lego's sigbus µs per miss "
          "%+.2f µs, what the\nhandler fault floor adds to the SIGBUS one, %+.2f µs, the "
          "fence on the dirty victim each miss\nevicts, which the sigbus delivery of a "
          "one-thread program skips) / lego's sigbus µs per miss;\npinned: with the pinned "
          "handler's %+.2f µs instead\n",
          f.handler_fault_us - f.fault_us, f.fence_us, f.handler_fault_same_cpu_us - f.fault_us);
      header = true;
    }
    const double sigbus = s.o.us / s.misses_per_access;
    // Every line the random workload touches is stored to: each miss evicts a dirty line.
    const double floor = (sigbus + f.handler_fault_us - f.fault_us + f.fence_us) / sigbus;
    const double pinned = (sigbus + f.handler_fault_same_cpu_us - f.fault_us + f.fence_us) / sigbus;
    char lego[96] = "-";
    if (const MemoryRow* h = delivery_twin(rows, s, "handler");
        h != nullptr && h->misses_per_access > 0) {
      const double handler = h->o.us / h->misses_per_access;
      snprintf(lego, sizeof lego, "%.2fx (µs per miss: sigbus %.2f, handler %.2f)",
               handler / sigbus, sigbus, handler);
    }
    MemoryRow base = s;
    base.delivery = "";  // the label names the system; both deliveries are on the line
    printf("  %s %.0f%% %s: handler/sigbus floor ratio %.2fx (pinned %.2fx), lego's %s\n",
           s.workload.c_str(), s.fraction * 100, system_label(base).c_str(), floor, pinned, lego);
  }
}

}  // namespace

void report_miss_floors(const std::vector<MemoryRow>& rows, uint64_t cap) {
  bool tcp = false, shm = false;
  std::vector<int> tcp_threads;  // random_mt's thread counts run over tcp
  for (auto& r : rows) {
    if (r.workload == "random_mt" && r.system == "lego_tcp" && r.o.ok &&
        std::find(tcp_threads.begin(), tcp_threads.end(), r.threads) == tcp_threads.end()) {
      tcp_threads.push_back(r.threads);
    }
    if (!has_floor(r)) continue;
    tcp |= r.system == "lego_tcp";
    shm |= r.system == "lego_shm";
  }
  std::sort(tcp_threads.begin(), tcp_threads.end());
  if (!tcp_threads.empty() && tcp_threads.front() != 1) tcp_threads.insert(tcp_threads.begin(), 1);
  if (!tcp_threads.empty()) tcp = true;
  if (!tcp && !shm) return;
  const MissFloors f = measure_miss_floors(cap, tcp, shm, /*windows=*/true, tcp_threads);
  printf("\nMiss floors on this host (see --help):\n");
  auto line = [](const char* what, const Result<double>& v) {
    if (v) {
      printf("  %-62s %7.2f us\n", what, v.value());
    } else {
      printf("  %-62s %s\n", what, v.status().message().c_str());
    }
  };
  auto part = [&f](double FaultFloor::*field) -> Result<double> {
    if (!f.fault) return f.fault.status();
    return f.fault.value().*field;
  };
  line("userfaultfd store miss (fault, SIGBUS, UFFDIO_COPY, return)", part(&FaultFloor::fault_us));
  line("the same, a handler thread serving it (lego-run's default)",
       part(&FaultFloor::handler_fault_us));
  line("the same, the handler pinned to the faulting thread's CPU",
       part(&FaultFloor::handler_fault_same_cpu_us));
  line("a line's share of a 32-line MADV_DONTNEED zap", part(&FaultFloor::zap_us));
  line("write-protecting a dirty victim (the handler delivery's fence)",
       part(&FaultFloor::fence_us));
  line("a line's share of a fault mapping a 32-line window", part(&FaultFloor::window_fault_us));
  line("a line's share of one madvise zapping a 32-line window", part(&FaultFloor::window_zap_us));
  if (tcp) {
    line("tcp round trip, 72 B / 4128 B, busy-polled, veth", f.tcp_rtt);
    line("tcp, a line's share of a 32-line window's round trip", f.tcp_window_line);
  }
  if (shm) {
    line("shm round trip, fi_pingpong -p shm, 4096 B each way", f.shm_rtt);
    line("shm, a line's share of fi_pingpong's 128 KiB one way", f.shm_window_line);
  }
  printf("%-11s %6s %-17s %16s %10s %11s\n", "workload", "local", "system", "floor us/access",
         "vs zram", "lego/floor");
  for (auto& r : rows) {
    if (!has_floor(r)) continue;
    const Result<double> floor = floor_per_access(r, f);
    if (!floor) continue;
    const double zram = peer_us(rows, r, "zram_swap");
    char vz[32] = "-";
    if (zram > 0) snprintf(vz, sizeof vz, "%.2fx", floor.value() / zram);
    printf("%-11s %5.0f%% %-17s %16.3f %10s %10.2fx\n", r.workload.c_str(), r.fraction * 100,
           system_label(r).c_str(), floor.value(), vz, r.o.us / floor.value());
  }
  if (f.fault) print_handler_floor(rows, f.fault.value());
  print_thread_floors(rows, f);
}

ProgramFloors measure_program_floors(bool tcp, bool shm) {
  // The fault floor's region: as many lines as a 32 MiB ExCache (the size matters little:
  // the floor maps and zaps lines it owns alone). A program's floor counts misses one line
  // each: no window round trips.
  const MissFloors f = measure_miss_floors(uint64_t{32} << 20, tcp, shm, /*windows=*/false, {});
  ProgramFloors p;
  if (f.fault) {
    p.handler_miss_us = f.fault->handler_fault_same_cpu_us;
    p.zap_us = f.fault->zap_us;
  } else {
    p.handler_miss_us = p.zap_us = f.fault.status();
  }
  p.tcp_rtt_us = f.tcp_rtt;
  p.shm_rtt_us = f.shm_rtt;
  return p;
}

}  // namespace lego::bench
