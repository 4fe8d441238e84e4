// StorageNode: the files of one export directory, served over FIT per storage_proto.h.
//
// Confinement: every path is resolved by openat2 relative to the export's directory fd
// with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS. Operations on a name (mkdir, unlink,
// rename, symlink, stat, ...) resolve the parent that way to an O_PATH fd and then call
// the *at() system call on the last component, which is never "", "." or "..". The
// kernel checks the whole walk atomically, so a symlink swapped in mid-path cannot lead
// outside; an escape is answered with EACCES (and counted).
//
// Lock order: the sessions table's mutex, then Session::mu. File I/O runs with no lock held: a
// handle's fd is shared (shared_ptr<File>) and closed when its last user drops it.
#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sodium.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "lego/lease_table.h"
#include "lego/storage_node.h"

namespace lego::stor {
namespace {

template <typename T>
bool read_struct(std::span<const std::byte> in, T* out) {
  if (in.size() < sizeof(T)) return false;
  memcpy(out, in.data(), sizeof(T));
  return true;
}

template <typename T>
size_t put(std::span<std::byte> out, const T& v) {
  memcpy(out.data(), &v, sizeof(T));
  return sizeof(T);
}

// A file descriptor closed on destruction.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      if (fd >= 0) close(fd);
      fd = o.fd;
      o.fd = -1;
    }
    return *this;
  }
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

Attr to_attr(const struct stat& st) {
  Attr a{};
  a.ino = st.st_ino;
  a.size = static_cast<uint64_t>(st.st_size);
  a.blocks = static_cast<uint64_t>(st.st_blocks);
  a.mode = st.st_mode;
  a.nlink = static_cast<uint32_t>(st.st_nlink);
  a.uid = st.st_uid;
  a.gid = st.st_gid;
  a.rdev = st.st_rdev;
  a.atime_ns = st.st_atim.tv_sec * 1000000000LL + st.st_atim.tv_nsec;
  a.mtime_ns = st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
  a.ctime_ns = st.st_ctim.tv_sec * 1000000000LL + st.st_ctim.tv_nsec;
  a.blksize = static_cast<uint32_t>(st.st_blksize);
  return a;
}

timespec to_timespec(int64_t ns) {
  timespec ts;
  ts.tv_sec = ns / 1000000000LL;
  ts.tv_nsec = ns % 1000000000LL;
  if (ts.tv_nsec < 0) {
    ts.tv_nsec += 1000000000LL;
    ts.tv_sec -= 1;
  }
  return ts;
}

// open(2) flags a client may ask for; anything else is dropped (O_PATH, O_TMPFILE, ...).
constexpr int kAllowedOpenFlags = O_ACCMODE | O_CREAT | O_EXCL | O_TRUNC | O_APPEND | O_DIRECTORY |
                                  O_NOFOLLOW | O_DSYNC | O_SYNC | O_NOATIME;

// Paths as the protocol defines them: no NUL, not absolute, not too long.
Status check_path(std::string_view p, const char* op) {
  if (p.size() > kMaxPath) return Status(ENAMETOOLONG, std::string(op) + ": path too long");
  if (p.find('\0') != std::string_view::npos) {
    return Status(EPROTO, std::string(op) + ": path contains NUL");
  }
  return Status();
}

}  // namespace

struct StorageNode::Impl {
  struct File {
    Fd fd;
  };
  struct Session {
    std::mutex mu;
    fit::NodeId owner = 0;
    uint32_t pid = 0;
    std::string name;
    std::unordered_map<uint64_t, std::shared_ptr<File>> files;  // guarded by mu
    uint64_t next_handle = 1;                                   // guarded by mu
    bool closed = false;                                        // guarded by mu
  };

  StorageNodeOptions options;
  const fit::Node* node = nullptr;  // set by serve(): its counters go into status_text()
  Fd root;                          // the export, O_PATH | O_DIRECTORY
  // The sessions by id and secret. Leases run on the FIT node's serving time: a session
  // never expires for time in which the server could not hear its client.
  LeaseTable<Session> sessions;

  struct Counters {
    std::atomic<uint64_t> sessions_opened{0}, sessions_expired{0}, handles_open{0}, reads{0},
        writes{0}, bytes_read{0}, bytes_written{0}, fsyncs{0}, metadata_ops{0}, escapes{0},
        refused{0}, files_refused{0};
  } c;

  Status refuse(int code, const std::string& msg) {
    c.refused++;
    return Status(code, msg);
  }

  // openat2 beneath the export. EXDEV (the walk would leave the export) becomes EACCES.
  Result<Fd> resolve(std::string_view path, int flags, mode_t mode, const char* op) {
    std::string p(path.empty() ? "." : path);
    if (p[0] == '/') {
      c.escapes++;
      return Status(EACCES, std::string(op) + " '" + p + "': absolute paths are refused");
    }
    open_how how{};
    // openat2 refuses O_PATH with any flag but O_DIRECTORY/O_NOFOLLOW/O_CLOEXEC.
    how.flags = static_cast<uint64_t>(flags | O_CLOEXEC | ((flags & O_PATH) ? 0 : O_NOCTTY));
    how.mode = (flags & O_CREAT) ? (mode & 07777) : 0;
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    for (int attempt = 0;; attempt++) {
      long fd = syscall(SYS_openat2, root.fd, p.c_str(), &how, sizeof(how));
      if (fd >= 0) return Fd(static_cast<int>(fd));
      int e = errno;
      // EAGAIN: a rename elsewhere raced with the walk; the kernel asks us to retry.
      if ((e == EAGAIN || e == EINTR) && attempt < 16) continue;
      if (e == EXDEV) {
        c.escapes++;
        return Status(EACCES, std::string(op) + " '" + p + "': leads outside the export");
      }
      if (e == EMFILE || e == ENFILE) {
        // This process's descriptors, shared by every session, ran out: not the calling
        // program's limit (EMFILE) but the storage node's table.
        c.files_refused++;
        return Status(ENFILE, std::string(op) + " '" + p +
                                  "': lego-stord has no file descriptor left (" + strerror(e) +
                                  "; raise its RLIMIT_NOFILE)");
      }
      return Status::from_errno(e, std::string(op) + " '" + p + "'");
    }
  }

  // The parent directory of `path` (O_PATH) and its last component.
  Result<Fd> parent(std::string_view path, std::string* name, const char* op) {
    if (!path.empty() && path[0] == '/') {
      c.escapes++;
      return Status(EACCES, std::string(op) + ": absolute paths are refused");
    }
    while (path.size() > 1 && path.back() == '/') path.remove_suffix(1);
    size_t slash = path.rfind('/');
    std::string_view dir = slash == std::string_view::npos ? "" : path.substr(0, slash);
    std::string_view last = slash == std::string_view::npos ? path : path.substr(slash + 1);
    if (last.empty() || last == "." || last == "..") {
      return Status(EINVAL, std::string(op) + " '" + std::string(path) +
                                "': needs a name, not the export or '.' or '..'");
    }
    if (last.size() > NAME_MAX) return Status(ENAMETOOLONG, std::string(op) + ": name too long");
    name->assign(last);
    return resolve(dir, O_PATH | O_DIRECTORY, 0, op);
  }

  // What a request naming no session of the asker's gets.
  Status unknown_session(const SessionHandle& h, fit::NodeId from) {
    return refuse(ESTALE, "storage session " + std::to_string(h.id) + " of node " +
                              std::to_string(from) + " is unknown (expired or restarted)");
  }

  // The session named by `h`, if its secret matches; renews its lease.
  Result<std::shared_ptr<Session>> lookup(const SessionHandle& h, fit::NodeId from) {
    std::shared_ptr<Session> s = sessions.find(h.id, h.secret);
    if (!s) return unknown_session(h, from);
    return s;
  }

  Result<std::shared_ptr<File>> file(Session& s, uint64_t handle) {
    std::lock_guard<std::mutex> g(s.mu);
    auto it = s.files.find(handle);
    if (it == s.files.end()) {
      return refuse(EBADF, "file handle " + std::to_string(handle) + " is not open");
    }
    return it->second;
  }

  void close_all(Session& s) {
    std::lock_guard<std::mutex> g(s.mu);
    s.closed = true;
    c.handles_open -= s.files.size();
    s.files.clear();
  }

  // ---- sessions ----

  Result<size_t> hello(const fit::RpcContext& ctx, std::span<const std::byte> req,
                       std::span<std::byte> rep) {
    HelloRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) {
      return refuse(EPROTO, "hello: request of " + std::to_string(req.size()) +
                                " bytes, expected " + std::to_string(sizeof(r)));
    }
    if (r.version != kProtoVersion) {
      return refuse(EPROTONOSUPPORT, "hello: storage protocol version " +
                                         std::to_string(r.version) + ", this storage node speaks " +
                                         std::to_string(kProtoVersion));
    }
    if (rep.size() < sizeof(HelloReply)) return Status(EMSGSIZE, "hello: reply buffer too small");
    auto s = std::make_shared<Session>();
    // Handles start at a random number per session, so a handle a client kept from an
    // earlier session (the node restarted, or the lease ran out) names no file of its new
    // session: EBADF, never another file.
    randombytes_buf(&s->next_handle, sizeof(s->next_handle));
    s->next_handle = (s->next_handle >> 2) | 1;
    s->owner = ctx.from;
    s->pid = r.pid;
    s->name.assign(r.name, strnlen(r.name, sizeof(r.name)));
    const auto key = sessions.add(s, kMaxSessions);
    if (!key) {
      c.refused++;
      return Status(EAGAIN, "hello: the storage node holds " + std::to_string(kMaxSessions) +
                                " sessions already; try again when leases run out");
    }
    c.sessions_opened++;
    HelloReply out{};
    out.version = kProtoVersion;
    out.max_io = static_cast<uint32_t>(std::min<size_t>(kMaxIo, max_io_for(rep.size())));
    out.session.id = key->id;
    memcpy(out.session.secret, key->secret, sizeof(out.session.secret));
    out.lease_ms = static_cast<uint32_t>(options.lease.count());
    return put(rep, out);
  }

  size_t max_io_for(size_t reply_capacity) const {
    size_t hdr = sizeof(HandleRequest) + 64;
    return reply_capacity > hdr ? reply_capacity - hdr : 0;
  }

  Result<size_t> goodbye(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    SessionRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r))
      return refuse(EPROTO, "goodbye: bad size");
    std::shared_ptr<Session> s = sessions.remove(r.session.id, r.session.secret);
    if (!s) return unknown_session(r.session, ctx.from);
    close_all(*s);
    return size_t{0};
  }

  Result<size_t> heartbeat(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    SessionRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) {
      return refuse(EPROTO, "heartbeat: bad size");
    }
    auto s = lookup(r.session, ctx.from);
    if (!s) return s.status();
    return size_t{0};
  }

  // ---- path operations ----

  // Decodes a PathRequest and its one or two paths; checks the session.
  struct PathOp {
    PathRequest r;
    std::string_view path, path2;
    std::shared_ptr<Session> session;
  };
  Result<PathOp> path_op(const fit::RpcContext& ctx, std::span<const std::byte> req, const char* op,
                         bool two_paths) {
    PathOp p;
    if (!read_struct(req, &p.r)) return refuse(EPROTO, std::string(op) + ": short request");
    if (p.r.path_len > kMaxPath || p.r.path2_len > kMaxPath ||
        req.size() != sizeof(p.r) + size_t{p.r.path_len} + p.r.path2_len ||
        (!two_paths && p.r.path2_len != 0)) {
      return refuse(EPROTO, std::string(op) + ": request of " + std::to_string(req.size()) +
                                " bytes does not match its path lengths");
    }
    const char* base = reinterpret_cast<const char*>(req.data()) + sizeof(p.r);
    p.path = std::string_view(base, p.r.path_len);
    p.path2 = std::string_view(base + p.r.path_len, p.r.path2_len);
    Status st = check_path(p.path, op);
    if (st.is_ok()) st = check_path(p.path2, op);
    if (!st) return refuse(st.code(), st.message());
    auto s = lookup(p.r.session, ctx.from);
    if (!s) return s.status();
    p.session = std::move(s.value());
    c.metadata_ops++;
    return p;
  }

  Result<size_t> stat(const fit::RpcContext& ctx, std::span<const std::byte> req,
                      std::span<std::byte> rep) {
    auto p = path_op(ctx, req, "stat", false);
    if (!p) return p.status();
    if (rep.size() < sizeof(Attr)) return Status(EMSGSIZE, "stat: reply buffer too small");
    struct stat st;
    if (p->path.empty()) {
      if (fstat(root.fd, &st) != 0) return Status::from_errno(errno, "stat export");
      return put(rep, to_attr(st));
    }
    std::string name;
    auto dir = parent(p->path, &name, "stat");
    if (!dir) return dir.status();
    if (fstatat(dir->fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) {
      return Status::from_errno(errno, "stat '" + std::string(p->path) + "'");
    }
    return put(rep, to_attr(st));
  }

  Result<size_t> open(const fit::RpcContext& ctx, std::span<const std::byte> req,
                      std::span<std::byte> rep) {
    auto p = path_op(ctx, req, "open", false);
    if (!p) return p.status();
    if (rep.size() < sizeof(OpenReply)) return Status(EMSGSIZE, "open: reply buffer too small");
    int flags = static_cast<int>(p->r.flags) & kAllowedOpenFlags;
    // O_NONBLOCK so that a FIFO in the export cannot stall a server thread; only regular
    // files and directories are served.
    auto fd = resolve(p->path, flags | O_NONBLOCK, p->r.mode, "open");
    if (!fd) return fd.status();
    struct stat st;
    if (fstat(fd->fd, &st) != 0) return Status::from_errno(errno, "open: fstat");
    if (!S_ISREG(st.st_mode) && !S_ISDIR(st.st_mode)) {
      return Status(EOPNOTSUPP, "open '" + std::string(p->path) +
                                    "': only regular files and directories are served");
    }
    if (S_ISREG(st.st_mode)) fcntl(fd->fd, F_SETFL, fcntl(fd->fd, F_GETFL) & ~O_NONBLOCK);
    Session& s = *p->session;
    OpenReply out{};
    {
      std::lock_guard<std::mutex> g(s.mu);
      if (s.closed) return Status(ESTALE, "open: session closed");
      if (s.files.size() >= options.max_files) {
        c.files_refused++;
        return Status(ENFILE, "open '" + std::string(p->path) + "': the session of node " +
                                  std::to_string(s.owner) + " holds " +
                                  std::to_string(options.max_files) +
                                  " files already (lego-stord --max-files)");
      }
      out.handle = s.next_handle++;
      auto f = std::make_shared<File>();
      f->fd = std::move(fd.value());
      s.files[out.handle] = std::move(f);
    }
    c.handles_open++;
    out.attr = to_attr(st);
    return put(rep, out);
  }

  Result<size_t> truncate(const fit::RpcContext& ctx, std::span<const std::byte> req) {
    auto p = path_op(ctx, req, "truncate", false);
    if (!p) return p.status();
    if (p->r.arg > static_cast<uint64_t>(INT64_MAX)) return Status(EINVAL, "truncate: size");
    auto fd = resolve(p->path, O_WRONLY | O_NONBLOCK, 0, "truncate");
    if (!fd) return fd.status();
    if (ftruncate(fd->fd, static_cast<off_t>(p->r.arg)) != 0) {
      return Status::from_errno(errno, "truncate '" + std::string(p->path) + "'");
    }
    return size_t{0};
  }

  Result<size_t> readdir(const fit::RpcContext& ctx, std::span<const std::byte> req,
                         std::span<std::byte> rep) {
    auto p = path_op(ctx, req, "readdir", false);
    if (!p) return p.status();
    auto fd = resolve(p->path, O_RDONLY | O_DIRECTORY, 0, "readdir");
    if (!fd) return fd.status();
    if (p->r.arg > static_cast<uint64_t>(INT64_MAX) ||
        lseek(fd->fd, static_cast<off_t>(p->r.arg), SEEK_SET) < 0) {
      return Status::from_errno(EINVAL, "readdir: bad cookie");
    }
    std::vector<char> buf(std::min<size_t>(rep.size(), 64 * 1024));
    size_t used = 0;
    for (;;) {
      long n = syscall(SYS_getdents64, fd->fd, buf.data(), buf.size());
      if (n < 0) return Status::from_errno(errno, "readdir '" + std::string(p->path) + "'");
      if (n == 0) return used;
      bool full = false;
      for (long off = 0; off < n;) {
        auto* d = reinterpret_cast<linux_dirent64*>(buf.data() + off);
        off += d->d_reclen;
        std::string_view name(d->d_name);
        if (name == "." || name == "..") continue;
        size_t rec = sizeof(DirEntry) + ((name.size() + 7) & ~size_t{7});
        if (used + rec > rep.size()) {
          full = true;
          break;
        }
        DirEntry e{};
        e.ino = d->d_ino;
        e.next = static_cast<uint64_t>(d->d_off);
        e.type = d->d_type;
        e.name_len = static_cast<uint32_t>(name.size());
        memcpy(rep.data() + used, &e, sizeof(e));
        memset(rep.data() + used + sizeof(e), 0, rec - sizeof(e));
        memcpy(rep.data() + used + sizeof(e), name.data(), name.size());
        used += rec;
      }
      if (full || used > 0) return used;
    }
  }

  struct linux_dirent64 {
    ino64_t d_ino;
    off64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
  };

  Result<size_t> name_op(const fit::RpcContext& ctx, std::span<const std::byte> req,
                         std::span<std::byte> rep, uint16_t opcode) {
    const char* op = opcode == kMkdir     ? "mkdir"
                     : opcode == kRmdir   ? "rmdir"
                     : opcode == kUnlink  ? "unlink"
                     : opcode == kSymlink ? "symlink"
                                          : "readlink";
    auto p = path_op(ctx, req, op, opcode == kSymlink);
    if (!p) return p.status();
    std::string name;
    auto dir = parent(p->path, &name, op);
    if (!dir) return dir.status();
    int rc = 0;
    switch (opcode) {
      case kMkdir:
        rc = mkdirat(dir->fd, name.c_str(), p->r.mode & 07777);
        break;
      case kRmdir:
        rc = unlinkat(dir->fd, name.c_str(), AT_REMOVEDIR);
        break;
      case kUnlink:
        rc = unlinkat(dir->fd, name.c_str(), 0);
        break;
      case kSymlink: {
        // The target is stored as text; following it is confined like any other path.
        if (p->path2.empty()) return refuse(EINVAL, "symlink: empty target");
        rc = symlinkat(std::string(p->path2).c_str(), dir->fd, name.c_str());
        break;
      }
      case kReadlink: {
        ssize_t n =
            readlinkat(dir->fd, name.c_str(), reinterpret_cast<char*>(rep.data()), rep.size());
        if (n < 0) return Status::from_errno(errno, "readlink '" + std::string(p->path) + "'");
        return static_cast<size_t>(n);
      }
      default:
        return refuse(EOPNOTSUPP, "not a name operation");
    }
    if (rc != 0)
      return Status::from_errno(errno, std::string(op) + " '" + std::string(p->path) + "'");
    return size_t{0};
  }

  Result<size_t> rename(const fit::RpcContext& ctx, std::span<const std::byte> req, bool link) {
    const char* op = link ? "link" : "rename";
    auto p = path_op(ctx, req, op, true);
    if (!p) return p.status();
    std::string from_name, to_name;
    auto from = parent(p->path, &from_name, op);
    if (!from) return from.status();
    auto to = parent(p->path2, &to_name, op);
    if (!to) return to.status();
    int rc;
    if (link) {
      rc = linkat(from->fd, from_name.c_str(), to->fd, to_name.c_str(), 0);
    } else {
      unsigned flags = p->r.flags & (RENAME_NOREPLACE | RENAME_EXCHANGE);
      rc = static_cast<int>(
          syscall(SYS_renameat2, from->fd, from_name.c_str(), to->fd, to_name.c_str(), flags));
    }
    if (rc != 0) {
      return Status::from_errno(errno, std::string(op) + " '" + std::string(p->path) + "' to '" +
                                           std::string(p->path2) + "'");
    }
    return size_t{0};
  }

  Result<size_t> setattr(const fit::RpcContext& ctx, std::span<const std::byte> req,
                         std::span<std::byte> rep) {
    SetattrRequest r;
    if (!read_struct(req, &r) || r.path_len > kMaxPath ||
        req.size() != sizeof(r) + size_t{r.path_len}) {
      return refuse(EPROTO, "setattr: request does not match its path length");
    }
    std::string_view path(reinterpret_cast<const char*>(req.data()) + sizeof(r), r.path_len);
    Status st = check_path(path, "setattr");
    if (!st) return refuse(st.code(), st.message());
    auto s = lookup(r.session, ctx.from);
    if (!s) return s.status();
    if (rep.size() < sizeof(Attr)) return Status(EMSGSIZE, "setattr: reply buffer too small");
    c.metadata_ops++;
    std::string what = "setattr '" + std::string(path) + "'";
    auto fd = resolve(path, O_PATH | O_NOFOLLOW, 0, "setattr");
    if (!fd) return fd.status();
    struct stat sb;
    if (fstat(fd->fd, &sb) != 0) return Status::from_errno(errno, what);
    std::string proc = "/proc/self/fd/" + std::to_string(fd->fd);
    if (r.mask & kSetSize) {
      if (!S_ISREG(sb.st_mode)) return Status(S_ISDIR(sb.st_mode) ? EISDIR : EINVAL, what);
      if (r.size > static_cast<uint64_t>(INT64_MAX)) return Status(EINVAL, what + ": size");
      auto w = resolve(path, O_WRONLY | O_NOFOLLOW, 0, "setattr");
      if (!w) return w.status();
      if (ftruncate(w->fd, static_cast<off_t>(r.size)) != 0) {
        return Status::from_errno(errno, what + ": truncate");
      }
    }
    if (r.mask & kSetMode) {
      if (S_ISLNK(sb.st_mode)) return Status(EOPNOTSUPP, what + ": chmod of a symlink");
      if (chmod(proc.c_str(), r.mode & 07777) != 0) {
        return Status::from_errno(errno, what + ": chmod");
      }
    }
    if (r.mask & (kSetUid | kSetGid)) {
      uid_t uid = (r.mask & kSetUid) ? r.uid : static_cast<uid_t>(-1);
      gid_t gid = (r.mask & kSetGid) ? r.gid : static_cast<gid_t>(-1);
      if (fchownat(fd->fd, "", uid, gid, AT_EMPTY_PATH) != 0) {
        return Status::from_errno(errno, what + ": chown");
      }
    }
    if (r.mask & (kSetAtime | kSetMtime | kSetAtimeNow | kSetMtimeNow)) {
      timespec ts[2];
      ts[0].tv_nsec = UTIME_OMIT;
      ts[1].tv_nsec = UTIME_OMIT;
      ts[0].tv_sec = ts[1].tv_sec = 0;
      if (r.mask & kSetAtime) ts[0] = to_timespec(r.atime_ns);
      if (r.mask & kSetMtime) ts[1] = to_timespec(r.mtime_ns);
      if (r.mask & kSetAtimeNow) ts[0].tv_nsec = UTIME_NOW;
      if (r.mask & kSetMtimeNow) ts[1].tv_nsec = UTIME_NOW;
      if (S_ISLNK(sb.st_mode)) {
        std::string name;
        auto dir = parent(path, &name, "setattr");
        if (!dir) return dir.status();
        if (utimensat(dir->fd, name.c_str(), ts, AT_SYMLINK_NOFOLLOW) != 0) {
          return Status::from_errno(errno, what + ": utimens");
        }
      } else if (utimensat(AT_FDCWD, proc.c_str(), ts, 0) != 0) {
        return Status::from_errno(errno, what + ": utimens");
      }
    }
    if (fstat(fd->fd, &sb) != 0) return Status::from_errno(errno, what);
    return put(rep, to_attr(sb));
  }

  Result<size_t> statfs(const fit::RpcContext& ctx, std::span<const std::byte> req,
                        std::span<std::byte> rep) {
    SessionRequest r;
    if (!read_struct(req, &r) || req.size() != sizeof(r)) return refuse(EPROTO, "statfs: bad size");
    auto s = lookup(r.session, ctx.from);
    if (!s) return s.status();
    if (rep.size() < sizeof(StatfsReply)) return Status(EMSGSIZE, "statfs: reply too small");
    struct statvfs v;
    if (fstatvfs(root.fd, &v) != 0) return Status::from_errno(errno, "statfs export");
    StatfsReply out{};
    out.block_size = v.f_frsize;
    out.blocks = v.f_blocks;
    out.blocks_free = v.f_bfree;
    out.blocks_avail = v.f_bavail;
    out.files = v.f_files;
    out.files_free = v.f_ffree;
    out.name_max = v.f_namemax;
    return put(rep, out);
  }

  // ---- handle operations ----

  Result<size_t> handle_op(const fit::RpcContext& ctx, std::span<const std::byte> req,
                           std::span<std::byte> rep, uint16_t opcode) {
    HandleRequest r;
    if (!read_struct(req, &r)) return refuse(EPROTO, "file request: short");
    size_t payload = opcode == kWrite ? r.length : 0;
    if (req.size() != sizeof(r) + payload) {
      return refuse(EPROTO, "file request of " + std::to_string(req.size()) +
                                " bytes does not match its length " + std::to_string(payload));
    }
    if ((opcode == kRead || opcode == kWrite) && r.length > kMaxIo) {
      return refuse(EPROTO, "file request: length " + std::to_string(r.length) + " over " +
                                std::to_string(kMaxIo));
    }
    if (r.offset > static_cast<uint64_t>(INT64_MAX) ||
        ((opcode == kRead || opcode == kWrite) &&
         r.offset + r.length > static_cast<uint64_t>(INT64_MAX))) {
      return refuse(EINVAL, "file request: offset " + std::to_string(r.offset) + " too large");
    }
    auto s = lookup(r.session, ctx.from);
    if (!s) return s.status();
    Session& sess = *s.value();
    if (opcode == kClose) {
      std::lock_guard<std::mutex> g(sess.mu);
      if (sess.files.erase(r.handle) == 0) {
        return refuse(EBADF, "close: handle " + std::to_string(r.handle) + " is not open");
      }
      c.handles_open--;
      return size_t{0};
    }
    auto f = file(sess, r.handle);
    if (!f) return f.status();
    int fd = f.value()->fd.fd;
    off_t off = static_cast<off_t>(r.offset);
    switch (opcode) {
      case kRead: {
        size_t want = std::min<size_t>(r.length, rep.size());
        size_t got = 0;
        while (got < want) {
          ssize_t n = pread(fd, rep.data() + got, want - got, off + static_cast<off_t>(got));
          if (n < 0 && errno == EINTR) continue;
          if (n < 0) {
            // Even after a partial read: FUSE takes a short read for end of file and
            // would cache zeros for the rest.
            return Status::from_errno(errno, "read handle " + std::to_string(r.handle));
          }
          if (n == 0) break;
          got += static_cast<size_t>(n);
        }
        c.reads++;
        c.bytes_read += got;
        return got;
      }
      case kWrite: {
        if (rep.size() < sizeof(WriteReply)) return Status(EMSGSIZE, "write: reply too small");
        const std::byte* data = req.data() + sizeof(r);
        size_t done = 0;
        while (done < r.length) {
          ssize_t n = pwrite(fd, data + done, r.length - done, off + static_cast<off_t>(done));
          if (n < 0 && errno == EINTR) continue;
          if (n < 0) {
            if (done > 0) break;  // a short write: the caller learns how much landed
            return Status::from_errno(errno, "write handle " + std::to_string(r.handle));
          }
          if (n == 0) break;
          done += static_cast<size_t>(n);
        }
        c.writes++;
        c.bytes_written += done;
        WriteReply out{};
        out.written = static_cast<uint32_t>(done);
        return put(rep, out);
      }
      case kFstat: {
        if (rep.size() < sizeof(Attr)) return Status(EMSGSIZE, "fstat: reply too small");
        struct stat st;
        if (fstat(fd, &st) != 0) return Status::from_errno(errno, "fstat");
        c.metadata_ops++;
        return put(rep, to_attr(st));
      }
      case kFtruncate:
        if (ftruncate(fd, off) != 0) return Status::from_errno(errno, "ftruncate");
        c.metadata_ops++;
        return size_t{0};
      case kFsync: {
        int rc = (r.flags & 1) ? fdatasync(fd) : fsync(fd);
        if (rc != 0) return Status::from_errno(errno, "fsync");
        c.fsyncs++;
        return size_t{0};
      }
      default:
        return refuse(EOPNOTSUPP, "not a file operation");
    }
  }

  size_t expire_idle() {
    auto dead = sessions.expire(options.lease);
    for (auto& [id, s] : dead) close_all(*s);
    c.sessions_expired += dead.size();
    return dead.size();
  }

  StorageNodeStats stats() const {
    StorageNodeStats s;
    s.sessions_open = sessions.size();
    s.sessions_opened = c.sessions_opened;
    s.sessions_expired = c.sessions_expired;
    s.handles_open = c.handles_open;
    s.reads = c.reads;
    s.writes = c.writes;
    s.bytes_read = c.bytes_read;
    s.bytes_written = c.bytes_written;
    s.fsyncs = c.fsyncs;
    s.metadata_ops = c.metadata_ops;
    s.escapes = c.escapes;
    s.refused = c.refused;
    s.files_refused = c.files_refused;
    return s;
  }
};

StorageNode::StorageNode(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
StorageNode::~StorageNode() = default;

Result<std::unique_ptr<StorageNode>> StorageNode::create(StorageNodeOptions options) {
  if (sodium_init() < 0) return Status(EIO, "libsodium failed to initialise");
  if (options.export_dir.empty()) return Status(EINVAL, "no export directory given");
  int fd = ::open(options.export_dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::from_errno(errno, "export directory '" + options.export_dir + "'");
  auto impl = std::make_unique<Impl>();
  impl->root = Fd(fd);
  impl->options = std::move(options);
  return std::unique_ptr<StorageNode>(new StorageNode(std::move(impl)));
}

void StorageNode::serve(fit::Node& node) {
  Impl* im = impl_.get();
  im->node = &node;
  im->sessions.follow(&node);
  node.handle(kHello, [im](const fit::RpcContext& ctx, auto req, auto rep) {
    return im->hello(ctx, req, rep);
  });
  node.handle(kGoodbye,
              [im](const fit::RpcContext& ctx, auto req, auto) { return im->goodbye(ctx, req); });
  node.handle(kHeartbeat,
              [im](const fit::RpcContext& ctx, auto req, auto) { return im->heartbeat(ctx, req); });
  node.handle(kStat, [im](const fit::RpcContext& ctx, auto req, auto rep) {
    return im->stat(ctx, req, rep);
  });
  node.handle(kOpen, [im](const fit::RpcContext& ctx, auto req, auto rep) {
    return im->open(ctx, req, rep);
  });
  for (uint16_t op : {kClose, kRead, kWrite, kFtruncate, kFsync, kFstat}) {
    node.handle(op, [im, op](const fit::RpcContext& ctx, auto req, auto rep) {
      return im->handle_op(ctx, req, rep, op);
    });
  }
  node.handle(kTruncate,
              [im](const fit::RpcContext& ctx, auto req, auto) { return im->truncate(ctx, req); });
  node.handle(kReaddir, [im](const fit::RpcContext& ctx, auto req, auto rep) {
    return im->readdir(ctx, req, rep);
  });
  for (uint16_t op : {kMkdir, kRmdir, kUnlink, kSymlink, kReadlink}) {
    node.handle(op, [im, op](const fit::RpcContext& ctx, auto req, auto rep) {
      return im->name_op(ctx, req, rep, op);
    });
  }
  node.handle(kRename, [im](const fit::RpcContext& ctx, auto req, auto) {
    return im->rename(ctx, req, false);
  });
  node.handle(kLink, [im](const fit::RpcContext& ctx, auto req, auto) {
    return im->rename(ctx, req, true);
  });
  node.handle(kSetattr, [im](const fit::RpcContext& ctx, auto req, auto rep) {
    return im->setattr(ctx, req, rep);
  });
  node.handle(kStatfs, [im](const fit::RpcContext& ctx, auto req, auto rep) {
    return im->statfs(ctx, req, rep);
  });
  node.handle(kStatus,
              [this](const fit::RpcContext&, auto, std::span<std::byte> rep) -> Result<size_t> {
                std::string text = status_text();
                size_t n = std::min(text.size(), rep.size());
                memcpy(rep.data(), text.data(), n);
                return n;
              });
}

size_t StorageNode::expire_idle() {
  return impl_->expire_idle();
}

StorageNodeStats StorageNode::stats() const {
  return impl_->stats();
}

std::string StorageNode::status_text() const {
  StorageNodeStats s = stats();
  std::ostringstream o;
  o << "storage node: export " << impl_->options.export_dir << ", lease "
    << impl_->options.lease.count() << " ms, max " << impl_->options.max_files
    << " files per session\n";
  impl_->sessions.for_each([&o](uint64_t id, Impl::Session& sess) {
    std::lock_guard<std::mutex> g(sess.mu);
    o << "  session " << id << ": node " << sess.owner << " pid " << sess.pid << " (" << sess.name
      << "), " << sess.files.size() << " open files\n";
  });
#define LEGO_STORAGE_NODE_LINE(name, type, doc) o << #name " " << s.name << "\n";
  LEGO_STORAGE_NODE_COUNTERS(LEGO_STORAGE_NODE_LINE)
#undef LEGO_STORAGE_NODE_LINE
  if (impl_->node != nullptr) o << fit::stats_text(impl_->node->stats());
  return o.str();
}

}  // namespace lego::stor
