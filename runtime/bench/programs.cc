// lego-bench --only programs: unmodified programs from Debian packages under local,
// zram_swap, lego_tcp and lego_shm (runtime/bench/lego_bench.h).
//
// Each program runs first under local, alone in an uncapped memory cgroup whose charges
// are sampled every 5 ms: the peak of its anonymous memory (memory.stat's rss) sets the
// local-memory cap of every other run, cap = fraction x peak anonymous. That is the ExCache
// size for lego-run, which holds the program's anonymous memory and nothing else. zram's
// cgroup also charges the program's page cache (memory.stat's cache: files it writes, such
// as sqlite's temp files) and kernel memory (memory.kmem.usage_in_bytes: page tables, slab,
// socket buffers), which lego leaves uncapped; so the zram peer's limit is the same cap plus
// the peak of those charges under local (the same anonymous budget for both). What remains
// can still OOM-kill the zram peer: at 25-36% of sort's peak the kernel killed it in the
// swap-in charge (do_swap_page -> mem_cgroup_swapin_charge_folio) with every resident page
// referenced and the cgroup charging no page cache and ~0.2 MiB of kernel memory
// (docs/measurements.md); such rows are marked and kept out of the means. The local run
// is also the reference output: every other run's stdout must hash the same (stress-ng,
// whose output is timing, is checked by its own --verify). lego runs use lego-run's
// defaults (delivery handler, policy refault, prefetch) plus --stats, whose misses and
// evictions (summed over the run's processes) go into the table; with --policies, each
// lego system is a row per policy ("lego_shm/fifo"), run with --policy.
//
// The programs (kProgramNames), at --program-size 1:
//   python     /usr/bin/python3 builds a dict of 600k sha1 strings and a list of 1.2M ints,
//              then reads 1/7 of the dict in a scattered order (~180 MiB);
//   sqlite     sqlite3 on :memory: fills a 200k-row table with hex digests, builds two
//              indexes, queries through them and checks integrity (~100 MiB);
//   sort       GNU sort --parallel=2 (2 threads) of 1.2M random lines, 68 MB (~140 MiB);
//   stress-ng  stress-ng --vm 2 --vm-method all --verify: 2 forked workers over 160 MiB;
//   redis      redis-server loaded with 300k 256-byte values by redis-cli --pipe, then
//              driven by redis-benchmark (600k GETs of random keys, 16 clients, pipeline
//              8); its figure is the GET phase's requests/s, and its time is GETs /
//              (requests/s), as redis-benchmark measured it (~120 MiB).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "runtime/bench/lego_bench.h"

namespace lego::bench {

// stress-ng's forked workers, which hold its memory between them, and sort's threads.
constexpr int kStressWorkers = 2;
constexpr int kSortThreads = 2;

const char* const kProgramNames[5] = {"python", "sqlite", "sort", "stress-ng", "redis"};

namespace {

using Clock = std::chrono::steady_clock;

// A run that takes longer than this is killed and reported (a hung program must not hang
// the benchmark). Not scaled with --program-size: on a loaded host sort at size 0.25 and
// 25% local over tcp took longer than 225 s, and was cut off.
constexpr double kTimeoutSeconds = 1800;
// How much of a run's stdout is kept to show where it differs from local's.
constexpr size_t kKeptOutput = 64 << 10;

// "41.3M": caps are fractions of a measured peak, never round.
std::string mib(uint64_t bytes) {
  char b[32];
  snprintf(b, sizeof b, "%.1fM", static_cast<double>(bytes) / (1 << 20));
  return b;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Ctrl-C or SIGTERM: the program running now is killed, no further run starts, and what
// ran is printed; the temp directory, cgroups and zram device are removed on the way out.
std::atomic<pid_t> g_running{0};
std::atomic<bool> g_stop{false};

void on_stop_signal(int) {
  g_stop = true;
  const pid_t p = g_running;
  if (p > 0) kill(p, SIGKILL);
}

// Deterministic inputs: the same bytes in every run and on every host.
uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out) die("cannot write " + path);
}

// The sizes of one benchmark run (--program-size scales all of them).
struct Sizes {
  long python_keys, sqlite_rows, sort_lines, stress_bytes_mib, stress_ops, redis_keys, redis_gets;
  explicit Sizes(double s)
      : python_keys(std::max(1000L, std::lround(600000 * s))),
        sqlite_rows(std::max(1000L, std::lround(200000 * s))),
        sort_lines(std::max(1000L, std::lround(1200000 * s))),
        stress_bytes_mib(std::max(4L, std::lround(160 * s))),
        stress_ops(std::max(200L, std::lround(8000 * s))),
        redis_keys(std::max(1000L, std::lround(300000 * s))),
        redis_gets(std::max(2000L, std::lround(600000 * s))) {}
};

const char* kPythonScript = R"(# lego-bench's python program: large dicts and lists.
import hashlib, sys
N = int(sys.argv[1])
d = {}
for i in range(N):
    d["key-%d" % i] = hashlib.sha1(str(i).encode()).hexdigest()
lst = [i * i for i in range(2 * N)]
h = hashlib.sha256()
for i in range(0, N, 7):
    h.update(d["key-%d" % ((i * 7919) % N)].encode())
print(len(d), len(lst), sum(lst), h.hexdigest())
)";

std::string sqlite_script(long rows) {
  // Payloads are digests (incompressible, the same every run); sha3() and sha3_query()
  // are built into Debian's sqlite3 shell.
  return "CREATE TABLE t(id INTEGER PRIMARY KEY, grp INTEGER, k TEXT, payload TEXT);\n"
         "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < " +
         std::to_string(rows) +
         ")\n"
         "INSERT INTO t SELECT i, i % 97, hex(sha3(i, 256)), "
         "hex(sha3(i, 512)) || hex(sha3(-i, 512)) FROM n;\n"
         "CREATE INDEX t_grp ON t(grp);\n"
         "CREATE INDEX t_k ON t(k);\n"
         "SELECT count(*), sum(id), sum(length(payload)) FROM t;\n"
         "SELECT count(*), sum(id) FROM t WHERE grp = 42;\n"
         "SELECT sum(id) FROM (SELECT id FROM t ORDER BY k LIMIT 1000 OFFSET " +
         std::to_string(rows / 2) +
         ");\n"
         "SELECT hex(sha3_query('SELECT id, k, payload FROM t WHERE grp BETWEEN 10 AND 12 "
         "ORDER BY k'));\n"
         "PRAGMA integrity_check;\n";
}

// 1.2M lines like "9f3a... 12345 0c1d...": random keys, so sort really sorts.
void write_sort_input(const std::string& path, long lines) {
  FILE* f = fopen(path.c_str(), "w");
  if (f == nullptr) die("cannot write " + path);
  uint64_t s = 1;
  for (long i = 0; i < lines; ++i) {
    const uint64_t a = splitmix64(s), b = splitmix64(s), c = splitmix64(s);
    fprintf(f, "%016llx %ld %016llx%016llx\n", static_cast<unsigned long long>(a), i,
            static_cast<unsigned long long>(b), static_cast<unsigned long long>(c));
  }
  if (fclose(f) != 0) die("cannot write " + path);
}

// The redis key redis-benchmark's -r makes of a number: "key:" and 12 digits.
std::string redis_key(long i) {
  char k[32];
  snprintf(k, sizeof k, "key:%012ld", i);
  return k;
}

// SET commands in the redis protocol for redis-cli --pipe: 256-byte hex values.
void write_redis_load(const std::string& path, long keys) {
  FILE* f = fopen(path.c_str(), "w");
  if (f == nullptr) die("cannot write " + path);
  uint64_t s = 2;
  for (long i = 0; i < keys; ++i) {
    const std::string k = redis_key(i);
    char v[257];
    for (int j = 0; j < 256; j += 16) {
      snprintf(v + j, 17, "%016llx", static_cast<unsigned long long>(splitmix64(s)));
    }
    fprintf(f, "*3\r\n$3\r\nSET\r\n$%zu\r\n%s\r\n$256\r\n%s\r\n", k.size(), k.c_str(), v);
  }
  if (fclose(f) != 0) die("cannot write " + path);
}

// How one run is started: under lego-run (prefix), in a memory cgroup (tasks), or plain.
struct Launch {
  std::vector<std::string> prefix;
  std::string tasks;
};

// Samples a cgroup's charges while a run lasts: its anonymous memory (memory.stat's rss)
// and what else the cgroup charges (page cache -- memory.stat's cache: files the program
// writes, sqlite's temp files -- and kernel memory: page tables, slab, socket buffers).
// stop() returns the peak anonymous memory, other_peak() the other charges' peak.
class PeakSampler {
 public:
  explicit PeakSampler(const MemoryCgroup* cg) : cg_(cg) {
    if (cg_ != nullptr) thread_ = std::thread([this] { loop(); });
  }
  ~PeakSampler() { stop(); }
  uint64_t stop() {
    done_ = true;
    if (thread_.joinable()) thread_.join();
    return peak_;
  }
  uint64_t other_peak() const { return other_peak_; }

 private:
  void loop() {
    while (!done_) {
      peak_ = std::max(peak_.load(), cg_->stat("rss"));
      other_peak_ = std::max(other_peak_.load(), cg_->stat("cache") + cg_->kernel_bytes());
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  const MemoryCgroup* cg_;
  std::atomic<bool> done_{false};
  std::atomic<uint64_t> peak_{0}, other_peak_{0};
  std::thread thread_;
};

// Forks argv (after launch's prefix) in its cgroup, stdin from /dev/null, stdout to
// `out_fd` (or /dev/null when -1), stderr appended to err_path. LC_ALL=C: sort's order.
pid_t spawn(const std::vector<std::string>& argv, const Launch& launch, int out_fd,
            const std::string& err_path) {
  std::vector<std::string> full = launch.prefix;
  full.insert(full.end(), argv.begin(), argv.end());
  const pid_t pid = fork();
  if (pid != 0) {
    g_running = pid;
    return pid;
  }
  if (!launch.tasks.empty()) {
    const std::string me = std::to_string(getpid());
    const int fd = open(launch.tasks.c_str(), O_WRONLY);
    if (fd < 0 || write(fd, me.data(), me.size()) != static_cast<ssize_t>(me.size())) _exit(120);
    close(fd);
  }
  const int null = open("/dev/null", O_RDWR);
  const int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  dup2(null, 0);
  dup2(out_fd >= 0 ? out_fd : null, 1);
  dup2(err >= 0 ? err : null, 2);
  setenv("LC_ALL", "C", 1);
  std::vector<char*> a;
  for (auto& s : full) a.push_back(const_cast<char*>(s.c_str()));
  a.push_back(nullptr);
  execvp(a[0], a.data());
  _exit(127);
}

std::string status_text(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by signal ") + strsignal(WTERMSIG(status));
  return "status " + std::to_string(status);
}

// What a run printed on stdout: its hash, length and beginning.
struct Output {
  uint64_t hash = 1469598103934665603ull;  // FNV-1a 64
  uint64_t length = 0;
  std::string head;
  void add(const char* p, size_t n) {
    for (size_t i = 0; i < n; ++i)
      hash = (hash ^ static_cast<unsigned char>(p[i])) * 1099511628211ull;
    length += n;
    if (head.size() < kKeptOutput) head.append(p, std::min(n, kKeptOutput - head.size()));
  }
  bool same(const Output& o) const { return hash == o.hash && length == o.length; }
};

// Runs argv to its end: its status (or -1 when it timed out and was killed) and stdout.
int run_to_end(const std::vector<std::string>& argv, const Launch& launch,
               const std::string& err_path, double timeout, Output* out) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) die("pipe");
  const pid_t pid = spawn(argv, launch, p[1], err_path);
  close(p[1]);
  const auto t0 = Clock::now();
  bool timed_out = false;
  char buf[1 << 16];
  for (;;) {
    pollfd pf{p[0], POLLIN, 0};
    const int r = poll(&pf, 1, 200);
    if (r > 0) {
      const ssize_t n = read(p[0], buf, sizeof buf);
      if (n <= 0) break;
      out->add(buf, static_cast<size_t>(n));
    }
    if (!timed_out && seconds_since(t0) > timeout) {
      kill(pid, SIGKILL);  // lego-run's PROGRAM dies with it
      timed_out = true;
    }
    // A worker the killed program forked may hold the pipe open: give up on it.
    if (timed_out && seconds_since(t0) > timeout + 10) break;
  }
  close(p[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  g_running = 0;
  return timed_out ? -1 : status;
}

// A helper tool (redis-cli, redis-benchmark): outside any cgroup or lego-run; its stdout
// and stderr together.
int run_tool(const std::vector<std::string>& argv, const std::string& stdin_path,
             std::string* text) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) die("pipe");
  const pid_t pid = fork();
  if (pid == 0) {
    const int in = open(stdin_path.empty() ? "/dev/null" : stdin_path.c_str(), O_RDONLY);
    dup2(in, 0);
    dup2(p[1], 1);
    dup2(p[1], 2);
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execvp(a[0], a.data());
    _exit(127);
  }
  close(p[1]);
  char buf[4096];
  ssize_t n;
  while ((n = read(p[0], buf, sizeof buf)) > 0) text->append(buf, static_cast<size_t>(n));
  close(p[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

// One program under one system at one local fraction.
struct Row {
  std::string program, system;
  double fraction = 1;
  uint64_t cap = 0;       // bytes (0: none, local)
  bool ok = false;        // ran to its end and, where it checks itself, passed
  bool oom = false;       // the kernel OOM-killed a process of the (zram) run
  bool compared = false;  // its output was compared with local's
  bool same = false;      // ...and was the same
  double seconds = 0;
  double rps = 0;                    // redis: redis-benchmark's GET requests per second
  long misses = -1, evictions = -1;  // lego runs: --stats summed over the run's processes
  int oom_kills = 0;                 // zram runs the kernel OOM-killed (all of them when oom)
  std::string error, difference;
  Output out;
  uint64_t peak = 0;   // local: peak anonymous memory
  uint64_t other = 0;  // local: peak of the cgroup's other charges (page cache + kernel)
};

// lego-run's --stats: misses and evictions summed over the blocks (one per process).
void read_stats(const std::string& err_path, Row* row) {
  std::ifstream in(err_path);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string key;
    long long v = -1;
    if (line.rfind("  ", 0) != 0 || !(ls >> key >> v)) continue;
    if (key == "misses") row->misses = std::max(0L, row->misses) + static_cast<long>(v);
    if (key == "evictions") row->evictions = std::max(0L, row->evictions) + static_cast<long>(v);
  }
}

// The last lines of a run's stderr, for a failed row.
std::string tail_of(const std::string& path) {
  std::ifstream in(path);
  std::string line, last;
  while (std::getline(in, line)) {
    if (!line.empty()) last = line;
  }
  return last.substr(0, 160);
}

// Where two outputs first differ, for the loud message.
std::string describe_difference(const Output& local, const Output& other) {
  size_t i = 0;
  const size_t n = std::min(local.head.size(), other.head.size());
  while (i < n && local.head[i] == other.head[i]) ++i;
  if (i == n && local.head.size() == other.head.size() && n == kKeptOutput) {
    return "same first " + std::to_string(kKeptOutput) + " bytes; lengths " +
           std::to_string(local.length) + " vs " + std::to_string(other.length) +
           ", hashes differ after that";
  }
  const size_t line_start = local.head.rfind('\n', i == 0 ? 0 : i - 1);
  const size_t from = line_start == std::string::npos || i == 0 ? 0 : line_start + 1;
  auto line_at = [&](const std::string& s) {
    if (from >= s.size()) return std::string("<end of output>");
    const size_t e = s.find('\n', from);
    return "'" +
           s.substr(from,
                    std::min<size_t>(e == std::string::npos ? s.size() - from : e - from, 120)) +
           "'";
  };
  const long line_no = std::count(local.head.begin(), local.head.begin() + from, '\n') + 1;
  return "line " + std::to_string(line_no) + ": local " + line_at(local.head) + ", this run " +
         line_at(other.head) + " (lengths " + std::to_string(local.length) + " vs " +
         std::to_string(other.length) + ")";
}

class Bench {
 public:
  Bench(const ProgramOptions& o, std::string lego_run)
      : o_(o), sizes_(o.size), lego_run_(std::move(lego_run)) {
    // With --policies each lego system is a row per policy, "lego_shm/fifo"; without, one
    // row under lego-run's default policy.
    for (auto& s : o_.systems) {
      if (base_system(s) == s && s.rfind("lego_", 0) == 0 && !o_.policies.empty()) {
        for (auto& pol : o_.policies) systems_.push_back(s + "/" + pol);
      } else {
        systems_.push_back(s);
      }
    }
    dir_ = "/tmp/lego-bench-programs-" + std::to_string(getpid());
    if (mkdir(dir_.c_str(), 0755) != 0) die("cannot create " + dir_ + ": " + strerror(errno));
  }
  ~Bench() { (void)!system(("rm -rf " + dir_).c_str()); }

  int run() {
    std::vector<std::string> programs = o_.programs;
    if (programs.empty()) programs.assign(std::begin(kProgramNames), std::end(kProgramNames));
    prepare(programs);
    const auto t0 = Clock::now();
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    for (auto& p : programs) {
      if (!g_stop) run_program(p);
    }
    if (g_stop) fprintf(stderr, "lego-bench: interrupted: the table has the runs that ended\n");
    fprintf(stderr, "lego-bench: programs done in %.0f s\n", seconds_since(t0));
    bool tcp = false, shm = false;
    for (auto& r : rows_) {
      if (!has_floor(r)) continue;
      tcp |= base_system(r.system) == "lego_tcp";
      shm |= base_system(r.system) == "lego_shm";
    }
    if (o_.floors && !g_stop && (tcp || shm)) floors_ = measure_program_floors(tcp, shm);
    print();
    if (!o_.csv.empty()) write_csv();
    if (g_stop) return 130;
    return failures_ == 0 ? 0 : 1;
  }

 private:
  std::string path(const char* name) const { return dir_ + "/" + name; }

  void prepare(const std::vector<std::string>& programs) {
    auto wants = [&](const char* p) {
      return std::find(programs.begin(), programs.end(), p) != programs.end();
    };
    if (wants("python")) write_text(path("dict_list.py"), kPythonScript);
    if (wants("sqlite")) {
      write_text(path("sqlite.sql"), sqlite_script(sizes_.sqlite_rows));
      write_text(path("sqlite-perturbed.sql"), sqlite_script(sizes_.sqlite_rows + 1));
    }
    if (wants("sort")) write_sort_input(path("sort.txt"), sizes_.sort_lines);
    if (wants("redis")) write_redis_load(path("redis-load.resp"), sizes_.redis_keys);
  }

  // The program's command line; `perturb` (--corrupt-output) changes what it computes.
  std::vector<std::string> argv_of(const std::string& p, bool perturb) const {
    if (p == "python") {
      return {"/usr/bin/python3", path("dict_list.py"),
              std::to_string(sizes_.python_keys + (perturb ? 1 : 0))};
    }
    if (p == "sqlite") {
      return {"/usr/bin/sqlite3", "-bail",
              ":memory:", ".read " + path(perturb ? "sqlite-perturbed.sql" : "sqlite.sql")};
    }
    if (p == "sort") {
      std::vector<std::string> a{
          "/usr/bin/sort", "--parallel=" + std::to_string(kSortThreads), "-S", "2G", "-T", dir_};
      if (perturb) a.push_back("-r");
      a.push_back(path("sort.txt"));
      return a;
    }
    if (p == "stress-ng") {
      return {"/usr/bin/stress-ng",
              "--vm",
              std::to_string(kStressWorkers),
              "--vm-bytes",
              std::to_string(sizes_.stress_bytes_mib) + "M",
              "--vm-method",
              "all",
              "--vm-keep",
              "--verify",
              "--vm-ops",
              std::to_string(sizes_.stress_ops),
              "--temp-path",
              dir_};
    }
    return {};  // redis: run_server()
  }

  // "lego_shm/fifo" -> "lego_shm"; the policy after the slash, or "" for lego-run's default.
  static std::string base_system(const std::string& system) {
    return system.substr(0, system.find('/'));
  }
  static std::string policy_of(const std::string& system) {
    const size_t slash = system.find('/');
    return slash == std::string::npos ? "" : system.substr(slash + 1);
  }

  // lego-run's --excache for a program at `cap`. The ExCache is per process (a forked child
  // is a lego process with one of its own, as LegoOS gives each process its pcache), while
  // the zram peer's cgroup caps all the program's processes together: stress-ng's workers
  // each get their share of the cap, so that both peers hold the same memory locally.
  static uint64_t lego_cap(const std::string& p, uint64_t cap) {
    if (p != "stress-ng") return cap;
    return std::max<uint64_t>(64 << 10, (cap / kStressWorkers) & ~uint64_t{kPage - 1});
  }

  Launch launch_for(const std::string& system, uint64_t cap) const {
    Launch l;
    const std::string base = base_system(system);
    if (base == "lego_tcp" || base == "lego_shm") {
      l.prefix = {lego_run_, "--excache", std::to_string(cap), "--transport",
                  base == "lego_tcp" ? "tcp" : "shm"};
      if (const std::string pol = policy_of(system); !pol.empty()) {
        l.prefix.insert(l.prefix.end(), {"--policy", pol});
      }
      l.prefix.insert(l.prefix.end(), {"--stats", "--"});
    }
    return l;
  }

  // One run of a program that runs to its end.
  void run_plain(const std::string& p, const Launch& l, Row* row) {
    const std::string err = path("stderr");
    unlink(err.c_str());
    const auto t0 = Clock::now();
    const int status = run_to_end(argv_of(p, o_.corrupt == base_system(row->system)), l, err,
                                  timeout(), &row->out);
    row->seconds = seconds_since(t0);
    read_stats(err, row);
    if (status == -1) {
      row->error = "timed out after " + std::to_string(static_cast<int>(timeout())) + " s";
    } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      row->error = status_text(status) + ": " + tail_of(err);
    } else if (p == "stress-ng") {
      // stress-ng checks its own memory (--verify): it says "fail:" and exits non-zero
      // when a read does not return what was written.
      std::ifstream in(err);
      const std::string text((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
      if (text.find("successful run completed") == std::string::npos ||
          text.find(" fail: ") != std::string::npos) {
        row->error = "stress-ng's --verify failed: " + tail_of(err);
      } else {
        row->ok = true;
      }
    } else {
      row->ok = true;
    }
  }

  // redis: the server under the system, loaded and driven by redis's own tools from
  // outside it; the output is the data set's size and DEBUG DIGEST afterwards.
  void run_server(const Launch& l, Row* row) {
    const std::string err = path("stderr");
    unlink(err.c_str());
    // A port of our own: parallel runs of lego-bench must not collide.
    const int port = 20000 + static_cast<int>((getpid() * 7 + runs_++) % 30000);
    const std::string ps = std::to_string(port);
    const pid_t pid = spawn(
        {"redis-server", "--port", ps, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--enable-debug-command", "local", "--daemonize", "no", "--loglevel", "warning"},
        l, -1, err);
    auto fail = [&](const std::string& what) {
      if (row->error.empty()) row->error = what;
    };
    // Up when it accepts a connection (lego-run first starts its memory node).
    const auto up0 = Clock::now();
    bool up = false;
    while (!up && seconds_since(up0) < 120) {
      int st = 0;
      if (waitpid(pid, &st, WNOHANG) == pid) {
        g_running = 0;
        fail("redis-server ended before serving: " + status_text(st) + ": " + tail_of(err));
        read_stats(err, row);
        return;
      }
      const int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(static_cast<uint16_t>(port));
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      up = connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
      close(s);
      if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (!up) fail("redis-server did not accept connections on port " + ps + " in 120 s");
    std::string text;
    if (up) {
      const int st = run_tool({"redis-cli", "-p", ps, "--pipe"}, path("redis-load.resp"), &text);
      if (st != 0)
        fail("loading with redis-cli --pipe: " + status_text(st) + ": " + text.substr(0, 160));
    }
    if (row->error.empty() && o_.corrupt == base_system(row->system)) {
      std::string t;
      run_tool({"redis-cli", "-p", ps, "SET", "key:perturbed", "x"}, "", &t);
    }
    if (row->error.empty()) {
      text.clear();
      const int st = run_tool(
          {"redis-benchmark", "-p", ps, "-q", "-t", "get", "-n", std::to_string(sizes_.redis_gets),
           "-r", std::to_string(sizes_.redis_keys), "-c", "16", "-P", "8"},
          "", &text);
      const size_t at = text.rfind(" requests per second");
      const size_t get = at == std::string::npos ? at : text.rfind("GET: ", at);
      if (st != 0 || get == std::string::npos) {
        fail("redis-benchmark: " + status_text(st) + ": " + text.substr(0, 160));
      } else {
        // The phase's time as redis-benchmark measured it: requests / (requests/s),
        // without the tool's own start-up.
        row->rps = strtod(text.c_str() + get + 5, nullptr);
        if (row->rps > 0) {
          row->seconds = static_cast<double>(sizes_.redis_gets) / row->rps;
        } else {
          fail("redis-benchmark reported no requests per second: " + text.substr(0, 160));
        }
      }
    }
    if (row->error.empty()) {
      for (const char* cmd : {"DBSIZE", "DEBUG DIGEST"}) {
        text.clear();
        std::vector<std::string> a{"redis-cli", "-p", ps};
        std::istringstream words(cmd);
        for (std::string w; words >> w;) a.push_back(w);
        const int st = run_tool(a, "", &text);
        if (st != 0) fail(std::string("redis-cli ") + cmd + ": " + status_text(st));
        text = std::string(cmd) + " " + text;
        row->out.add(text.data(), text.size());
      }
    }
    text.clear();
    run_tool({"redis-cli", "-p", ps, "SHUTDOWN", "NOSAVE"}, "", &text);
    int st = 0;
    const auto d0 = Clock::now();
    while (waitpid(pid, &st, WNOHANG) == 0) {
      if (seconds_since(d0) > 60) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        fail("redis-server did not stop on SHUTDOWN");
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    g_running = 0;
    read_stats(err, row);
    if (row->error.empty() && !(WIFEXITED(st) && WEXITSTATUS(st) == 0)) {
      fail("redis-server: " + status_text(st) + ": " + tail_of(err));
    }
    row->ok = row->error.empty();
  }

  void run_once(const std::string& p, const Launch& l, Row* row) {
    if (p == "redis") {
      run_server(l, row);
    } else {
      run_plain(p, l, row);
    }
  }

  double timeout() const { return kTimeoutSeconds; }

  void progress(const Row& r) const {
    if (r.ok) {
      fprintf(stderr, "lego-bench: %-9s %3.0f%% local %-9s %8.2f s", r.program.c_str(),
              r.fraction * 100, r.system.c_str(), r.seconds);
      if (r.misses >= 0) fprintf(stderr, "  misses %ld evictions %ld", r.misses, r.evictions);
      fprintf(stderr, "\n");
    } else {
      fprintf(stderr, "lego-bench: %-9s %3.0f%% local %-9s %s\n", r.program.c_str(),
              r.fraction * 100, r.system.c_str(), r.oom ? "OOM-killed" : r.error.c_str());
    }
  }

  void run_program(const std::string& p) {
    // local: the reference output, the time to compare with, and the peak that sets the
    // cap. It runs once per program, whatever the fractions.
    Row local;
    local.program = p;
    local.system = "local";
    {
      // A run first, out of any cgroup, so that the files the program reads (python's
      // modules, the inputs) are in the page cache before the measured run: a memory cgroup
      // is charged for the page cache its tasks bring in, not for pages already cached. The
      // peers after this run find them cached too, so the charge measured below is what
      // every run's cgroup gets (files written, kernel memory). Without it the measure
      // depended on what an earlier run had left cached (python's: 13.4 MiB after
      // drop_caches, 0.3 MiB warm), and the zram peer's limit with it.
      fprintf(stderr, "lego-bench: %s, local (bringing its files into the page cache)...\n",
              p.c_str());
      Row warm_up;
      run_once(p, Launch{}, &warm_up);
      MemoryCgroup cg;
      const std::string e = cg.create("peak", 0);
      if (!e.empty()) die(e);
      Launch l;
      l.tasks = cg.tasks();
      fprintf(stderr, "lego-bench: %s, local (measuring its peak anonymous memory)...\n",
              p.c_str());
      PeakSampler sampler(&cg);
      run_once(p, l, &local);
      local.peak = sampler.stop();
      local.other = sampler.other_peak();
    }
    if (local.ok) peaks_.push_back({p, local.peak, local.other});
    progress(local);
    if (!local.ok) {
      failures_++;
      for (double f : o_.fractions) {
        Row r = local;
        r.fraction = f;
        rows_.push_back(r);
      }
      return;
    }
    for (double f : o_.fractions) {
      const uint64_t cap =
          std::max<uint64_t>(64 << 10, static_cast<uint64_t>(f * static_cast<double>(local.peak)) &
                                           ~uint64_t{kPage - 1});
      // zram's cgroup also charges the program's page cache and kernel memory, which
      // lego's ExCache does not hold (it caps anonymous lines only): the same anonymous
      // budget for both is the ExCache size plus those charges' peak under local.
      const uint64_t zram_cap = cap + ((local.other + kPage - 1) & ~uint64_t{kPage - 1});
      Row l = local;
      l.fraction = f;
      l.cap = cap;
      if (std::find(o_.systems.begin(), o_.systems.end(), "local") != o_.systems.end()) {
        rows_.push_back(l);
      }
      for (auto& s : systems_) {
        if (s == "local" || g_stop) continue;
        // A fresh row per attempt (a killed zram run leaves nothing behind).
        auto fresh = [&] {
          Row r;
          r.program = p;
          r.system = s;
          r.fraction = f;
          r.cap = s == "zram_swap" ? zram_cap : lego_cap(p, cap);
          return r;
        };
        Row r = fresh();
        fprintf(stderr, "lego-bench: %s, %.0f%% local (cap %s%s of peak %s%s), %s...\n", p.c_str(),
                f * 100, mib(r.cap).c_str(), r.cap != cap && s != "zram_swap" ? " per worker" : "",
                mib(local.peak).c_str(),
                s == "zram_swap" ? (" + " + mib(local.other) + " not anonymous").c_str() : "",
                s.c_str());
        if (s == "zram_swap") {
          // An OOM kill is the kernel's verdict on that run: noted, and the run repeated
          // (fresh device and cgroup) up to --oom-retries times.
          for (int kills = 0;; ++kills) {
            ZramSwap z;
            r = fresh();
            const std::string e = z.setup(zram_cap);
            if (!e.empty()) {
              r.error = e;
              break;
            }
            Launch zl;
            zl.tasks = z.tasks();
            run_once(p, zl, &r);
            r.oom = z.cgroup().oom_kills() > 0;
            r.oom_kills = kills + (r.oom ? 1 : 0);
            if (!r.oom || kills == o_.oom_retries) break;
            fprintf(stderr, "lego-bench: %s, %.0f%% local, zram_swap: OOM-killed, running again\n",
                    p.c_str(), f * 100);
          }
          if (r.oom) r.ok = false;
        } else {
          run_once(p, launch_for(s, lego_cap(p, cap)), &r);
        }
        if (r.ok && p != "stress-ng") {
          r.compared = true;
          r.same = r.out.same(local.out);
          if (!r.same) {
            r.difference = describe_difference(local.out, r.out);
            fprintf(stderr,
                    "lego-bench: !!! %s under %s at %.0f%% local: OUTPUT DIFFERS FROM LOCAL: %s\n",
                    p.c_str(), s.c_str(), f * 100, r.difference.c_str());
          }
        }
        if ((!r.ok && !r.oom) || (r.compared && !r.same)) failures_++;
        progress(r);
        rows_.push_back(r);
      }
    }
  }

  const Row* find(const Row& r, const char* system) const {
    for (auto& q : rows_) {
      if (q.program == r.program && q.fraction == r.fraction && q.system == system) return &q;
    }
    return nullptr;
  }

  // A usable figure: ran, and its output is local's (or it checks itself).
  static bool usable(const Row* r) { return r != nullptr && r->ok && (!r->compared || r->same); }

  // A lego run with a floor: it ran, its --stats were read, and its seconds are the whole
  // run's (redis's are its GET phase alone, while its misses include the load).
  static bool has_floor(const Row& r) {
    return r.system.rfind("lego_", 0) == 0 && usable(&r) && r.misses >= 0 && r.evictions >= 0 &&
           r.rps <= 0;
  }

  // The run's floor in seconds: local's time, plus per miss the pinned handler's store miss
  // and the transport's round trip, plus per eviction a line's share of a 32-line zap.
  Result<double> floor_seconds(const Row& r) const {
    const ProgramFloors& f = floors_.value();
    const Row* local = find(r, "local");
    if (!usable(local)) return Status(ENODATA, "no local run");
    const Result<double>& rtt = base_system(r.system) == "lego_tcp" ? f.tcp_rtt_us : f.shm_rtt_us;
    for (const Result<double>* part : {&f.handler_miss_us, &f.zap_us, &rtt}) {
      if (!*part) return part->status();
    }
    const double us = static_cast<double>(r.misses) * (f.handler_miss_us.value() + rtt.value()) +
                      static_cast<double>(r.evictions) * f.zap_us.value();
    // The misses of a program's threads or processes may overlap (sort's 2 threads,
    // stress-ng's 2 workers, each with a handler of its own): at most that many at a time.
    const int parallel = r.program == "sort"        ? kSortThreads
                         : r.program == "stress-ng" ? kStressWorkers
                                                    : 1;
    return local->seconds + us / parallel / 1e6;
  }

  void print_floors() const {
    if (!floors_) return;
    const ProgramFloors& f = floors_.value();
    auto part = [](const Result<double>& v) {
      char b[64];
      if (v) {
        snprintf(b, sizeof b, "%.2f us", v.value());
        return std::string(b);
      }
      return v.status().message();
    };
    printf(
        "\nFloors: what each lego run cannot cost less than on this host (see --help): local's "
        "seconds\n+ misses x (a store miss served by a handler pinned to the faulting thread's "
        "CPU, %s,\n+ the round trip: tcp %s, shm %s) + evictions x a line's share of a 32-line "
        "zap, %s;\nsort's divided by %d and stress-ng's by %d, the threads or processes whose "
        "misses may overlap\n",
        part(f.handler_miss_us).c_str(), part(f.tcp_rtt_us).c_str(), part(f.shm_rtt_us).c_str(),
        part(f.zap_us).c_str(), kSortThreads, kStressWorkers);
    int w = 9;
    for (auto& sys : systems_) w = std::max(w, static_cast<int>(sys.size()));
    printf("%-9s %5s %-*s %9s %9s %9s %9s %13s %10s\n", "program", "local", w, "system", "misses",
           "evictions", "seconds", "floor s", "floor vs zram", "lego/floor");
    for (auto& r : rows_) {
      if (!has_floor(r)) continue;
      const Result<double> floor = floor_seconds(r);
      if (!floor) continue;
      const Row* zram = find(r, "zram_swap");
      char vz[32] = "-";
      if (usable(zram) && zram->seconds > 0)
        snprintf(vz, sizeof vz, "%.2fx", floor.value() / zram->seconds);
      printf("%-9s %4.0f%% %-*s %9ld %9ld %9.2f %9.2f %13s %9.2fx\n", r.program.c_str(),
             r.fraction * 100, w, r.system.c_str(), r.misses, r.evictions, r.seconds, floor.value(),
             vz, r.seconds / floor.value());
    }
    if (std::any_of(rows_.begin(), rows_.end(), [](const Row& r) { return r.rps > 0; })) {
      printf("(redis has none: its seconds are the GET phase's, its misses the whole run's)\n");
    }
    // Beside the targets' means: the floors' own, over the same programs.
    for (double fr : o_.fractions) {
      for (const std::string& system : systems_) {
        if (system.rfind("lego_", 0) != 0) continue;
        double log_sum = 0;
        int n = 0;
        for (auto& r : rows_) {
          if (r.fraction != fr || r.system != system || !has_floor(r)) continue;
          const Row* zram = find(r, "zram_swap");
          const Result<double> floor = floor_seconds(r);
          if (!usable(zram) || zram->seconds <= 0 || !floor) continue;
          log_sum += std::log(floor.value() / zram->seconds);
          n++;
        }
        if (n == 0) continue;
        printf("floors' geometric mean at %.0f%% local, %s vs zram_swap: %.2fx over %d program%s\n",
               fr * 100, system.c_str(), std::exp(log_sum / n), n, n > 1 ? "s" : "");
      }
    }
  }

  static std::string output_word(const Row& r) {
    if (r.system == "local") return "reference";
    if (!r.ok) return "-";
    if (!r.compared) return "verify ok";
    return r.same ? "same" : "DIFFERS!";
  }

  void print() const {
    printf(
        "\nlego-bench: real programs; cap = local fraction x the program's peak anonymous "
        "memory under local\n(the ExCache size for lego; for zram the memory cgroup's limit, "
        "plus the program's peak page cache\nand kernel memory under local, which the cgroup "
        "charges and the ExCache does not hold);\nlego-run's defaults (delivery handler, policy "
        "refault) unless --policies\n");
    int w = 9;  // the system column: "lego_shm/refault" with --policies
    for (auto& sys : systems_) w = std::max(w, static_cast<int>(sys.size()));
    printf("%-9s %5s %9s %-*s %9s %10s %9s %8s %-10s %9s %9s\n", "program", "local", "cap", w,
           "system", "seconds", "req/s", "vs local", "vs zram", "output", "misses", "evictions");
    for (auto& r : rows_) {
      printf("%-9s %4.0f%% %9s %-*s ", r.program.c_str(), r.fraction * 100,
             r.cap ? mib(r.cap).c_str() : "-", w, r.system.c_str());
      if (!r.ok) {
        if (r.oom) {
          printf("OOM-killed (all %d runs; kept out of the means)\n", r.oom_kills);
        } else {
          printf("FAILED: %s\n", r.error.c_str());
        }
        continue;
      }
      const Row* local = find(r, "local");
      const Row* zram = find(r, "zram_swap");
      char rps[32] = "-", vl[32] = "-", vz[32] = "-", mi[32] = "-", ev[32] = "-";
      if (r.rps > 0) snprintf(rps, sizeof rps, "%.0f", r.rps);
      if (usable(local) && local->seconds > 0)
        snprintf(vl, sizeof vl, "%.2fx", r.seconds / local->seconds);
      if (usable(zram) && zram->seconds > 0)
        snprintf(vz, sizeof vz, "%.2fx", r.seconds / zram->seconds);
      if (r.misses >= 0) snprintf(mi, sizeof mi, "%ld", r.misses);
      if (r.evictions >= 0) snprintf(ev, sizeof ev, "%ld", r.evictions);
      printf("%9.2f %10s %9s %8s %-10s %9s %9s", r.seconds, rps, vl, vz, output_word(r).c_str(), mi,
             ev);
      if (r.oom_kills > 0)
        printf("  (after %d OOM-killed run%s)", r.oom_kills, r.oom_kills > 1 ? "s" : "");
      printf("\n");
    }
    printf(
        "(redis: seconds = GETs / req/s, redis-benchmark's GET phase; ratios are of "
        "seconds: > 1 is slower)\n");
    for (auto& pk : peaks_) {
      printf("%s under local: peak anonymous %s, peak page cache + kernel memory %s\n",
             pk.program.c_str(), mib(pk.anonymous).c_str(), mib(pk.other).c_str());
    }
    // The targets: at 25% local, lego over shm at most 1.0x zram, over tcp at most 1.5x.
    const bool have_zram =
        std::find(o_.systems.begin(), o_.systems.end(), "zram_swap") != o_.systems.end();
    for (double f : have_zram ? o_.fractions : std::vector<double>{}) {
      for (const std::string& system : systems_) {
        if (system.rfind("lego_", 0) != 0) continue;
        const char* sys = system.c_str();
        double log_sum = 0;
        int n = 0;
        std::string out;
        for (auto& r : rows_) {
          if (r.fraction != f || r.system != sys) continue;
          const Row* zram = find(r, "zram_swap");
          if (!usable(&r) || !usable(zram)) {
            out += " " + r.program + "(out)";
            continue;
          }
          log_sum += std::log(r.seconds / zram->seconds);
          n++;
        }
        if (n == 0 && out.empty()) continue;
        printf("geometric mean at %.0f%% local, %s vs zram_swap: ", f * 100, sys);
        if (n > 0) {
          printf("%.2fx over %d program%s", std::exp(log_sum / n), n, n > 1 ? "s" : "");
        } else {
          printf("-");
        }
        if (!out.empty())
          printf("; kept out (failed, OOM-killed or output differs):%s", out.c_str());
        if (f == 0.25)
          printf("  [target %s]", base_system(sys) == "lego_shm" ? "<= 1.0x" : "<= 1.5x");
        printf("\n");
      }
    }
    print_floors();
    for (auto& r : rows_) {
      if (r.compared && !r.same) {
        printf("!!! OUTPUT DIFFERS: %s under %s at %.0f%% local: %s\n", r.program.c_str(),
               r.system.c_str(), r.fraction * 100, r.difference.c_str());
      }
    }
  }

  void write_csv() const {
    FILE* f = fopen(o_.csv.c_str(), "w");
    if (f == nullptr) die("cannot write " + o_.csv);
    fprintf(f, "program,local_fraction,system,seconds,ok,oom_killed\n");
    for (auto& r : rows_) {
      fprintf(f, "%s,%.2f,%s,%.4f,%d,%d\n", r.program.c_str(), r.fraction, r.system.c_str(),
              r.ok ? r.seconds : 0.0, usable(&r) ? 1 : 0, r.oom ? 1 : 0);
    }
    if (fclose(f) != 0) die("cannot write " + o_.csv);
    printf("wrote %s\n", o_.csv.c_str());
  }

  const ProgramOptions& o_;
  Sizes sizes_;
  std::string lego_run_, dir_;
  std::vector<std::string> systems_;  // o_.systems, a lego system once per policy
  std::vector<Row> rows_;
  Result<ProgramFloors> floors_ = Status(ENODATA, "not measured");
  // Each program's charges under local, which set the caps.
  struct Peaks {
    std::string program;
    uint64_t anonymous, other;
  };
  std::vector<Peaks> peaks_;
  int failures_ = 0;
  int runs_ = 0;
};

}  // namespace

int run_programs(const ProgramOptions& opts, const std::string& lego_run) {
  Bench b(opts, lego_run);
  return b.run();
}

}  // namespace lego::bench
