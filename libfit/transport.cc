// The one place a provider is chosen, and the polling helpers every provider uses.
#include "libfit/transport.h"

#include <sched.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>

namespace lego::fit::transport {

// Each provider's factory, in its own file.
std::unique_ptr<Transport> make_tcp(const Context& ctx);      // tcp.cc
std::unique_ptr<Transport> make_ofi_msg(const Context& ctx);  // ofi_msg.cc
std::unique_ptr<Transport> make_ofi_rdm(const Context& ctx);  // ofi_rdm.cc

std::unique_ptr<Transport> make_transport(const Context& ctx) {
  switch (ctx.self->provider) {
    case Provider::kTcp:
      return make_tcp(ctx);
    case Provider::kOfiTcp:
    case Provider::kVerbs:
      return make_ofi_msg(ctx);
    case Provider::kShm:
      return make_ofi_rdm(ctx);
  }
  return make_tcp(ctx);  // unreachable: config.cc accepts only the providers above
}

uint64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

bool IdlePoll::should_sleep(uint64_t budget_ns) {
  ++empty;
  if ((empty & 15) == 0) sched_yield();
  if ((empty & 63) != 0) return false;
  const uint64_t now = monotonic_ns();
  if (idle_since_ns == 0) {
    idle_since_ns = now;
    return false;
  }
  return now - idle_since_ns > budget_ns;
}

// How long a sleeping poller naps on a queue without a wait object (shm).
constexpr useconds_t kNapUs = 200;

void nap_if_needed(bool blocking, bool waitable, IdlePoll& idle, uint64_t budget_ns) {
  if (blocking && !waitable) {
    usleep(50);
  } else if (!blocking && idle.should_sleep(budget_ns)) {
    usleep(kNapUs);
  }
}

bool pid_gone(pid_t pid) {
  return pid > 0 && kill(pid, 0) != 0 && errno == ESRCH;
}

}  // namespace lego::fit::transport
