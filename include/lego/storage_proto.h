// The storage-node protocol, version 1: what a processor node asks lego-stord about the
// files of its export. Carried as FIT RPCs (include/lego/fit.h); each request opcode
// below has one request and one reply layout. All integers little-endian; every struct's
// size is asserted; the storage node checks every length, path and handle before use and
// answers a malformed request with EPROTO, never by crashing.
//
// Sessions: kHello opens one for a client (a mount) and returns a SessionHandle (an id
// plus a 128-bit random secret). Every later request names it; an unknown id or a wrong
// secret gets ESTALE (the storage node restarted or expired the session: say kHello
// again). Open files are handles of one session: a session is freed, with every file it
// holds open, by kGoodbye or when no request (kHeartbeat included) arrived for the lease
// time, so a vanished client leaks nothing. A session holds at most the storage node's
// max_files (lego-stord --max-files, default kMaxHandles) open files; kOpen beyond that,
// or when the storage node itself has no file descriptor left, gets ENFILE: the table
// that is full is the whole mount's (every program on the processor node shares one
// session), not the calling process's, whose limit EMFILE would name.
//
// Paths: relative to the export, '/'-separated, without a leading '/', at most kMaxPath
// bytes, no NUL; "" names the export's root. The storage node resolves them beneath its
// export (openat2 RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS): a path or symlink that would
// leave it gets EXDEV, whatever races with the lookup. Errors are errno values, the same
// the storage node's own system call returned (ENOENT, EACCES, ENOSPC, EIO, ...).
#pragma once

#include <cstddef>
#include <cstdint>

namespace lego::stor {

inline constexpr uint32_t kProtoVersion = 1;
inline constexpr uint32_t kMaxPath = 4096;  // bytes of one path, without NUL
// Largest read or write payload per request: 128 KiB fits FIT's default 136 KiB
// max_message_bytes with headers. Clients split larger I/O.
inline constexpr uint32_t kMaxIo = 128 * 1024;
inline constexpr uint32_t kMaxHandles = 65536;   // default open files per session
inline constexpr uint32_t kMaxSessions = 16384;  // sessions per storage node (EAGAIN beyond)

enum Opcode : uint16_t {
  kHello = 0x200,  // HelloRequest -> HelloReply
  kGoodbye,        // SessionRequest -> (empty): closes every handle of the session
  kHeartbeat,      // SessionRequest -> (empty): keeps the lease
  kStat,           // PathRequest(path) -> Attr (lstat: a symlink is not followed)
  kOpen,           // PathRequest(path, flags, mode) -> OpenReply
  kClose,          // HandleRequest -> (empty)
  kRead,           // HandleRequest(offset, length) -> bytes (fewer at end of file)
  kWrite,          // HandleRequest(offset, length) + length bytes -> WriteReply
  kTruncate,       // PathRequest(path, arg = size) -> (empty)
  kFtruncate,      // HandleRequest(offset = size) -> (empty)
  kFsync,          // HandleRequest(flags = 1: data only) -> (empty); on the storage disk
  kReaddir,        // PathRequest(path, arg = cookie) -> DirEntry records
  kMkdir,          // PathRequest(path, mode) -> (empty)
  kRmdir,          // PathRequest(path) -> (empty)
  kUnlink,         // PathRequest(path) -> (empty)
  kRename,         // PathRequest(path -> path2, flags = renameat2 flags) -> (empty); atomic
  kSymlink,        // PathRequest(path = new link, path2 = its target text) -> (empty)
  kReadlink,       // PathRequest(path) -> the target's bytes
  kSetattr,        // SetattrRequest + path -> Attr
  kStatfs,         // SessionRequest -> StatfsReply
  kStatus,         // (empty) -> UTF-8 text: the node's state and counters
  kLink,           // PathRequest(path = existing, path2 = new name) -> (empty)
  kFstat,          // HandleRequest -> Attr (also for a file unlinked while open)
};

struct SessionHandle {
  uint64_t id;
  uint8_t secret[16];
};
static_assert(sizeof(SessionHandle) == 24);

struct HelloRequest {
  uint32_t version;  // kProtoVersion
  uint32_t pid;      // the client process, for status output
  char name[56];     // its name, NUL-padded, for status output
};
static_assert(sizeof(HelloRequest) == 64);

struct HelloReply {
  uint32_t version;
  uint32_t max_io;  // largest read/write payload the node accepts
  SessionHandle session;
  uint32_t lease_ms;  // send something at least this often
  uint32_t reserved;
};
static_assert(sizeof(HelloReply) == 40);

struct SessionRequest {
  SessionHandle session;
};
static_assert(sizeof(SessionRequest) == 24);

// Followed by path_len bytes of path, then path2_len bytes of path2 (0 unless the
// opcode says). The request is exactly that long.
struct PathRequest {
  SessionHandle session;
  uint32_t path_len;
  uint32_t path2_len;
  uint32_t flags;  // kOpen: O_* flags (the storage node adds O_NOCTTY|O_CLOEXEC); kRename
  uint32_t mode;   // kOpen (with O_CREAT), kMkdir: permission bits
  uint64_t arg;    // kTruncate: size; kReaddir: cookie (0 = from the start)
};
static_assert(sizeof(PathRequest) == 48);

// Followed by `length` bytes for kWrite, nothing otherwise.
struct HandleRequest {
  SessionHandle session;
  uint64_t handle;
  uint64_t offset;  // kRead/kWrite: file offset (64-bit); kFtruncate: the new size
  uint32_t length;  // kRead/kWrite: bytes, at most max_io
  uint32_t flags;   // kFsync: 1 = fdatasync
};
static_assert(sizeof(HandleRequest) == 48);

// A file's attributes, from fstatat.
struct Attr {
  uint64_t ino;
  uint64_t size;
  uint64_t blocks;  // 512-byte blocks allocated
  uint32_t mode;    // type and permission bits (S_IFREG | 0644, ...)
  uint32_t nlink;
  uint32_t uid;
  uint32_t gid;
  uint64_t rdev;
  int64_t atime_ns;  // nanoseconds since the epoch
  int64_t mtime_ns;
  int64_t ctime_ns;
  uint32_t blksize;
  uint32_t reserved;
};
static_assert(sizeof(Attr) == 80);

struct OpenReply {
  uint64_t handle;
  Attr attr;
};
static_assert(sizeof(OpenReply) == 88);

struct WriteReply {
  uint32_t written;
  uint32_t reserved;
};
static_assert(sizeof(WriteReply) == 8);

// kReaddir's reply: records, each a DirEntry followed by name_len bytes of name, padded
// with zeros to a multiple of 8. An empty reply means the end of the directory. `next`
// is the cookie that continues after this entry.
struct DirEntry {
  uint64_t ino;
  uint64_t next;
  uint32_t type;  // DT_* value
  uint32_t name_len;
};
static_assert(sizeof(DirEntry) == 24);

enum SetattrMask : uint32_t {
  kSetMode = 1,
  kSetUid = 2,
  kSetGid = 4,
  kSetSize = 8,
  kSetAtime = 16,
  kSetMtime = 32,
  kSetAtimeNow = 64,
  kSetMtimeNow = 128,
};

// Followed by path_len bytes of path. Applies the fields named by `mask`.
struct SetattrRequest {
  SessionHandle session;
  uint32_t path_len;
  uint32_t mask;
  uint32_t mode;
  uint32_t uid;
  uint32_t gid;
  uint32_t reserved;
  uint64_t size;
  int64_t atime_ns;
  int64_t mtime_ns;
};
static_assert(sizeof(SetattrRequest) == 72);

struct StatfsReply {
  uint64_t block_size;
  uint64_t blocks;
  uint64_t blocks_free;
  uint64_t blocks_avail;
  uint64_t files;
  uint64_t files_free;
  uint64_t name_max;
  uint64_t reserved;
};
static_assert(sizeof(StatfsReply) == 64);

}  // namespace lego::stor
