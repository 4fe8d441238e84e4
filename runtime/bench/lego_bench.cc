// lego-bench: the ExCache against its peers, side by side in one run.
//
// Each workload runs, with the same heap and the same local-memory cap, under:
//   local      all-local memory, no cap;
//   zram_swap  Linux swap on a fresh zram device, the workload alone in a memory cgroup
//              capped at the ExCache size (docs/measurements.md's recipe; set up and torn
//              down here);
//   lego_tcp   lego-run, private memory node in another network namespace over tcp;
//   lego_shm   lego-run, private memory node over shm on this host;
// the lego systems once per fault delivery (lego-run --delivery: handler, the default, and
// sigbus), side by side; random_mt once per thread count (--threads).
// Heaps are filled with incompressible data (zeros flatter zram). A run the kernel
// OOM-kills is reported as such, never averaged in; the zram peer is then run again, up to
// --oom-retries times, and its row says how many of its runs were killed. Prints µs per
// access and ratios to
// local and to zram_swap, then each lego row's handler/sigbus ratio and random_mt's
// throughput per thread count with the CPU it took; --csv writes
// workload,local_fraction,threads,system,delivery,us_per_access.
// Then the miss floors: what random and sequential misses cannot cost less than here with
// userfaultfd and the transport alone (fault_floor.h, libfit/bench/floors.h; --help).
//
// File workloads (sequential write, sequential read, random 4 KiB reads of one large
// file) run under:
//   local      a temp directory on this host's file system (fsync after writes, page
//              cache dropped before reads);
//   lego       lego-run --export: a private lego-stord in its own network namespace over
//              tcp, mounted at /lego by lego-fs; this program itself, in its --file-worker
//              mode, does the I/O there, the same code as for local;
//   tcp_floor  the transport alone: a busy-polled TCP stream of the same bytes between
//              two network namespaces (MB/s), and a 4 KiB request/response round trip.
//
// The parts: workers.cc (the workloads), peers.cc (running them; zram), files.cc (the
// file workloads), miss_floors.cc (the floors); this file has the flags and the memory
// table.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "lego/flags.h"
#include "lego/units.h"
#include "runtime/bench/lego_bench.h"

using namespace lego;
using namespace lego::bench;

namespace {

const char* kUsage = R"(usage: lego-bench [options]

Memory workloads: each runs under all-local memory, Linux swap on zram capped to the
ExCache size, and lego-run over tcp and shm; µs per access and ratios.
File workloads: each runs on local disk, through the lego mount, and as the bare TCP
transport floor; MB/s or µs per read, and the ratios lego/local and lego/floor.

options:
  --only KIND          memory or files: run only that kind (default: both)
  --cap SIZE           local memory: ExCache size and cgroup cap (default 64M)
  --fractions LIST     local fraction(s) of the heap (default 0.25,0.5: heap 4x and 2x cap)
  --workloads LIST     memory workloads: random,sequential,zipf,random_mt (default: all)
  --systems LIST       for memory: local,zram_swap,lego_tcp,lego_shm (default: all)
  --deliveries LIST    lego-run --delivery for the lego systems: handler,sigbus (default:
                       both, side by side)
  --threads LIST       random_mt's thread counts (default 1,2,4)
  --accesses N         accesses per memory run (default 200000)
  --oom-retries N      run the zram peer again, up to N times, when the kernel OOM-kills
                       it (default 2); the table says how many of its runs were killed
  --no-floors          skip the miss floors printed after the memory table (below)
  --file-workloads LIST  seq_write,seq_read,rand_read_4k (default: all)
  --file-systems LIST  local,lego,tcp_floor (default: all)
  --file-size SIZE     the file's size (default 1G; e.g. 256M)
  --rand-reads N       4 KiB reads at random aligned offsets (default 20000)
  --file-dir DIR       where the temp directories for local and for the storage node's
                       export are made (default /var/tmp: this host's disk)
  --csv FILE           rows: workload,local_fraction,threads,system,delivery,
                       us_per_access (delivery "-" outside lego); then
                       file_workload,system,mb_per_s_or_us
  --help               this text

What the file workloads measure. One file of --file-size, written and read in 1 MiB
write()/read() calls from a static buffer; rand_read_4k is pread() of 4 KiB at random
aligned offsets with POSIX_FADV_RANDOM (µs per read). seq_write's time includes the
final fsync (data on the disk). Before each read workload the page cache is dropped
(sync; echo 3 > /proc/sys/vm/drop_caches: all of this host's clean cache, the lego
mount's and the storage node's included), so reads come from the disk in both cases.
local: a temp directory under --file-dir. lego: lego-run --export (a private lego-stord
in its own network namespace over tcp, serving another temp directory under --file-dir
on the same disk) runs `lego-bench --file-worker` on /lego: the same code as local.
tcp_floor: a busy-polled TCP stream of --file-size bytes between two network namespaces
(1 MiB sends; client->server for seq_write, server->client for seq_read), and a 4 KiB
request/response round trip (both sides busy-polling) for rand_read_4k: no disk, no FUSE.

Miss floors. When the random or sequential workload runs under lego, the table is
followed by what its misses cannot cost less than on this host with userfaultfd,
measured in the same run (no memory node work, no copies of lego's own):
  random: one store miss (fault, SIGBUS, a handler mapping 4 KiB with UFFDIO_COPY,
  sigreturn), a line's share of a 32-line process_madvise(MADV_DONTNEED) zap, and one
  round trip: for tcp a busy-polled socket exchanging a fetch's 72-byte request and
  4128-byte reply over a veth pair into another namespace (as lego-run's link), for shm
  libfabric's fi_pingpong -p shm with 4096 bytes each way. An access misses with
  probability 1 - local fraction: the floor per access is that times the sum.
  sequential: every access misses; per line, its share of a fault whose handler maps a
  32-line window with one UFFDIO_COPY, of one madvise zapping a window, and 1.5 times
  its share of moving a window (in for both passes, out for the written half): tcp a
  32-line fetch's round trip, shm half of fi_pingpong's 128 KiB round trip.
"vs zram" is the floor's ratio to swap on zram, "lego/floor" lego's to the floor.

Deliveries and threads. After the table: for each lego row, the handler delivery's µs per
access over the sigbus delivery's (the misses are the same, so this is the ratio per
miss); and for random_mt, accesses per second per thread count and their ratio to one
thread, with the CPU the timed part took per access: the program in user mode and in the
kernel (its threads and the runtime's: getrusage), and the memory node (lego-memd's
/proc/PID/stat). Over random accesses at local fraction f, (1 - f) of accesses miss: CPU
per miss is CPU per access / (1 - f).

Needs root (zram, cgroups, network namespaces). lego-run is looked up beside this
program (bazel-bin/runtime/lego-run) or through $LEGO_RUN.
)";

constexpr const char* kKinds[] = {"memory", "files"};
constexpr const char* kWorkloads[] = {"random", "sequential", "zipf", "random_mt"};
constexpr const char* kSystems[] = {"local", "zram_swap", "lego_tcp", "lego_shm"};
constexpr const char* kDeliveries[] = {"handler", "sigbus"};

// µs per access of r's lego system under delivery `d`, or 0.
double delivery_us(const std::vector<MemoryRow>& rows, const MemoryRow& r, const char* d) {
  for (auto& q : rows) {
    if (q.workload == r.workload && q.fraction == r.fraction && q.threads == r.threads &&
        q.system == r.system && q.delivery == d && q.o.ok) {
      return q.o.us;
    }
  }
  return 0;
}

// Each lego row's handler/sigbus ratio, then random_mt per thread count.
void print_deliveries_and_threads(const std::vector<MemoryRow>& rows) {
  bool header = false;
  for (auto& r : rows) {
    if (r.delivery != "handler" || !r.o.ok) continue;
    const double sigbus = delivery_us(rows, r, "sigbus");
    if (sigbus <= 0) continue;
    if (!header) {
      printf("\nhandler delivery over sigbus delivery (µs per access; the same misses):\n");
      printf("%-11s %6s %7s %-10s %10s %10s %8s\n", "workload", "local", "threads", "system",
             "handler", "sigbus", "ratio");
      header = true;
    }
    printf("%-11s %5.0f%% %7d %-10s %10.3f %10.3f %7.2fx\n", r.workload.c_str(), r.fraction * 100,
           r.threads, r.system.c_str(), r.o.us, sigbus, r.o.us / sigbus);
  }
  header = false;
  for (auto& r : rows) {
    if (r.workload != "random_mt" || !r.o.ok) continue;
    if (!header) {
      printf(
          "\nrandom_mt: accesses per second by threads, and CPU µs per access of the timed "
          "part\n(program user, program kernel, memory node; per miss: / (1 - local))\n");
      printf("%6s %-17s %7s %12s %9s %9s %9s %9s\n", "local", "system", "threads", "accesses/s",
             "vs 1", "user", "kernel", "memd");
      header = true;
    }
    double one = 0;
    for (auto& q : rows) {
      if (q.workload == r.workload && q.fraction == r.fraction && q.system == r.system &&
          q.delivery == r.delivery && q.threads == 1 && q.o.ok) {
        one = q.o.us;
      }
    }
    char vs[32] = "-", memd[32] = "-";
    if (one > 0) snprintf(vs, sizeof vs, "%.2fx", one / r.o.us);
    if (r.cpu_memd >= 0) snprintf(memd, sizeof memd, "%.3f", r.cpu_memd);
    printf("%5.0f%% %-17s %7d %12.0f %9s %9.3f %9.3f %9s\n", r.fraction * 100,
           system_label(r).c_str(), r.threads, 1e6 / r.o.us, vs, r.cpu_user, r.cpu_kernel, memd);
  }
}
constexpr const char* kFileWorkloads[] = {"seq_write", "seq_read", "rand_read_4k"};
constexpr const char* kFileSystems[] = {"local", "lego", "tcp_floor"};

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && strcmp(argv[1], "--worker") == 0) {
    if (argc != 6) die("--worker WORKLOAD HEAP_BYTES ACCESSES THREADS");
    return worker(argv[2], strtoull(argv[3], nullptr, 10), atol(argv[4]), atoi(argv[5]));
  }
  if (argc >= 2 && strcmp(argv[1], "--file-worker") == 0) {
    if (argc != 6) die("--file-worker DIR SIZE_BYTES RAND_READS WORKLOADS");
    return file_worker(argv[2], strtoull(argv[3], nullptr, 10), atol(argv[4]), split_list(argv[5]));
  }
  uint64_t cap = 64ull << 20;
  std::vector<double> fractions{0.25, 0.5};
  std::vector<std::string> workloads(std::begin(kWorkloads), std::end(kWorkloads));
  std::vector<std::string> systems(std::begin(kSystems), std::end(kSystems));
  std::vector<std::string> deliveries(std::begin(kDeliveries), std::end(kDeliveries));
  std::vector<int> thread_counts{1, 2, 4};
  long accesses = 200000;
  int oom_retries = 2;
  bool floors = true;
  std::string csv, only;
  FileOptions fo;
  const std::vector<flags::Flag> table = {
      {"cap", true, [&](const char* a) { cap = flags::size("--cap", a); }},
      {"fractions", true,
       [&](const char* a) {
         fractions.clear();
         for (auto& f : split_list(a)) {
           char* end = nullptr;
           const double v = strtod(f.c_str(), &end);
           if (end == f.c_str() || *end != '\0' || !(v > 0 && v <= 1)) {
             flags::usage_error("--fractions: '" + f + "' is not in (0, 1]");
           }
           fractions.push_back(v);
         }
       }},
      {"workloads", true,
       [&](const char* a) { workloads = flags::list("--workloads", a, kWorkloads); }},
      {"systems", true, [&](const char* a) { systems = flags::list("--systems", a, kSystems); }},
      {"deliveries", true,
       [&](const char* a) { deliveries = flags::list("--deliveries", a, kDeliveries); }},
      {"threads", true,
       [&](const char* a) {
         thread_counts.clear();
         for (auto& t : split_list(a)) {
           thread_counts.push_back(static_cast<int>(flags::number("--threads", t.c_str(), 1, 64)));
         }
       }},
      {"accesses", true,
       [&](const char* a) { accesses = flags::number("--accesses", a, 1, 1000000000000); }},
      {"csv", true, [&](const char* a) { csv = a; }},
      {"only", true, [&](const char* a) { only = flags::choice("--only", a, kKinds); }},
      {"file-workloads", true,
       [&](const char* a) { fo.workloads = flags::list("--file-workloads", a, kFileWorkloads); }},
      {"file-systems", true,
       [&](const char* a) { fo.systems = flags::list("--file-systems", a, kFileSystems); }},
      {"file-size", true,
       [&](const char* a) {
         fo.size = flags::size("--file-size", a, kPage, "4K") & ~uint64_t{kPage - 1};
       }},
      {"rand-reads", true,
       [&](const char* a) { fo.rand_reads = flags::number("--rand-reads", a, 1, 100000000); }},
      {"file-dir", true, [&](const char* a) { fo.dir = a; }},
      {"oom-retries", true,
       [&](const char* a) {
         oom_retries = static_cast<int>(flags::number("--oom-retries", a, 0, 100));
       }},
      {"no-floors", false, [&](const char*) { floors = false; }},
  };
  const int first = flags::parse(argc, argv, {"lego-bench", kUsage, 2, false}, table);
  if (first < argc) die(std::string("unexpected argument '") + argv[first] + "' (see --help)");
  if (geteuid() != 0) die("needs root (zram, cgroups, network namespaces)");
  std::string self = self_path();
  std::string lego_run =
      getenv("LEGO_RUN") ? getenv("LEGO_RUN") : self.substr(0, self.rfind('/')) + "/../lego-run";
  if (access(lego_run.c_str(), X_OK) != 0)
    die("cannot find lego-run at " + lego_run + " (set LEGO_RUN)");

  std::vector<MemoryRow> rows;
  if (only == "files") fractions.clear();
  for (double f : fractions) {
    uint64_t heap = static_cast<uint64_t>(cap / f) & ~uint64_t{kPage - 1};
    for (auto& w : workloads) {
      for (int threads : w == "random_mt" ? thread_counts : std::vector<int>{1}) {
        std::vector<std::string> worker{self,
                                        "--worker",
                                        w,
                                        std::to_string(heap),
                                        std::to_string(accesses),
                                        std::to_string(threads)};
        for (auto& s : systems) {
          const bool lego = s == "lego_tcp" || s == "lego_shm";
          for (const std::string& d : lego ? deliveries : std::vector<std::string>{""}) {
            fprintf(stderr, "lego-bench: %s, %d thread%s, %.0f%% local, %s%s%s...\n", w.c_str(),
                    threads, threads > 1 ? "s" : "", f * 100, s.c_str(), d.empty() ? "" : "/",
                    d.c_str());
            Outcome o;
            if (s == "local") {
              o = run(worker, "");
            } else if (s == "zram_swap") {
              // An OOM kill is the kernel's verdict on that run, not a figure: say so, and try
              // again (a fresh zram device and cgroup each time) so that the row can still
              // compare.
              for (int kills = 0;; ++kills) {
                ZramSwap z;
                std::string err = z.setup(cap);
                if (!err.empty()) {
                  o = Outcome();
                  o.error = err;
                } else {
                  o = run(worker, z.tasks());
                }
                o.oom_kills = kills;
                if (!o.oom || kills == oom_retries) break;
                fprintf(stderr,
                        "lego-bench: %s, %.0f%% local, zram_swap: OOM-killed, running again\n",
                        w.c_str(), f * 100);
              }
              if (o.oom) o.oom_kills += 1;
            } else if (s == "lego_tcp" || s == "lego_shm") {
              std::vector<std::string> a{lego_run,
                                         "--excache",
                                         std::to_string(cap),
                                         "--delivery",
                                         d,
                                         "--transport",
                                         s == "lego_tcp" ? "tcp" : "shm",
                                         "--memory-capacity",
                                         std::to_string(heap * 2 + (256 << 20)),
                                         "--"};
              a.insert(a.end(), worker.begin(), worker.end());
              o = run(a, "");
            }
            MemoryRow row{w, s, f, threads, o, d};
            if (const size_t at = o.text.find("cpu_us_per_access ");
                o.ok && at != std::string::npos) {
              sscanf(o.text.c_str() + at, "cpu_us_per_access %lf %lf %lf", &row.cpu_user,
                     &row.cpu_kernel, &row.cpu_memd);
            }
            rows.push_back(row);
          }
        }
      }
    }
  }
  std::vector<FileRow> file_rows;
  if (only != "memory") file_rows = run_files(fo, self, lego_run);
  if (only != "files") {
    printf("\nlego-bench: µs per access, cap %s (ExCache = cgroup limit), %ld accesses per run\n",
           format_size(cap).c_str(), accesses);
    printf("%-11s %6s %7s %-17s %12s %10s %10s\n", "workload", "local", "threads", "system",
           "us/access", "vs local", "vs zram");
    for (auto& r : rows) {
      const double local = peer_us(rows, r, "local"), zram = peer_us(rows, r, "zram_swap");
      if (!r.o.ok) {
        printf("%-11s %5.0f%% %7d %-17s %12s  (%s", r.workload.c_str(), r.fraction * 100, r.threads,
               system_label(r).c_str(), r.o.oom ? "OOM-killed" : "failed", r.o.error.c_str());
        if (r.o.oom_kills > 1) printf("; all %d runs OOM-killed", r.o.oom_kills);
        printf(")\n");
        continue;
      }
      char vl[32] = "-", vz[32] = "-";
      if (local > 0) snprintf(vl, sizeof vl, "%.1fx", r.o.us / local);
      if (zram > 0) snprintf(vz, sizeof vz, "%.2fx", r.o.us / zram);
      printf("%-11s %5.0f%% %7d %-17s %12.3f %10s %10s", r.workload.c_str(), r.fraction * 100,
             r.threads, system_label(r).c_str(), r.o.us, vl, vz);
      if (r.o.oom_kills > 0) {
        printf("  (after %d OOM-killed run%s)", r.o.oom_kills, r.o.oom_kills > 1 ? "s" : "");
      }
      printf("\n");
    }
    print_deliveries_and_threads(rows);
  }
  if (only != "files" && floors) report_miss_floors(rows, cap);
  if (only != "memory") print_files(fo, file_rows);
  if (!csv.empty()) {
    FILE* f = fopen(csv.c_str(), "w");
    if (f == nullptr) die("cannot write " + csv);
    if (only != "files") {
      fprintf(f, "workload,local_fraction,threads,system,delivery,us_per_access\n");
    }
    for (auto& r : rows) {
      const char* d = r.delivery.empty() ? "-" : r.delivery.c_str();
      if (r.o.ok) {
        fprintf(f, "%s,%.2f,%d,%s,%s,%.4f\n", r.workload.c_str(), r.fraction, r.threads,
                r.system.c_str(), d, r.o.us);
      } else {
        fprintf(f, "%s,%.2f,%d,%s,%s,%s\n", r.workload.c_str(), r.fraction, r.threads,
                r.system.c_str(), d, r.o.oom ? "oom" : "failed");
      }
    }
    if (only != "memory") {
      if (only != "files") fprintf(f, "\n");  // a second table follows
      fprintf(f, "file_workload,system,mb_per_s_or_us\n");
      for (auto& r : file_rows) {
        if (r.ok) {
          fprintf(f, "%s,%s,%.4f\n", r.workload.c_str(), r.system.c_str(), r.figure);
        } else {
          fprintf(f, "%s,%s,failed\n", r.workload.c_str(), r.system.c_str());
        }
      }
    }
    fclose(f);
    printf("wrote %s\n", csv.c_str());
  }
  return 0;
}
