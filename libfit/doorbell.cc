// A doorbell for shm servers (doorbell.h).
#include "libfit/doorbell.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <ctime>

namespace lego::fit::transport {
namespace {

constexpr size_t kBytes = 4096;

// Shared between processes: not FUTEX_PRIVATE_FLAG.
long futex(std::atomic<uint32_t>* word, int op, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, timeout, nullptr, 0);
}

void* map_bell(int fd) {
  void* p = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  return p == MAP_FAILED ? nullptr : p;
}

}  // namespace

std::string Doorbell::path_for(const std::string& address, uint16_t port) {
  // The address may hold any character: keep a readable prefix and tell addresses apart
  // by their FNV-1a hash.
  std::string readable;
  for (char c : address) {
    if (readable.size() == 48) break;
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                       c == '-' || c == '_' || c == '.';
    readable += plain ? c : '_';
  }
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : address) h = (h ^ c) * 0x100000001b3ull;
  char hash[20];
  snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(h));
  return "/dev/shm/lego-fit-bell-" + readable + "-" + std::to_string(port) + "-" + hash;
}

Doorbell::Doorbell(Word* word, std::string path, bool owner)
    : word_(word), path_(std::move(path)), owner_(owner) {}

Doorbell::~Doorbell() {
  munmap(word_, kBytes);
  if (owner_) unlink(path_.c_str());
}

Result<std::unique_ptr<Doorbell>> Doorbell::create(const std::string& address, uint16_t port) {
  std::string path = path_for(address, port);
  // A bell left by a server that died: its clients hold the old inode, ours is new (they
  // reopen it when they reconnect).
  unlink(path.c_str());
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return Status::from_errno(errno, "creating the shm doorbell " + path);
  void* p = nullptr;
  if (ftruncate(fd, kBytes) == 0) p = map_bell(fd);
  const int err = errno;
  close(fd);
  if (p == nullptr) {
    unlink(path.c_str());
    return Status::from_errno(err, "mapping the shm doorbell " + path);
  }
  return std::unique_ptr<Doorbell>(new Doorbell(static_cast<Word*>(p), std::move(path), true));
}

std::unique_ptr<Doorbell> Doorbell::open(const std::string& address, uint16_t port) {
  std::string path = path_for(address, port);
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return nullptr;
  // A file that is not a server's bell (too short: mapping it would fault) is not used.
  struct stat st {};
  void* p = nullptr;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size >= static_cast<off_t>(kBytes)) {
    p = map_bell(fd);
  }
  close(fd);
  if (p == nullptr) return nullptr;
  return std::unique_ptr<Doorbell>(new Doorbell(static_cast<Word*>(p), std::move(path), false));
}

void Doorbell::ring() {
  // The send's stores into the server's queue before our look at `sleeping`.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (word_->sleeping.load(std::memory_order_relaxed) == 0) return;
  word_->seq.fetch_add(1, std::memory_order_release);
  futex(&word_->seq, FUTEX_WAKE, 1, nullptr);
}

void Doorbell::arm() {
  armed_seq_ = word_->seq.load(std::memory_order_acquire);
  word_->sleeping.store(1, std::memory_order_relaxed);
  // `sleeping` before the caller's last look at its queue.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  armed_ = true;
}

void Doorbell::wait(int timeout_ms) {
  const timespec timeout{timeout_ms / 1000, (timeout_ms % 1000) * 1'000'000L};
  // Returns at once when a ring came since arm() (seq moved on).
  futex(&word_->seq, FUTEX_WAIT, armed_seq_, &timeout);
  disarm();
}

void Doorbell::disarm() {
  word_->sleeping.store(0, std::memory_order_relaxed);
  armed_ = false;
}

}  // namespace lego::fit::transport
