// lego-fs: FUSE operations mapped onto StorageClient calls (see lego_fs.h).
//
// Open files are storage handles kept in fuse_file_info::fh: read/write/getattr/truncate
// of a file unlinked while open come with no path, and the handle serves them. (Not
// nullpath_ok: with it libfuse drops the path of every fchmod/futimens too.)
#define FUSE_USE_VERSION 35
#include "runtime/fs/lego_fs.h"

#include <fcntl.h>
#include <fuse.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "lego/daemon.h"

namespace lego::fs {
namespace {

// Readahead of the mount, in KiB. The kernel gives a FUSE mount 128 KiB, and a READ
// request is never larger than the readahead window, so a 1 MiB read() became eight
// 128 KiB requests, each a storage round trip with nothing else in flight. 1 MiB is one
// FUSE request of max_pages (libfuse's max_write), which the client splits into max_io
// chunks sent together (dd of 512 MiB here: ~160-640 MB/s at 128 KiB, ~390-990 MB/s at
// 1 MiB). Larger windows were not better, and at 4 MiB (kernel 6.18) reads collapsed to
// ~20 MB/s in 4 KiB synchronous reads.
// INIT cannot raise it (the kernel keeps the smaller of its offer and the reply, and
// sets it when it processes the reply), so it is set afterwards through the mount's bdi
// in sysfs, which needs root.
constexpr int kReadaheadKiB = 1024;

// Once the mount serves requests: sets its readahead (see kReadaheadKiB), then writes
// "ready\n" to ready_fd (when >= 0). stat() of the mount point waits for FUSE's INIT
// and is answered by the loop, so it runs on a thread of its own beside fuse_loop_mt.
// The readahead is best effort: without it reads work, only slower.
void when_mounted(const std::string& mountpoint, int ready_fd) {
  struct stat st;
  if (stat(mountpoint.c_str(), &st) == 0) {
    std::string knob = "/sys/class/bdi/" + std::to_string(major(st.st_dev)) + ":" +
                       std::to_string(minor(st.st_dev)) + "/read_ahead_kb";
    int fd = open(knob.c_str(), O_WRONLY | O_CLOEXEC);
    std::string value = std::to_string(kReadaheadKiB);
    if (fd < 0 || write(fd, value.data(), value.size()) != static_cast<ssize_t>(value.size())) {
      fprintf(stderr, "lego-fs: cannot set %s (%s): sequential reads will be slower\n",
              knob.c_str(), strerror(errno));
    }
    if (fd >= 0) close(fd);
  }
  daemon::signal_ready(ready_fd);
}

stor::StorageClient& client() {
  return *static_cast<stor::StorageClient*>(fuse_get_context()->private_data);
}

int err(const Status& s) {
  return s.is_ok() ? 0 : -(s.code() > 0 ? s.code() : EIO);
}
template <typename T>
int err(const Result<T>& r) {
  return err(r.status());
}

void fill_stat(const stor::Attr& a, struct stat* st) {
  memset(st, 0, sizeof(*st));
  st->st_ino = a.ino;
  st->st_size = static_cast<off_t>(a.size);
  st->st_blocks = static_cast<blkcnt_t>(a.blocks);
  st->st_mode = a.mode;
  st->st_nlink = a.nlink;
  st->st_uid = a.uid;
  st->st_gid = a.gid;
  st->st_rdev = a.rdev;
  st->st_blksize = a.blksize;
  st->st_atim.tv_sec = a.atime_ns / 1000000000LL;
  st->st_atim.tv_nsec = a.atime_ns % 1000000000LL;
  st->st_mtim.tv_sec = a.mtime_ns / 1000000000LL;
  st->st_mtim.tv_nsec = a.mtime_ns % 1000000000LL;
  st->st_ctim.tv_sec = a.ctime_ns / 1000000000LL;
  st->st_ctim.tv_nsec = a.ctime_ns % 1000000000LL;
}

std::string p(const char* path) {
  return path ? path : "";
}

void* op_init(fuse_conn_info* conn, fuse_config* cfg) {
  cfg->use_ino = 1;
  cfg->hard_remove = 1;  // unlink for real: the storage node keeps open files alive
  cfg->entry_timeout = 1.0;
  cfg->attr_timeout = 1.0;
  cfg->negative_timeout = 0;
  (void)conn;
  return fuse_get_context()->private_data;
}

int op_getattr(const char* path, struct stat* st, fuse_file_info* fi) {
  auto a = fi ? client().fstat(fi->fh) : client().stat(p(path));
  if (!a) return err(a);
  fill_stat(a.value(), st);
  return 0;
}

int op_readlink(const char* path, char* buf, size_t size) {
  auto r = client().readlink(p(path));
  if (!r) return err(r);
  if (size == 0) return -EINVAL;
  size_t n = std::min(size - 1, r->size());
  memcpy(buf, r->data(), n);
  buf[n] = '\0';
  return 0;
}

int op_mkdir(const char* path, mode_t mode) {
  return err(client().mkdir(p(path), mode & 07777));
}
int op_unlink(const char* path) {
  return err(client().unlink(p(path)));
}
int op_rmdir(const char* path) {
  return err(client().rmdir(p(path)));
}
int op_symlink(const char* target, const char* link) {
  return err(client().symlink(target, p(link)));
}
int op_rename(const char* from, const char* to, unsigned int flags) {
  return err(client().rename(p(from), p(to), flags));
}
int op_link(const char* from, const char* to) {
  return err(client().link(p(from), p(to)));
}

int setattr(const char* path, fuse_file_info* fi, const stor::SetAttr& sa) {
  if (path == nullptr) {
    // An unlinked open file: only its size can be changed, through its handle.
    if (fi != nullptr && sa.mask == stor::kSetSize) return err(client().ftruncate(fi->fh, sa.size));
    return -ENOENT;
  }
  if (fi != nullptr && sa.mask == stor::kSetSize) return err(client().ftruncate(fi->fh, sa.size));
  return err(client().setattr(p(path), sa));
}

int op_chmod(const char* path, mode_t mode, fuse_file_info* fi) {
  stor::SetAttr sa;
  sa.mask = stor::kSetMode;
  sa.mode = mode & 07777;
  return setattr(path, fi, sa);
}

int op_chown(const char* path, uid_t uid, gid_t gid, fuse_file_info* fi) {
  stor::SetAttr sa;
  if (uid != static_cast<uid_t>(-1)) {
    sa.mask |= stor::kSetUid;
    sa.uid = uid;
  }
  if (gid != static_cast<gid_t>(-1)) {
    sa.mask |= stor::kSetGid;
    sa.gid = gid;
  }
  if (sa.mask == 0) return 0;
  return setattr(path, fi, sa);
}

int op_truncate(const char* path, off_t size, fuse_file_info* fi) {
  if (size < 0) return -EINVAL;
  stor::SetAttr sa;
  sa.mask = stor::kSetSize;
  sa.size = static_cast<uint64_t>(size);
  return setattr(path, fi, sa);
}

int op_utimens(const char* path, const timespec tv[2], fuse_file_info* fi) {
  stor::SetAttr sa;
  const uint32_t set[2] = {stor::kSetAtime, stor::kSetMtime};
  const uint32_t now[2] = {stor::kSetAtimeNow, stor::kSetMtimeNow};
  int64_t* ns[2] = {&sa.atime_ns, &sa.mtime_ns};
  for (int i = 0; i < 2; i++) {
    if (tv == nullptr || tv[i].tv_nsec == UTIME_NOW) {
      sa.mask |= now[i];
    } else if (tv[i].tv_nsec != UTIME_OMIT) {
      sa.mask |= set[i];
      *ns[i] = tv[i].tv_sec * 1000000000LL + tv[i].tv_nsec;
    }
  }
  if (sa.mask == 0) return 0;
  return setattr(path, fi, sa);
}

int op_open(const char* path, fuse_file_info* fi) {
  auto r = client().open(p(path), fi->flags & ~(O_CREAT | O_EXCL));
  if (!r) return err(r);
  fi->fh = r->handle;
  return 0;
}

int op_create(const char* path, mode_t mode, fuse_file_info* fi) {
  auto r = client().open(p(path), fi->flags | O_CREAT, mode & 07777);
  if (!r) return err(r);
  fi->fh = r->handle;
  return 0;
}

int op_read(const char*, char* buf, size_t size, off_t off, fuse_file_info* fi) {
  if (off < 0) return -EINVAL;
  auto r =
      client().read(fi->fh, static_cast<uint64_t>(off), {reinterpret_cast<std::byte*>(buf), size});
  if (!r) return err(r);
  return static_cast<int>(r.value());
}

int op_write(const char*, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
  if (off < 0) return -EINVAL;
  auto r = client().write(fi->fh, static_cast<uint64_t>(off),
                          {reinterpret_cast<const std::byte*>(buf), size});
  if (!r) return err(r);
  return static_cast<int>(r.value());
}

int op_statfs(const char*, struct statvfs* st) {
  auto r = client().statfs();
  if (!r) return err(r);
  memset(st, 0, sizeof(*st));
  st->f_bsize = st->f_frsize = r->block_size;
  st->f_blocks = r->blocks;
  st->f_bfree = r->blocks_free;
  st->f_bavail = r->blocks_avail;
  st->f_files = r->files;
  st->f_ffree = st->f_favail = r->files_free;
  st->f_namemax = r->name_max;
  return 0;
}

int op_flush(const char*, fuse_file_info*) {
  return 0;  // writes are sent as they happen; durability is fsync's job
}

int op_release(const char*, fuse_file_info* fi) {
  return err(client().close(fi->fh));
}

int op_fsync(const char*, int datasync, fuse_file_info* fi) {
  return err(client().fsync(fi->fh, datasync != 0));
}

// A directory's handle is its path (nullpath_ok hides it from readdir); listing is
// stateless on the storage node: each page is asked for by cookie.
int op_opendir(const char* path, fuse_file_info* fi) {
  auto a = client().stat(p(path));
  if (!a) return err(a);
  if (!S_ISDIR(a->mode)) return -ENOTDIR;
  fi->fh = reinterpret_cast<uint64_t>(new std::string(p(path)));
  return 0;
}

// fsync(2) of a directory: makes creates, renames and unlinks in it durable on the storage
// node (the "write tmp, fsync, rename, fsync dir" idiom). Without this operation FUSE
// answers every later directory fsync with success and does nothing.
int op_fsyncdir(const char*, int datasync, fuse_file_info* fi) {
  const std::string& path = *reinterpret_cast<std::string*>(fi->fh);
  auto dir = client().open(path, O_RDONLY | O_DIRECTORY);
  if (!dir) return err(dir);
  Status synced = client().fsync(dir->handle, datasync != 0);
  Status closed = client().close(dir->handle);
  return err(!synced ? synced : closed);
}

int op_releasedir(const char*, fuse_file_info* fi) {
  delete reinterpret_cast<std::string*>(fi->fh);
  return 0;
}

int op_readdir(const char*, void* buf, fuse_fill_dir_t filler, off_t off, fuse_file_info* fi,
               fuse_readdir_flags) {
  const std::string& path = *reinterpret_cast<std::string*>(fi->fh);
  uint64_t cookie = static_cast<uint64_t>(off);
  for (;;) {
    auto page = client().readdir_page(path, cookie);
    if (!page) return err(page);
    if (page->empty()) return 0;
    for (auto& it : page.value()) {
      struct stat st {};
      st.st_ino = it.ino;
      st.st_mode = static_cast<mode_t>(it.type) << 12;  // DT_* is S_IFMT >> 12
      if (filler(buf, it.name.c_str(), &st, static_cast<off_t>(it.next),
                 static_cast<fuse_fill_dir_flags>(0)) != 0) {
        return 0;  // FUSE's buffer is full; it comes back with this offset
      }
      cookie = it.next;
    }
  }
}

fuse_operations make_ops() {
  fuse_operations ops{};
  ops.init = op_init;
  ops.getattr = op_getattr;
  ops.readlink = op_readlink;
  ops.mkdir = op_mkdir;
  ops.unlink = op_unlink;
  ops.rmdir = op_rmdir;
  ops.symlink = op_symlink;
  ops.rename = op_rename;
  ops.link = op_link;
  ops.chmod = op_chmod;
  ops.chown = op_chown;
  ops.truncate = op_truncate;
  ops.utimens = op_utimens;
  ops.open = op_open;
  ops.create = op_create;
  ops.read = op_read;
  ops.write = op_write;
  ops.statfs = op_statfs;
  ops.flush = op_flush;
  ops.release = op_release;
  ops.fsync = op_fsync;
  ops.opendir = op_opendir;
  ops.releasedir = op_releasedir;
  ops.fsyncdir = op_fsyncdir;
  ops.readdir = op_readdir;
  return ops;
}

}  // namespace

Status serve(stor::StorageClient& client, const MountOptions& options) {
  static const fuse_operations ops = make_ops();
  std::vector<std::string> args = {"lego-fs", "-o", "fsname=lego,subtype=lego"};
  if (options.allow_other) {
    args.push_back("-o");
    args.push_back("allow_other,default_permissions");
  }
  if (options.debug) args.push_back("-d");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  fuse_args fargs = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  fuse* f = fuse_new(&fargs, &ops, sizeof(ops), &client);
  if (f == nullptr) return Status(EIO, "lego-fs: fuse_new failed");
  if (fuse_mount(f, options.mountpoint.c_str()) != 0) {
    fuse_destroy(f);
    return Status(EIO, "lego-fs: cannot mount at " + options.mountpoint +
                           " (is it an existing directory, and /dev/fuse usable?)");
  }
  fuse_session* se = fuse_get_session(f);
  if (fuse_set_signal_handlers(se) != 0) {
    fuse_unmount(f);
    fuse_destroy(f);
    return Status(EIO, "lego-fs: cannot install signal handlers");
  }
  std::thread mounted(when_mounted, options.mountpoint, options.ready_fd);
  fuse_loop_config cfg{};
  cfg.clone_fd = 0;
  cfg.max_idle_threads = 8;
  int rc = fuse_loop_mt(f, &cfg);
  fuse_remove_signal_handlers(se);
  fuse_unmount(f);
  mounted.join();  // its stat() has returned: the loop served it, or the mount is gone
  fuse_destroy(f);
  if (rc != 0 && rc != SIGTERM && rc != SIGINT && rc != SIGHUP) {
    return Status(EIO, "lego-fs: the FUSE loop failed (" + std::to_string(rc) + ")");
  }
  return Status();
}

}  // namespace lego::fs
