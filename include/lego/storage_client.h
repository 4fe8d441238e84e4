// The storage node's client: a processor node's view of the files of a lego-stord export
// (storage_proto.h), as calls that mirror the POSIX file API. lego-fs mounts a FUSE file
// system on top of it; tests and tools may use it directly.
//
// A StorageClient holds one session on the storage node and heartbeats it from a thread
// of its own (every lease/4) so its open files stay open. If the storage node forgets
// the session (it restarted, or nothing was heard for the lease), the client opens a new
// one on the next call: path operations then succeed again, while handles of the old
// session fail with EIO (their files were closed on the storage node).
//
// Errors: every call returns a Status/Result whose code is the errno a program should
// see: the storage node's own (ENOENT, EACCES, ENOSPC, EEXIST, ENOTEMPTY, ...; EACCES
// also for a path that would leave the export), or EIO when the storage node cannot be
// reached, died mid-call or did not answer within the cluster's timeout. Calls never
// wait longer than that timeout. A request whose connection broke (a storage node that
// restarted) is sent again within it, up to lego/retry.h's kAttempts tries: a request
// that ran before its answer was lost runs again (writes at an offset and reads come out
// the same; a mkdir then answers EEXIST). Messages name the node and the path.
//
// Thread-safety: all methods may be called from any number of threads at once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "lego/fit.h"
#include "lego/status.h"
#include "lego/storage_proto.h"

namespace lego::stor {

struct ClientOptions {
  std::string name = "lego-fs";  // shown in the storage node's status
  bool heartbeat = true;         // keep the session alive from a background thread
};

// Which fields StorageClient::setattr changes (SetattrMask bits in `mask`).
struct SetAttr {
  uint32_t mask = 0;
  uint32_t mode = 0, uid = 0, gid = 0;
  uint64_t size = 0;
  int64_t atime_ns = 0, mtime_ns = 0;
};

struct DirItem {
  std::string name;
  uint64_t ino = 0;
  uint32_t type = 0;  // DT_*
  uint64_t next = 0;  // cookie that continues after this entry
};

class StorageClient {
 public:
  // Opens a session on storage node `storage`, calling through `node` (which must
  // outlive the client). Errors as above; EPROTONOSUPPORT for a protocol mismatch.
  static Result<std::unique_ptr<StorageClient>> connect(fit::Node& node, fit::NodeId storage,
                                                        ClientOptions options = {});
  // Closes the session (and so every file still open) on the storage node.
  ~StorageClient();

  StorageClient(const StorageClient&) = delete;
  StorageClient& operator=(const StorageClient&) = delete;

  // lstat(2) of `path` (relative to the export; "" is its root).
  Result<Attr> stat(const std::string& path);
  // open(2): returns a handle for read/write/close and the file's attributes.
  Result<OpenReply> open(const std::string& path, int flags, uint32_t mode = 0644);
  Status close(uint64_t handle);
  // fstat(2) of an open file (works after the file was unlinked).
  Result<Attr> fstat(uint64_t handle);
  // pread(2)/pwrite(2) at 64-bit offsets; any size (split into max_io() requests). read
  // returns fewer bytes only at end of file.
  Result<size_t> read(uint64_t handle, uint64_t offset, std::span<std::byte> dst);
  Result<size_t> write(uint64_t handle, uint64_t offset, std::span<const std::byte> src);
  Status fsync(uint64_t handle, bool data_only = false);
  Status ftruncate(uint64_t handle, uint64_t size);
  Status truncate(const std::string& path, uint64_t size);
  // One page of entries of directory `path` from `cookie` (0: the start), without "."
  // and "..". An empty page is the end.
  Result<std::vector<DirItem>> readdir_page(const std::string& path, uint64_t cookie);
  // The whole directory.
  Result<std::vector<DirItem>> readdir(const std::string& path);
  Status mkdir(const std::string& path, uint32_t mode = 0755);
  Status rmdir(const std::string& path);
  Status unlink(const std::string& path);
  // rename(2)/renameat2(2) flags (RENAME_NOREPLACE, RENAME_EXCHANGE); atomic.
  Status rename(const std::string& from, const std::string& to, uint32_t flags = 0);
  Status link(const std::string& existing, const std::string& new_path);
  // Creates `link_path` holding the text `target`.
  Status symlink(const std::string& target, const std::string& link_path);
  Result<std::string> readlink(const std::string& path);
  Result<Attr> setattr(const std::string& path, const SetAttr& attr);
  Result<StatfsReply> statfs();
  // The storage node's status text (kStatus).
  Result<std::string> status();

  uint32_t max_io() const;
  fit::NodeId storage_node() const;

  // Sends a raw request under this client's session (tests of malformed messages).
  // The first sizeof(SessionHandle) bytes of `request` are overwritten with the session.
  Result<size_t> call_raw(uint16_t opcode, std::vector<std::byte> request,
                          std::span<std::byte> reply);

 private:
  struct Impl;
  explicit StorageClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lego::stor
