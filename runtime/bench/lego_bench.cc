// lego-bench: the ExCache against its peers, side by side in one run.
//
// Each workload runs, with the same heap and the same local-memory cap, under:
//   local      all-local memory, no cap;
//   zram_swap  Linux swap on a fresh zram device, the workload alone in a memory cgroup
//              capped at the ExCache size (docs/measurements.md's recipe; set up and torn
//              down here);
//   lego_tcp   lego-run, private memory node in another network namespace over tcp;
//   lego_shm   lego-run, private memory node over shm on this host;
//   lego_config  lego-run --config FILE against the memory nodes of an existing cluster
//              (only when named, with --config: how the verbs guest test runs it);
// the lego systems once per fault delivery (lego-run --delivery: handler, the default, and
// sigbus), side by side, and once per --rma mode (one-sided reads against requests: each
// lego row with --rma on beside its --rma off twin, docs/rma.md); random_mt once per thread
// count (--threads).
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
// Cluster rows (--only cluster): the random read-modify-write workload under lego-run's
// private cluster of --memory-nodes N with --replicas R: its cost per access with R copies
// against 1 (over tcp and shm, --cluster-runs pairs alternating), then failover_ms (a memory
// node SIGKILLed mid-run: from the kill to the end of the first miss that met the lost node,
// the runtime's own time of it) and re-replication's speed (the runtime's bytes_copied over
// its first copy's start to its last one's end) with the program's pace meanwhile.
//
// Real programs (--only programs): python3, sqlite3, sort, stress-ng and redis-server,
// unmodified, under local, zram_swap, lego_tcp and lego_shm (programs.cc).
//
// Start-up: /bin/true alone and under lego-run (embedded default over tcp and shm, and
// --config against a running lego-memd over tcp and shm): median wall time, time added,
// and where it goes, from the runs' LEGO_STARTUP_TRACE marks (startup.cc).
//
// The parts: workers.cc (the workloads), peers.cc (running them; zram), files.cc (the
// file workloads), miss_floors.cc (the floors), cluster.cc (the cluster rows),
// programs.cc (the real programs), startup.cc (start-up); this file has the flags
// and the memory table.
#include <unistd.h>

#include <algorithm>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "lego/flags.h"
#include "lego/progress.h"
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
  --only KIND          memory, files, startup, cluster or programs: run only that kind
                       (default: memory, files and startup; cluster and programs only
                       when named)
  --cap SIZE           local memory: ExCache size and cgroup cap (default 64M)
  --fractions LIST     local fraction(s) of the heap (default 0.25,0.5: heap 4x and 2x cap)
  --workloads LIST     memory workloads: random,sequential,zipf,hotset,random_mt (default:
                       all). zipf: Zipf(0.99) over the heap's pages, hottest first;
                       hotset: 90% of accesses to the first eighth of the heap, 10% to any
                       page
  --systems LIST       for memory: local,zram_swap,lego_tcp,lego_shm (default: all), and
                       lego_config (only when named: lego-run --config FILE)
  --config FILE        the cluster file lego_config runs against (lego-run --config): its
                       memory nodes must be running and hold the heap
  --rma LIST           lego-run --rma for the lego rows, each a row of its own: auto,on,off
                       (default auto); a mode listed again runs again, in turn with the
                       others (off,on,auto,off,on,auto: two rounds). With off and
                       another, a table of the modes side by side follows: the median µs
                       per access of each mode's runs, the median of each round's ratio to
                       off, the median miss's latency bucket, the share of fetches read
                       one-sided, and auto's averages
  --memd-busy LIST     with --systems lego_config: run the lego_config rows again with N
                       other processor clients loading its memory nodes, for each N
                       (default 0: the node serves the row alone; e.g. 0,2). Each client
                       is lego-run --config --rma off of the random workload over an 8
                       MiB heap with a 1 MiB ExCache (nearly every access a fetch and a
                       write-back), started before the row's --rma modes (each
                       client's heap filled) and stopped after them. The --rma table then has a line per load
  --deliveries LIST    lego-run --delivery for the lego systems: handler,sigbus (default:
                       both, side by side)
  --threads LIST       random_mt's thread counts (default 1,2,4)
  --policies LIST      lego rows' eviction policies, each a row of its own (lego-run
                       --policy): fifo,clock,refault (memory: default fifo; programs:
                       default one row under lego-run's default, refault; given, rows
                       such as lego_shm/fifo). Memory rows show misses per access (the
                       loop's fetches, from --stats)
  --accesses N         accesses per memory run (default 200000)
  --oom-retries N      run the zram peer again, up to N times, when the kernel OOM-kills
                       it (default 2); the table says how many of its runs were killed
  --no-floors          skip the miss floors printed after the memory table and the real
                       programs' floors (below)
  --file-workloads LIST  seq_write,seq_read,rand_read_4k (default: all)
  --file-systems LIST  local,lego,tcp_floor (default: all)
  --file-size SIZE     the file's size (default 1G; e.g. 256M)
  --rand-reads N       4 KiB reads at random aligned offsets (default 20000)
  --file-dir DIR       where the temp directories for local and for the storage node's
                       export are made (default /var/tmp: this host's disk)
  --startup-runs N     runs of each start-up case (default 7; the median is shown)
  --memory-nodes N     cluster rows: private memory nodes (default 3)
  --replicas R         cluster rows: copies compared with 1 (default 2); with 2 or more a
                       failover row too
  --cluster-fraction F cluster rows: the random workload's local fraction (default 0.25)
  --cluster-runs N     cluster rows: runs of replication's cost, R=1 and R=R alternating,
                       each pair's ratio and their median printed (default 3)
  --csv FILE           rows: workload,local_fraction,threads,system,delivery,
                       us_per_access,policy,misses_per_access,rma,memd_busy (delivery,
                       policy and rma "-" outside lego; us_per_access "failed" or "oom"
                       for a run that gave no figure); then
                       file_workload,system,mb_per_s_or_us; then
                       startup_system,median_ms,added_ms; then (cluster) cluster_row,
                       transport,local_fraction,memory_nodes,replicas,run,us_per_access,
                       vs_replicas_1,detect_ms,failover_ms,stall_ms,rereplication_mb,
                       rereplication_ms,rereplication_mb_per_s,us_per_access_before_kill,
                       us_per_access_during_rereplication
  --programs LIST      with --only programs: python,sqlite,sort,stress-ng,redis (default:
                       all)
  --program-size F     with --only programs: scale every program's input by F (default 1:
                       heaps of ~90-165 MiB; 0.25: ~25-45 MiB; 0.05 for a quick check)
  --corrupt-output SYSTEM  for tests of lego-bench itself: the programs' runs under SYSTEM
                       get a slightly different input, so their output must be reported
                       as differing from local's
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
  random, handler delivery: the same store misses on a region of their own whose
  userfaultfd has no SIGBUS, each served by a handler thread that polls it as lego's
  does while several threads fault (non-blocking read(), sched_yield() between empty
  reads for 50 µs after the last fault, then poll()) and maps the line with UFFDIO_COPY,
  waking the faulting thread; and again with both threads pinned to one CPU. The three
  deliveries' rounds run in turn. And the fence: one
  UFFDIO_WRITEPROTECT of a resident dirty line, which an eviction under the handler
  delivery pays per dirty victim (the sigbus delivery skips it while the program has one
  thread). For each random lego row under the sigbus delivery, a line "handler/sigbus
  floor ratio": (lego's sigbus µs per miss + the handler fault's µs over the SIGBUS
  fault's + the fence, as each miss evicts a dirty line) / lego's sigbus µs per miss,
  what a handler costing nothing beyond its delivery would reach (pinned: with the
  pinned figure), beside lego's own handler/sigbus, per miss (each row's µs per access /
  its misses per access).
  The free figure depends on where the scheduler puts the two threads (here often on
  two CPUs: a cross-CPU wake-up per miss) and lego's handler can beat it; the pinned
  one is the lower (docs/measurements.md).
  random_mt over tcp: for each thread count, that many client threads each making the
  fetch's exchange with one in flight, against one server thread serving them all (as
  lego-memd's), over the same veth link, both sides busy-polling and both blocking: round
  trips per second and each one's ratio to its 1-thread figure, beside lego_tcp's.
  And random_mt's miss floor by threads: that many threads, each storing to missing lines
  of its own in one userfaultfd region (SIGBUS delivery), each miss one such round trip on
  the thread's own connection and a UFFDIO_COPY of the reply, a 32-line zap per 32
  misses; both ends waiting by spinning, spinning with sched_yield, or blocking. Printed:
  misses per second each way, the best of the three, its ratio to the best at 1 thread,
  the CPUs it kept busy, beside lego_tcp's misses per second; then, per thread count, the
  floor's best over lego_tcp's own 1-thread misses per second: the most that many
  threads could give lego here. With both ends on this host's CPUs, the floor's ratio is
  what more threads can gain at best (docs/measurements.md). Then the same floor with
  write-backs: each request also carries the 4 KiB of a line the thread dropped in its
  last batch, the dirty victim each of random_mt's misses evicts (4168 B / 4128 B).

Real programs (--only programs). Each runs under local first: once to bring the files it
reads into the page cache (a cgroup is charged for the page cache its tasks bring in, so
the peers, which run after it, are not), then alone in a memory cgroup whose anonymous
memory is sampled every 5 ms: the peak sets each other run's cap, fraction x peak: the
ExCache size for lego-run; for zram the cgroup limit, plus the
program's peak page cache and kernel memory under local (the cgroup charges them, the
ExCache does not hold them: the same anonymous budget for both). Local's stdout is the
reference: every other run's must be the same (a hash of all of it), and a difference is
printed loudly and makes lego-bench exit 1; stress-ng, whose output is timing, is checked
by its own --verify. lego runs use lego-run's defaults (--delivery handler) and --stats:
the table has their misses and evictions, summed over the run's processes.
  python     /usr/bin/python3 builds a dict of 600k sha1 strings and a list of 1.2M ints
  sqlite     sqlite3 :memory:, 200k rows of digests, two indexes, queries, integrity_check
  sort       GNU sort --parallel=2 (multi-threaded) of 1.2M random lines
  stress-ng  --vm 2 --vm-method all --verify: two forked workers over 160 MiB; under lego
             each gets an ExCache of half the cap (the cap column shows one's): lego-run's
             ExCache is per process, the zram peer's cgroup caps both workers together
  redis      redis-server, 300k keys loaded by redis-cli --pipe, then redis-benchmark's
             600k GETs of random keys (16 clients, pipeline 8); figure: that phase
Printed: seconds, req/s (redis), ratios to local and zram, the output check, misses and
evictions; then the geometric mean over programs of lego vs zram per fraction (runs
OOM-killed under zram, failed, or with differing output kept out). --csv rows:
program,local_fraction,system,seconds,ok,oom_killed.
Then each lego run's floor (not with --no-floors), from figures measured after the runs
(the miss floors above): local's seconds, plus for each of the run's misses a store miss
served by a handler thread pinned to the faulting thread's CPU (the default delivery's
cheapest hand-off here) and the transport's one-line round trip, plus for each eviction a
line's share of a 32-line zap (the misses and evictions of sort's 2 threads and of
stress-ng's 2 workers may overlap: theirs divided by 2): what the run cannot cost less
than with userfaultfd on this host, however fast lego's own code. It leaves out the
write-backs, prefetched lines, zero fills and first-store faults, so it is low. Printed
per run beside lego's seconds, its ratio to zram and lego's to it, and the floors'
geometric mean vs zram per fraction over the programs lego's mean has. redis has none
(its seconds are its GET phase's).

Start-up. /bin/true, each case once per round, rounds side by side: local (alone);
lego_tcp and lego_shm (lego-run's embedded default: a private lego-memd started and
stopped by the run); config_tcp and config_shm (lego-run --config against a lego-memd
this program started before, as a user's cluster runs all along). The table gives the
median wall time and what lego-run adds to local's; the next, where the time goes: the
medians of the phases between the marks lego-run, its lego-memd and the runtime in
/bin/true write to $LEGO_STARTUP_TRACE (include/lego/startup_trace.h).

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

constexpr const char* kKinds[] = {"memory", "files", "startup", "cluster", "programs"};
constexpr const char* kWorkloads[] = {"random", "sequential", "zipf", "hotset", "random_mt"};
constexpr const char* kPolicies[] = {"fifo", "clock", "refault"};
constexpr const char* kSystems[] = {"local", "zram_swap", "lego_tcp", "lego_shm", "lego_config"};
constexpr const char* kRmaModes[] = {"auto", "on", "off"};
bool is_lego(const std::string& s) {
  return s == "lego_tcp" || s == "lego_shm" || s == "lego_config";
}
constexpr const char* kDeliveries[] = {"handler", "sigbus"};

bool same_rma_group(const MemoryRow& a, const MemoryRow& b) {
  return a.workload == b.workload && a.fraction == b.fraction && a.threads == b.threads &&
         a.system == b.system && a.delivery == b.delivery && a.policy == b.policy &&
         a.busy == b.busy;
}

// Of `rma`'s rows in r's group (a mode listed more than once in --rma runs that often,
// alternating with the others), the one whose µs per access is the median (the lower middle
// of an even count); *runs counts them all, *failed those that failed. Null when none ran.
const MemoryRow* median_rma_row(const std::vector<MemoryRow>& rows, const MemoryRow& r,
                                const char* rma, int* runs, int* failed) {
  std::vector<const MemoryRow*> ok;
  *runs = *failed = 0;
  for (auto& q : rows) {
    if (q.rma != rma || !same_rma_group(q, r)) continue;
    ++*runs;
    if (q.o.ok) {
      ok.push_back(&q);
    } else {
      ++*failed;
    }
  }
  if (ok.empty()) return nullptr;
  std::sort(ok.begin(), ok.end(), [](auto* a, auto* b) { return a->o.us < b->o.us; });
  return ok[(ok.size() - 1) / 2];
}

// The median over rounds of `rma`'s µs per access over off's in the same round (the k-th
// run of each, side by side in time), or 0 when no round has both.
double median_paired_ratio(const std::vector<MemoryRow>& rows, const MemoryRow& r,
                           const char* rma) {
  std::vector<const MemoryRow*> off, mode;
  for (auto& q : rows) {
    if (!same_rma_group(q, r)) continue;
    if (q.rma == "off") off.push_back(&q);
    if (q.rma == rma) mode.push_back(&q);
  }
  std::vector<double> ratios;
  for (size_t k = 0; k < off.size() && k < mode.size(); k++) {
    if (off[k]->o.ok && mode[k]->o.ok) ratios.push_back(mode[k]->o.us / off[k]->o.us);
  }
  if (ratios.empty()) return 0;
  std::sort(ratios.begin(), ratios.end());
  const size_t n = ratios.size();
  return n % 2 == 1 ? ratios[n / 2] : (ratios[n / 2 - 1] + ratios[n / 2]) / 2;
}

// The --rma modes of each lego row side by side (off, on, auto), per memory-node load
// (--memd-busy): µs per access (the median of a mode's runs), the median over rounds of
// each round's ratio to off (a load that changes between rounds moves both sides of a
// round's ratio alike), the median miss's bucket, and the share of fetches read one-sided.
// Printed when off and another mode ran.
void print_rma(const std::vector<MemoryRow>& rows) {
  bool header = false;
  for (size_t k = 0; k < rows.size(); k++) {
    const MemoryRow& first = rows[k];
    if (first.rma != "off") continue;
    bool seen = false;  // an earlier run of the group printed it
    for (size_t j = 0; j < k; j++) seen |= rows[j].rma == "off" && same_rma_group(rows[j], first);
    if (seen) continue;
    int runs[3], failed[3];
    const MemoryRow* median[3];
    const char* names[3] = {"off", "on", "auto"};
    for (int i = 0; i < 3; i++)
      median[i] = median_rma_row(rows, first, names[i], &runs[i], &failed[i]);
    if (runs[1] == 0 && runs[2] == 0) continue;
    if (!header) {
      printf(
          "\nrequests (--rma off), one-sided reads (--rma on) and the measured choice (--rma "
          "auto),\nwith the memory node serving this run alone (memd idle) or N other processor "
          "clients\n(busy N, --memd-busy): µs per access (the median of each mode's runs; * some "
          "failed), the\nmedian of the rounds' ratios to off, the median miss's latency bucket "
          "(< µs), the share of\nfetches read one-sided (rma/f), and auto's last averages of a "
          "one-line fetch by request\nand one-sided (µs)\n");
      printf("%-11s %6s %-17s %-7s %4s %9s %9s %9s %7s %8s %8s %8s %8s %8s %10s %8s %8s\n",
             "workload", "local", "system", "memd", "runs", "off us", "on us", "auto us", "on/off",
             "auto/off", "off p50", "on p50", "auto p50", "on rma/f", "auto rma/f", "avg req",
             "avg rma");
      header = true;
    }
    MemoryRow base = first;
    base.rma = "";
    base.busy = 0;  // its own column
    char memd[16] = "idle";
    if (first.busy > 0) snprintf(memd, sizeof memd, "busy %d", first.busy);
    char us[3][32], ratio[3][32], p50[3][32], share[3][32], avg[2][32] = {"-", "-"};
    for (int i = 0; i < 3; i++) {
      const MemoryRow* r = median[i];
      snprintf(us[i], sizeof us[i], runs[i] == 0 ? "-" : "failed");
      snprintf(ratio[i], sizeof ratio[i], "-");
      snprintf(p50[i], sizeof p50[i], "-");
      snprintf(share[i], sizeof share[i], "-");
      if (r == nullptr) continue;
      snprintf(us[i], sizeof us[i], "%.3f%s", r->o.us, failed[i] > 0 ? "*" : "");
      if (const double x = median_paired_ratio(rows, first, names[i]); x > 0) {
        snprintf(ratio[i], sizeof ratio[i], "%.2fx", x);
      }
      if (r->miss_p50_us >= 0) snprintf(p50[i], sizeof p50[i], "%.1f", r->miss_p50_us);
      const double fetches = r->misses_per_access * double(r->accesses);
      if (r->rma_lines >= 0 && fetches > 0) {
        snprintf(share[i], sizeof share[i], "%.2f", r->rma_lines / fetches);
      }
    }
    if (const MemoryRow* a = median[2]; a != nullptr) {
      if (a->auto_request_us > 0) snprintf(avg[0], sizeof avg[0], "%.1f", a->auto_request_us);
      if (a->auto_one_sided_us > 0) snprintf(avg[1], sizeof avg[1], "%.1f", a->auto_one_sided_us);
    }
    printf("%-11s %5.0f%% %-17s %-7s %4d %9s %9s %9s %7s %8s %8s %8s %8s %8s %10s %8s %8s\n",
           first.workload.c_str(), first.fraction * 100, system_label(base).c_str(), memd,
           std::max({runs[0], runs[1], runs[2]}), us[0], us[1], us[2], ratio[1], ratio[2], p50[0],
           p50[1], p50[2], share[1], share[2], avg[0], avg[1]);
  }
}

// Each lego row's handler/sigbus ratio, then random_mt per thread count.
void print_deliveries_and_threads(const std::vector<MemoryRow>& rows) {
  bool header = false;
  for (auto& r : rows) {
    if (r.delivery != "handler" || !r.o.ok || r.busy > 0) continue;
    const MemoryRow* twin = delivery_twin(rows, r, "sigbus");
    if (twin == nullptr) continue;
    const double sigbus = twin->o.us;
    if (!header) {
      printf("\nhandler delivery over sigbus delivery (µs per access; the same misses):\n");
      printf("%-11s %6s %7s %-17s %10s %10s %8s\n", "workload", "local", "threads", "system",
             "handler", "sigbus", "ratio");
      header = true;
    }
    const std::string system =
        r.policy.empty() || r.policy == "fifo" ? r.system : r.system + "/" + r.policy;
    printf("%-11s %5.0f%% %7d %-17s %10.3f %10.3f %7.2fx\n", r.workload.c_str(), r.fraction * 100,
           r.threads, system.c_str(), r.o.us, sigbus, r.o.us / sigbus);
  }
  header = false;
  for (auto& r : rows) {
    if (r.workload != "random_mt" || !r.o.ok) continue;
    if (!header) {
      printf(
          "\nrandom_mt: accesses per second by threads, and CPU µs per access of the timed "
          "part\n(program user, program kernel, memory node; per miss: / (1 - local))\n");
      printf("%6s %-24s %7s %12s %9s %9s %9s %9s\n", "local", "system", "threads", "accesses/s",
             "vs 1", "user", "kernel", "memd");
      header = true;
    }
    const double one = one_thread_us(rows, r);
    char vs[32] = "-", memd[32] = "-";
    if (one > 0) snprintf(vs, sizeof vs, "%.2fx", one / r.o.us);
    if (r.cpu_memd >= 0) snprintf(memd, sizeof memd, "%.3f", r.cpu_memd);
    printf("%5.0f%% %-24s %7d %12.0f %9s %9.3f %9.3f %9s\n", r.fraction * 100,
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
  std::vector<std::string> policies{"fifo"};
  std::vector<std::string> rmas{"auto"};
  std::vector<int> memd_busy{0};
  std::string config;
  bool systems_given = false;
  long accesses = 200000;
  int oom_retries = 2;
  bool floors = true;
  int startup_runs = 7;
  std::string csv, only;
  FileOptions fo;
  ClusterOptions co;
  ProgramOptions po;
  const std::vector<flags::Flag> table = {
      {"memory-nodes", true,
       [&](const char* a) {
         co.memory_nodes = static_cast<int>(flags::number("--memory-nodes", a, 1, 16));
       }},
      {"replicas", true,
       [&](const char* a) {
         co.replicas = static_cast<uint32_t>(flags::number("--replicas", a, 1, 4));
       }},
      {"cluster-fraction", true,
       [&](const char* a) {
         char* end = nullptr;
         co.fraction = strtod(a, &end);
         if (end == a || *end != '\0' || !(co.fraction > 0 && co.fraction <= 1)) {
           flags::usage_error(std::string("--cluster-fraction: '") + a + "' is not in (0, 1]");
         }
       }},
      {"cluster-runs", true,
       [&](const char* a) {
         co.runs = static_cast<int>(flags::number("--cluster-runs", a, 1, 100));
       }},
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
      {"systems", true,
       [&](const char* a) {
         systems = flags::list("--systems", a, kSystems);
         systems_given = true;
       }},
      {"rma", true, [&](const char* a) { rmas = flags::list("--rma", a, kRmaModes); }},
      {"memd-busy", true,
       [&](const char* a) {
         memd_busy.clear();
         for (auto& n : split_list(a)) {
           memd_busy.push_back(static_cast<int>(flags::number("--memd-busy", n.c_str(), 0, 16)));
         }
       }},
      {"config", true, [&](const char* a) { config = a; }},
      {"deliveries", true,
       [&](const char* a) { deliveries = flags::list("--deliveries", a, kDeliveries); }},
      {"threads", true,
       [&](const char* a) {
         thread_counts.clear();
         for (auto& t : split_list(a)) {
           thread_counts.push_back(static_cast<int>(flags::number("--threads", t.c_str(), 1, 64)));
         }
       }},
      {"policies", true,
       [&](const char* a) {
         policies = flags::list("--policies", a, kPolicies);
         po.policies = policies;
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
      {"programs", true,
       [&](const char* a) { po.programs = flags::list("--programs", a, kProgramNames); }},
      {"program-size", true,
       [&](const char* a) {
         char* end = nullptr;
         po.size = strtod(a, &end);
         if (end == a || *end != '\0' || !(po.size > 0 && po.size <= 100)) {
           flags::usage_error(std::string("--program-size: '") + a + "' is not in (0, 100]");
         }
       }},
      {"corrupt-output", true,
       [&](const char* a) { po.corrupt = flags::choice("--corrupt-output", a, kSystems); }},
      {"startup-runs", true,
       [&](const char* a) {
         startup_runs = static_cast<int>(flags::number("--startup-runs", a, 1, 1000));
       }},
  };
  const int first = flags::parse(argc, argv, {"lego-bench", kUsage, 2, false}, table);
  if (first < argc) die(std::string("unexpected argument '") + argv[first] + "' (see --help)");
  if (geteuid() != 0) die("needs root (zram, cgroups, network namespaces)");
  if (!systems_given) systems.pop_back();  // lego_config only when named
  const bool has_config_system =
      std::find(systems.begin(), systems.end(), "lego_config") != systems.end();
  if (has_config_system && config.empty()) die("--systems lego_config needs --config FILE");
  if (!config.empty() && !has_config_system) die("--config is for --systems lego_config");
  if (has_config_system && only == "programs") die("--only programs has no lego_config system");
  if (std::any_of(memd_busy.begin(), memd_busy.end(), [](int n) { return n > 0; }) &&
      !has_config_system) {
    die("--memd-busy needs --systems lego_config: the busy clients share its memory nodes");
  }
  std::string self = self_path();
  const std::string lego_run = find_lego_run(self);
  if (only == "programs") {
    po.fractions = fractions;
    po.systems = systems;
    po.oom_retries = oom_retries;
    po.csv = csv;
    po.floors = floors;
    return run_programs(po, lego_run);
  }

  if (co.replicas > static_cast<uint32_t>(co.memory_nodes)) {
    die("--replicas " + std::to_string(co.replicas) + " needs --memory-nodes " +
        std::to_string(co.replicas) + " or more");
  }
  co.cap = cap;
  co.accesses = accesses;
  const bool memory = only.empty() || only == "memory";
  const bool files = only.empty() || only == "files";
  const bool startup = only.empty() || only == "startup";
  std::vector<MemoryRow> rows;
  if (!memory) fractions.clear();
  // One step per memory run and per file system: a line that updates on a terminal,
  // plain lines in a log.
  size_t runs = 0;
  for (auto& w : workloads) {
    for (auto& s : systems) {
      const bool lego = is_lego(s);
      runs += (w == "random_mt" ? thread_counts.size() : 1) *
              (lego ? deliveries.size() * policies.size() * rmas.size() : 1) *
              (s == "lego_config" ? memd_busy.size() : 1);
    }
  }
  Progress progress("lego-bench", fractions.size() * runs + (files ? fo.systems.size() : 0));
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
          const bool lego = is_lego(s);
          for (const std::string& d : lego ? deliveries : std::vector<std::string>{""}) {
            for (const std::string& pol : lego ? policies : std::vector<std::string>{""}) {
              for (int busy : s == "lego_config" ? memd_busy : std::vector<int>{0}) {
                // The --rma modes of one load side by side, under the same busy clients.
                BusyClients clients;
                std::string busy_error;
                if (busy > 0) busy_error = clients.start(busy, lego_run, config, self);
                const size_t group = rows.size();
                for (const std::string& rma : lego ? rmas : std::vector<std::string>{""}) {
                  char label[200];
                  snprintf(label, sizeof label, "%s, %d thread%s, %.0f%% local, %s%s%s%s%s%s%s%s",
                           w.c_str(), threads, threads > 1 ? "s" : "", f * 100, s.c_str(),
                           d.empty() ? "" : "/", d.c_str(), pol.empty() || pol == "fifo" ? "" : "/",
                           pol == "fifo" ? "" : pol.c_str(),
                           rma.empty() || rma == "auto" ? "" : "/rma_",
                           rma == "auto" ? "" : rma.c_str(),
                           busy > 0 ? (", memd busy " + std::to_string(busy)).c_str() : "");
                  progress.step(label);
                  Outcome o;
                  if (s == "local") {
                    o = run(worker, "");
                  } else if (s == "zram_swap") {
                    // An OOM kill is the kernel's verdict on that run, not a figure: say so, and
                    // try again (a fresh zram device and cgroup each time) so that the row can
                    // still compare.
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
                      progress.note(std::string(label) + ": OOM-killed, running again");
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
                                               "--policy",
                                               pol,
                                               "--stats",
                                               "--"};
                    a.insert(a.end() - 1, {"--rma", rma});
                    a.insert(a.end(), worker.begin(), worker.end());
                    o = run(a, "", "us_per_access ", /*keep_stderr=*/true);
                  } else if (s == "lego_config") {
                    std::vector<std::string> a{
                        lego_run,     "--config", config,     "--excache", std::to_string(cap),
                        "--delivery", d,          "--policy", pol,         "--rma",
                        rma,          "--stats",  "--"};
                    a.insert(a.end(), worker.begin(), worker.end());
                    o = run(a, "", "us_per_access ", /*keep_stderr=*/true);
                  }
                  MemoryRow row{w, s, f, threads, o, d, -1, -1, -1, pol, -1, rma, -1, -1};
                  row.accesses = accesses;
                  row.busy = busy;
                  if (lego && o.ok) {
                    row.rma_lines = stat_value(o.err, "rma_lines");
                    if (const double ns = stat_value(o.err, "rma_request_ns"); ns > 0) {
                      row.auto_request_us = ns / 1000;
                    }
                    if (const double ns = stat_value(o.err, "rma_one_sided_ns"); ns > 0) {
                      row.auto_one_sided_us = ns / 1000;
                    }
                    if (const size_t at = o.err.find("miss_latency     p50 < ");
                        at != std::string::npos) {
                      sscanf(o.err.c_str() + at, "miss_latency     p50 < %lf", &row.miss_p50_us);
                    }
                  }
                  // After the heap's fill every line is backed: every miss of the loop is a fetch.
                  if (const double fetches = stat_value(o.err, "fetches");
                      lego && o.ok && fetches >= 0) {
                    row.misses_per_access = fetches / double(accesses);
                  }
                  if (const size_t at = o.text.find("cpu_us_per_access ");
                      o.ok && at != std::string::npos) {
                    sscanf(o.text.c_str() + at, "cpu_us_per_access %lf %lf %lf", &row.cpu_user,
                           &row.cpu_kernel, &row.cpu_memd);
                  }
                  rows.push_back(row);
                }
                // A client that died left the memory node less busy than the rows say.
                if (busy_error.empty() && busy > 0) busy_error = clients.stop();
                for (size_t i = group; i < rows.size() && !busy_error.empty(); i++) {
                  rows[i].o.ok = false;
                  rows[i].o.error = busy_error;
                }
              }
            }
          }
        }
      }
    }
  }
  std::vector<FileRow> file_rows;
  if (files) file_rows = run_files(fo, self, lego_run, progress);
  progress.finish();
  std::vector<StartupRow> startup_rows;
  if (startup) startup_rows = run_startup(lego_run, startup_runs);
  std::vector<ClusterRow> cluster_rows;
  if (only == "cluster") cluster_rows = run_cluster(co, self, lego_run);
  if (memory) {
    printf("\nlego-bench: µs per access, cap %s (ExCache = cgroup limit), %ld accesses per run\n",
           format_size(cap).c_str(), accesses);
    printf("%-11s %6s %7s %-24s %12s %10s %10s %11s\n", "workload", "local", "threads", "system",
           "us/access", "vs local", "vs zram", "misses/acc");
    for (auto& r : rows) {
      const double local = peer_us(rows, r, "local"), zram = peer_us(rows, r, "zram_swap");
      if (!r.o.ok) {
        printf("%-11s %5.0f%% %7d %-24s %12s  (%s", r.workload.c_str(), r.fraction * 100, r.threads,
               system_label(r).c_str(), r.o.oom ? "OOM-killed" : "failed", r.o.error.c_str());
        if (r.o.oom_kills > 1) printf("; all %d runs OOM-killed", r.o.oom_kills);
        printf(")\n");
        continue;
      }
      char vl[32] = "-", vz[32] = "-";
      if (local > 0) snprintf(vl, sizeof vl, "%.1fx", r.o.us / local);
      if (zram > 0) snprintf(vz, sizeof vz, "%.2fx", r.o.us / zram);
      char mpa[32] = "-";
      if (r.misses_per_access >= 0) snprintf(mpa, sizeof mpa, "%.4f", r.misses_per_access);
      printf("%-11s %5.0f%% %7d %-24s %12.3f %10s %10s %11s", r.workload.c_str(), r.fraction * 100,
             r.threads, system_label(r).c_str(), r.o.us, vl, vz, mpa);
      if (r.o.oom_kills > 0) {
        printf("  (after %d OOM-killed run%s)", r.o.oom_kills, r.o.oom_kills > 1 ? "s" : "");
      }
      printf("\n");
    }
    print_deliveries_and_threads(rows);
    print_rma(rows);
  }
  if (memory && floors) report_miss_floors(rows, cap);
  if (files) print_files(fo, file_rows);
  if (startup) print_startup(startup_rows);
  if (only == "cluster") print_cluster(co, cluster_rows);
  if (!csv.empty()) {
    FILE* f = fopen(csv.c_str(), "w");
    if (f == nullptr) die("cannot write " + csv);
    if (only == "cluster") write_cluster_csv(f, co, cluster_rows);
    if (memory) {
      fprintf(f,
              "workload,local_fraction,threads,system,delivery,us_per_access,policy,"
              "misses_per_access,rma,memd_busy\n");
    }
    for (auto& r : rows) {
      const char* d = r.delivery.empty() ? "-" : r.delivery.c_str();
      fprintf(f, "%s,%.2f,%d,%s,%s,", r.workload.c_str(), r.fraction, r.threads, r.system.c_str(),
              d);
      if (r.o.ok) {
        fprintf(f, "%.4f", r.o.us);
      } else {
        fprintf(f, "%s", r.o.oom ? "oom" : "failed");
      }
      fprintf(f, ",%s,", r.policy.empty() ? "-" : r.policy.c_str());
      if (r.o.ok && r.misses_per_access >= 0) fprintf(f, "%.5f", r.misses_per_access);
      // The load is a column of its own: a busy row is otherwise the idle row's twin.
      fprintf(f, ",%s,%d\n", r.rma.empty() ? "-" : r.rma.c_str(), r.busy);
    }
    if (files) {
      if (memory) fprintf(f, "\n");  // a second table follows
      fprintf(f, "file_workload,system,mb_per_s_or_us\n");
      for (auto& r : file_rows) {
        if (r.ok) {
          fprintf(f, "%s,%s,%.4f\n", r.workload.c_str(), r.system.c_str(), r.figure);
        } else {
          fprintf(f, "%s,%s,failed\n", r.workload.c_str(), r.system.c_str());
        }
      }
    }
    if (startup) {
      if (memory || files) fprintf(f, "\n");  // another table follows
      fprintf(f, "startup_system,median_ms,added_ms\n");
      double local = -1;
      for (auto& r : startup_rows) {
        if (r.system == "local") local = r.median_ms;
      }
      for (auto& r : startup_rows) {
        if (r.runs == 0) {
          fprintf(f, "%s,failed,\n", r.system.c_str());
        } else {
          fprintf(f, "%s,%.2f,%.2f\n", r.system.c_str(), r.median_ms,
                  local > 0 ? r.median_ms - local : 0.0);
        }
      }
    }
    fclose(f);
    printf("wrote %s\n", csv.c_str());
  }
  return 0;
}
