// lego-run --syscalls (runtime/launcher/syscalls.h): the ptrace loop and the table.
#include "runtime/launcher/syscalls.h"

#include <signal.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>
#include <vector>

namespace lego::launch {

namespace {

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

constexpr long kOptions = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK |
                          PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC;

// x86-64 system call names, by number: those programs commonly make (others print as
// "syscall_N").
const char* syscall_name(long nr) {
  // clang-format off
  switch (nr) {
#define LEGO_SYSCALL(name) case SYS_##name: return #name;
    LEGO_SYSCALL(read)
    LEGO_SYSCALL(write)
    LEGO_SYSCALL(open)
    LEGO_SYSCALL(close)
    LEGO_SYSCALL(stat)
    LEGO_SYSCALL(fstat)
    LEGO_SYSCALL(lstat)
    LEGO_SYSCALL(poll)
    LEGO_SYSCALL(lseek)
    LEGO_SYSCALL(mmap)
    LEGO_SYSCALL(mprotect)
    LEGO_SYSCALL(munmap)
    LEGO_SYSCALL(brk)
    LEGO_SYSCALL(rt_sigaction)
    LEGO_SYSCALL(rt_sigprocmask)
    LEGO_SYSCALL(rt_sigreturn)
    LEGO_SYSCALL(ioctl)
    LEGO_SYSCALL(pread64)
    LEGO_SYSCALL(pwrite64)
    LEGO_SYSCALL(readv)
    LEGO_SYSCALL(writev)
    LEGO_SYSCALL(access)
    LEGO_SYSCALL(pipe)
    LEGO_SYSCALL(select)
    LEGO_SYSCALL(sched_yield)
    LEGO_SYSCALL(mremap)
    LEGO_SYSCALL(msync)
    LEGO_SYSCALL(madvise)
    LEGO_SYSCALL(dup)
    LEGO_SYSCALL(dup2)
    LEGO_SYSCALL(pause)
    LEGO_SYSCALL(nanosleep)
    LEGO_SYSCALL(alarm)
    LEGO_SYSCALL(setitimer)
    LEGO_SYSCALL(getpid)
    LEGO_SYSCALL(sendfile)
    LEGO_SYSCALL(socket)
    LEGO_SYSCALL(connect)
    LEGO_SYSCALL(accept)
    LEGO_SYSCALL(sendto)
    LEGO_SYSCALL(recvfrom)
    LEGO_SYSCALL(sendmsg)
    LEGO_SYSCALL(recvmsg)
    LEGO_SYSCALL(shutdown)
    LEGO_SYSCALL(bind)
    LEGO_SYSCALL(listen)
    LEGO_SYSCALL(getsockname)
    LEGO_SYSCALL(getpeername)
    LEGO_SYSCALL(socketpair)
    LEGO_SYSCALL(setsockopt)
    LEGO_SYSCALL(getsockopt)
    LEGO_SYSCALL(clone)
    LEGO_SYSCALL(fork)
    LEGO_SYSCALL(vfork)
    LEGO_SYSCALL(execve)
    LEGO_SYSCALL(exit)
    LEGO_SYSCALL(wait4)
    LEGO_SYSCALL(kill)
    LEGO_SYSCALL(uname)
    LEGO_SYSCALL(fcntl)
    LEGO_SYSCALL(flock)
    LEGO_SYSCALL(fsync)
    LEGO_SYSCALL(fdatasync)
    LEGO_SYSCALL(truncate)
    LEGO_SYSCALL(ftruncate)
    LEGO_SYSCALL(getdents)
    LEGO_SYSCALL(getcwd)
    LEGO_SYSCALL(chdir)
    LEGO_SYSCALL(rename)
    LEGO_SYSCALL(mkdir)
    LEGO_SYSCALL(rmdir)
    LEGO_SYSCALL(link)
    LEGO_SYSCALL(unlink)
    LEGO_SYSCALL(symlink)
    LEGO_SYSCALL(readlink)
    LEGO_SYSCALL(chmod)
    LEGO_SYSCALL(fchmod)
    LEGO_SYSCALL(fchown)
    LEGO_SYSCALL(umask)
    LEGO_SYSCALL(gettimeofday)
    LEGO_SYSCALL(getrlimit)
    LEGO_SYSCALL(getrusage)
    LEGO_SYSCALL(sysinfo)
    LEGO_SYSCALL(getuid)
    LEGO_SYSCALL(getgid)
    LEGO_SYSCALL(geteuid)
    LEGO_SYSCALL(getegid)
    LEGO_SYSCALL(setpgid)
    LEGO_SYSCALL(getppid)
    LEGO_SYSCALL(getpgrp)
    LEGO_SYSCALL(setsid)
    LEGO_SYSCALL(sigaltstack)
    LEGO_SYSCALL(statfs)
    LEGO_SYSCALL(fstatfs)
    LEGO_SYSCALL(mlock)
    LEGO_SYSCALL(munlock)
    LEGO_SYSCALL(prctl)
    LEGO_SYSCALL(arch_prctl)
    LEGO_SYSCALL(gettid)
    LEGO_SYSCALL(futex)
    LEGO_SYSCALL(sched_setaffinity)
    LEGO_SYSCALL(sched_getaffinity)
    LEGO_SYSCALL(getdents64)
    LEGO_SYSCALL(set_tid_address)
    LEGO_SYSCALL(clock_gettime)
    LEGO_SYSCALL(clock_nanosleep)
    LEGO_SYSCALL(exit_group)
    LEGO_SYSCALL(epoll_wait)
    LEGO_SYSCALL(epoll_ctl)
    LEGO_SYSCALL(tgkill)
    LEGO_SYSCALL(waitid)
    LEGO_SYSCALL(inotify_add_watch)
    LEGO_SYSCALL(openat)
    LEGO_SYSCALL(mkdirat)
    LEGO_SYSCALL(newfstatat)
    LEGO_SYSCALL(unlinkat)
    LEGO_SYSCALL(renameat)
    LEGO_SYSCALL(readlinkat)
    LEGO_SYSCALL(faccessat)
    LEGO_SYSCALL(pselect6)
    LEGO_SYSCALL(ppoll)
    LEGO_SYSCALL(set_robust_list)
    LEGO_SYSCALL(splice)
    LEGO_SYSCALL(utimensat)
    LEGO_SYSCALL(epoll_pwait)
    LEGO_SYSCALL(timerfd_create)
    LEGO_SYSCALL(eventfd2)
    LEGO_SYSCALL(epoll_create1)
    LEGO_SYSCALL(dup3)
    LEGO_SYSCALL(pipe2)
    LEGO_SYSCALL(inotify_init1)
    LEGO_SYSCALL(signalfd4)
    LEGO_SYSCALL(recvmmsg)
    LEGO_SYSCALL(prlimit64)
    LEGO_SYSCALL(sendmmsg)
    LEGO_SYSCALL(process_vm_readv)
    LEGO_SYSCALL(getrandom)
    LEGO_SYSCALL(memfd_create)
    LEGO_SYSCALL(membarrier)
    LEGO_SYSCALL(copy_file_range)
    LEGO_SYSCALL(statx)
    LEGO_SYSCALL(rseq)
    LEGO_SYSCALL(pidfd_send_signal)
    LEGO_SYSCALL(io_uring_setup)
    LEGO_SYSCALL(io_uring_enter)
    LEGO_SYSCALL(pidfd_open)
    LEGO_SYSCALL(clone3)
    LEGO_SYSCALL(faccessat2)
    LEGO_SYSCALL(process_madvise)
    LEGO_SYSCALL(accept4)
    LEGO_SYSCALL(userfaultfd)
#undef LEGO_SYSCALL
    default: return nullptr;
  }
  // clang-format on
}

}  // namespace

std::unique_ptr<SyscallTracer> SyscallTracer::start(pid_t program, std::string* error) {
  std::unique_ptr<SyscallTracer> t(new SyscallTracer());
  t->program_ = program;
  // The thread that seizes is the tracer: everything ptrace happens on it.
  std::mutex m;
  std::string err;
  bool started = false;
  std::condition_variable cv;
  t->thread_ = std::thread([&, tp = t.get()] {
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, nullptr);  // lego-run's main thread takes its signals
    std::string e;
    if (ptrace(PTRACE_SEIZE, tp->program_, nullptr, reinterpret_cast<void*>(kOptions)) != 0) {
      e = std::string("--syscalls: cannot trace the program (ptrace: ") + strerror(errno) + ")";
    }
    {
      std::lock_guard<std::mutex> g(m);
      err = e;
      started = true;
    }
    cv.notify_one();
    if (e.empty()) tp->run();
  });
  std::unique_lock<std::mutex> g(m);
  cv.wait(g, [&] { return started; });
  if (!err.empty()) {
    *error = err;
    g.unlock();
    t->thread_.join();
    return nullptr;
  }
  return t;
}

SyscallTracer::~SyscallTracer() {
  // Tracees left (descendants still running when lego-run ends) are detached when this
  // process exits; a thread still waiting for them must not be joined.
  if (thread_.joinable()) thread_.detach();
}

void SyscallTracer::run() {
  std::unordered_map<pid_t, std::pair<long, uint64_t>> entered;  // tid -> (nr, entry time)
  size_t tracees = 1;
  bool program_started = false;
  while (tracees > 0) {
    int st = 0;
    const pid_t pid = waitpid(-1, &st, __WALL | __WNOTHREAD);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;  // ECHILD: nothing left
    }
    if (WIFEXITED(st) || WIFSIGNALED(st)) {
      --tracees;
      entered.erase(pid);
      if (pid == program_) {
        program_status_ = st;
        program_done_ = true;
      }
      continue;
    }
    if (!WIFSTOPPED(st)) continue;
    const int sig = WSTOPSIG(st);
    const int event = st >> 16;
    int deliver = 0;
    if (sig == (SIGTRAP | 0x80)) {
      __ptrace_syscall_info info{};
      if (ptrace(PTRACE_GET_SYSCALL_INFO, pid, reinterpret_cast<void*>(sizeof info), &info) > 0) {
        const uint64_t now = now_ns();
        if (info.op == PTRACE_SYSCALL_INFO_ENTRY) {
          const long nr = static_cast<long>(info.entry.nr);
          entered[pid] = {nr, now};
          std::lock_guard<std::mutex> g(mu_);
          counts_[nr].calls++;
        } else if (info.op == PTRACE_SYSCALL_INFO_EXIT) {
          auto it = entered.find(pid);
          if (it != entered.end()) {
            std::lock_guard<std::mutex> g(mu_);
            Count& c = counts_[it->second.first];
            c.ns += now - it->second.second;
            if (info.exit.is_error) c.errors++;
            entered.erase(it);
          }
        }
      }
    } else if (event == PTRACE_EVENT_FORK || event == PTRACE_EVENT_VFORK ||
               event == PTRACE_EVENT_CLONE) {
      ++tracees;  // auto-attached; it reports its own first stop
    } else if (event == PTRACE_EVENT_EXEC) {
      // A thread that was not the leader took over the leader's pid: its entry is moot.
      entered.erase(pid);
    } else if (event == PTRACE_EVENT_STOP) {
      // A new tracee's first stop, the program's own stop before exec, or a group-stop:
      // resumed (job-control stops are not honoured while traced; see the header).
      if (pid == program_ && !program_started) program_started = true;
    } else if (event == 0 && sig == SIGSTOP && pid == program_ && !program_started) {
      program_started = true;  // its own stop before exec, seized before it took effect
    } else if (event == 0) {
      deliver = sig;  // a signal for the tracee: deliver it
    }
    ptrace(PTRACE_SYSCALL, pid, nullptr, reinterpret_cast<void*>(static_cast<long>(deliver)));
  }
}

bool SyscallTracer::program_ended(int* status) const {
  if (!program_done_.load()) return false;
  *status = program_status_.load();
  return true;
}

void SyscallTracer::print(FILE* out) const {
  struct Row {
    std::string name;
    Count c;
  };
  std::vector<Row> rows;
  Count total;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [nr, c] : counts_) {
      const char* n = syscall_name(nr);
      rows.push_back({n ? n : "syscall_" + std::to_string(nr), c});
      total.calls += c.calls;
      total.errors += c.errors;
      total.ns += c.ns;
    }
  }
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    return a.c.ns != b.c.ns ? a.c.ns > b.c.ns : a.c.calls > b.c.calls;
  });
  fprintf(out,
          "lego-run: system calls of the program and its descendants (wall time in the "
          "call, as traced)\n");
  fprintf(out, "%% time     seconds  usecs/call     calls    errors syscall\n");
  fprintf(out, "------ ----------- ----------- --------- --------- ----------------\n");
  auto line = [&](const std::string& name, const Count& c) {
    const double pct =
        total.ns ? 100.0 * static_cast<double>(c.ns) / static_cast<double>(total.ns) : 0;
    char errors[32] = "";
    if (c.errors)
      snprintf(errors, sizeof errors, "%llu", static_cast<unsigned long long>(c.errors));
    fprintf(out, "%6.2f %11.6f %11llu %9llu %9s %s\n", pct, static_cast<double>(c.ns) / 1e9,
            static_cast<unsigned long long>(c.calls ? c.ns / 1000 / c.calls : 0),
            static_cast<unsigned long long>(c.calls), errors, name.c_str());
  };
  for (const Row& r : rows) line(r.name, r.c);
  fprintf(out, "------ ----------- ----------- --------- --------- ----------------\n");
  line("total", total);
}

}  // namespace lego::launch
