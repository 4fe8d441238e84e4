// The launch contract's formats (runtime/launch_contract.h): what lego-run and the
// preloaded runtime write for each other, parsed by the other side.
#include "runtime/launch_contract.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "lego/units.h"

namespace lego::launch {

std::string run_dir_for(pid_t lego_run_pid) {
  return kRunDirPrefix + std::to_string(lego_run_pid);
}

namespace {

constexpr char kEnvConfig[] = "LEGO_CONFIG";
constexpr char kEnvNode[] = "LEGO_NODE";
constexpr char kEnvMemoryNode[] = "LEGO_MEMORY_NODE";
constexpr char kEnvReplicas[] = "LEGO_REPLICAS";
constexpr char kEnvExcache[] = "LEGO_EXCACHE";
constexpr char kEnvRegion[] = "LEGO_REGION";
constexpr char kEnvPolicy[] = "LEGO_POLICY";
constexpr char kEnvPrefetch[] = "LEGO_PREFETCH";
constexpr char kEnvDelivery[] = "LEGO_DELIVERY";
constexpr char kEnvPcache[] = "LEGO_PCACHE";
constexpr char kEnvRma[] = "LEGO_RMA";
constexpr char kEnvFork[] = "LEGO_FORK_CHILDREN";
constexpr char kEnvRunDir[] = "LEGO_RUN_DIR";

// Reads variable `name` into *out when set; EINVAL names it when its value is bad.
Status read_number(const char* name, long lo, long hi, long* out) {
  const char* v = getenv(name);
  if (v == nullptr) return Status::ok();
  auto n = parse_int(v, name, lo, hi);
  if (!n) return n.status();
  *out = n.value();
  return Status::ok();
}

Status read_size(const char* name, uint64_t* out) {
  const char* v = getenv(name);
  if (v == nullptr) return Status::ok();
  auto n = parse_size(v, name);
  if (!n) return n.status();
  *out = n.value();
  return Status::ok();
}

template <size_t N>
Status read_choice(const char* name, const char* const (&choices)[N], std::string* out) {
  const char* v = getenv(name);
  if (v == nullptr) return Status::ok();
  for (const char* c : choices) {
    if (strcmp(v, c) == 0) {
      *out = v;
      return Status::ok();
    }
  }
  return Status(EINVAL, std::string(name) + ": '" + v + "' is not one lego-run gives");
}

}  // namespace

void export_settings(const Settings& s) {
  setenv(kEnvConfig, s.config.c_str(), 1);
  setenv(kEnvNode, std::to_string(s.node).c_str(), 1);
  setenv(kEnvMemoryNode, std::to_string(s.memory_node).c_str(), 1);
  setenv(kEnvReplicas, std::to_string(s.replicas).c_str(), 1);
  setenv(kEnvExcache, std::to_string(s.excache_bytes).c_str(), 1);
  setenv(kEnvPolicy, s.policy.c_str(), 1);
  setenv(kEnvPrefetch, std::to_string(s.prefetch_lines).c_str(), 1);
  setenv(kEnvDelivery, s.delivery.c_str(), 1);
  setenv(kEnvPcache, s.pcache.c_str(), 1);
  setenv(kEnvRma, s.rma.c_str(), 1);
  setenv(kEnvFork, s.fork_children.c_str(), 1);
  setenv(kEnvRunDir, s.run_dir.c_str(), 1);
}

bool under_lego_run() {
  return getenv(kEnvConfig) != nullptr;
}

std::string run_dir_from_environment() {
  const char* v = getenv(kEnvRunDir);
  return v != nullptr ? v : "";
}

Result<Settings> settings_from_environment() {
  Settings s;
  if (const char* v = getenv(kEnvConfig)) s.config = v;
  s.run_dir = run_dir_from_environment();
  long node = 0, memory = 0, replicas = 0;
  LEGO_RETURN_IF_ERROR(read_number(kEnvNode, 0, 65535, &node));
  LEGO_RETURN_IF_ERROR(read_number(kEnvMemoryNode, 0, 65535, &memory));
  s.node = static_cast<uint32_t>(node);
  s.memory_node = static_cast<uint32_t>(memory);
  // mon::kMaxReplicas; the runtime says when the cluster has fewer memory nodes.
  LEGO_RETURN_IF_ERROR(read_number(kEnvReplicas, 0, 4, &replicas));
  s.replicas = static_cast<uint32_t>(replicas);
  LEGO_RETURN_IF_ERROR(read_size(kEnvExcache, &s.excache_bytes));
  LEGO_RETURN_IF_ERROR(read_size(kEnvRegion, &s.region_bytes));
  LEGO_RETURN_IF_ERROR(read_number(kEnvPrefetch, 0, kMaxPrefetchLines, &s.prefetch_lines));
  LEGO_RETURN_IF_ERROR(read_choice(kEnvPolicy, kPolicies, &s.policy));
  LEGO_RETURN_IF_ERROR(read_choice(kEnvDelivery, kDeliveries, &s.delivery));
  LEGO_RETURN_IF_ERROR(read_choice(kEnvPcache, kPcacheModes, &s.pcache));
  LEGO_RETURN_IF_ERROR(read_choice(kEnvRma, kRmaModes, &s.rma));
  LEGO_RETURN_IF_ERROR(read_choice(kEnvFork, kForkModes, &s.fork_children));
  return s;
}

ExCacheOptions excache_options(const Settings& s) {
  ExCacheOptions o;
  o.capacity_bytes = s.excache_bytes;
  o.region_bytes = s.region_bytes;
  o.policy = s.policy == "clock"     ? ExCacheOptions::Policy::kClock
             : s.policy == "refault" ? ExCacheOptions::Policy::kRefault
                                     : ExCacheOptions::Policy::kFifo;
  o.prefetch_lines = static_cast<uint32_t>(s.prefetch_lines);
  o.delivery = s.delivery == "sigbus" ? ExCacheOptions::Delivery::kSigbus
                                      : ExCacheOptions::Delivery::kHandlerThread;
  o.kernel_module = s.pcache == "on"    ? ExCacheOptions::KernelModule::kRequire
                    : s.pcache == "off" ? ExCacheOptions::KernelModule::kOff
                                        : ExCacheOptions::KernelModule::kAuto;
  return o;
}

std::string format_run_info(const RunInfo& info) {
  return "pid " + std::to_string(info.pid) + "\nstart " + std::to_string(info.start) + "\nconfig " +
         info.config + "\nnode " + std::to_string(info.node) + "\nmemory_node " +
         std::to_string(info.memory_node) + "\nprivate_memory " +
         (info.private_memory ? "1" : "0") + "\n";
}

bool parse_run_info(const std::string& text, RunInfo* info) {
  std::istringstream in(text);
  std::string line;
  int seen = 0;
  while (std::getline(in, line)) {
    const size_t sp = line.find(' ');
    if (sp == std::string::npos) return false;
    const std::string key = line.substr(0, sp), value = line.substr(sp + 1);
    char* end = nullptr;
    errno = 0;
    const unsigned long long n = strtoull(value.c_str(), &end, 10);
    const bool number = errno == 0 && end != value.c_str() && *end == '\0';
    if (key == "config") {
      if (value.empty() || value[0] != '/') return false;
      info->config = value;
      seen |= 1;
    } else if (!number) {
      return false;
    } else if (key == "pid") {
      info->pid = static_cast<pid_t>(n);
      seen |= 2;
    } else if (key == "start") {
      info->start = n;
      seen |= 4;
    } else if (key == "node") {
      info->node = static_cast<uint32_t>(n);
      seen |= 8;
    } else if (key == "memory_node") {
      info->memory_node = static_cast<uint32_t>(n);
      seen |= 16;
    } else if (key == "private_memory") {
      info->private_memory = n != 0;
      seen |= 32;
    }  // unknown keys: written by a newer lego-run; ignored
  }
  return seen == 63 && info->pid > 0;
}

int format_space_line(char* buf, size_t cap, uint32_t node, const mem::SpaceHandle& handle) {
  int n = snprintf(buf, cap, "space %" PRIu32 " %" PRIu64 " ", node, handle.id);
  for (uint8_t b : handle.secret) {
    if (n < 0 || static_cast<size_t>(n) >= cap) return -1;
    n += snprintf(buf + n, cap - static_cast<size_t>(n), "%02x", b);
  }
  if (n < 0 || static_cast<size_t>(n) + 1 >= cap) return -1;
  buf[n++] = '\n';
  buf[n] = '\0';
  return n;
}

bool parse_space_line(const std::string& line, uint32_t* node, mem::SpaceHandle* handle) {
  unsigned n = 0;
  unsigned long long id = 0;
  char secret[40] = {};
  int used = 0;
  if (sscanf(line.c_str(), "space %u %llu %33s%n", &n, &id, secret, &used) != 3 ||
      strlen(secret) != 2 * sizeof(handle->secret)) {
    return false;
  }
  for (size_t i = used; i < line.size(); i++) {
    if (line[i] != '\n') return false;  // trailing text: not a line we wrote
  }
  for (size_t i = 0; i < sizeof(handle->secret); i++) {
    unsigned b = 0;
    if (sscanf(secret + 2 * i, "%2x", &b) != 1) return false;
    handle->secret[i] = static_cast<uint8_t>(b);
  }
  *node = n;
  handle->id = id;
  return true;
}

int format_space_file_name(char* buf, size_t cap, pid_t pid, uint64_t start, uint64_t id) {
  const int n = snprintf(buf, cap, "%s%d.%" PRIu64 ".%" PRIu64, kSpaceFilePrefix,
                         static_cast<int>(pid), start, id);
  return n < 0 || static_cast<size_t>(n) >= cap ? -1 : n;
}

bool parse_space_file_name(const char* name, pid_t* pid, uint64_t* start, uint64_t* id) {
  const size_t prefix = strlen(kSpaceFilePrefix);
  if (strncmp(name, kSpaceFilePrefix, prefix) != 0) return false;
  long p = 0;
  unsigned long long s = 0, i = 0;
  int used = 0;
  if (sscanf(name + prefix, "%ld.%llu.%llu%n", &p, &s, &i, &used) != 3 || p <= 0 ||
      name[prefix + used] != '\0') {
    return false;
  }
  *pid = static_cast<pid_t>(p);
  *start = s;
  *id = i;
  return true;
}

int format_stats_report(char* buf, size_t cap, pid_t pid, const char* program,
                        const ExCacheStats& stats, bool kernel_module, const StatsValue* extra,
                        size_t extra_count) {
  size_t used = 0;
  auto put = [&](const char* fmt, auto... args) {
    if (used >= cap) return;
    const int n = snprintf(buf + used, cap - used, fmt, args...);
    used = n < 0 ? cap : used + static_cast<size_t>(n);
  };
  put("stats pid %d program %s\nhits n/a\n", static_cast<int>(pid), program);
  for (const ExCacheStatsField& f : kExCacheStatsFields) {
    put("%s %" PRIu64 "\n", f.name, stats.*f.field);
  }
  put("miss_p50_ns %" PRIu64 "\nmiss_p99_ns %" PRIu64 "\nkernel_module %d\nmiss_histogram ",
      stats.miss_p50_ns, stats.miss_p99_ns, kernel_module ? 1 : 0);
  // "bucket:count,..." for the non-empty log2(ns) buckets.
  bool any = false;
  for (size_t b = 0; b < stats.miss_latency_log2_ns.size(); ++b) {
    if (stats.miss_latency_log2_ns[b] == 0) continue;
    put("%s%zu:%" PRIu64, any ? "," : "", b, stats.miss_latency_log2_ns[b]);
    any = true;
  }
  put("%s\n", any ? "" : "-");
  for (size_t i = 0; i < extra_count; i++) put("%s %" PRIu64 "\n", extra[i].name, extra[i].value);
  put("end\n");
  return used < cap ? static_cast<int>(used) : -1;
}

uint64_t StatsReport::number(const std::string& key) const {
  const std::string v = text(key);
  char* end = nullptr;
  const unsigned long long n = strtoull(v.c_str(), &end, 10);
  return end != v.c_str() && *end == '\0' ? n : 0;
}

std::string StatsReport::text(const std::string& key) const {
  for (const auto& [k, v] : values) {
    if (k == key) return v;
  }
  return "";
}

StatsReport parse_stats_report(const std::string& block) {
  StatsReport r;
  std::istringstream in(block);
  std::getline(in, r.head);
  for (std::string line; std::getline(in, line);) {
    const size_t sp = line.find(' ');
    if (sp != std::string::npos) r.values.emplace_back(line.substr(0, sp), line.substr(sp + 1));
  }
  return r;
}

ProcessInfo process_info(pid_t pid) {
  ProcessInfo info;
  char path[32];
  snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return info;
  char buf[1024];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return info;
  buf[n] = '\0';
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so fields are
  // counted from its last ')'. After it: state is field 3, num_threads 20, starttime 22.
  const char* p = strrchr(buf, ')');
  if (p == nullptr || p[1] != ' ') return info;
  p += 2;
  info.state = *p;
  for (int field = 3; field < 22 && *p != '\0'; field++) {
    p = strchr(p, ' ');
    if (p == nullptr) return info;
    ++p;
    if (field + 1 == 20) info.threads = strtol(p, nullptr, 10);
  }
  info.start = strtoull(p, nullptr, 10);
  info.exists = true;
  return info;
}

bool process_gone(pid_t pid, uint64_t start) {
  const ProcessInfo p = process_info(pid);
  if (!p.exists || p.start != start) return true;
  return (p.state == 'Z' || p.state == 'X') && p.threads <= 1;
}

}  // namespace lego::launch
