// Running lego-bench's workers under each system, and the zram peer's set-up
// (runtime/bench/lego_bench.h).
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

#include "runtime/bench/lego_bench.h"

namespace lego::bench {

void die(const std::string& m) {
  fprintf(stderr, "lego-bench: %s\n", m.c_str());
  exit(2);
}

std::string self_path() {
  char b[4096] = {};
  ssize_t n = readlink("/proc/self/exe", b, sizeof(b) - 1);
  return n > 0 ? std::string(b, n) : "lego-bench";
}

namespace {

bool write_file(const std::string& path, const std::string& text) {
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  close(fd);
  return ok;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

Outcome run(const std::vector<std::string>& argv, const std::string& cgroup_tasks, const char* key,
            bool keep_stderr) {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) {
    Outcome o;
    o.error = "pipe";
    return o;
  }
  // stderr to an unlinked temp file: read after the run, no second pipe to drain.
  int err = -1;
  if (keep_stderr) {
    char tmpl[] = "/tmp/lego-bench-stderr-XXXXXX";
    err = mkostemp(tmpl, O_CLOEXEC);
    if (err >= 0) unlink(tmpl);
  }
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    if (err >= 0) dup2(err, 2);
    if (!cgroup_tasks.empty()) {
      std::string me = std::to_string(getpid());
      if (!write_file(cgroup_tasks, me)) _exit(120);
    }
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execv(a[0], a.data());
    _exit(127);
  }
  close(out[1]);
  std::string text;
  char buf[512];
  ssize_t n;
  while ((n = read(out[0], buf, sizeof(buf))) > 0) text.append(buf, n);
  close(out[0]);
  int status = 0;
  rusage ru{};
  wait4(pid, &status, 0, &ru);
  Outcome o;
  if (err >= 0) {
    lseek(err, 0, SEEK_SET);
    while ((n = read(err, buf, sizeof(buf))) > 0) o.err.append(buf, n);
    close(err);
  }
  // The CPU the run took: its own and that of every descendant it waited for (under
  // lego-run: the program, the private memory nodes and the monitor).
  o.cpu_user_s = double(ru.ru_utime.tv_sec) + double(ru.ru_utime.tv_usec) / 1e6;
  o.cpu_sys_s = double(ru.ru_stime.tv_sec) + double(ru.ru_stime.tv_usec) / 1e6;
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
    o.oom = true;
    o.error = "killed (OOM)";
    return o;
  }
  o.text = text;
  size_t at = key ? text.find(key) : 0;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || at == std::string::npos) {
    o.error = "exit status " +
              std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    // Its own last word, when its stderr was kept.
    if (const size_t end = o.err.find_last_not_of('\n'); end != std::string::npos) {
      const size_t begin = o.err.rfind('\n', end);
      o.error += ": " + o.err.substr(begin == std::string::npos ? 0 : begin + 1,
                                     end - (begin == std::string::npos ? 0 : begin + 1) + 1);
    }
    return o;
  }
  o.ok = true;
  if (key) o.us = strtod(text.c_str() + at + strlen(key), nullptr);
  return o;
}

double stat_value(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    std::istringstream l(line);
    std::string k;
    double v;
    if (l >> k >> v && k == name) return v;
  }
  return -1;
}

std::string find_lego_run(const std::string& self) {
  std::string lego_run =
      getenv("LEGO_RUN") ? getenv("LEGO_RUN") : self.substr(0, self.rfind('/')) + "/../lego-run";
  if (access(lego_run.c_str(), X_OK) != 0) {
    die("cannot find lego-run at " + lego_run + " (set LEGO_RUN)");
  }
  return lego_run;
}

std::string MemoryCgroup::create(const std::string& tag, uint64_t cap) {
  remove();
  std::string p = "/sys/fs/cgroup/memory/lego-bench-" + std::to_string(getpid());
  if (!tag.empty()) p += "-" + tag;
  if (mkdir(p.c_str(), 0755) != 0) return "cannot create " + p + ": " + strerror(errno);
  path_ = p;
  if (cap != 0 && !write_file(path_ + "/memory.limit_in_bytes", std::to_string(cap))) {
    return "cannot cap " + path_;
  }
  return "";
}

uint64_t MemoryCgroup::stat(const char* key) const {
  std::ifstream in(path_ + "/memory.stat");
  std::string k;
  uint64_t v = 0;
  while (in >> k >> v) {
    if (k == key) return v;
  }
  return 0;
}

uint64_t MemoryCgroup::kernel_bytes() const {
  std::ifstream in(path_ + "/memory.kmem.usage_in_bytes");
  uint64_t v = 0;
  return in >> v ? v : 0;
}

int MemoryCgroup::oom_kills() const {
  std::ifstream in(path_ + "/memory.oom_control");
  std::string k;
  long v = 0;
  while (in >> k >> v) {
    if (k == "oom_kill") return static_cast<int>(v);
  }
  return 0;
}

void MemoryCgroup::remove() {
  if (!path_.empty()) rmdir(path_.c_str());
  path_.clear();
}

std::string ZramSwap::setup(uint64_t cap) {
  std::string n = read_file("/sys/class/zram-control/hot_add");
  if (n.empty()) return "no zram (modprobe zram?)";
  dev_ = std::stoi(n);
  std::string d = "/dev/zram" + std::to_string(dev_);
  if (!write_file("/sys/block/zram" + std::to_string(dev_) + "/disksize", "4G")) {
    return "cannot size " + d;
  }
  if (system(("mkswap " + d + " >/dev/null && swapon " + d).c_str()) != 0) {
    return "mkswap/swapon " + d + " failed";
  }
  swapped_ = true;
  return cg_.create("", cap);
}

void ZramSwap::teardown() {
  cg_.remove();
  if (swapped_) {
    std::string d = "/dev/zram" + std::to_string(dev_);
    (void)!system(("swapoff " + d).c_str());
    swapped_ = false;
  }
  if (dev_ >= 0) write_file("/sys/class/zram-control/hot_remove", std::to_string(dev_));
  dev_ = -1;
}

std::string system_label(const MemoryRow& r) {
  std::string label = r.delivery.empty() ? r.system : r.system + "/" + r.delivery;
  if (!r.policy.empty() && r.policy != "fifo") label += "/" + r.policy;
  if (!r.rma.empty() && r.rma != "auto") label += "/rma_" + r.rma;
  if (r.busy > 0) label += "/busy" + std::to_string(r.busy);
  return label;
}

double peer_us(const std::vector<MemoryRow>& rows, const MemoryRow& r, const char* system) {
  for (auto& q : rows) {
    if (q.workload == r.workload && q.fraction == r.fraction && q.threads == r.threads &&
        q.system == system && q.o.ok) {
      return q.o.us;
    }
  }
  return 0;
}

const MemoryRow* one_thread_row(const std::vector<MemoryRow>& rows, const MemoryRow& r) {
  for (auto& q : rows) {
    if (q.workload == r.workload && q.fraction == r.fraction && q.system == r.system &&
        q.delivery == r.delivery && q.policy == r.policy && q.rma == r.rma && q.busy == r.busy &&
        q.threads == 1 && q.o.ok) {
      return &q;
    }
  }
  return nullptr;
}

double one_thread_us(const std::vector<MemoryRow>& rows, const MemoryRow& r) {
  const MemoryRow* one = one_thread_row(rows, r);
  return one != nullptr ? one->o.us : 0;
}

const MemoryRow* delivery_twin(const std::vector<MemoryRow>& rows, const MemoryRow& r,
                               const std::string& d) {
  for (auto& q : rows) {
    if (q.workload == r.workload && q.fraction == r.fraction && q.threads == r.threads &&
        q.system == r.system && q.delivery == d && q.policy == r.policy && q.rma == r.rma &&
        q.busy == r.busy && q.o.ok) {
      return &q;
    }
  }
  return nullptr;
}

}  // namespace lego::bench
