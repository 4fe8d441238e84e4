// lego-bench: the ExCache against its peers, side by side in one run.
//
// Each workload runs, with the same heap and the same local-memory cap, under:
//   local      all-local memory, no cap;
//   zram_swap  Linux swap on a fresh zram device, the workload alone in a memory cgroup
//              capped at the ExCache size (NOTES.md's recipe; set up and torn down here);
//   lego_tcp   lego-run, private memory node in another network namespace over tcp;
//   lego_shm   lego-run, private memory node over shm on this host.
// Heaps are filled with incompressible data (zeros flatter zram). A run the kernel
// OOM-kills is reported as such, never averaged in. Prints µs per access and ratios to
// local and to zram_swap; --csv writes workload,local_fraction,threads,system,us_per_access.
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lego/units.h"

using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kPage = 4096;

const char* kUsage = R"(usage: lego-bench [options]

Runs each workload under all-local memory, Linux swap on zram capped to the ExCache size,
and lego-run over tcp and shm, in one run; prints µs per access and ratios.

options:
  --cap SIZE           local memory: ExCache size and cgroup cap (default 64M)
  --fractions LIST     local fraction(s) of the heap (default 0.25,0.5: heap 4x and 2x cap)
  --workloads LIST     random,sequential,zipf,random_mt (default: all)
  --systems LIST       local,zram_swap,lego_tcp,lego_shm (default: all)
  --accesses N         accesses per run (default 200000)
  --csv FILE           rows: workload,local_fraction,threads,system,us_per_access
  --help               this text

Needs root (zram, cgroups, network namespaces). lego-run is looked up beside this
program (bazel-bin/runtime/lego-run) or through $LEGO_RUN.
)";

[[noreturn]] void die(const std::string& m) {
  fprintf(stderr, "lego-bench: %s\n", m.c_str());
  exit(2);
}

// ---------------------------------------------------------------- the worker

// Zipf(s) over n items by inverting a precomputed CDF (n is at most a few 100k pages).
class Zipf {
 public:
  Zipf(size_t n, double s) : cdf_(n) {
    double sum = 0;
    for (size_t i = 0; i < n; i++) cdf_[i] = (sum += 1.0 / std::pow(double(i + 1), s));
    for (auto& c : cdf_) c /= sum;
  }
  size_t operator()(std::mt19937_64& rng) const {
    double u = std::uniform_real_distribution<double>(0, 1)(rng);
    return std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin();
  }

 private:
  std::vector<double> cdf_;
};

// Runs one workload in this process and prints "us_per_access <x>".
int worker(const std::string& workload, size_t heap_bytes, long accesses) {
  size_t pages = heap_bytes / kPage;
  auto* heap = static_cast<uint64_t*>(malloc(pages * kPage));
  if (heap == nullptr) {
    fprintf(stderr, "worker: cannot allocate %zu bytes\n", heap_bytes);
    return 3;
  }
  // Incompressible fill.
  std::mt19937_64 fill(42);
  for (size_t i = 0; i < pages * kPage / 8; i++) heap[i] = fill();
  const size_t words_per_page = kPage / 8;
  std::unique_ptr<Zipf> zipf;
  if (workload == "zipf") zipf = std::make_unique<Zipf>(pages, 0.99);
  int threads = workload == "random_mt" ? 2 : 1;
  std::atomic<uint64_t> sink{0};
  auto t0 = Clock::now();
  long done = 0;
  if (workload == "sequential") {
    uint64_t acc = 0;
    long passes = std::max(1L, accesses / long(2 * pages));
    for (long p = 0; p < passes; p++) {
      for (size_t i = 0; i < pages; i++) acc += heap[i * words_per_page];
      for (size_t i = 0; i < pages; i++) heap[i * words_per_page] += 1;
      done += 2 * pages;
    }
    sink += acc;
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; t++) {
      pool.emplace_back([&, t] {
        std::mt19937_64 rng(7 + t);
        for (long n = 0; n < accesses / threads; n++) {
          size_t page = zipf ? (*zipf)(rng) : rng() % pages;
          heap[page * words_per_page + (n & 7)] += 1;  // read-modify-write
        }
      });
    }
    for (auto& th : pool) th.join();
    done = accesses / threads * threads;
  }
  double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  printf("us_per_access %.4f\n", us / done);
  fflush(stdout);
  return sink == 1 ? 1 : 0;
}

// ---------------------------------------------------------------- the driver

struct Outcome {
  bool ok = false;
  bool oom = false;
  double us = 0;
  std::string error;
};

std::string self_path() {
  char b[4096] = {};
  ssize_t n = readlink("/proc/self/exe", b, sizeof(b) - 1);
  return n > 0 ? std::string(b, n) : "lego-bench";
}

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

// Runs argv, optionally first joining a memory cgroup; parses "us_per_access".
Outcome run(const std::vector<std::string>& argv, const std::string& cgroup_tasks) {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return {false, false, 0, "pipe"};
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
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
  waitpid(pid, &status, 0);
  Outcome o;
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
    o.oom = true;
    o.error = "killed (OOM)";
    return o;
  }
  size_t at = text.find("us_per_access ");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || at == std::string::npos) {
    o.error = "exit status " +
              std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return o;
  }
  o.ok = true;
  o.us = strtod(text.c_str() + at + 14, nullptr);
  return o;
}

// A fresh zram swap device and a memory cgroup capped at `cap`, removed on destruction.
class ZramSwap {
 public:
  ~ZramSwap() { teardown(); }
  std::string setup(uint64_t cap) {
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
    cg_ = "/sys/fs/cgroup/memory/lego-bench-" + std::to_string(getpid());
    if (mkdir(cg_.c_str(), 0755) != 0) return "cannot create " + cg_;
    if (!write_file(cg_ + "/memory.limit_in_bytes", std::to_string(cap))) {
      return "cannot cap " + cg_;
    }
    return "";
  }
  std::string tasks() const { return cg_ + "/tasks"; }
  void teardown() {
    if (!cg_.empty()) rmdir(cg_.c_str());
    cg_.clear();
    if (swapped_) {
      std::string d = "/dev/zram" + std::to_string(dev_);
      (void)!system(("swapoff " + d).c_str());
      swapped_ = false;
    }
    if (dev_ >= 0) write_file("/sys/class/zram-control/hot_remove", std::to_string(dev_));
    dev_ = -1;
  }

 private:
  int dev_ = -1;
  bool swapped_ = false;
  std::string cg_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && strcmp(argv[1], "--worker") == 0) {
    if (argc != 5) die("--worker WORKLOAD HEAP_BYTES ACCESSES");
    return worker(argv[2], strtoull(argv[3], nullptr, 10), atol(argv[4]));
  }
  uint64_t cap = 64ull << 20;
  std::vector<double> fractions{0.25, 0.5};
  std::vector<std::string> workloads{"random", "sequential", "zipf", "random_mt"};
  std::vector<std::string> systems{"local", "zram_swap", "lego_tcp", "lego_shm"};
  long accesses = 200000;
  std::string csv;
  enum { kCap = 1, kFrac, kWork, kSys, kAcc, kCsv, kHelp };
  static const option opts[] = {{"cap", required_argument, nullptr, kCap},
                                {"fractions", required_argument, nullptr, kFrac},
                                {"workloads", required_argument, nullptr, kWork},
                                {"systems", required_argument, nullptr, kSys},
                                {"accesses", required_argument, nullptr, kAcc},
                                {"csv", required_argument, nullptr, kCsv},
                                {"help", no_argument, nullptr, kHelp},
                                {nullptr, 0, nullptr, 0}};
  int c;
  while ((c = getopt_long(argc, argv, "h", opts, nullptr)) != -1) {
    switch (c) {
      case kCap: {
        auto v = lego::parse_size(optarg, "--cap");
        if (!v) die(v.status().message());
        cap = v.value();
        break;
      }
      case kFrac:
        fractions.clear();
        for (auto& f : lego::split_list(optarg)) {
          double v = strtod(f.c_str(), nullptr);
          if (!(v > 0 && v <= 1)) die("--fractions: '" + f + "' is not in (0, 1]");
          fractions.push_back(v);
        }
        break;
      case kWork:
        workloads = lego::split_list(optarg);
        break;
      case kSys:
        systems = lego::split_list(optarg);
        break;
      case kAcc:
        accesses = atol(optarg);
        break;
      case kCsv:
        csv = optarg;
        break;
      case 'h':
      case kHelp:
        fputs(kUsage, stdout);
        return 0;
      default:
        fputs(kUsage, stderr);
        return 2;
    }
  }
  if (geteuid() != 0) die("needs root (zram, cgroups, network namespaces)");
  std::string self = self_path();
  std::string lego_run =
      getenv("LEGO_RUN") ? getenv("LEGO_RUN") : self.substr(0, self.rfind('/')) + "/../lego-run";
  if (access(lego_run.c_str(), X_OK) != 0)
    die("cannot find lego-run at " + lego_run + " (set LEGO_RUN)");

  struct Row {
    std::string workload, system;
    double fraction;
    int threads;
    Outcome o;
  };
  std::vector<Row> rows;
  for (double f : fractions) {
    uint64_t heap = static_cast<uint64_t>(cap / f) & ~uint64_t{kPage - 1};
    for (auto& w : workloads) {
      std::vector<std::string> worker{self, "--worker", w, std::to_string(heap),
                                      std::to_string(accesses)};
      for (auto& s : systems) {
        fprintf(stderr, "lego-bench: %s, %.0f%% local, %s...\n", w.c_str(), f * 100, s.c_str());
        Outcome o;
        if (s == "local") {
          o = run(worker, "");
        } else if (s == "zram_swap") {
          ZramSwap z;
          std::string err = z.setup(cap);
          if (!err.empty()) {
            o.error = err;
          } else {
            o = run(worker, z.tasks());
          }
        } else if (s == "lego_tcp" || s == "lego_shm") {
          std::vector<std::string> a{lego_run,
                                     "--excache",
                                     std::to_string(cap),
                                     "--delivery",
                                     "sigbus",
                                     "--transport",
                                     s == "lego_tcp" ? "tcp" : "shm",
                                     "--memory-capacity",
                                     std::to_string(heap * 2 + (256 << 20)),
                                     "--"};
          a.insert(a.end(), worker.begin(), worker.end());
          o = run(a, "");
        } else {
          die("unknown system '" + s + "'");
        }
        rows.push_back({w, s, f, w == "random_mt" ? 2 : 1, o});
      }
    }
  }
  printf("\nlego-bench: µs per access, cap %s (ExCache = cgroup limit), %ld accesses per run\n",
         lego::format_size(cap).c_str(), accesses);
  printf("%-11s %6s %-10s %12s %10s %10s\n", "workload", "local", "system", "us/access", "vs local",
         "vs zram");
  for (auto& r : rows) {
    double local = 0, zram = 0;
    for (auto& q : rows) {
      if (q.workload != r.workload || q.fraction != r.fraction || !q.o.ok) continue;
      if (q.system == "local") local = q.o.us;
      if (q.system == "zram_swap") zram = q.o.us;
    }
    if (!r.o.ok) {
      printf("%-11s %5.0f%% %-10s %12s  (%s)\n", r.workload.c_str(), r.fraction * 100,
             r.system.c_str(), r.o.oom ? "OOM-killed" : "failed", r.o.error.c_str());
      continue;
    }
    char vl[32] = "-", vz[32] = "-";
    if (local > 0) snprintf(vl, sizeof vl, "%.1fx", r.o.us / local);
    if (zram > 0) snprintf(vz, sizeof vz, "%.2fx", r.o.us / zram);
    printf("%-11s %5.0f%% %-10s %12.3f %10s %10s\n", r.workload.c_str(), r.fraction * 100,
           r.system.c_str(), r.o.us, vl, vz);
  }
  if (!csv.empty()) {
    FILE* f = fopen(csv.c_str(), "w");
    if (f == nullptr) die("cannot write " + csv);
    fprintf(f, "workload,local_fraction,threads,system,us_per_access\n");
    for (auto& r : rows) {
      if (r.o.ok) {
        fprintf(f, "%s,%.2f,%d,%s,%.4f\n", r.workload.c_str(), r.fraction, r.threads,
                r.system.c_str(), r.o.us);
      } else {
        fprintf(f, "%s,%.2f,%d,%s,%s\n", r.workload.c_str(), r.fraction, r.threads,
                r.system.c_str(), r.o.oom ? "oom" : "failed");
      }
    }
    fclose(f);
    printf("wrote %s\n", csv.c_str());
  }
  return 0;
}
