// StorageClient: storage_proto.h requests over FIT, with a session that is heartbeated
// and reopened when the storage node forgets it.
//
// Lock order: Impl::mu only (the session and the heartbeat's wake-up).
#include "lego/storage_client.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>

#include "lego/retry.h"

namespace lego::stor {
namespace {

using Clock = std::chrono::steady_clock;

// For calls that may legitimately take long on the storage node (fsync).
constexpr std::chrono::milliseconds kSlowCallTimeout{10 * 60 * 1000};

// Transport failures (lego/retry.h's transport_failure: the node could not be asked, or
// did not answer usably) reach programs as EIO; the storage node's own errno passes
// through, EACCES included (its "permission denied" for a file; a wrong cluster key is
// found when the mount starts). EAGAIN is a handshake the storage node kept closing (its
// cap on connections awaiting the handshake; libfit already retried it for the timeout):
// regular-file system calls on the storage node do not fail with EAGAIN.
Status map_error(const Status& st) {
  if (transport_failure(classify(st))) return Status(EIO, st.message());
  return st;
}

// Whether a request that failed with `st` on try `attempt` is sent again: what
// lego/retry.h classifies kRetry, while tries (kAttempts in all) and time are left (until
// `deadline`: the call's timeout from its first send, all a program waits before EIO). A
// timeout uses the time up, so what is sent again in practice is a request on a connection
// that broke: a storage node that restarted (libfit opens a new connection). Requests sent
// again are carried out again if the first one was: writes at an offset, reads, stats
// come out the same; a create, unlink or rename answers what its first run left (EEXIST,
// ENOENT), as a program sees after NFS's retransmissions.
bool send_again(const Status& st, int attempt, Clock::time_point deadline) {
  return classify(st) == ErrorClass::kRetry && attempt < kAttempts && Clock::now() < deadline;
}

// What is left of the time until `deadline`, rounded up (a call that times out has used
// all of it: send_again then says no), at least 1 ms (0 would mean the default).
std::chrono::milliseconds time_left(Clock::time_point deadline) {
  auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
  return std::max(left, std::chrono::milliseconds(1));
}

template <typename T>
void append(std::vector<std::byte>& out, const T& v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

void append(std::vector<std::byte>& out, const std::string& s) {
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

// Protocol paths carry no leading '/'.
std::string rel(const std::string& path) {
  size_t i = 0;
  while (i < path.size() && path[i] == '/') i++;
  return path.substr(i);
}

}  // namespace

struct StorageClient::Impl {
  fit::Node* node = nullptr;
  fit::NodeId storage = 0;
  ClientOptions options;
  uint32_t max_io = kMaxIo;
  std::chrono::milliseconds lease{20000};

  std::mutex hello_mu;  // one re-hello at a time (taken before mu)
  std::mutex mu;
  SessionHandle session{};  // guarded by mu
  uint64_t generation = 0;  // sessions opened; guarded by mu
  bool stopping = false;    // guarded by mu
  std::condition_variable cv;
  std::thread heartbeat;

  std::string who() const { return "storage node " + std::to_string(storage); }

  std::vector<std::byte>& buffer() {
    thread_local std::vector<std::byte> buf;
    if (buf.size() < node->config().max_message_bytes) buf.resize(node->config().max_message_bytes);
    return buf;
  }

  Status hello() {
    HelloRequest r{};
    r.version = kProtoVersion;
    r.pid = static_cast<uint32_t>(getpid());
    strncpy(r.name, options.name.c_str(), sizeof(r.name) - 1);
    HelloReply out{};
    auto res = node->send_reply(storage, kHello, {reinterpret_cast<std::byte*>(&r), sizeof(r)},
                                {reinterpret_cast<std::byte*>(&out), sizeof(out)});
    if (!res) return map_error(res.status()).with_context(who());
    if (res.value() != sizeof(out) || out.version != kProtoVersion) {
      return Status(EPROTONOSUPPORT, who() + ": unexpected hello reply");
    }
    std::lock_guard<std::mutex> g(mu);
    session = out.session;
    generation++;
    max_io = std::max<uint32_t>(4096, std::min<uint32_t>(out.max_io, kMaxIo));
    lease = std::chrono::milliseconds(std::max<uint32_t>(out.lease_ms, 100));
    return Status();
  }

  SessionHandle current(uint64_t* gen = nullptr) {
    std::lock_guard<std::mutex> g(mu);
    if (gen) *gen = generation;
    return session;
  }

  // Sends `req` (whose first bytes are a SessionHandle, filled in here), again after a
  // broken connection (send_again). When the storage node forgot the session: path
  // requests reopen it and are retried once; handle requests fail with EIO, their files
  // being gone. A storage node that restarted does both: the calling thread's connection
  // was left from the old one (libfit learns it is dead by using it, and opens a new one
  // for the next try), and the new one knows no session. One that is really gone fails
  // the next try at once (ECONNREFUSED).
  Result<size_t> call(uint16_t op, std::vector<std::byte>& req, std::span<std::byte> rep,
                      bool retry_stale, const std::string& what,
                      std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) {
    const auto deadline = Clock::now() + (timeout.count() > 0 ? timeout : node->config().timeout);
    bool reopened = false;
    for (int attempt = 1;; attempt++) {
      uint64_t gen;
      SessionHandle s = current(&gen);
      memcpy(req.data(), &s, sizeof(s));
      auto r = node->send_reply(storage, op, req, rep, time_left(deadline));
      if (r) return r;
      if (r.status().code() == ESTALE) {
        if (!retry_stale || reopened) return failed(r.status(), what);
        LEGO_RETURN_IF_ERROR(reopen_session(gen));
        reopened = true;
        continue;
      }
      if (!send_again(r.status(), attempt, deadline)) return failed(r.status(), what);
    }
  }

  // A failed request's error for the caller: a forgotten session (ESTALE) loses its files.
  Status failed(const Status& st, const std::string& what) const {
    if (st.code() == ESTALE) {
      return Status(
          EIO, who() + ": " + what + ": the storage node lost this file (" + st.message() + ")");
    }
    return map_error(st).with_context(who() + ": " + what);
  }

  std::vector<std::byte> path_req(const std::string& path, const std::string& path2, uint32_t flags,
                                  uint32_t mode, uint64_t arg) {
    PathRequest r{};
    std::string p = rel(path);
    r.path_len = static_cast<uint32_t>(p.size());
    r.path2_len = static_cast<uint32_t>(path2.size());
    r.flags = flags;
    r.mode = mode;
    r.arg = arg;
    std::vector<std::byte> req;
    req.reserve(sizeof(r) + p.size() + path2.size());
    append(req, r);
    append(req, p);
    append(req, path2);
    return req;
  }

  Result<size_t> path_call(uint16_t op, const std::string& what, const std::string& path,
                           std::span<std::byte> rep, const std::string& path2 = "",
                           uint32_t flags = 0, uint32_t mode = 0, uint64_t arg = 0) {
    if (path.size() > kMaxPath || path2.size() > kMaxPath) {
      return Status(ENAMETOOLONG, who() + ": " + what + ": path too long");
    }
    auto req = path_req(path, path2, flags, mode, arg);
    return call(op, req, rep, true, what + " '" + path + "'");
  }

  Result<size_t> handle_call(uint16_t op, const std::string& what, uint64_t handle, uint64_t offset,
                             uint32_t length, uint32_t flags, std::span<std::byte> rep,
                             std::span<const std::byte> data = {},
                             std::chrono::milliseconds timeout = std::chrono::milliseconds(0)) {
    HandleRequest r{};
    r.handle = handle;
    r.offset = offset;
    r.length = length;
    r.flags = flags;
    std::vector<std::byte> req;
    req.reserve(sizeof(r) + data.size());
    append(req, r);
    req.insert(req.end(), data.begin(), data.end());
    return call(op, req, rep, false, what + " of handle " + std::to_string(handle), timeout);
  }

  // The storage node forgot session generation `seen` (ESTALE): open a new one, unless
  // another thread already did. Serialized: two threads re-helloing at once would open two
  // sessions, and a file one of them opened in the first would be unknown in the second.
  Status reopen_session(uint64_t seen) {
    std::lock_guard<std::mutex> h(hello_mu);
    {
      std::lock_guard<std::mutex> g(mu);
      if (generation != seen) return Status::ok();
    }
    return hello();
  }

  static constexpr size_t kPipeline = 8;

  // One read (dst_of gives each chunk's destination) or write (src) of `total` bytes in
  // max_io chunks, up to kPipeline in flight. See StorageClient::read.
  template <typename DstOf>
  Result<size_t> pipelined(uint16_t op, const char* what, uint64_t handle, uint64_t offset,
                           size_t total, DstOf dst_of, std::span<const std::byte> src) {
    // As in call(): sent again after a broken connection (send_again), when no chunk
    // counted yet. Reads and writes at an offset are idempotent.
    const auto deadline = Clock::now() + node->config().timeout;
    Status why;
    auto r = pipelined_once(op, what, handle, offset, total, dst_of, src, &why);
    for (int attempt = 1; !r && !why.is_ok() && send_again(why, attempt, deadline); attempt++) {
      r = pipelined_once(op, what, handle, offset, total, dst_of, src, &why);
    }
    return r;
  }

  template <typename DstOf>
  Result<size_t> pipelined_once(uint16_t op, const char* what, uint64_t handle, uint64_t offset,
                                size_t total, DstOf dst_of, std::span<const std::byte> src,
                                Status* why) {
    *why = Status();  // set to the failure when nothing counts as done
    const bool writing = op == kWrite;
    const size_t chunk = max_io;
    const size_t chunks = std::max<size_t>(1, (total + chunk - 1) / chunk);
    struct Slot {
      std::vector<std::byte> req;
      WriteReply w{};
      uint32_t n = 0;
      fit::RpcFuture f;
    };
    std::vector<Slot> slots(std::min(chunks, kPipeline));
    SessionHandle s = current();
    size_t sent = 0, done = 0;
    Status first_error;
    bool stop = false;  // a short or failed chunk: the rest no longer counts
    auto issue = [&](size_t i) {
      Slot& sl = slots[i % slots.size()];
      size_t at = i * chunk;
      sl.n = static_cast<uint32_t>(std::min(chunk, total - at));
      HandleRequest r{};
      r.session = s;
      r.handle = handle;
      r.offset = offset + at;
      r.length = sl.n;
      sl.req.clear();
      append(sl.req, r);
      if (writing) sl.req.insert(sl.req.end(), src.begin() + at, src.begin() + at + sl.n);
      std::span<std::byte> rep;
      if constexpr (std::is_same_v<DstOf, std::nullptr_t>) {
        rep = {reinterpret_cast<std::byte*>(&sl.w), sizeof(sl.w)};
      } else {
        rep = dst_of(at, sl.n);
      }
      sl.f = node->send_reply_async(storage, op, sl.req, rep);
    };
    if (total == 0) return size_t{0};
    for (; sent < slots.size(); sent++) issue(sent);
    for (size_t i = 0; i < sent; i++) {  // `sent` grows as chunks complete
      Slot& sl = slots[i % slots.size()];
      auto r = sl.f.wait();
      if (!stop) {
        if (!r) {
          stop = true;
          // A read that failed part way is an error all the same: a short read means end
          // of file to FUSE, which would cache zeros in place of the missing data.
          if (done == 0 || !writing) {
            if (done == 0) *why = r.status();
            first_error =
                failed(r.status(), std::string(what) + " of handle " + std::to_string(handle));
          }
        } else if (writing) {
          if (r.value() != sizeof(sl.w) || sl.w.written > sl.n) {
            return Status(EIO, who() + ": write: bad reply");
          }
          done += sl.w.written;
          if (sl.w.written < sl.n) stop = true;
        } else {
          done += r.value();
          if (r.value() < sl.n) stop = true;  // end of file
        }
      }
      if (!stop && sent < chunks) issue(sent++);
    }
    if (!first_error.is_ok()) return first_error;  // set only when nothing counts as done
    return done;
  }

  void heartbeat_loop() {
    std::unique_lock<std::mutex> lk(mu);
    while (!stopping) {
      cv.wait_for(lk, lease / 4);
      if (stopping) break;
      SessionRequest r{session};
      lk.unlock();
      std::vector<std::byte> req(sizeof(r));
      memcpy(req.data(), &r, sizeof(r));
      std::byte none[8];
      // A lost session is reopened by the next real call; failures here are not fatal.
      (void)node->send_reply(storage, kHeartbeat, req, none);
      lk.lock();
    }
  }
};

StorageClient::StorageClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

StorageClient::~StorageClient() {
  {
    std::lock_guard<std::mutex> g(impl_->mu);
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->heartbeat.joinable()) impl_->heartbeat.join();
  SessionRequest r{impl_->current()};
  std::byte none[8];
  (void)impl_->node->send_reply(impl_->storage, kGoodbye,
                                {reinterpret_cast<std::byte*>(&r), sizeof(r)}, none);
}

Result<std::unique_ptr<StorageClient>> StorageClient::connect(fit::Node& node, fit::NodeId storage,
                                                              ClientOptions options) {
  auto impl = std::make_unique<Impl>();
  impl->node = &node;
  impl->storage = storage;
  impl->options = std::move(options);
  LEGO_RETURN_IF_ERROR(impl->hello());
  size_t cap = node.config().max_message_bytes;
  if (cap > sizeof(HandleRequest) + 64) {
    impl->max_io = static_cast<uint32_t>(
        std::min<size_t>(impl->max_io, (cap - sizeof(HandleRequest) - 64) & ~size_t{4095}));
  }
  if (impl->options.heartbeat) {
    Impl* im = impl.get();
    impl->heartbeat = std::thread([im] { im->heartbeat_loop(); });
  }
  return std::unique_ptr<StorageClient>(new StorageClient(std::move(impl)));
}

Result<Attr> StorageClient::stat(const std::string& path) {
  Attr a{};
  auto r = impl_->path_call(kStat, "stat", path, {reinterpret_cast<std::byte*>(&a), sizeof(a)});
  if (!r) return r.status();
  if (r.value() != sizeof(a)) return Status(EIO, impl_->who() + ": stat: short reply");
  return a;
}

Result<OpenReply> StorageClient::open(const std::string& path, int flags, uint32_t mode) {
  OpenReply o{};
  auto r = impl_->path_call(kOpen, "open", path, {reinterpret_cast<std::byte*>(&o), sizeof(o)}, "",
                            static_cast<uint32_t>(flags), mode);
  if (!r) return r.status();
  if (r.value() != sizeof(o)) return Status(EIO, impl_->who() + ": open: short reply");
  return o;
}

Status StorageClient::close(uint64_t handle) {
  std::byte none[8];
  auto r = impl_->handle_call(kClose, "close", handle, 0, 0, 0, none);
  return r ? Status() : r.status();
}

Result<Attr> StorageClient::fstat(uint64_t handle) {
  Attr a{};
  auto r = impl_->handle_call(kFstat, "fstat", handle, 0, 0, 0,
                              {reinterpret_cast<std::byte*>(&a), sizeof(a)});
  if (!r) return r.status();
  if (r.value() != sizeof(a)) return Status(EIO, impl_->who() + ": fstat: short reply");
  return a;
}

// Reads and writes larger than one request (a FUSE request is up to 1 MiB, a request at
// most max_io) keep up to kPipeline requests in flight instead of one round trip at a
// time. What is reported done is the leading run of whole chunks: the first short or
// failed chunk ends it (a write's later chunks may have landed too, as after a failed
// write(2) part way). A read with a failed chunk fails.
Result<size_t> StorageClient::read(uint64_t handle, uint64_t offset, std::span<std::byte> dst) {
  return impl_->pipelined(kRead, "read", handle, offset, dst.size(),
                          [&](size_t at, uint32_t n) { return dst.subspan(at, n); }, {});
}

Result<size_t> StorageClient::write(uint64_t handle, uint64_t offset,
                                    std::span<const std::byte> src) {
  return impl_->pipelined(kWrite, "write", handle, offset, src.size(), nullptr, src);
}

Status StorageClient::fsync(uint64_t handle, bool data_only) {
  std::byte none[8];
  // fsync may have gigabytes to write on the storage node: the cluster's RPC timeout
  // (seconds) would report EIO for a sync that goes on and succeeds. A dead node is still
  // noticed at once (its connection breaks).
  auto r = impl_->handle_call(kFsync, "fsync", handle, 0, 0, data_only ? 1 : 0, none, {},
                              kSlowCallTimeout);
  return r ? Status() : r.status();
}

Status StorageClient::ftruncate(uint64_t handle, uint64_t size) {
  std::byte none[8];
  auto r = impl_->handle_call(kFtruncate, "ftruncate", handle, size, 0, 0, none);
  return r ? Status() : r.status();
}

Status StorageClient::truncate(const std::string& path, uint64_t size) {
  std::byte none[8];
  auto r = impl_->path_call(kTruncate, "truncate", path, none, "", 0, 0, size);
  return r ? Status() : r.status();
}

Result<std::vector<DirItem>> StorageClient::readdir_page(const std::string& path, uint64_t cookie) {
  auto& buf = impl_->buffer();
  auto r = impl_->path_call(kReaddir, "readdir", path, buf, "", 0, 0, cookie);
  if (!r) return r.status();
  std::vector<DirItem> items;
  size_t off = 0, end = r.value();
  while (off < end) {
    DirEntry e;
    if (end - off < sizeof(e)) return Status(EIO, impl_->who() + ": readdir: bad reply");
    memcpy(&e, buf.data() + off, sizeof(e));
    size_t rec = sizeof(e) + ((size_t{e.name_len} + 7) & ~size_t{7});
    if (e.name_len == 0 || e.name_len > 255 || rec > end - off) {
      return Status(EIO, impl_->who() + ": readdir: bad reply");
    }
    DirItem it;
    it.name.assign(reinterpret_cast<const char*>(buf.data() + off + sizeof(e)), e.name_len);
    it.ino = e.ino;
    it.type = e.type;
    it.next = e.next;
    items.push_back(std::move(it));
    off += rec;
  }
  return items;
}

Result<std::vector<DirItem>> StorageClient::readdir(const std::string& path) {
  std::vector<DirItem> all;
  uint64_t cookie = 0;
  for (;;) {
    auto page = readdir_page(path, cookie);
    if (!page) return page.status();
    if (page->empty()) return all;
    cookie = page->back().next;
    for (auto& it : page.value()) all.push_back(std::move(it));
  }
}

Status StorageClient::mkdir(const std::string& path, uint32_t mode) {
  std::byte none[8];
  auto r = impl_->path_call(kMkdir, "mkdir", path, none, "", 0, mode);
  return r ? Status() : r.status();
}

Status StorageClient::rmdir(const std::string& path) {
  std::byte none[8];
  auto r = impl_->path_call(kRmdir, "rmdir", path, none);
  return r ? Status() : r.status();
}

Status StorageClient::unlink(const std::string& path) {
  std::byte none[8];
  auto r = impl_->path_call(kUnlink, "unlink", path, none);
  return r ? Status() : r.status();
}

Status StorageClient::rename(const std::string& from, const std::string& to, uint32_t flags) {
  std::byte none[8];
  auto r = impl_->path_call(kRename, "rename", from, none, rel(to), flags);
  return r ? Status() : r.status();
}

Status StorageClient::link(const std::string& existing, const std::string& new_path) {
  std::byte none[8];
  auto r = impl_->path_call(kLink, "link", existing, none, rel(new_path));
  return r ? Status() : r.status();
}

Status StorageClient::symlink(const std::string& target, const std::string& link_path) {
  std::byte none[8];
  auto r = impl_->path_call(kSymlink, "symlink", link_path, none, target);
  return r ? Status() : r.status();
}

Result<std::string> StorageClient::readlink(const std::string& path) {
  std::vector<std::byte> buf(kMaxPath + 1);
  auto r = impl_->path_call(kReadlink, "readlink", path, buf);
  if (!r) return r.status();
  return std::string(reinterpret_cast<const char*>(buf.data()), r.value());
}

Result<Attr> StorageClient::setattr(const std::string& path, const SetAttr& attr) {
  std::string p = rel(path);
  if (p.size() > kMaxPath) return Status(ENAMETOOLONG, impl_->who() + ": setattr: path too long");
  SetattrRequest r{};
  r.path_len = static_cast<uint32_t>(p.size());
  r.mask = attr.mask;
  r.mode = attr.mode;
  r.uid = attr.uid;
  r.gid = attr.gid;
  r.size = attr.size;
  r.atime_ns = attr.atime_ns;
  r.mtime_ns = attr.mtime_ns;
  std::vector<std::byte> req;
  append(req, r);
  append(req, p);
  Attr a{};
  auto res = impl_->call(kSetattr, req, {reinterpret_cast<std::byte*>(&a), sizeof(a)}, true,
                         "setattr '" + path + "'");
  if (!res) return res.status();
  if (res.value() != sizeof(a)) return Status(EIO, impl_->who() + ": setattr: short reply");
  return a;
}

Result<StatfsReply> StorageClient::statfs() {
  std::vector<std::byte> req(sizeof(SessionRequest));
  StatfsReply s{};
  auto r = impl_->call(kStatfs, req, {reinterpret_cast<std::byte*>(&s), sizeof(s)}, true, "statfs");
  if (!r) return r.status();
  return s;
}

Result<std::string> StorageClient::status() {
  auto& buf = impl_->buffer();
  auto r = impl_->node->send_reply(impl_->storage, kStatus, {}, buf);
  if (!r) return map_error(r.status()).with_context(impl_->who());
  return std::string(reinterpret_cast<const char*>(buf.data()), r.value());
}

uint32_t StorageClient::max_io() const {
  return impl_->max_io;
}

fit::NodeId StorageClient::storage_node() const {
  return impl_->storage;
}

Result<size_t> StorageClient::call_raw(uint16_t opcode, std::vector<std::byte> request,
                                       std::span<std::byte> reply) {
  SessionHandle s = impl_->current();
  if (request.size() >= sizeof(s)) memcpy(request.data(), &s, sizeof(s));
  auto r = impl_->node->send_reply(impl_->storage, opcode, request, reply);
  if (!r) return r.status();
  return r;
}

}  // namespace lego::stor
