// The floor of lego's miss path on this host, with no memory node: what one userfaultfd
// miss costs before any transport is involved. lego-bench prints it beside the workloads,
// so that a ratio to swap on zram can be read against what the mechanism allows.
//
// Measured in a forked child (it installs a SIGBUS handler and a userfaultfd), on a region
// registered as lego registers its ExCache (missing + write-protect, SIGBUS delivery):
//   fault_us  a store to a missing line: the page fault, SIGBUS delivery, a handler that
//             maps the line with UFFDIO_COPY from a resident 4 KiB buffer, sigreturn, and
//             the store retried. Lines are touched in random order, as a uniform random
//             workload does.
//   zap_us    a resident line's share of dropping 32 scattered lines with one
//             process_madvise(MADV_DONTNEED), as an eviction batch does.
//   fence_us  write-protecting one resident, dirty line with UFFDIO_WRITEPROTECT (lines in
//             random order): what an eviction pays per dirty victim to fence out stores
//             before it copies the victim out. The handler delivery always pays it; the
//             sigbus delivery skips it while the process has one thread (runtime/excache/
//             evict.cc, "Evicting without a fence").
// The same random store misses delivered as lego-run's default (--delivery handler) delivers
// them, on regions of their own registered the same way with a userfaultfd without SIGBUS:
//   handler_fault_us           the fault, the faulting thread's sleep, a handler thread
//                              reading the fault and mapping the line with UFFDIO_COPY, the
//                              wake-up, and the store retried. The handler polls the
//                              userfaultfd as lego's does while several threads fault:
//                              non-blocking read(), sched_yield() between empty reads for
//                              ExCacheOptions' default handler_spin_us after the last
//                              fault, then poll(). The threads run wherever the scheduler
//                              puts them, as lego's do
//                              (on a 2-vCPU VM often on two CPUs, a cross-CPU wake-up per
//                              miss; it varies from run to run);
//   handler_fault_same_cpu_us  the same with both threads pinned to one CPU (no cross-CPU
//                              wake-up: what pinning the handler beside the program could
//                              save).
// and, for a sequential scan (lines stored to in address order):
//   window_fault_us  a line's share of a store fault whose handler maps the 32 lines
//                    around it with one UFFDIO_COPY, as a prefetch window is mapped;
//   window_zap_us    a line's share of dropping 32 contiguous lines with one madvise.
// Each figure is the median over rounds of the mean per line. The random misses' rounds of
// the three deliveries (SIGBUS, handler, pinned handler) run in turn, so that a change in the
// host's load moves them alike: their differences are what the handler delivery adds.
#pragma once

#include <cstddef>

#include "lego/status.h"
#include "libfit/bench/floors.h"

namespace lego::bench {

struct FaultFloor {
  double fault_us = 0;
  double zap_us = 0;
  double window_fault_us = 0;
  double window_zap_us = 0;
  double handler_fault_us = 0;
  double handler_fault_same_cpu_us = 0;
  double fence_us = 0;
};

// lines: the region's size in 4 KiB lines (at least 64); rounds: at least 1. The child
// checks every line's content after its fault and fails the measurement if one is wrong.
Result<FaultFloor> measure_fault_floor(size_t lines, int rounds);

// random_mt's miss floor by threads: the best this host did, of the ways tried, at `threads`
// threads each missing on lines of its own with one round trip per miss. Measured in a
// forked child: one userfaultfd region registered as above (SIGBUS delivery, the cheapest
// per miss), a slice of 2048 lines per thread. Each thread stores to its lines in random
// order; each store misses, and the SIGBUS handler, on the faulting thread, makes one round
// trip (`server`'s request and reply) on the thread's own connection, waiting as `wait`
// says, and maps the reply's last 4 KiB with UFFDIO_COPY; after every 32 misses the thread
// drops those 32 lines with one process_madvise, as an eviction batch does. With a request
// of 4 KiB or more, each request's last 4 KiB carries a victim: just before a batch is
// dropped, its 32 lines are copied into the thread's next 32 requests, so each miss writes
// back one dirty line, as a random miss into a full cache of stored-to lines must (the
// write-back rides the fetch: no message of its own). Else no write-backs. Never a fence,
// never bookkeeping. Each thread makes misses_per_thread timed misses after a
// warm-up of a tenth as many (at least 64); every line's first and last word are checked
// before it is dropped, and the server must have answered exactly one request per miss.
//   misses_per_s  misses of all threads per second of the timed part;
//   cpus_busy     the child's and the server's CPU time over the child's wall time (set-up
//                 and warm-up included): how many CPUs the floor kept busy.
// `server` must have been started for exactly `threads` clients, with a reply of at least
// 4 KiB; it exits once the child did, and what it did is read then. Call it from a
// single-threaded process, never from two threads at once: the child is forked, allocates
// and starts threads, and the message sizes reach its SIGBUS handler through globals.
struct ThreadedMissFloor {
  double misses_per_s = 0;
  double cpus_busy = 0;
};
Result<ThreadedMissFloor> measure_threaded_miss_floor(RoundTripServer& server, int threads,
                                                      int misses_per_thread, Wait wait);

}  // namespace lego::bench
