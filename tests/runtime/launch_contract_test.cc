// Tests of the launch contract's formats (runtime/launch_contract.h): what lego-run and the
// preloaded runtime write for each other parses back, malformed text is refused, and
// process_gone tells a process that ended from one that runs (pid reuse, zombies, and a
// zombie leader whose other threads still run). The settings lego-run exports are the
// ones the runtime reads (unset ones give the contract's defaults, bad ones are refused
// naming the variable), and the "stats" report carries every counter of the one list
// (LEGO_EXCACHE_COUNTERS) and fits one pipe write.
#include "runtime/launch_contract.h"

#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

namespace {

using namespace lego;

mem::SpaceHandle some_handle() {
  mem::SpaceHandle h{};
  h.id = 1234567890123ull;
  for (int i = 0; i < 16; i++) h.secret[i] = static_cast<uint8_t>(0xf0 + i);
  return h;
}

TEST_CASE("a space line parses back; malformed ones are refused") {
  char line[128];
  const mem::SpaceHandle h = some_handle();
  const int n = launch::format_space_line(line, sizeof line, 7, h);
  REQUIRE(n > 0);
  CHECK(std::string(line) == "space 7 1234567890123 f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff\n");
  uint32_t node = 0;
  mem::SpaceHandle back{};
  REQUIRE(launch::parse_space_line(line, &node, &back));
  CHECK(node == 7);
  CHECK(back.id == h.id);
  CHECK(memcmp(back.secret, h.secret, sizeof h.secret) == 0);
  CHECK(launch::format_space_line(line, 40, 7, h) == -1);  // does not fit
  for (const char* bad :
       {"", "space 7 1", "space 7 1 f0f1", "space x 1 f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
        "space 7 1 f0f1f2f3f4f5f6f7f8f9fafbfcfdfeffaa",
        "space 7 1 g0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
        "space 7 1 f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff junk"}) {
    INFO(bad);
    CHECK_FALSE(launch::parse_space_line(bad, &node, &back));
  }
}

TEST_CASE("a space file's name parses back; other names are not space files") {
  char name[64];
  REQUIRE(launch::format_space_file_name(name, sizeof name, 4242, 987654, 31) > 0);
  CHECK(std::string(name) == "space.4242.987654.31");
  pid_t pid = 0;
  uint64_t start = 0, id = 0;
  REQUIRE(launch::parse_space_file_name(name, &pid, &start, &id));
  CHECK((pid == 4242 && start == 987654 && id == 31));
  for (const char* bad : {"run", "report", ".space.4242.987654.31", "space.4242.987654",
                          "space.0.1.2", "space.4242.987654.31.tmp", "space.-1.2.3"}) {
    INFO(bad);
    CHECK_FALSE(launch::parse_space_file_name(bad, &pid, &start, &id));
  }
}

TEST_CASE("the run file parses back; one with a field missing is refused") {
  launch::RunInfo info;
  info.pid = 99;
  info.start = 12345;
  info.config = "/etc/lego/cluster.toml";
  info.node = 1;
  info.memory_node = 7;
  info.private_memory = true;
  const std::string text = launch::format_run_info(info);
  launch::RunInfo back;
  REQUIRE(launch::parse_run_info(text, &back));
  CHECK((back.pid == 99 && back.start == 12345 && back.config == info.config && back.node == 1 &&
         back.memory_node == 7 && back.private_memory));
  // A newer lego-run's extra key is ignored.
  CHECK(launch::parse_run_info(text + "future 1\n", &back));
  const std::string no_node =
      text.substr(0, text.find("node ")) + text.substr(text.find('\n', text.find("node ")) + 1);
  CHECK_FALSE(launch::parse_run_info(no_node, &back));
  CHECK_FALSE(launch::parse_run_info("pid x\n", &back));
  info.config = "relative.toml";
  CHECK_FALSE(launch::parse_run_info(launch::format_run_info(info), &back));
}

TEST_CASE("process_gone: this process runs, another start time is another process") {
  const launch::ProcessInfo self = launch::process_info(getpid());
  REQUIRE(self.exists);
  CHECK(self.start > 0);
  CHECK(self.threads >= 1);
  CHECK_FALSE(launch::process_gone(getpid(), self.start));
  CHECK(launch::process_gone(getpid(), self.start + 1));  // a pid reused
}

TEST_CASE("process_gone: an exited child is gone as a zombie and after it was reaped") {
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) _exit(0);
  const uint64_t start = launch::process_info(child).start;
  // Until it has exited (a zombie, not reaped yet).
  bool zombie = false;
  for (int i = 0; i < 2000 && !zombie; i++) {
    zombie = launch::process_info(child).state == 'Z';
    if (!zombie) usleep(1000);
  }
  REQUIRE(zombie);
  CHECK(launch::process_gone(child, start));
  waitpid(child, nullptr, 0);
  CHECK(launch::process_gone(child, start));
}

void* run_briefly(void*) {
  usleep(500 * 1000);
  return nullptr;
}

TEST_CASE("process_gone: a zombie leader whose other thread still runs is alive") {
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    pthread_t t;
    if (pthread_create(&t, nullptr, run_briefly, nullptr) != 0) _exit(1);
    // The main thread ends; the process goes on in `t`. (SYS_exit ends the calling thread
    // alone, with no unwinding through the test framework's frames, as pthread_exit does.)
    syscall(SYS_exit, 0);
  }
  const uint64_t start = launch::process_info(child).start;
  bool leader_zombie = false;
  for (int i = 0; i < 400 && !leader_zombie; i++) {
    const launch::ProcessInfo p = launch::process_info(child);
    leader_zombie = p.state == 'Z' && p.threads > 1;
    if (!leader_zombie) usleep(1000);
  }
  REQUIRE(leader_zombie);
  CHECK_FALSE(launch::process_gone(child, start));
  int status = 0;
  waitpid(child, &status, 0);  // returns once the last thread ended
  CHECK(launch::process_gone(child, start));
}

// The LEGO_* variables as the runtime finds them, cleared after each case.
void clear_environment() {
  for (const char* v : {"LEGO_CONFIG", "LEGO_NODE", "LEGO_MEMORY_NODE", "LEGO_REPLICAS",
                        "LEGO_EXCACHE", "LEGO_REGION", "LEGO_POLICY", "LEGO_PREFETCH",
                        "LEGO_DELIVERY", "LEGO_PCACHE", "LEGO_RMA", "LEGO_RUN_DIR"}) {
    unsetenv(v);
  }
}

TEST_CASE("the settings lego-run exports are the ones the runtime reads") {
  clear_environment();
  CHECK_FALSE(launch::under_lego_run());
  launch::Settings out;
  out.config = "/etc/lego/cluster.toml";
  out.node = 3;
  out.memory_node = 9;
  out.replicas = 2;
  out.excache_bytes = 8 << 20;
  out.policy = "clock";
  out.prefetch_lines = 0;
  out.delivery = "sigbus";
  out.pcache = "off";
  out.rma = "on";
  out.run_dir = "/tmp/lego-run-1";
  launch::export_settings(out);
  CHECK(launch::under_lego_run());
  CHECK(launch::run_dir_from_environment() == "/tmp/lego-run-1");
  auto in = launch::settings_from_environment();
  REQUIRE(in.is_ok());
  const launch::Settings& s = in.value();
  CHECK((s.config == out.config && s.node == 3 && s.memory_node == 9 && s.replicas == 2 &&
         s.excache_bytes == out.excache_bytes && s.policy == "clock" && s.prefetch_lines == 0 &&
         s.delivery == "sigbus" && s.pcache == "off" && s.rma == "on" && s.run_dir == out.run_dir));
  CHECK(s.region_bytes == launch::kDefaultRegionBytes);
  const ExCacheOptions o = launch::excache_options(s);
  CHECK((o.capacity_bytes == out.excache_bytes && o.policy == ExCacheOptions::Policy::kClock &&
         o.prefetch_lines == 0 && o.delivery == ExCacheOptions::Delivery::kSigbus &&
         o.kernel_module == ExCacheOptions::KernelModule::kOff));
  clear_environment();
}

TEST_CASE("unset settings are the contract's defaults, the ExCache's where it has them") {
  clear_environment();
  setenv("LEGO_CONFIG", "/c.toml", 1);
  auto in = launch::settings_from_environment();
  REQUIRE(in.is_ok());
  const ExCacheOptions o = launch::excache_options(in.value());
  CHECK(o.capacity_bytes == ExCacheOptions{}.capacity_bytes);
  CHECK(o.prefetch_lines == ExCacheOptions{}.prefetch_lines);
  CHECK(o.region_bytes == launch::kDefaultRegionBytes);
  // lego-run's own choices: refault (fewer misses in real programs) and the handler.
  CHECK(o.policy == ExCacheOptions::Policy::kRefault);
  CHECK(o.delivery == ExCacheOptions::Delivery::kHandlerThread);
  CHECK(o.kernel_module == ExCacheOptions::KernelModule::kAuto);
  CHECK(in.value().rma == "auto");
  clear_environment();
}

TEST_CASE("a setting out of the contract is refused, naming its variable") {
  struct Case {
    const char* name;
    const char* value;
  } cases[] = {{"LEGO_EXCACHE", "lots"}, {"LEGO_REGION", "1X"},  {"LEGO_PREFETCH", "32"},
               {"LEGO_NODE", "70000"},   {"LEGO_POLICY", "lru"}, {"LEGO_DELIVERY", "thread"},
               {"LEGO_PCACHE", "yes"},   {"LEGO_RMA", "always"}};
  for (auto& c : cases) {
    INFO(c.name << "=" << c.value);
    clear_environment();
    setenv("LEGO_CONFIG", "/c.toml", 1);
    setenv(c.name, c.value, 1);
    auto in = launch::settings_from_environment();
    CHECK(in.status().code() == EINVAL);
    CHECK(in.status().message().find(c.name) != std::string::npos);
  }
  clear_environment();
}

TEST_CASE("the stats report carries every counter and gauge, and fits one pipe write") {
  ExCacheStats s;
  uint64_t v = 1;
  for (const ExCacheStatsField& f : kExCacheStatsFields) s.*f.field = v++;
  // Every histogram bucket in use and large: the longest report there can be.
  for (auto& b : s.miss_latency_log2_ns) b = ~uint64_t{0};
  s.miss_p50_ns = 1024;
  s.miss_p99_ns = 65536;
  char buf[PIPE_BUF];
  const int n = launch::format_stats_report(buf, sizeof buf, 4242, "python3", s, true);
  REQUIRE(n > 0);
  const std::string text(buf, static_cast<size_t>(n));
  REQUIRE(text.rfind("stats pid 4242 program python3\n", 0) == 0);
  REQUIRE(text.size() >= 4);
  CHECK(text.substr(text.size() - 4) == "end\n");
  // As lego-run reads it: the block between "stats " and "end".
  const launch::StatsReport r = launch::parse_stats_report(text.substr(6, text.size() - 6 - 4));
  CHECK(r.head == "pid 4242 program python3");
  v = 1;
  for (const ExCacheStatsField& f : kExCacheStatsFields) {
    INFO(f.name);
    CHECK(r.number(f.name) == v++);
  }
  CHECK(r.number("kernel_module") == 1);
  CHECK(r.number("miss_p99_ns") == 65536);
  CHECK(r.text("miss_histogram").rfind("0:18446744073709551615,1:", 0) == 0);
  CHECK(r.number("no_such_key") == 0);
  CHECK(launch::format_stats_report(buf, 100, 4242, "python3", s, true) == -1);
  // The backend's counters follow, by name.
  const launch::StatsValue extra[] = {{"nodes_lost", 1}, {"failovers", 42}};
  const int m = launch::format_stats_report(buf, sizeof buf, 7, "sqlite3", s, true, extra, 2);
  REQUIRE(m > 0);
  const std::string t2(buf, static_cast<size_t>(m));
  const launch::StatsReport r2 = launch::parse_stats_report(t2.substr(6, t2.size() - 6 - 4));
  CHECK(r2.number("nodes_lost") == 1);
  CHECK(r2.number("failovers") == 42);
  // No misses: the histogram is "-".
  ExCacheStats none;
  REQUIRE(launch::format_stats_report(buf, sizeof buf, 1, "true", none, false) > 0);
  CHECK(std::string(buf).find("\nmiss_histogram -\nend\n") != std::string::npos);
}

}  // namespace
