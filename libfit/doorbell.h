// A doorbell: a futex word in /dev/shm that shm clients ring after posting a request, so
// that a server thread with nothing to do sleeps in the kernel instead of napping.
//
// libfabric 1.17's shm provider has no wait object that another process can signal (its
// "wait" spins in sched_yield), so an shm server had two ways to idle: spin (a vCPU per
// memory node: with three nodes and a processor on two vCPUs they fought each other), or
// nap between polls (50 µs in blocking mode, 200 µs in polling mode once idle for 2 ms:
// every first request after a pause waited out the nap). With the doorbell the server
// sleeps until a client rings or kBlockingSliceMs passes, and a ring costs a client a
// futex wake only while the server sleeps.
//
// The protocol (Dekker's, both sides store, fence, then load):
//   server  arm():  snapshot seq; sleeping = 1; fence   -> then polls its queue once more
//           wait(): futex_wait(seq, snapshot, timeout)  -> only if that poll found nothing
//           disarm(): sleeping = 0
//   client  ring(): fence (after the send is in the server's queue); if sleeping:
//           seq++ and futex_wake
// A client's send lands either before the server's last poll (which then finds it) or
// after the server set sleeping (and the client sees it and rings). The file is the
// server's (mode 0600: shm itself only connects processes of one user); it is named after
// the server's shm address and port, which name its endpoint too, so clients find it
// without a wire change. A client that cannot open it (none: an older server) rings nothing; the
// server's sleep is bounded by its timeout anyway.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "lego/status.h"

namespace lego::fit::transport {

class Doorbell {
 public:
  ~Doorbell();
  Doorbell(const Doorbell&) = delete;
  Doorbell& operator=(const Doorbell&) = delete;

  // The server's bell for shm address `address` and `port` (nodes of one host may share
  // an address): created (a stale one of a server that died is replaced) and removed from
  // /dev/shm when destroyed.
  static Result<std::unique_ptr<Doorbell>> create(const std::string& address, uint16_t port);
  // A client's handle on the bell of the server there; null when there is none.
  static std::unique_ptr<Doorbell> open(const std::string& address, uint16_t port);
  // The /dev/shm path of that server's bell.
  static std::string path_for(const std::string& address, uint16_t port);

  // Client: call after each send is posted.
  void ring();

  // Server: about to sleep. Poll the queue once more after this; if it is still empty
  // call wait(), else disarm().
  void arm();
  // Sleeps until a ring (since arm()) or `timeout_ms`; disarms.
  void wait(int timeout_ms);
  void disarm();
  bool armed() const { return armed_; }

 private:
  struct Word {
    std::atomic<uint32_t> seq;       // the futex: bumped by every ring that wakes
    std::atomic<uint32_t> sleeping;  // 1 from arm() to disarm()
  };
  Doorbell(Word* word, std::string path, bool owner);

  Word* word_;
  std::string path_;  // removed at destruction when owner_
  bool owner_;
  bool armed_ = false;
  uint32_t armed_seq_ = 0;
};

}  // namespace lego::fit::transport
