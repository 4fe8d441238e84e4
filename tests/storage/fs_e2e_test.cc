// End to end: lego-stord in its own network namespace serves an export; lego-fs mounts
// it, in this test's private mount namespace, from the processor's namespace; unmodified
// programs and raw system calls work on the files through the mount.
// Guards: an fsx-style random mix of writes, truncates and reads compared with a local
// reference after every step; sqlite3 building and checking a database
// (PRAGMA integrity_check); tar of a tree in and out, compared with diff -r; offsets past
// 4 GiB; the right errno for common failures; fsync'ed data surviving a killed and
// restarted lego-stord; a lego-stord killed mid-write giving EIO promptly, not a hang.
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "lego/fit.h"
#include "tests/libfit/cluster_fixture.h"
#include "tests/netns/netns.h"
#include "tests/support.h"

using namespace lego;
using Clock = std::chrono::steady_clock;
using lego::testing::runfile;

namespace {

std::string temp_dir(const std::string& tag) {
  return testing::temp_dir("fse2e-" + tag);
}

// This test process and its children get a mount namespace of their own, so the FUSE
// mount is invisible to (and dies with) nothing else. Done once, before any thread.
void private_mounts() {
  static bool done = [] {
    REQUIRE(unshare(CLONE_NEWNS) == 0);
    REQUIRE(mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0);
    return true;
  }();
  (void)done;
}

std::string sh(const std::string& cmd) {
  auto r = testing::run_command({"sh", "-c", cmd});
  INFO(cmd);
  INFO(r.status().message());
  REQUIRE(r.is_ok());
  return r.value();
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Waits for "ready\n" on fd (a child's --ready-fd), up to 20 s.
bool wait_ready(int fd) {
  pollfd p{fd, POLLIN, 0};
  bool ok = poll(&p, 1, 20000) == 1;
  char buf[8];
  ok = ok && read(fd, buf, sizeof(buf)) > 0;
  close(fd);
  return ok;
}

struct Stack {
  std::unique_ptr<testing::Topology> topo;
  std::string dir, config, exp, mnt;
  pid_t stord = -1, fs = -1;

  std::vector<std::string> fs_flags;  // extra lego-fs flags

  explicit Stack(std::vector<std::string> flags = {}) : fs_flags(std::move(flags)) {
    private_mounts();
    auto t = testing::Topology::create(2, "stor");
    INFO(t.status().message());
    REQUIRE(t.is_ok());
    topo = std::move(t.value());
    fit::ClusterConfig c = testing::make_cluster(2, "tcp");
    c.timeout = std::chrono::milliseconds(3000);
    c.nodes[0].address = topo->address(0);
    c.nodes[1].address = topo->address(1);
    c.nodes[1].role = fit::Role::kStorage;
    c.nodes[1].server_threads = 2;
    dir = temp_dir("stack");
    config = dir + "/cluster.toml";
    std::ofstream(config) << c.to_toml();
    exp = dir + "/export";
    mnt = dir + "/mnt";
    REQUIRE(mkdir(exp.c_str(), 0755) == 0);
    REQUIRE(mkdir(mnt.c_str(), 0755) == 0);
    start_stord();
    start_fs();
  }

  ~Stack() {
    if (fs > 0) {
      kill(fs, SIGTERM);
      (void)testing::Topology::wait_exit(fs, std::chrono::seconds(10));
    }
    umount2(mnt.c_str(), MNT_DETACH);
    kill_stord();
    (void)!system(("rm -rf '" + dir + "'").c_str());
  }

  void start_stord() {
    int p[2];
    REQUIRE(pipe(p) == 0);
    auto pid = topo->spawn(1, {runfile("daemons/storage/lego-stord"), "--config", config, "--node",
                               "2", "--export", exp, "--ready-fd", std::to_string(p[1])});
    close(p[1]);
    INFO(pid.status().message());
    REQUIRE(pid.is_ok());
    stord = pid.value();
    REQUIRE(wait_ready(p[0]));
  }

  void kill_stord() {
    if (stord > 0) {
      kill(stord, SIGKILL);
      waitpid(stord, nullptr, 0);
      stord = -1;
    }
  }

  void start_fs() {
    int p[2];
    REQUIRE(pipe(p) == 0);
    std::vector<std::string> argv = {
        runfile("runtime/fs/lego-fs"), "--config", config, "--node", "1", "--ready-fd",
        std::to_string(p[1])};
    argv.insert(argv.end(), fs_flags.begin(), fs_flags.end());
    argv.push_back(mnt);
    auto pid = topo->spawn(0, argv);
    close(p[1]);
    INFO(pid.status().message());
    REQUIRE(pid.is_ok());
    fs = pid.value();
    REQUIRE(wait_ready(p[0]));
    struct stat a, b;
    REQUIRE(::stat(mnt.c_str(), &a) == 0);
    REQUIRE(::stat(dir.c_str(), &b) == 0);
    REQUIRE(a.st_dev != b.st_dev);  // the mount is there
  }

  std::string m(const std::string& rel) const { return mnt + "/" + rel; }
  std::string e(const std::string& rel) const { return exp + "/" + rel; }
};

// memcmp that accepts empty ranges (whose pointers may be null).
bool same(const char* a, const char* b, size_t n) {
  return n == 0 || memcmp(a, b, n) == 0;
}

void compare_whole(int fd, const std::vector<char>& ref, int step) {
  struct stat st;
  REQUIRE(fstat(fd, &st) == 0);
  INFO("step " << step);
  REQUIRE(static_cast<size_t>(st.st_size) == ref.size());
  std::vector<char> got(ref.size() + 1);
  ssize_t n = pread(fd, got.data(), got.size(), 0);
  REQUIRE(n == static_cast<ssize_t>(ref.size()));
  REQUIRE(same(got.data(), ref.data(), ref.size()));
}

}  // namespace

TEST_CASE("fsx: random writes, truncates and reads match a local reference", "[fs][e2e]") {
  Stack s;
  std::string path = s.m("fsx.bin");
  int fd = open(path.c_str(), O_CREAT | O_RDWR | O_TRUNC, 0644);
  REQUIRE(fd >= 0);
  std::vector<char> ref;
  std::mt19937_64 rng(20261129);
  const size_t kMaxLen = 512 * 1024;
  const int kOps = 4000;
  for (int step = 0; step < kOps; step++) {
    int op = static_cast<int>(rng() % 100);
    if (op < 45) {  // write at an offset, maybe past the end (a hole)
      size_t off = rng() % kMaxLen, len = 1 + rng() % (64 * 1024);
      if (off + len > kMaxLen) len = kMaxLen - off;
      std::vector<char> data(len);
      for (auto& ch : data) ch = static_cast<char>(rng());
      REQUIRE(pwrite(fd, data.data(), len, static_cast<off_t>(off)) == static_cast<ssize_t>(len));
      if (ref.size() < off + len) ref.resize(off + len, 0);
      memcpy(ref.data() + off, data.data(), len);
    } else if (op < 60) {  // truncate down or up
      size_t len = rng() % kMaxLen;
      REQUIRE(ftruncate(fd, static_cast<off_t>(len)) == 0);
      ref.resize(len, 0);
    } else if (op < 90) {  // read a random range
      size_t off = rng() % (kMaxLen + 1000), len = 1 + rng() % (128 * 1024);
      std::vector<char> got(len);
      ssize_t n = pread(fd, got.data(), len, static_cast<off_t>(off));
      size_t want = off >= ref.size() ? 0 : std::min(len, ref.size() - off);
      INFO("step " << step << " read " << off << "+" << len);
      REQUIRE(n == static_cast<ssize_t>(want));
      REQUIRE(same(got.data(), ref.data() + std::min(off, ref.size()), want));
    } else if (op < 95) {  // close and reopen: drops the kernel's cached pages
      REQUIRE(close(fd) == 0);
      fd = open(path.c_str(), O_RDWR);
      REQUIRE(fd >= 0);
    } else {  // fsync, then the storage node's own copy must match
      REQUIRE(fsync(fd) == 0);
      std::string disk = slurp(s.e("fsx.bin"));
      INFO("step " << step);
      REQUIRE(disk.size() == ref.size());
      REQUIRE(same(disk.data(), ref.data(), ref.size()));
    }
    compare_whole(fd, ref, step);
  }
  REQUIRE(close(fd) == 0);
  std::string disk = slurp(s.e("fsx.bin"));
  REQUIRE(disk == std::string(ref.begin(), ref.end()));
}

TEST_CASE("unmodified programs: sqlite3, tar, cp, mv, rm, ls, python3", "[fs][e2e]") {
  Stack s;
  SECTION("sqlite3 builds a database and it passes integrity_check") {
    for (std::string mode : {"DELETE", "WAL"}) {
      INFO(mode);
      std::string db = s.m("db-" + mode + ".sqlite");
      std::string out = sh("sqlite3 '" + db + "' \"PRAGMA journal_mode=" + mode +
                           ";"
                           "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, n INTEGER);"
                           "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c "
                           "WHERE x<20000) INSERT INTO t(v,n) SELECT hex(randomblob(60)), x "
                           "FROM c;"
                           "CREATE INDEX tn ON t(n);"
                           "UPDATE t SET n=n+1 WHERE id%3=0; DELETE FROM t WHERE id%7=0;\"");
      std::string q =
          sh("sqlite3 '" + db + "' 'SELECT count(*), sum(n) FROM t; PRAGMA integrity_check;'");
      // 20000 rows minus the 2857 multiples of 7; sum(n) over the rest, +1 per multiple
      // of 3 that is not a multiple of 7 (6667 - 952 = 5715).
      long sum = 0;
      for (long x = 1; x <= 20000; x++)
        if (x % 7 != 0) sum += x + (x % 3 == 0 ? 1 : 0);
      CHECK(q == "17143|" + std::to_string(sum) + "\nok\n");
    }
  }
  SECTION("tar in and out, compared with diff -r") {
    std::string src = s.dir + "/src", out = s.dir + "/out";
    sh("mkdir -p '" + src + "/a/b/c' '" + src + "/empty' '" + out + "' && cd '" + src +
       "' && for i in $(seq 1 40); do head -c $((i * 4099)) /dev/urandom > a/f$i; done && "
       "head -c 3000000 /dev/urandom > a/b/big && echo hi > a/b/c/small && "
       "ln -s ../f1 a/b/link && chmod 600 a/f2 && ln a/f3 a/hardlink");
    REQUIRE(mkdir(s.m("tree").c_str(), 0755) == 0);
    sh("tar -C '" + src + "' -cf - . | tar -C '" + s.m("tree") + "' -xf -");
    sh("diff -r '" + src + "' '" + s.m("tree") + "'");
    sh("diff -r '" + src + "' '" + s.e("tree") + "'");  // the storage node's own copy
    sh("tar -C '" + s.m("tree") + "' -cf - . | tar -C '" + out + "' -xf -");
    sh("diff -r '" + src + "' '" + out + "'");
    CHECK(sh("stat -c %a '" + s.m("tree/a/f2") + "'") == "600\n");
    CHECK(sh("readlink '" + s.m("tree/a/b/link") + "'") == "../f1\n");
    CHECK(sh("stat -c %h '" + s.m("tree/a/f3") + "'") == "2\n");
  }
  SECTION("cat, cp, mv, rm, ls, python3") {
    sh("echo hello > '" + s.m("h.txt") + "' && cp '" + s.m("h.txt") + "' '" + s.m("h2.txt") +
       "' && mv '" + s.m("h2.txt") + "' '" + s.m("h3.txt") + "'");
    CHECK(sh("cat '" + s.m("h3.txt") + "'") == "hello\n");
    CHECK(sh("ls '" + s.mnt + "'") == "h.txt\nh3.txt\n");
    sh("rm '" + s.m("h.txt") + "'");
    CHECK(slurp(s.e("h3.txt")) == "hello\n");
    std::string py = s.dir + "/t.py";
    std::ofstream(py) << "import os, sys\n"
                         "d = sys.argv[1]\n"
                         "os.makedirs(d + '/p/q')\n"
                         "with open(d + '/p/q/x.tmp', 'w') as f: f.write('x' * 100000)\n"
                         "os.replace(d + '/p/q/x.tmp', d + '/p/q/x')\n"
                         "assert os.stat(d + '/p/q/x').st_size == 100000\n"
                         "assert os.listdir(d + '/p/q') == ['x']\n"
                         "f = open(d + '/p/q/x'); os.unlink(d + '/p/q/x')\n"
                         "assert len(f.read()) == 100000  # unlinked while open\n"
                         "f.close()\n"
                         "os.rmdir(d + '/p/q'); os.rmdir(d + '/p')\n"
                         "print('py ok')\n";
    CHECK(sh("python3 '" + py + "' '" + s.mnt + "'") == "py ok\n");
  }
}

TEST_CASE("system calls through the mount: errno, offsets past 4 GiB", "[fs][e2e]") {
  Stack s;
  errno = 0;
  CHECK(open(s.m("missing").c_str(), O_RDONLY) == -1);
  CHECK(errno == ENOENT);
  REQUIRE(mkdir(s.m("d").c_str(), 0755) == 0);
  CHECK(mkdir(s.m("d").c_str(), 0755) == -1);
  CHECK(errno == EEXIST);
  int fd = open(s.m("d/f").c_str(), O_CREAT | O_WRONLY, 0644);
  REQUIRE(fd >= 0);
  close(fd);
  CHECK(rmdir(s.m("d").c_str()) == -1);
  CHECK(errno == ENOTEMPTY);
  CHECK(open(s.m("d/f/x").c_str(), O_RDONLY) == -1);
  CHECK(errno == ENOTDIR);
  CHECK(open(s.m("d/f").c_str(), O_CREAT | O_EXCL | O_WRONLY, 0644) == -1);
  CHECK(errno == EEXIST);
  CHECK(rename(s.m("d/f").c_str(), s.m("d/g").c_str()) == 0);

  // Attributes changed through an open file (fchmod, futimens, ftruncate).
  fd = open(s.m("d/g").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  CHECK(fchmod(fd, 0604) == 0);
  CHECK(ftruncate(fd, 12345) == 0);
  timespec times[2] = {{1000000, 5}, {2000000, 7}};  // after ftruncate, which sets mtime
  CHECK(futimens(fd, times) == 0);
  close(fd);
  struct stat gs;
  REQUIRE(::stat(s.e("d/g").c_str(), &gs) == 0);
  CHECK((gs.st_mode & 07777) == 0604);
  CHECK(gs.st_mtim.tv_sec == 2000000);
  CHECK(gs.st_size == 12345);

  fd = open(s.m("sparse").c_str(), O_CREAT | O_RDWR, 0644);
  REQUIRE(fd >= 0);
  const off_t far = (5LL << 30) + 77;
  REQUIRE(pwrite(fd, "far", 3, far) == 3);
  struct stat st;
  REQUIRE(fstat(fd, &st) == 0);
  CHECK(st.st_size == far + 3);
  char buf[4] = {};
  REQUIRE(close(fd) == 0);
  fd = open(s.m("sparse").c_str(), O_RDONLY);
  REQUIRE(pread(fd, buf, 3, far) == 3);
  CHECK(std::string(buf, 3) == "far");
  close(fd);
  REQUIRE(::stat(s.e("sparse").c_str(), &st) == 0);
  CHECK(st.st_size == far + 3);
}

TEST_CASE("fsync'ed data survives a killed and restarted lego-stord; a kill mid-write gives EIO",
          "[fs][e2e]") {
  Stack s;
  std::string data(1 << 20, '\0');
  std::mt19937 rng(5);
  for (auto& ch : data) ch = static_cast<char>(rng());
  int fd = open(s.m("durable").c_str(), O_CREAT | O_WRONLY, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size()));
  REQUIRE(fsync(fd) == 0);
  REQUIRE(close(fd) == 0);
  s.kill_stord();
  CHECK(slurp(s.e("durable")) == data);  // on the storage node's disk

  // With the storage node gone, calls fail with EIO promptly.
  auto t0 = Clock::now();
  struct stat st;
  int rc = ::stat(s.m("durable2").c_str(), &st);
  int e = errno;
  CHECK(rc == -1);
  CHECK(e == EIO);
  CHECK(Clock::now() - t0 < std::chrono::seconds(10));

  // Restarted, it serves the same files again through the same mount.
  s.start_stord();
  fd = -1;
  for (int i = 0; i < 50 && fd < 0; i++) {
    fd = open(s.m("durable").c_str(), O_RDONLY);
    if (fd < 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(fd >= 0);
  std::string back(data.size(), '\0');
  const ssize_t got = pread(fd, back.data(), back.size(), 0);
  INFO("pread: " << (got < 0 ? strerror(errno) : "ok"));
  REQUIRE(got == static_cast<ssize_t>(back.size()));
  CHECK(back == data);
  close(fd);

  // Killed in the middle of a stream of writes: the writer sees EIO, not a hang.
  fd = open(s.m("stream").c_str(), O_CREAT | O_WRONLY, 0644);
  REQUIRE(fd >= 0);
  std::atomic<int> write_errno{0};
  std::atomic<bool> started{false};
  Clock::time_point failed_at;
  std::thread writer([&] {
    std::vector<char> chunk(256 * 1024, 'w');
    for (int i = 0; i < 100000; i++) {
      started = true;
      if (pwrite(fd, chunk.data(), chunk.size(), off_t(i % 64) * off_t(chunk.size())) < 0 ||
          (i % 8 == 0 && fsync(fd) != 0)) {
        write_errno = errno;
        failed_at = Clock::now();
        return;
      }
    }
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  auto killed_at = Clock::now();
  s.kill_stord();
  writer.join();
  CHECK(write_errno == EIO);
  CHECK(failed_at - killed_at < std::chrono::seconds(10));
  close(fd);
  s.start_stord();
}

// Guards sequential read speed: lego-fs sets its mount's readahead to 1 MiB (the kernel
// gives FUSE 128 KiB, which cut every 1 MiB read() into eight one-at-a-time requests).
TEST_CASE("the mount's readahead is 1 MiB", "[fs][e2e]") {
  Stack s;
  struct stat st;
  REQUIRE(::stat(s.mnt.c_str(), &st) == 0);
  std::string knob = "/sys/class/bdi/" + std::to_string(major(st.st_dev)) + ":" +
                     std::to_string(minor(st.st_dev)) + "/read_ahead_kb";
  INFO(knob);
  CHECK(slurp(knob) == "1024\n");
}

// Runs fn as user nobody in a child (fn gets an O_PATH fd of the mount's root: the test's
// temp directory is not searchable by nobody); returns fn's result, or -1.
int as_nobody(const Stack& s, const std::function<int(int)>& fn) {
  int root = open(s.mnt.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root < 0) return -1;
  pid_t pid = fork();
  if (pid == 0) {
    if (setgroups(0, nullptr) != 0 || setresgid(65534, 65534, 65534) != 0 ||
        setresuid(65534, 65534, 65534) != 0) {
      _exit(100);
    }
    _exit(fn(root));
  }
  close(root);
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Guards POSIX's rule that writing or truncating a file as a user without CAP_FSETID
// clears its setuid and setgid bits (a setuid binary must not stay setuid once someone
// else changed it), and truncate(2) by path of a file nobody holds open.
TEST_CASE("a non-owner's write or truncate clears setuid/setgid; truncate by path", "[fs][e2e]") {
  Stack s({"--allow-other"});  // other users in, with the kernel's permission checks
  int fd = open(s.m("suid").c_str(), O_CREAT | O_WRONLY, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, "root", 4) == 4);
  REQUIRE(close(fd) == 0);
  REQUIRE(chown(s.m("suid").c_str(), 0, 100) == 0);  // chown clears the bits: chmod after
  auto mode_in_export = [&] {
    struct stat st;
    REQUIRE(::stat(s.e("suid").c_str(), &st) == 0);
    return st.st_mode & 07777;
  };

  REQUIRE(chmod(s.m("suid").c_str(), 06777) == 0);
  REQUIRE(mode_in_export() == 06777);
  CHECK(as_nobody(s, [](int root) {
          int f = openat(root, "suid", O_WRONLY | O_APPEND);
          return f >= 0 && write(f, "user", 4) == 4 && close(f) == 0 ? 0 : 1;
        }) == 0);
  CHECK(mode_in_export() == 0777);

  REQUIRE(chmod(s.m("suid").c_str(), 06777) == 0);
  CHECK(as_nobody(s, [](int root) {
          std::string path = "/proc/self/fd/" + std::to_string(root) + "/suid";
          return truncate(path.c_str(), 2) == 0 ? 0 : 1;
        }) == 0);
  CHECK(mode_in_export() == 0777);

  // Size by path, the file not open anywhere: grows with zeros, then shrinks.
  REQUIRE(truncate(s.m("suid").c_str(), 100000) == 0);
  std::string data = slurp(s.e("suid"));
  CHECK(data.size() == 100000);
  CHECK(data.substr(0, 2) == "ro");
  CHECK(data.find_first_not_of('\0', 2) == std::string::npos);
  REQUIRE(truncate(s.m("suid").c_str(), 3) == 0);
  CHECK(slurp(s.e("suid")) == std::string("ro\0", 3));
  struct stat st;
  REQUIRE(::stat(s.m("suid").c_str(), &st) == 0);
  CHECK(st.st_size == 3);
}
