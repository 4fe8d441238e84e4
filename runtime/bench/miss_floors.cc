// lego-bench's miss floors (runtime/bench/lego_bench.h): what random and sequential
// misses cannot cost less than on this host with userfaultfd and the transport alone,
// measured in the same run (--help says what each part is).
#include <unistd.h>

#include <cstdio>

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

struct MissFloors {
  Result<FaultFloor> fault = Status(ENODATA, "not measured");
  Result<double> tcp_rtt = Status(ENODATA, "not measured");
  Result<double> shm_rtt = Status(ENODATA, "not measured");
  // A line's share of moving a 32-line window (round trip of a window fetch / 32).
  Result<double> tcp_window_line = Status(ENODATA, "not measured");
  Result<double> shm_window_line = Status(ENODATA, "not measured");
};

Result<double> per_window_line(Result<double> rtt) {
  if (!rtt) return rtt;
  return rtt.value() / kWindowLines;
}

MissFloors measure_miss_floors(uint64_t cap, bool tcp, bool shm) {
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
      f.tcp_window_line =
          per_window_line(tcp_busypoll_rtt_us(ns, remote, static_cast<uint16_t>(port + 2),
                                              kWindowRequestBytes, kWindowReplyBytes, 2000));
    } else {
      f.tcp_rtt = f.tcp_window_line = link.status();
    }
  }
  if (shm) {
    fprintf(stderr, "lego-bench: miss floors: shm round trip...\n");
    f.shm_rtt = fi_pingpong_rtt_us("shm", "rdm", kPage, 20000, "", "127.0.0.1",
                                   static_cast<uint16_t>(port + 1));
    // fi_pingpong sends the same size both ways: half its round trip is one window's way.
    auto window = fi_pingpong_rtt_us("shm", "rdm", kWindowLines * kPage, 2000, "", "127.0.0.1",
                                     static_cast<uint16_t>(port + 3));
    f.shm_window_line = window ? Result<double>(window.value() / 2 / kWindowLines) : window;
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

}  // namespace

void report_miss_floors(const std::vector<MemoryRow>& rows, uint64_t cap) {
  bool tcp = false, shm = false;
  for (auto& r : rows) {
    if (!has_floor(r)) continue;
    tcp |= r.system == "lego_tcp";
    shm |= r.system == "lego_shm";
  }
  if (!tcp && !shm) return;
  const MissFloors f = measure_miss_floors(cap, tcp, shm);
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
  line("a line's share of a 32-line MADV_DONTNEED zap", part(&FaultFloor::zap_us));
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
}

}  // namespace lego::bench
