// lego-run --syscalls: per-system-call counts, errors and time for PROGRAM and its
// descendants, printed when the run ends, like `strace -c` (LegoOS's strace counts).
//
// How: ptrace, from a thread of lego-run's own. PROGRAM stops itself just before exec;
// the tracer thread seizes it (PTRACE_SEIZE with TRACESYSGOOD and the fork, vfork, clone
// and exec events, so every descendant and thread is traced from its first instruction)
// and resumes it with PTRACE_SYSCALL: each system call stops the calling thread at entry
// and at exit, and PTRACE_GET_SYSCALL_INFO says which call, its result and whether it
// failed. Chosen over the alternatives:
//   - an LD_PRELOAD wrapper misses every system call not made through libc's wrapper (Go
//     programs, raw syscall(2), libc's internal calls) and static programs;
//   - perf's raw_syscalls tracepoints need perf_event_paranoid <= 1 or CAP_PERFMON, and
//     counting per call number needs a sampled ring buffer per thread;
//   - seccomp's RET_TRACE only avoids stops for calls one does not count; counting all
//     of them makes it ptrace with one more moving part.
// Cost: nothing when --syscalls is off (no thread, no ptrace). On: two ptrace stops per
// system call (each a round trip to the tracer thread: measured in README "Syscall
// counts"), in PROGRAM and in lego's runtime threads inside it alike (the fault handler
// thread's ioctl and send/recv calls are counted: they are PROGRAM's process's calls).
//
// Time is wall-clock time from the entry stop to the exit stop, as seen by the tracer
// (strace -c -w): it includes the stops themselves, so it is an upper bound, and a call
// that blocks (read on a pipe, futex) counts the time it blocked. Calls are counted at
// entry (exit_group and a successful execve have no exit stop), errors (a result in
// -4095..-1) and time at exit. Limits: job-control stops (SIGTSTP, SIGSTOP) of traced
// processes are not honoured while traced; a set-user-ID PROGRAM runs without its
// privileges (the kernel's rule for traced execs); a process that another tracer holds
// is not traced.
//
// Thread-safety: start() from the main thread; the rest from any thread.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace lego::launch {

class SyscallTracer {
 public:
  // Seizes `program`, which has stopped itself (SIGSTOP) before exec, and resumes it
  // under tracing, on a thread of its own. An error message when it cannot attach (the
  // program is then killed by the caller).
  static std::unique_ptr<SyscallTracer> start(pid_t program, std::string* error);
  ~SyscallTracer();

  // True, with PROGRAM's wait status, once PROGRAM (the first tracee) has ended. The
  // tracer reaps it: lego-run must not wait for it itself.
  bool program_ended(int* status) const;
  // The strace -c table, sorted by time, of everything traced so far: "% time, seconds,
  // usecs/call, calls, errors, syscall", and a total line.
  void print(FILE* out) const;

 private:
  SyscallTracer() = default;
  void run();

  struct Count {
    uint64_t calls = 0, errors = 0, ns = 0;
  };
  pid_t program_ = 0;
  std::thread thread_;
  mutable std::mutex mu_;
  std::map<long, Count> counts_;  // by system call number; guarded by mu_
  std::atomic<bool> program_done_{false};
  std::atomic<int> program_status_{0};
  int stop_fd_ = -1;
};

}  // namespace lego::launch
