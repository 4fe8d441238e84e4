// RemoteBackend: ExCache's LineBackend on a memory node (lego-memd) over FIT.
// Internal to the runtime; see include/lego/excache.h for the calling context rules:
// fetch and write_back allocate nothing and use preallocated buffers.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "lego/excache.h"
#include "lego/fit.h"
#include "lego/memory_proto.h"

namespace lego::runtime {

class RemoteBackend : public LineBackend {
 public:
  // Opens an address space for this process on memory node `memory` through `node`
  // (which must stay alive), connects every channel, and starts a heartbeat thread
  // (which first calls on_thread_start, if given).
  static Result<std::unique_ptr<RemoteBackend>> open(fit::Node* node, fit::NodeId memory,
                                                     const std::string& program,
                                                     void (*on_thread_start)() = nullptr);
  ~RemoteBackend() override;

  Status fetch(uint64_t line_addr, std::span<std::byte, kExCacheLineBytes> out) override;
  // One kFetch request for every line; the reply lands in place (its 8-byte header in
  // the headroom before `out`), so a reply whose lines were all stored needs no copy.
  Status fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out) override;
  Status start_fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out,
                           FetchTicket* ticket) override;
  Status finish_fetch_batch(FetchTicket* ticket) override;
  bool fetch_ready(FetchTicket* ticket) override;
  Status write_back(std::span<const WriteBack> lines) override;
  Status start_write_back(std::span<const WriteBack> lines, WriteBackTicket* ticket) override;
  Status finish_write_back(WriteBackTicket* ticket) override;
  Status release(uint64_t addr, uint64_t length) override;

  // Snapshots are copies of the space on the memory node (mem::kFork), at most
  // kMaxSnapshots alive; the heartbeat thread keeps their leases too.
  Result<uint32_t> snapshot() override;
  Status fetch_snapshot(uint32_t id, uint64_t line_addr,
                        std::span<std::byte, kExCacheLineBytes> out) override;
  Status write_back_snapshot(uint32_t id, std::span<const WriteBack> lines) override;
  Status release_snapshot(uint32_t id, uint64_t addr, uint64_t length) override;
  void drop_snapshot(uint32_t id) override;
  static constexpr uint32_t kMaxSnapshots = 64;

  // Asks the memory node to promise (delta > 0) or release (delta < 0) space for this
  // process. ENOMEM when it cannot. No allocation; callable from jemalloc's hooks.
  Status reserve(int64_t delta_bytes);

  // Frees the address space on the memory node. Later calls fail.
  Status close();

  // Told of every space this backend opens or closes after it is set: each snapshot
  // (snapshot(), then drop_snapshot()) and the process's own space (close()). lego-run's
  // runtime keeps its registry of spaces with it (runtime/launch_contract.h), so that a
  // snapshot left by a process that exited or exec'd is freed too. Runs on the calling
  // thread (the handler thread for drop_snapshot): must allocate nothing and not call
  // back into the backend.
  using SpaceObserver = void (*)(const mem::SpaceHandle& space, bool opened);
  void set_space_observer(SpaceObserver observer) { observer_ = observer; }
  fit::NodeId memory_node() const { return memory_; }
  const mem::SpaceHandle& handle() const { return handle_; }
  // "node 2 (10.1.2.3:18602, tcp)", for messages.
  std::string describe_memory_node() const;

 private:
  RemoteBackend() = default;
  // A preallocated write-back request buffer; acquire() spins over kBuffers of them.
  static constexpr int kBuffers = 8;
  std::byte* acquire_buffer();
  void release_buffer(std::byte* b);
  // For a buffer a zero-copy send may still read (fit::Node::PendingCall::request_busy):
  // leaves it to the transport for good and puts a fresh one in its place.
  void retire_buffer(std::byte* b);
  Status fetch_in(const mem::SpaceHandle& h, uint64_t line_addr,
                  std::span<std::byte, kExCacheLineBytes> out);
  Status write_back_in(const mem::SpaceHandle& h, std::span<const WriteBack> lines);
  Status release_in(const mem::SpaceHandle& h, uint64_t addr, uint64_t length);
  // The snapshot's handle, or nullptr for an id not alive.
  const mem::SpaceHandle* snapshot_handle(uint32_t id) const;
  // The fetch request for fetch_batch's lines; returns its size.
  size_t fetch_request(std::span<const uint64_t> line_addrs, std::byte* buf) const;
  // Checks a fetch reply of `len` bytes for `n` lines at out - 8 and spreads its lines.
  Status unpack_fetch_reply(size_t len, size_t n, std::byte* out) const;

  fit::Node* node_ = nullptr;
  fit::NodeId memory_ = 0;
  mem::SpaceHandle handle_{};
  uint32_t lease_ms_ = 0;
  size_t buffer_bytes_ = 0;
  std::byte* buffers_ = nullptr;  // kBuffers x buffer_bytes_, mmap'd
  // buffer_[i]: buffers_ + i * buffer_bytes_, or its replacement after retire_buffer.
  std::atomic<std::byte*> buffer_[kBuffers] = {};
  std::atomic<bool> busy_[kBuffers] = {};
  bool streaming_copies_ = false;  // encode write-backs with non-temporal stores (open())
  // Snapshot slots: state 0 free, 1 being filled, 2 alive (handle valid).
  std::atomic<int> snapshot_state_[kMaxSnapshots] = {};
  mem::SpaceHandle snapshots_[kMaxSnapshots] = {};
  std::atomic<bool> stop_{false};
  std::thread heartbeat_;
  SpaceObserver observer_ = nullptr;
};

}  // namespace lego::runtime
