// Description: the ExCache's retry-then-give-up paths, against MapBackend failing on
// demand as a memory node would (timeouts, resets). A fetch or write-back that fails with
// what lego/retry.h classifies kRetry is tried again, kAttempts tries in all, and the
// program's data comes through intact; one that keeps failing (or fails with anything
// else) ends the process in ExCacheOptions::on_fatal with a message naming the address,
// seen from a forked child. Guards issue 15 (the in-process backend could not fail, so the
// miss path's retries had no unit test; a fetch started ahead got 9 tries, others 8).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <string>

#include "lego/excache.h"
#include "lego/retry.h"
#include "tests/runtime/child_report.h"
#include "tests/runtime/map_backend.h"

namespace {

using lego::ExCache;
using lego::ExCacheOptions;
using lego::testing::MapBackend;
using Delivery = ExCacheOptions::Delivery;
using Op = MapBackend::Op;

constexpr size_t kLine = lego::kExCacheLineBytes;
constexpr size_t kCapacity = 16;  // lines: the smallest cache
constexpr size_t kLines = 64;     // the region: four times the cache

struct Cache {
  MapBackend backend{kLines + 64};
  std::unique_ptr<ExCache> cache;
  char* base = nullptr;

  Cache(Delivery delivery, bool prefetch, void (*on_fatal)(const char*) = nullptr) {
    ExCacheOptions o;
    o.capacity_bytes = kCapacity * kLine;
    o.region_bytes = kLines * kLine;
    o.delivery = delivery;
    o.evict_batch_lines = 4;
    o.prefetch_lines = prefetch ? 8 : 0;
    o.on_fatal = on_fatal;
    auto c = ExCache::create(o, &backend);
    if (!c) {
      fprintf(stderr, "ExCache::create: %s\n", c.status().message().c_str());
      abort();
    }
    cache = std::move(c.value());
    base = static_cast<char*>(cache->region_base());
  }
  uint64_t* line(size_t i) const { return reinterpret_cast<uint64_t*>(base + i * kLine); }
};

uint64_t pattern(size_t i, size_t w, uint64_t round) {
  return (i * 0x9e3779b97f4a7c15ull) ^ (w * 0xbf58476d1ce4e5b9ull) ^ (round << 56) ^ round;
}

// Writes round `round`'s pattern into every line (the cache evicts and writes back as it
// goes), then reads it all back: the number of words that came back wrong.
size_t write_then_check(Cache& c, uint64_t round) {
  for (size_t i = 0; i < kLines; ++i) {
    for (size_t w = 0; w < kLine / 8; w += 37) c.line(i)[w] = pattern(i, w, round);
  }
  size_t bad = 0;
  for (size_t i = 0; i < kLines; ++i) {
    for (size_t w = 0; w < kLine / 8; w += 37) bad += c.line(i)[w] != pattern(i, w, round);
  }
  return bad;
}

struct Mode {
  const char* name;
  Delivery delivery;
  bool prefetch;
};
const Mode kModes[] = {{"sigbus", Delivery::kSigbus, false},
                       {"sigbus/prefetch", Delivery::kSigbus, true},
                       {"thread", Delivery::kHandlerThread, false},
                       {"thread/prefetch", Delivery::kHandlerThread, true}};

// --- A forked child that ends in the fatal hook.
int g_report_fd = -1;
MapBackend* g_backend = nullptr;

// on_fatal: the message, then how many backend calls were made to fail. Async-signal-safe.
void report_fatal(const char* message) {
  (void)!write(g_report_fd, message, strlen(message));
  char tail[32];
  size_t n = 0;
  const char* lead = "\ntries ";
  while (*lead != '\0') tail[n++] = *lead++;
  uint64_t v = g_backend->failures_injected.load();
  char digits[20];
  size_t d = 0;
  do {
    digits[d++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v != 0);
  while (d > 0) tail[n++] = digits[--d];
  (void)!write(g_report_fd, tail, n);
}

// Runs `body` with a fresh cache in a child (the handler-thread delivery), whose fatal
// hook reports through the child's report pipe.
template <typename Body>
lego::testing::ChildEnd die_in_child(Body body) {
  return lego::testing::run_child([&](int report_fd) {
    g_report_fd = report_fd;
    Cache c(Delivery::kHandlerThread, false, report_fatal);
    g_backend = &c.backend;
    body(c);
  });
}

}  // namespace

TEST_CASE(
    "a fetch that keeps timing out ends in the fatal hook naming the address, after "
    "kAttempts tries",
    "[retry]") {
  lego::testing::ChildEnd d = die_in_child([&](Cache& c) {
    if (write_then_check(c, 1) != 0) _exit(3);
    c.backend.fail(Op::kFetch, ETIMEDOUT, -1);
    lego::testing::report_line(g_report_fd, c.line(7));
    volatile uint64_t v = c.line(7)[3];  // evicted long ago: a miss that must fetch
    (void)v;
  });
  INFO(d.report);
  CHECK(WIFSIGNALED(d.status));
  CHECK(WTERMSIG(d.status) == SIGABRT);
  CHECK_THAT(d.report,
             Catch::Contains("LineBackend::fetch_batch failed (errno " + std::to_string(ETIMEDOUT) +
                             ") at " + lego::testing::reported_line(d.report)));
  CHECK_THAT(d.report, Catch::EndsWith("\ntries " + std::to_string(lego::kAttempts)));
}

TEST_CASE("a fetch error that is not worth retrying is fatal at once", "[retry]") {
  lego::testing::ChildEnd d = die_in_child([&](Cache& c) {
    if (write_then_check(c, 1) != 0) _exit(3);
    c.backend.fail(Op::kFetch, EPROTO, -1);
    lego::testing::report_line(g_report_fd, c.line(5));
    volatile uint64_t v = c.line(5)[0];
    (void)v;
  });
  INFO(d.report);
  CHECK(WIFSIGNALED(d.status));
  CHECK_THAT(d.report,
             Catch::Contains("LineBackend::fetch_batch failed (errno " + std::to_string(EPROTO) +
                             ") at " + lego::testing::reported_line(d.report)));
  CHECK_THAT(d.report, Catch::EndsWith("\ntries 1"));
}

TEST_CASE(
    "a write-back that keeps failing ends in the fatal hook naming a line, after "
    "kAttempts tries",
    "[retry]") {
  lego::testing::ChildEnd d = die_in_child([&](Cache& c) {
    c.backend.fail(Op::kWriteBack, ECONNRESET, -1);
    lego::testing::report_line(
        g_report_fd, c.line(0));  // the first eviction's first line: FIFO evicts line 0 first
    (void)write_then_check(c, 1);
  });
  INFO(d.report);
  CHECK(WIFSIGNALED(d.status));
  CHECK_THAT(d.report,
             Catch::Contains("LineBackend::write_back failed (errno " + std::to_string(ECONNRESET) +
                             ") at " + lego::testing::reported_line(d.report)));
  CHECK_THAT(d.report, Catch::EndsWith("\ntries " + std::to_string(lego::kAttempts)));
}
