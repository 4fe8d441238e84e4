// MapBackend: an in-process LineBackend for tests and benchmarks. Lines live in a
// std::unordered_map (line address -> slot of a preallocated slab) under a spinlock. On a
// test's demand it fails calls as a memory node would (fail(): timeouts, resets), so that
// the ExCache's retry and give-up paths can be driven without a network.
//
// Honest about the LineBackend contract: it takes no lock program code could hold (its own
// spinlock only) and copies into preallocated slab slots, but inserting a new address into
// the unordered_map allocates a node. That is tolerable in tests only because their
// SIGBUS handlers interrupt test code at region accesses, never inside malloc; the real
// memory-node client must not allocate at all.
#pragma once

#include <array>
#include <atomic>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "lego/excache.h"

namespace lego::testing {

class MapBackend : public LineBackend {
 public:
  // `max_lines`: the most distinct lines ever held (sizes the slab; more is an ENOSPC).
  explicit MapBackend(size_t max_lines) : slab_(max_lines) {
    index_.reserve(max_lines);
    free_.reserve(max_lines);
    for (size_t i = max_lines; i > 0; --i) free_.push_back(static_cast<uint32_t>(i - 1));
  }

  // Faults on demand: the next `count` calls of `op` fail with `code` (ETIMEDOUT: the
  // memory node did not answer; ECONNRESET: its connection broke; or any errno), then
  // calls succeed again; count -1: every call fails, until fail() is called again (count
  // 0 stops failing). Each failure is counted in failures_injected. Async-signal-safe:
  // atomics only, and the error's message fits std::string's inline buffer, so a failure
  // allocates nothing either.
  enum class Op : uint8_t { kFetch, kWriteBack, kFinishWriteBack };
  void fail(Op op, int code, int count) {
    Injected& f = injected_[static_cast<int>(op)];
    f.code.store(code, std::memory_order_relaxed);
    f.left.store(count, std::memory_order_release);
  }

  Status fetch(uint64_t line_addr, std::span<std::byte, kExCacheLineBytes> out) override {
    fetch_calls.fetch_add(1, std::memory_order_relaxed);
    if (Status st = injected(Op::kFetch); !st.is_ok()) return st;
    lock();
    if (in_flight_.count(line_addr) != 0) fetches_in_flight.fetch_add(1, std::memory_order_relaxed);
    auto it = index_.find(line_addr);
    if (it == index_.end()) {
      unlock();
      fetches_of_unknown.fetch_add(1, std::memory_order_relaxed);
      std::memset(out.data(), 0, out.size());
      return Status::ok();
    }
    std::memcpy(out.data(), slab_[it->second].data(), kExCacheLineBytes);
    unlock();
    return Status::ok();
  }

  Status write_back(std::span<const WriteBack> lines) override {
    write_back_calls.fetch_add(1, std::memory_order_relaxed);
    if (Status st = injected(Op::kWriteBack); !st.is_ok()) return st;
    lines_written.fetch_add(lines.size(), std::memory_order_relaxed);
    lock();
    for (const WriteBack& wb : lines) {
      auto [it, inserted] = index_.try_emplace(wb.addr, 0);
      if (inserted) {
        if (free_.empty()) {
          index_.erase(it);
          unlock();
          return Status(ENOSPC, "MapBackend: slab full");
        }
        it->second = free_.back();
        free_.pop_back();
      }
      std::memcpy(slab_[it->second].data(), wb.data, kExCacheLineBytes);
    }
    unlock();
    return Status::ok();
  }

  // Deferred mode (set defer_write_backs before the cache starts): start_write_back only
  // copies the lines aside and finish_write_back stores them, like a memory node that
  // answers late. A fetch of a line whose write-back was started and not yet finished gets
  // the stale copy and is counted in fetches_in_flight: ExCache must never make one.
  bool defer_write_backs = false;

  Status start_write_back(std::span<const WriteBack> lines, WriteBackTicket* ticket) override {
    if (!defer_write_backs) {
      ticket->buffer = nullptr;
      return write_back(lines);
    }
    auto* pending = new std::vector<Line>(lines.size());
    for (size_t i = 0; i < lines.size(); ++i) {
      (*pending)[i].addr = lines[i].addr;
      std::memcpy((*pending)[i].data.data(), lines[i].data, kExCacheLineBytes);
    }
    lock();
    for (const WriteBack& wb : lines) ++in_flight_[wb.addr];
    unlock();
    ticket->buffer = pending;
    write_backs_started.fetch_add(1, std::memory_order_relaxed);
    return Status::ok();
  }

  Status finish_write_back(WriteBackTicket* ticket) override {
    auto* pending = static_cast<std::vector<Line>*>(ticket->buffer);
    Status failed = injected(Op::kFinishWriteBack);
    if (pending == nullptr) return failed;
    ticket->buffer = nullptr;
    std::vector<WriteBack> batch;
    for (const Line& l : *pending) batch.push_back(WriteBack{l.addr, l.data.data()});
    Status st = failed.is_ok() ? write_back(batch) : failed;  // failed: none stored
    lock();
    for (const Line& l : *pending) {
      if (--in_flight_[l.addr] == 0) in_flight_.erase(l.addr);
    }
    unlock();
    delete pending;
    return st;
  }

  Status release(uint64_t addr, uint64_t length) override {
    release_calls.fetch_add(1, std::memory_order_relaxed);
    lock();
    for (uint64_t a = addr; a < addr + length; a += kExCacheLineBytes) {
      auto it = index_.find(a);
      if (it == index_.end()) continue;
      free_.push_back(it->second);
      index_.erase(it);
    }
    unlock();
    return Status::ok();
  }

  size_t lines_held() {
    lock();
    size_t n = index_.size();
    unlock();
    return n;
  }

  std::atomic<uint64_t> fetch_calls{0};
  std::atomic<uint64_t> fetches_of_unknown{0};  // fetches of lines never written back
  std::atomic<uint64_t> write_back_calls{0};
  std::atomic<uint64_t> lines_written{0};
  std::atomic<uint64_t> release_calls{0};
  std::atomic<uint64_t> write_backs_started{0};  // deferred mode
  std::atomic<uint64_t> fetches_in_flight{0};    // deferred mode: must stay 0
  std::atomic<uint64_t> failures_injected{0};    // calls fail() made fail

 private:
  struct Injected {
    std::atomic<int> code{0};
    std::atomic<int> left{0};  // failures still to come; -1: every call
  };
  // The injected failure for this call of `op`, if any (ok otherwise).
  Status injected(Op op) {
    Injected& f = injected_[static_cast<int>(op)];
    int left = f.left.load(std::memory_order_acquire);
    while (left != 0) {
      if (left < 0 || f.left.compare_exchange_weak(left, left - 1)) {
        failures_injected.fetch_add(1, std::memory_order_relaxed);
        return Status(f.code.load(std::memory_order_relaxed), "injected");
      }
    }
    return Status::ok();
  }
  Injected injected_[3];

  void lock() {
    while (locked_.exchange(true, std::memory_order_acquire)) {
      while (locked_.load(std::memory_order_relaxed)) __builtin_ia32_pause();
    }
  }
  void unlock() { locked_.store(false, std::memory_order_release); }

  std::atomic<bool> locked_{false};
  std::vector<std::array<std::byte, kExCacheLineBytes>> slab_;
  std::unordered_map<uint64_t, uint32_t> index_;
  struct Line {
    uint64_t addr = 0;
    std::array<std::byte, kExCacheLineBytes> data;
  };
  std::unordered_map<uint64_t, int> in_flight_;  // line -> write-backs started, not finished
  std::vector<uint32_t> free_;
};

}  // namespace lego::testing
