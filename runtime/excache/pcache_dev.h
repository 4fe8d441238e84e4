// runtime/excache/pcache_dev.h: the ExCache's client of lego_pcache.ko (/dev/lego_pcache, kmod/).
// The ABI is include/lego/pcache_abi.h; this wraps its ioctls. Every call is one
// ioctl on preallocated memory: async-signal-safe, so the evictor may run it inside the
// SIGBUS handler.
#pragma once

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <string>

#include "lego/pcache_abi.h"
#include "lego/status.h"

namespace lego::excache_internal {

class PcacheDevice {
 public:
  // Opens the device and checks its ABI: ENOENT when the module is not loaded, EPROTO when
  // its major version differs, EOPNOTSUPP when it lacks AD or EVICT. *features: what it
  // offers (LEGO_PCACHE_FEAT_*; MKCLEAN from ABI 1.1 on).
  static Result<int> open_checked(uint32_t* max_lines, uint64_t* features) {
    int fd = ::open(LEGO_PCACHE_DEVICE, O_RDWR | O_CLOEXEC);
    if (fd < 0) return Status::from_errno(errno, "open " LEGO_PCACHE_DEVICE);
    lego_pcache_info info{};
    if (ioctl(fd, LEGO_PCACHE_IOC_INFO, &info) != 0) {
      Status st = Status::from_errno(errno, "LEGO_PCACHE_IOC_INFO on " LEGO_PCACHE_DEVICE);
      ::close(fd);
      return st;
    }
    const uint32_t major = info.abi_version >> 16;
    if (major != LEGO_PCACHE_ABI_MAJOR) {
      ::close(fd);
      return Status(EPROTO, "lego_pcache ABI " + std::to_string(major) + "." +
                                std::to_string(info.abi_version & 0xffff) +
                                ", this runtime speaks " + std::to_string(LEGO_PCACHE_ABI_MAJOR) +
                                ".x");
    }
    const uint64_t needed = LEGO_PCACHE_FEAT_AD | LEGO_PCACHE_FEAT_EVICT;
    if ((info.features & needed) != needed || info.line_size != LEGO_PCACHE_LINE_SIZE ||
        info.max_lines == 0) {
      ::close(fd);
      return Status(EOPNOTSUPP, "lego_pcache lacks AD/EVICT or has another line size");
    }
    *max_lines = info.max_lines;
    *features = info.features;
    return fd;
  }

  // LEGO_PCACHE_IOC_AD; returns 0 or errno.
  static int ad(int fd, const uint64_t* lines, uint32_t count, uint32_t flags, uint64_t* accessed,
                uint64_t* dirty) {
    lego_pcache_ad a{};
    a.lines = reinterpret_cast<uintptr_t>(lines);
    a.count = count;
    a.flags = flags;
    a.accessed = reinterpret_cast<uintptr_t>(accessed);
    a.dirty = reinterpret_cast<uintptr_t>(dirty);
    return call(fd, LEGO_PCACHE_IOC_AD, &a);
  }

  // LEGO_PCACHE_IOC_EVICT of strictly ascending `lines`; returns 0 or errno.
  static int evict(int fd, const uint64_t* lines, uint32_t count, uint32_t flags, uint64_t* evicted,
                   uint64_t* dirty) {
    lego_pcache_evict e{};
    e.lines = reinterpret_cast<uintptr_t>(lines);
    e.count = count;
    e.flags = flags;
    e.evicted = reinterpret_cast<uintptr_t>(evicted);
    e.dirty = reinterpret_cast<uintptr_t>(dirty);
    return call(fd, LEGO_PCACHE_IOC_EVICT, &e);
  }

  // LEGO_PCACHE_IOC_MKCLEAN; returns 0 or errno. `done` may be null.
  static int mkclean(int fd, const uint64_t* lines, uint32_t count, uint64_t* done) {
    lego_pcache_mkclean m{};
    m.lines = reinterpret_cast<uintptr_t>(lines);
    m.count = count;
    m.done = reinterpret_cast<uintptr_t>(done);
    return call(fd, LEGO_PCACHE_IOC_MKCLEAN, &m);
  }

  static bool bit(const uint64_t* bitmap, size_t i) { return (bitmap[i / 64] >> (i % 64)) & 1; }

 private:
  // ioctl(fd, request, arg), retried on EINTR; returns 0 or errno.
  static int call(int fd, unsigned long request, void* arg) {
    for (;;) {
      if (ioctl(fd, request, arg) == 0) return 0;
      if (errno != EINTR) return errno;
    }
  }
};

}  // namespace lego::excache_internal
