#include "runtime/preload/remote_backend.h"

#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <vector>

#include "lego/retry.h"

namespace lego::runtime {

Result<std::unique_ptr<RemoteBackend>> RemoteBackend::open(fit::Node* node, fit::NodeId memory,
                                                           const std::string& program,
                                                           void (*on_thread_start)()) {
  std::unique_ptr<RemoteBackend> b(new RemoteBackend());
  b->node_ = node;
  b->memory_ = memory;
  Status st = node->connect(memory);
  if (!st) return st.with_context("connecting to memory node " + b->describe_memory_node());
  mem::OpenRequest req{};
  req.version = mem::kProtoVersion;
  req.pid = static_cast<uint32_t>(getpid());
  strncpy(req.program, program.c_str(), sizeof(req.program) - 1);
  mem::OpenReply rep{};
  auto r =
      node->send_reply(memory, mem::kOpen, {reinterpret_cast<const std::byte*>(&req), sizeof(req)},
                       {reinterpret_cast<std::byte*>(&rep), sizeof(rep)});
  if (!r) return r.status().with_context("opening an address space");
  if (r.value() != sizeof(rep) || rep.line_bytes != kExCacheLineBytes) {
    return Status(EPROTO, "memory node " + b->describe_memory_node() +
                              " answered open with an unexpected layout");
  }
  b->handle_ = rep.handle;
  b->lease_ms_ = rep.lease_ms;
  b->buffer_bytes_ =
      sizeof(mem::WriteBackRequest) + mem::kMaxBatch * (sizeof(uint64_t) + kExCacheLineBytes);
  if (b->buffer_bytes_ > node->config().max_message_bytes) {
    return Status(EMSGSIZE, "max_message_bytes " +
                                std::to_string(node->config().max_message_bytes) +
                                " cannot carry a batch of " + std::to_string(mem::kMaxBatch) +
                                " lines; raise it to at least " + std::to_string(b->buffer_bytes_));
  }
  void* p = mmap(nullptr, b->buffer_bytes_ * kBuffers, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return Status::from_errno(errno, "mmap of write-back buffers");
  b->buffers_ = static_cast<std::byte*>(p);
  // Over shm the memory node's CPU reads start_write_back's buffers straight from this
  // process (libfit's zero-copy send): they are filled with non-temporal stores
  // (copy_line_streaming). Over sockets this CPU copies them into the kernel: ordinary
  // stores keep them cached.
  const fit::NodeConfig* mn = node->config().find(memory);
  b->streaming_copies_ = mn != nullptr && mn->provider == fit::Provider::kShm;
  for (int i = 0; i < kBuffers; i++) b->buffer_[i] = b->buffers_ + i * b->buffer_bytes_;
  // Keeps the lease while the program runs; the thread allocates only at start.
  RemoteBackend* self = b.get();
  b->heartbeat_ = std::thread([self, on_thread_start] {
    excache_service_thread_begin();
    if (on_thread_start != nullptr) on_thread_start();
    auto period = std::chrono::milliseconds(std::max<uint32_t>(self->lease_ms_ / 4, 50));
    mem::SpaceRequest hb{self->handle_};
    while (!self->stop_.load()) {
      auto wake = std::chrono::steady_clock::now() + period;
      while (!self->stop_.load() && std::chrono::steady_clock::now() < wake) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      if (self->stop_.load()) break;
      (void)self->node_->send_reply(self->memory_, mem::kHeartbeat,
                                    {reinterpret_cast<const std::byte*>(&hb), sizeof(hb)}, {});
      for (uint32_t i = 0; i < kMaxSnapshots; i++) {
        const mem::SpaceHandle* h = self->snapshot_handle(i);
        if (h == nullptr) continue;
        mem::SpaceRequest shb{*h};
        (void)self->node_->send_reply(self->memory_, mem::kHeartbeat,
                                      {reinterpret_cast<const std::byte*>(&shb), sizeof(shb)}, {});
      }
    }
    excache_service_thread_end();
  });
  return b;
}

RemoteBackend::~RemoteBackend() {
  stop_ = true;
  if (heartbeat_.joinable()) heartbeat_.join();
  if (buffers_ != nullptr) {
    for (int i = 0; i < kBuffers; i++) {
      std::byte* b = buffer_[i].load();
      if (b != nullptr && (b < buffers_ || b >= buffers_ + buffer_bytes_ * kBuffers)) {
        munmap(b, buffer_bytes_);  // a replacement (retire_buffer)
      }
    }
    munmap(buffers_, buffer_bytes_ * kBuffers);
  }
}

std::string RemoteBackend::describe_memory_node() const {
  const fit::NodeConfig* n = node_->config().find(memory_);
  if (n == nullptr) return std::to_string(memory_);
  return std::to_string(memory_) + " (" + n->address + ":" + std::to_string(n->port) + ", " +
         fit::provider_name(n->provider) + ")";
}

std::byte* RemoteBackend::acquire_buffer() {
  for (;;) {
    for (int i = 0; i < kBuffers; i++) {
      bool expected = false;
      if (!busy_[i].load(std::memory_order_relaxed) &&
          busy_[i].compare_exchange_strong(expected, true, std::memory_order_acquire)) {
        return buffer_[i].load(std::memory_order_relaxed);
      }
    }
    sched_yield();
  }
}

void RemoteBackend::release_buffer(std::byte* b) {
  for (int i = 0; i < kBuffers; i++) {
    if (buffer_[i].load(std::memory_order_relaxed) == b) {
      busy_[i].store(false, std::memory_order_release);
      return;
    }
  }
}

void RemoteBackend::retire_buffer(std::byte* b) {
  for (int i = 0; i < kBuffers; i++) {
    if (buffer_[i].load(std::memory_order_relaxed) != b) continue;
    // The old buffer is leaked on purpose: the memory node may still read it. (mmap is
    // async-signal-safe: this runs on the eviction path.) Without a replacement the slot
    // stays busy and the pool one buffer smaller.
    void* p =
        mmap(nullptr, buffer_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;
    buffer_[i].store(static_cast<std::byte*>(p), std::memory_order_relaxed);
    busy_[i].store(false, std::memory_order_release);
    return;
  }
}

Status RemoteBackend::fetch(uint64_t line_addr, std::span<std::byte, kExCacheLineBytes> out) {
  return fetch_in(handle_, line_addr, out);
}

Status RemoteBackend::fetch_in(const mem::SpaceHandle& h, uint64_t line_addr,
                               std::span<std::byte, kExCacheLineBytes> out) {
  struct {
    mem::FetchRequest req;
    uint64_t addr;
  } req{{h, 1, 0}, line_addr};
  // The reply (memory_proto.h): the line, or nothing when it was never stored.
  auto r = node_->send_reply(memory_, mem::kFetch,
                             {reinterpret_cast<const std::byte*>(&req), sizeof(req)}, out);
  if (!r) return r.status();
  return unpack_fetch_reply(r.value(), 1, out.data());
}

namespace {
struct FetchBatchRequest {
  mem::FetchRequest req;
  uint64_t addrs[LineBackend::kMaxFetchBatch];
};
}  // namespace

size_t RemoteBackend::fetch_request(std::span<const uint64_t> line_addrs, std::byte* buf) const {
  FetchBatchRequest r{{handle_, static_cast<uint32_t>(line_addrs.size()), 0}, {}};
  memcpy(r.addrs, line_addrs.data(), line_addrs.size() * sizeof(uint64_t));
  const size_t len = sizeof(r.req) + line_addrs.size() * sizeof(uint64_t);
  memcpy(buf, &r, len);
  return len;
}

// Where a fetch reply for n lines lands: in place, its header (none for one line) in the
// headroom before `out`.
static std::span<std::byte> fetch_reply_span(size_t n, std::byte* out) {
  const size_t head = mem::fetch_reply_head_bytes(static_cast<uint32_t>(n));
  return {out - head, head + n * kExCacheLineBytes};
}

Status RemoteBackend::unpack_fetch_reply(size_t len, size_t n, std::byte* out) const {
  if (n == 1) {
    // No header (memory_proto.h): the line, or nothing for a line never stored.
    if (len == 0) {
      memset(out, 0, kExCacheLineBytes);
    } else if (len != kExCacheLineBytes) {
      return Status(EPROTO, "fetch reply of " + std::to_string(len) +
                                " bytes for one line from memory node " + describe_memory_node());
    }
    return Status();
  }
  mem::FetchReply head;
  memcpy(&head, out - sizeof(head), sizeof(head));
  const size_t stored = static_cast<size_t>(__builtin_popcountll(head.stored_mask));
  if (len != sizeof(head) + stored * kExCacheLineBytes ||
      (n < 64 && (head.stored_mask >> n) != 0)) {
    return Status(EPROTO, "malformed fetch reply from memory node " + describe_memory_node());
  }
  if (stored == n) return Status();
  // Lines never stored were left out of the reply: spread the stored ones to their slots,
  // last first (a line only moves towards the end), and zero the rest.
  size_t from = stored;
  for (size_t i = n; i-- > 0;) {
    std::byte* slot = out + i * kExCacheLineBytes;
    if (head.stored_mask & (uint64_t{1} << i)) {
      --from;
      if (from != i) memmove(slot, out + from * kExCacheLineBytes, kExCacheLineBytes);
    } else {
      memset(slot, 0, kExCacheLineBytes);
    }
  }
  return Status();
}

Status RemoteBackend::fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out) {
  static_assert(kMaxFetchBatch <= mem::kMaxBatch && kMaxFetchBatch <= 64);
  static_assert(sizeof(mem::FetchReply) <= kFetchHeadroom);
  const size_t n = line_addrs.size();
  if (n == 0) return Status();
  if (n > kMaxFetchBatch) return Status(EINVAL, "fetch_batch of more than 32 lines");
  alignas(8) std::byte req[sizeof(FetchBatchRequest)];
  const size_t req_len = fetch_request(line_addrs, req);
  auto r = node_->send_reply(memory_, mem::kFetch, {req, req_len}, fetch_reply_span(n, out));
  if (!r) return r.status();
  return unpack_fetch_reply(r.value(), n, out);
}

Status RemoteBackend::start_fetch_batch(std::span<const uint64_t> line_addrs, std::byte* out,
                                        FetchTicket* ticket) {
  static_assert(sizeof(fit::Node::PendingCall) <= sizeof(ticket->opaque));
  const size_t n = line_addrs.size();
  if (n == 0 || n > kMaxFetchBatch) return Status(EINVAL, "start_fetch_batch: 1 to 32 lines");
  ticket->count = n;
  ticket->out = out;
  auto* call = new (ticket->opaque) fit::Node::PendingCall();
  alignas(8) std::byte req[sizeof(FetchBatchRequest)];
  const size_t req_len = fetch_request(line_addrs, req);
  return node_->start_call(call, memory_, mem::kFetch, {req, req_len}, fetch_reply_span(n, out));
}

Status RemoteBackend::finish_fetch_batch(FetchTicket* ticket) {
  auto* call = std::launder(reinterpret_cast<fit::Node::PendingCall*>(ticket->opaque));
  if (call->channel == nullptr) return Status(EINVAL, "finish_fetch_batch: not started");
  auto r = node_->finish_call(call);
  if (!r) return r.status();
  return unpack_fetch_reply(r.value(), ticket->count, ticket->out);
}

bool RemoteBackend::fetch_ready(FetchTicket* ticket) {
  return node_->call_done(std::launder(reinterpret_cast<fit::Node::PendingCall*>(ticket->opaque)));
}

Status RemoteBackend::write_back(std::span<const WriteBack> lines) {
  return write_back_in(handle_, lines);
}

// Copies a 4 KiB line with non-temporal stores: the memory node's CPU reads the buffer
// (shm: straight from it), so its cache lines sit in that CPU's cache; ordinary stores would
// first have to take each line back from it. `dst` is 8-byte aligned (the request layout:
// 16-byte aligned for an even number of lines).
static void copy_line_streaming(std::byte* dst, const std::byte* src) {
#if defined(__x86_64__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) != 0) {
    auto* d = reinterpret_cast<long long*>(dst);
    for (size_t i = 0; i < kExCacheLineBytes / sizeof(long long); i++) {
      long long v;
      memcpy(&v, src + i * sizeof v, sizeof v);
      _mm_stream_si64(d + i, v);
    }
    return;
  }
  auto* d = reinterpret_cast<__m128i*>(dst);
  const auto* s = reinterpret_cast<const __m128i*>(src);
  for (size_t i = 0; i < kExCacheLineBytes / sizeof(__m128i); i += 4) {
    const __m128i a = _mm_loadu_si128(s + i), b = _mm_loadu_si128(s + i + 1),
                  c = _mm_loadu_si128(s + i + 2), e = _mm_loadu_si128(s + i + 3);
    _mm_stream_si128(d + i, a);
    _mm_stream_si128(d + i + 1, b);
    _mm_stream_si128(d + i + 2, c);
    _mm_stream_si128(d + i + 3, e);
  }
#else
  memcpy(dst, src, kExCacheLineBytes);
#endif
}

// Encodes a write-back request of lines (at most mem::kMaxBatch) into buf; returns its length.
// `streaming`: copy the lines with non-temporal stores (copy_line_streaming).
static size_t encode_write_back(const mem::SpaceHandle& h,
                                std::span<const LineBackend::WriteBack> lines, std::byte* buf,
                                bool streaming) {
  const uint32_t n = static_cast<uint32_t>(lines.size());
  mem::WriteBackRequest head{h, n, 0};
  memcpy(buf, &head, sizeof(head));
  std::byte* addrs = buf + sizeof(head);
  std::byte* data = addrs + n * sizeof(uint64_t);
  for (uint32_t i = 0; i < n; i++) {
    memcpy(addrs + i * sizeof(uint64_t), &lines[i].addr, sizeof(uint64_t));
    std::byte* to = data + size_t{i} * kExCacheLineBytes;
    if (streaming) {
      copy_line_streaming(to, lines[i].data);
    } else {
      memcpy(to, lines[i].data, kExCacheLineBytes);
    }
  }
#if defined(__x86_64__)
  if (streaming) _mm_sfence();  // the streamed stores are visible before the send
#endif
  return sizeof(head) + n * (sizeof(uint64_t) + kExCacheLineBytes);
}

Status RemoteBackend::write_back_in(const mem::SpaceHandle& h, std::span<const WriteBack> lines) {
  size_t done = 0;
  while (done < lines.size()) {
    const size_t n = std::min<size_t>(lines.size() - done, mem::kMaxBatch);
    std::byte* buf = acquire_buffer();
    // (Sent by copy: streamed stores would only make that copy read from memory.)
    const size_t len = encode_write_back(h, lines.subspan(done, n), buf, /*streaming=*/false);
    auto r = node_->send_reply(memory_, mem::kWriteBack, {buf, len}, {});
    release_buffer(buf);
    if (!r) return r.status();
    done += n;
  }
  return Status();
}

// The request buffer is kept until finish: a write-back is idempotent, so one that failed
// on the way (a timeout, a reconnection) is sent again from it, as write_back's callers
// retry with the lines themselves.
Status RemoteBackend::start_write_back(std::span<const WriteBack> lines, WriteBackTicket* ticket) {
  static_assert(sizeof(fit::Node::PendingCall) <= sizeof(ticket->opaque));
  ticket->buffer = nullptr;
  if (lines.empty() || lines.size() > mem::kMaxBatch) return write_back(lines);
  std::byte* buf = acquire_buffer();
  const size_t len = encode_write_back(handle_, lines, buf, streaming_copies_);
  auto* call = new (ticket->opaque) fit::Node::PendingCall();
  // The buffer is kept until finish anyway (for a resend): the transport may send from it.
  call->zero_copy = true;
  Status st = node_->start_call(call, memory_, mem::kWriteBack, {buf, len}, {});
  if (!st) {
    release_buffer(buf);
    return st;
  }
  ticket->buffer = buf;
  ticket->length = len;
  return Status();
}

Status RemoteBackend::finish_write_back(WriteBackTicket* ticket) {
  auto* buf = static_cast<std::byte*>(ticket->buffer);
  if (buf == nullptr) return Status();  // stored in start
  ticket->buffer = nullptr;
  auto* call = std::launder(reinterpret_cast<fit::Node::PendingCall*>(ticket->opaque));
  auto r = node_->finish_call(call);
  const bool busy = call->request_busy;
  // Sent again after what lego/retry.h classifies kRetry (a timeout, a lost connection,
  // which libfit re-opens), kAttempts tries in all. The resend copies the buffer, which a
  // send still pending may read too: it does not change.
  for (int attempt = 1; !r && classify(r.status()) == ErrorClass::kRetry && attempt < kAttempts;
       ++attempt) {
    r = node_->send_reply(memory_, mem::kWriteBack, {buf, ticket->length}, {});
  }
  if (busy) {
    retire_buffer(buf);
  } else {
    release_buffer(buf);
  }
  return r.status();
}

Status RemoteBackend::release(uint64_t addr, uint64_t length) {
  return release_in(handle_, addr, length);
}

Status RemoteBackend::release_in(const mem::SpaceHandle& h, uint64_t addr, uint64_t length) {
  mem::ReleaseRequest req{h, addr, length};
  auto r = node_->send_reply(memory_, mem::kRelease,
                             {reinterpret_cast<const std::byte*>(&req), sizeof(req)}, {});
  return r.status();
}

Status RemoteBackend::reserve(int64_t delta_bytes) {
  mem::ReserveRequest req{handle_, delta_bytes};
  auto r = node_->send_reply(memory_, mem::kReserve,
                             {reinterpret_cast<const std::byte*>(&req), sizeof(req)}, {});
  return r.status();
}

Result<uint32_t> RemoteBackend::snapshot() {
  uint32_t id = kMaxSnapshots;
  for (uint32_t i = 0; i < kMaxSnapshots; i++) {
    int expected = 0;
    if (snapshot_state_[i].compare_exchange_strong(expected, 1)) {
      id = i;
      break;
    }
  }
  if (id == kMaxSnapshots) {
    return Status(EAGAIN,
                  "more than " + std::to_string(kMaxSnapshots) + " forked children alive at once");
  }
  mem::SpaceRequest req{handle_};
  mem::OpenReply rep{};
  auto r = node_->send_reply(memory_, mem::kFork,
                             {reinterpret_cast<const std::byte*>(&req), sizeof(req)},
                             {reinterpret_cast<std::byte*>(&rep), sizeof(rep)});
  if (!r || r.value() != sizeof(rep)) {
    snapshot_state_[id].store(0);
    if (!r) return r.status().with_context("memory node " + describe_memory_node());
    return Status(EPROTO, "memory node " + describe_memory_node() +
                              " answered fork with an unexpected layout");
  }
  snapshots_[id] = rep.handle;
  snapshot_state_[id].store(2, std::memory_order_release);
  if (observer_ != nullptr) observer_(rep.handle, true);
  return id;
}

const mem::SpaceHandle* RemoteBackend::snapshot_handle(uint32_t id) const {
  if (id >= kMaxSnapshots || snapshot_state_[id].load(std::memory_order_acquire) != 2) {
    return nullptr;
  }
  return &snapshots_[id];
}

Status RemoteBackend::fetch_snapshot(uint32_t id, uint64_t line_addr,
                                     std::span<std::byte, kExCacheLineBytes> out) {
  const mem::SpaceHandle* h = snapshot_handle(id);
  if (h == nullptr) return Status(ENOENT, "no snapshot " + std::to_string(id));
  return fetch_in(*h, line_addr, out);
}

Status RemoteBackend::write_back_snapshot(uint32_t id, std::span<const WriteBack> lines) {
  const mem::SpaceHandle* h = snapshot_handle(id);
  if (h == nullptr) return Status(ENOENT, "no snapshot " + std::to_string(id));
  return write_back_in(*h, lines);
}

Status RemoteBackend::release_snapshot(uint32_t id, uint64_t addr, uint64_t length) {
  const mem::SpaceHandle* h = snapshot_handle(id);
  if (h == nullptr) return Status(ENOENT, "no snapshot " + std::to_string(id));
  return release_in(*h, addr, length);
}

void RemoteBackend::drop_snapshot(uint32_t id) {
  const mem::SpaceHandle* h = snapshot_handle(id);
  if (h == nullptr) return;
  mem::SpaceRequest req{*h};
  snapshot_state_[id].store(1);  // no new users; the slot is reused after the close
  (void)node_->send_reply(memory_, mem::kClose,
                          {reinterpret_cast<const std::byte*>(&req), sizeof(req)}, {});
  if (observer_ != nullptr) observer_(req.handle, false);
  snapshot_state_[id].store(0, std::memory_order_release);
}

Status RemoteBackend::close() {
  stop_ = true;
  if (heartbeat_.joinable()) heartbeat_.join();
  mem::SpaceRequest req{handle_};
  auto r = node_->send_reply(memory_, mem::kClose,
                             {reinterpret_cast<const std::byte*>(&req), sizeof(req)}, {});
  if (r && observer_ != nullptr) observer_(handle_, false);
  return r.status();
}

}  // namespace lego::runtime
