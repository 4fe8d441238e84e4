// ClusterConfig: the cluster file (TOML, schema in include/lego/fit.h), parsed with
// Debian's tomlplusplus.
//
// The file is hand-written by operators, so the parser is strict: unknown keys, wrong
// types and out-of-range values are errors rather than silently ignored or clamped, and
// every error says where it is ("cluster.toml:12: node.port: 70000 is out of range
// 1..65535") so it can be fixed without reading this code.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <initializer_list>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <toml++/toml.h>

#include "lego/fit.h"
#include "lego/status.h"

namespace lego::fit {
namespace {

constexpr size_t kKeyBytes = 32;
constexpr char kHexDigits[] = "0123456789abcdef";
// How many names role_name(), progress_name() and provider_name() know: the enums' last
// value plus one.
constexpr int kRoles = static_cast<int>(Role::kMonitor) + 1;
constexpr int kProgressModes = static_cast<int>(Progress::kBlocking) + 1;
constexpr int kProviders = static_cast<int>(Provider::kVerbs) + 1;
// Limits on what we read, so that a wrong path (/dev/zero, a disk image) fails quickly
// instead of filling memory.
constexpr size_t kMaxClusterFileBytes = 16 << 20;
constexpr size_t kMaxKeyFileBytes = 4096;

// Reads all of `path`, described as `what` in errors. Errors keep the errno (ENOENT,
// EACCES, EISDIR...): it tells the operator more than a generic EINVAL would.
Result<std::string> read_whole_file(const std::string& path, const std::string& what,
                                    size_t max_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::from_errno(errno, "cannot open " + what + " " + path);
  std::string text;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      return Status::from_errno(err, "cannot read " + what + " " + path);
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (text.size() > max_bytes) {
      ::close(fd);
      return Status(EFBIG,
                    what + " " + path + " is larger than " + std::to_string(max_bytes) + " bytes");
    }
  }
  ::close(fd);
  return text;
}

// "origin:line: field: what", the one shape of every config error. line 0 means the
// error concerns the whole document (e.g. no [[node]] at all), which has no line.
Status invalid(const std::string& origin, int line, std::string_view field,
               const std::string& what) {
  std::string message = origin;
  if (line > 0) message += ":" + std::to_string(line);
  message += ": ";
  message += field;
  message += ": ";
  message += what;
  return Status(EINVAL, std::move(message));
}

int source_line(const toml::node& node) {
  return static_cast<int>(node.source().begin.line);
}

const char* type_name(toml::node_type type) {
  switch (type) {
    case toml::node_type::none:
      return "nothing";
    case toml::node_type::table:
      return "a table";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a float";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::date:
      return "a date";
    case toml::node_type::time:
      return "a time";
    case toml::node_type::date_time:
      return "a date-time";
  }
  return "an unknown type";
}

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

std::string join(std::initializer_list<std::string_view> names, std::string_view separator) {
  std::string out;
  for (std::string_view name : names) {
    if (!out.empty()) out += separator;
    out += name;
  }
  return out;
}

// One table of the cluster file ([cluster] or one [[node]]), read field by field. An error
// points at the field's own line when the field is present, and at the table's header
// when it is missing.
class TableReader {
 public:
  TableReader(const std::string& origin, std::string_view name, const toml::table& table)
      : origin_(origin), name_(name), table_(table) {}

  int line() const { return source_line(table_); }
  int line_of(std::string_view key) const {
    const toml::node* node = table_.get(key);
    return node ? source_line(*node) : line();
  }
  bool has(std::string_view key) const { return table_.contains(key); }

  Status error(std::string_view key, const std::string& what) const {
    return invalid(origin_, line_of(key), name_ + "." + std::string(key), what);
  }

  // Checked before any field is read: a misspelt optional key would otherwise be ignored
  // (keeping the default the operator meant to change), and a misspelt required one would
  // be reported as missing, which hides the typo.
  Status check_keys(std::initializer_list<std::string_view> allowed) const {
    for (auto&& [key, value] : table_) {
      bool known = false;
      for (std::string_view a : allowed) known = known || key.str() == a;
      if (!known) {
        return invalid(origin_, static_cast<int>(key.source().begin.line),
                       name_ + "." + std::string(key.str()),
                       "unknown key (expected one of " + join(allowed, ", ") + ")");
      }
    }
    return Status::ok();
  }

  Status require(std::string_view key, const std::string& why = "") const {
    if (has(key)) return Status::ok();
    return error(key, "missing" + (why.empty() ? "" : " (" + why + ")"));
  }

  // Leaves `out` unchanged (the default) when the key is absent.
  Status read_int(std::string_view key, int64_t min, int64_t max, int64_t& out) const {
    const toml::node* node = table_.get(key);
    if (!node) return Status::ok();
    const toml::value<int64_t>* value = node->as_integer();
    if (!value) {
      return error(key, std::string("expected an integer, got ") + type_name(node->type()));
    }
    int64_t v = value->get();
    if (v < min || v > max) {
      return error(key, std::to_string(v) + " is out of range " + std::to_string(min) + ".." +
                            std::to_string(max));
    }
    out = v;
    return Status::ok();
  }

  Status read_string(std::string_view key, std::string& out) const {
    const toml::node* node = table_.get(key);
    if (!node) return Status::ok();
    const toml::value<std::string>* value = node->as_string();
    if (!value) return error(key, std::string("expected a string, got ") + type_name(node->type()));
    out = value->get();
    return Status::ok();
  }

  // Reads one of the names name(Enum(0)) .. name(Enum(count-1)): the enum's own name
  // function is the one list of valid spellings.
  template <typename Enum>
  Status read_enum(std::string_view key, const char* (*name)(Enum), int count, Enum& out) const {
    if (!has(key)) return Status::ok();
    std::string text;
    LEGO_RETURN_IF_ERROR(read_string(key, text));
    std::string choices;
    for (int i = 0; i < count; i++) {
      Enum candidate = static_cast<Enum>(i);
      if (text == name(candidate)) {
        out = candidate;
        return Status::ok();
      }
      choices += (i ? " | " : "") + std::string(name(candidate));
    }
    return error(key, in_quotes(text) + " is not one of " + choices);
  }

 private:
  const std::string& origin_;
  std::string name_;
  const toml::table& table_;
};

// The key is a secret: errors describe what is wrong with it but never echo it.
Result<std::vector<uint8_t>> decode_key(std::string_view hex) {
  if (hex.size() != 2 * kKeyBytes) {
    return Status(EINVAL, "must be " + std::to_string(2 * kKeyBytes) + " hex digits (" +
                              std::to_string(kKeyBytes) + " bytes), got " +
                              std::to_string(hex.size()) + " characters");
  }
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::vector<uint8_t> bytes(kKeyBytes);
  for (size_t i = 0; i < kKeyBytes; i++) {
    int hi = digit(hex[2 * i]);
    int lo = digit(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      return Status(
          EINVAL, "character " + std::to_string(2 * i + (hi < 0 ? 1 : 2)) + " is not a hex digit");
    }
    bytes[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return bytes;
}

std::string_view trim(std::string_view s) {
  constexpr std::string_view kSpace = " \t\r\n\v\f";
  size_t begin = s.find_first_not_of(kSpace);
  if (begin == std::string_view::npos) return {};
  size_t end = s.find_last_not_of(kSpace);
  return s.substr(begin, end - begin + 1);
}

// key = "hex" or key_file = "path": exactly one. A relative key_file is relative to the
// cluster file's directory, so a cluster file and its key can move together.
Status read_key(const TableReader& cluster, const std::filesystem::path& base_dir,
                std::vector<uint8_t>& key) {
  bool inline_key = cluster.has("key");
  bool key_file = cluster.has("key_file");
  if (inline_key && key_file) return cluster.error("key_file", "set key or key_file, not both");
  if (!inline_key && !key_file) return cluster.error("key", "missing (set key or key_file)");

  if (inline_key) {
    std::string hex;
    LEGO_RETURN_IF_ERROR(cluster.read_string("key", hex));
    Result<std::vector<uint8_t>> decoded = decode_key(hex);
    if (!decoded.is_ok()) return cluster.error("key", decoded.status().message());
    key = std::move(decoded).value();
    return Status::ok();
  }

  std::string file;
  LEGO_RETURN_IF_ERROR(cluster.read_string("key_file", file));
  if (file.empty()) return cluster.error("key_file", "is empty");
  std::string path = (base_dir / file).string();
  Result<std::string> text = read_whole_file(path, "key file", kMaxKeyFileBytes);
  if (!text.is_ok()) {
    // Keeps the errno: EACCES (a root-only key file) is the usual cause.
    Status read_error = text.status();
    return Status(read_error.code(), cluster.error("key_file", read_error.message()).message());
  }
  Result<std::vector<uint8_t>> decoded = decode_key(trim(*text));
  if (!decoded.is_ok()) return cluster.error("key_file", path + ": " + decoded.status().message());
  key = std::move(decoded).value();
  return Status::ok();
}

Status read_cluster(const TableReader& cluster, const std::filesystem::path& base_dir,
                    ClusterConfig& config) {
  LEGO_RETURN_IF_ERROR(
      cluster.check_keys({"key", "key_file", "channels_per_peer", "timeout_ms", "max_message_bytes",
                          "replicas", "heartbeat_ms", "lost_after_ms", "monitor_wait_ms"}));
  LEGO_RETURN_IF_ERROR(read_key(cluster, base_dir, config.key));

  // Defaults are whatever fit.h initialises the fields to.
  int64_t channels = config.channels_per_peer;
  int64_t timeout_ms = config.timeout.count();
  int64_t max_message = static_cast<int64_t>(config.max_message_bytes);
  LEGO_RETURN_IF_ERROR(cluster.read_int("channels_per_peer", 1, 64, channels));
  LEGO_RETURN_IF_ERROR(cluster.read_int("timeout_ms", 1, 3600 * 1000, timeout_ms));
  LEGO_RETURN_IF_ERROR(cluster.read_int("max_message_bytes", 4096, 16 << 20, max_message));
  config.channels_per_peer = static_cast<int>(channels);
  config.timeout = std::chrono::milliseconds(timeout_ms);
  config.max_message_bytes = static_cast<size_t>(max_message);

  int64_t replicas = config.replicas;
  int64_t heartbeat_ms = config.heartbeat.count();
  int64_t lost_after_ms = config.lost_after.count();
  int64_t monitor_wait_ms = config.monitor_wait.count();
  // 4: mon::kMaxReplicas, the most a placement names.
  LEGO_RETURN_IF_ERROR(cluster.read_int("replicas", 1, 4, replicas));
  LEGO_RETURN_IF_ERROR(cluster.read_int("heartbeat_ms", 10, 600 * 1000, heartbeat_ms));
  LEGO_RETURN_IF_ERROR(cluster.read_int("lost_after_ms", 20, 3600 * 1000, lost_after_ms));
  LEGO_RETURN_IF_ERROR(cluster.read_int("monitor_wait_ms", 0, 24 * 3600 * 1000, monitor_wait_ms));
  if (lost_after_ms <= heartbeat_ms) {
    return cluster.error(cluster.has("lost_after_ms") ? "lost_after_ms" : "heartbeat_ms",
                         "lost_after_ms (" + std::to_string(lost_after_ms) +
                             ") must be longer than heartbeat_ms (" + std::to_string(heartbeat_ms) +
                             "): a node would be lost between two heartbeats");
  }
  config.replicas = static_cast<int>(replicas);
  config.heartbeat = std::chrono::milliseconds(heartbeat_ms);
  config.lost_after = std::chrono::milliseconds(lost_after_ms);
  config.monitor_wait = std::chrono::milliseconds(monitor_wait_ms);
  return Status::ok();
}

// shm endpoints are named by address alone, so a port is optional (and unused) there.
bool needs_port(Provider provider) {
  return provider != Provider::kShm;
}

Status read_node(const TableReader& table, NodeConfig& node) {
  LEGO_RETURN_IF_ERROR(table.check_keys(
      {"id", "role", "address", "port", "provider", "progress", "server_threads"}));
  node.line = table.line();

  LEGO_RETURN_IF_ERROR(table.require("id"));
  int64_t id = 0;
  LEGO_RETURN_IF_ERROR(table.read_int("id", 0, 65535, id));
  node.id = static_cast<NodeId>(id);

  LEGO_RETURN_IF_ERROR(table.require("role"));
  LEGO_RETURN_IF_ERROR(table.read_enum("role", role_name, kRoles, node.role));

  LEGO_RETURN_IF_ERROR(table.require("address"));
  LEGO_RETURN_IF_ERROR(table.read_string("address", node.address));
  if (node.address.empty()) return table.error("address", "is empty");

  LEGO_RETURN_IF_ERROR(table.read_enum("provider", provider_name, kProviders, node.provider));
  if (needs_port(node.provider)) {
    LEGO_RETURN_IF_ERROR(table.require(
        "port", std::string("required for provider ") + provider_name(node.provider)));
  }
  int64_t port = 0;
  LEGO_RETURN_IF_ERROR(table.read_int("port", 1, 65535, port));
  node.port = static_cast<uint16_t>(port);

  LEGO_RETURN_IF_ERROR(table.read_enum("progress", progress_name, kProgressModes, node.progress));

  int64_t threads = node.server_threads;
  LEGO_RETURN_IF_ERROR(table.read_int("server_threads", 1, 64, threads));
  node.server_threads = static_cast<int>(threads);
  return Status::ok();
}

// What check_against_earlier needs to know of the nodes read so far, indexed so that each
// new node is checked in O(1) (a pairwise check took 3.4 s for 8,000 nodes).
struct EarlierNodes {
  std::unordered_map<NodeId, size_t> by_id;              // index into config.nodes
  std::unordered_map<std::string, size_t> by_listen_on;  // "address\nport" (needs_port)
};

std::string listen_key(const NodeConfig& node) {
  return node.address + "\n" + std::to_string(node.port);
}

std::string node_name(const NodeConfig& node) {
  return "node " + std::to_string(node.id) + " (line " + std::to_string(node.line) + ")";
}

// Checks `node` against the nodes before it; errors name both nodes and their lines.
Status check_against_earlier(const TableReader& table, const NodeConfig& node,
                             const std::vector<NodeConfig>& earlier, const EarlierNodes& index) {
  if (auto it = index.by_id.find(node.id); it != index.by_id.end()) {
    return table.error(
        "id", std::to_string(node.id) + " is already used by " + node_name(earlier[it->second]));
  }
  // One provider for the whole cluster: nodes on different providers cannot reach each
  // other. Every earlier node uses the first one's.
  if (!earlier.empty() && earlier.front().provider != node.provider) {
    const NodeConfig& first = earlier.front();
    return table.error("provider", "node " + std::to_string(node.id) + " uses " +
                                       in_quotes(provider_name(node.provider)) + " but " +
                                       node_name(first) + " uses " +
                                       in_quotes(provider_name(first.provider)) +
                                       "; all nodes must use the same provider");
  }
  if (node.role == Role::kMonitor) {
    for (const NodeConfig& other : earlier) {
      if (other.role == Role::kMonitor) {
        return table.error("role", "node " + std::to_string(node.id) + " is a second monitor (" +
                                       node_name(other) + " is one); a cluster has at most one");
      }
    }
  }
  if (needs_port(node.provider)) {
    if (auto it = index.by_listen_on.find(listen_key(node)); it != index.by_listen_on.end()) {
      return table.error("port", "node " + std::to_string(node.id) + " and " +
                                     node_name(earlier[it->second]) + " both listen on " +
                                     in_quotes(node.address) + " port " +
                                     std::to_string(node.port));
    }
  }
  return Status::ok();
}

Status read_nodes(const std::string& origin, const toml::node* nodes, ClusterConfig& config) {
  if (!nodes) return invalid(origin, 0, "node", "no [[node]] tables; at least one is required");
  // `[node]` instead of `[[node]]` is an easy slip; say which form is expected.
  const toml::array* array = nodes->as_array();
  if (!array) {
    return invalid(origin, source_line(*nodes), "node",
                   std::string("expected [[node]] tables, got ") + type_name(nodes->type()));
  }
  if (array->empty()) {
    return invalid(origin, source_line(*nodes), "node", "no nodes; at least one is required");
  }
  EarlierNodes index;
  for (const toml::node& element : *array) {
    if (!element.is_table()) {
      return invalid(origin, source_line(element), "node",
                     std::string("expected a table, got ") + type_name(element.type()));
    }
    TableReader table(origin, "node", *element.as_table());
    NodeConfig node;
    LEGO_RETURN_IF_ERROR(read_node(table, node));
    LEGO_RETURN_IF_ERROR(check_against_earlier(table, node, config.nodes, index));
    index.by_id.emplace(node.id, config.nodes.size());
    if (needs_port(node.provider))
      index.by_listen_on.emplace(listen_key(node), config.nodes.size());
    config.nodes.push_back(std::move(node));
  }
  return Status::ok();
}

Result<ClusterConfig> parse_document(const std::string& text, const std::string& origin,
                                     const std::filesystem::path& base_dir) {
  toml::table doc;
  // toml++ reports syntax errors by throwing; lego's convention is a returned Status.
  try {
    doc = toml::parse(std::string_view(text), std::string_view(origin));
  } catch (const toml::parse_error& e) {
    const toml::source_position& at = e.source().begin;
    return Status(EINVAL, origin + ":" + std::to_string(at.line) + ":" + std::to_string(at.column) +
                              ": " + std::string(e.description()));
  }

  for (auto&& [key, value] : doc) {
    if (key.str() != "cluster" && key.str() != "node") {
      return invalid(origin, static_cast<int>(key.source().begin.line), key.str(),
                     "unknown key (expected [cluster] or [[node]])");
    }
  }

  ClusterConfig config;
  config.origin = origin;
  const toml::node* cluster = doc.get("cluster");
  if (!cluster) return invalid(origin, 0, "cluster", "missing [cluster] table");
  if (!cluster->is_table()) {
    return invalid(origin, source_line(*cluster), "cluster",
                   std::string("expected a table, got ") + type_name(cluster->type()));
  }
  LEGO_RETURN_IF_ERROR(
      read_cluster(TableReader(origin, "cluster", *cluster->as_table()), base_dir, config));
  LEGO_RETURN_IF_ERROR(read_nodes(origin, doc.get("node"), config));
  return config;
}

std::string to_hex(const std::vector<uint8_t>& bytes) {
  std::string hex;
  for (uint8_t b : bytes) {
    hex += kHexDigits[b >> 4];
    hex += kHexDigits[b & 0xf];
  }
  return hex;
}

// A TOML basic string: quotes, backslashes and control characters escaped.
std::string toml_string(std::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f) {
      out += "\\u00";
      out += kHexDigits[u >> 4];
      out += kHexDigits[u & 0xf];
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace

const char* role_name(Role role) {
  switch (role) {
    case Role::kProcessor:
      return "processor";
    case Role::kMemory:
      return "memory";
    case Role::kStorage:
      return "storage";
    case Role::kMonitor:
      return "monitor";
  }
  return "unknown";
}

const char* progress_name(Progress progress) {
  switch (progress) {
    case Progress::kPolling:
      return "polling";
    case Progress::kBlocking:
      return "blocking";
  }
  return "unknown";
}

const char* provider_name(Provider provider) {
  switch (provider) {
    case Provider::kTcp:
      return "tcp";
    case Provider::kOfiTcp:
      return "ofi_tcp";
    case Provider::kShm:
      return "shm";
    case Provider::kVerbs:
      return "verbs";
  }
  return "unknown";
}

std::optional<Provider> parse_provider(std::string_view name) {
  for (int i = 0; i < kProviders; i++) {
    if (name == provider_name(static_cast<Provider>(i))) return static_cast<Provider>(i);
  }
  return std::nullopt;
}

Result<ClusterConfig> ClusterConfig::parse_file(const std::string& path) {
  Result<std::string> text = read_whole_file(path, "cluster file", kMaxClusterFileBytes);
  if (!text.is_ok()) return text.status();
  return parse_document(*text, path, std::filesystem::path(path).parent_path());
}

Result<ClusterConfig> ClusterConfig::parse_string(const std::string& text,
                                                  const std::string& origin) {
  // No file, so a relative key_file is relative to the working directory.
  return parse_document(text, origin, std::filesystem::path());
}

std::string ClusterConfig::to_toml() const {
  std::string out = "[cluster]\n";
  out += "key = " + toml_string(to_hex(key)) + "\n";
  out += "channels_per_peer = " + std::to_string(channels_per_peer) + "\n";
  out += "timeout_ms = " + std::to_string(timeout.count()) + "\n";
  out += "max_message_bytes = " + std::to_string(max_message_bytes) + "\n";
  out += "replicas = " + std::to_string(replicas) + "\n";
  out += "heartbeat_ms = " + std::to_string(heartbeat.count()) + "\n";
  out += "lost_after_ms = " + std::to_string(lost_after.count()) + "\n";
  out += "monitor_wait_ms = " + std::to_string(monitor_wait.count()) + "\n";
  for (const NodeConfig& node : nodes) {
    out += "\n[[node]]\n";
    out += "id = " + std::to_string(node.id) + "\n";
    out += "role = " + toml_string(role_name(node.role)) + "\n";
    out += "address = " + toml_string(node.address) + "\n";
    // shm nodes may have no port; 0 would not parse back (ports are 1..65535).
    if (node.port != 0) out += "port = " + std::to_string(node.port) + "\n";
    out += "provider = " + toml_string(provider_name(node.provider)) + "\n";
    out += "progress = " + toml_string(progress_name(node.progress)) + "\n";
    out += "server_threads = " + std::to_string(node.server_threads) + "\n";
  }
  return out;
}

const NodeConfig* ClusterConfig::find(NodeId id) const {
  for (const NodeConfig& node : nodes) {
    if (node.id == id) return &node;
  }
  return nullptr;
}

const NodeConfig* ClusterConfig::first_of(Role role) const {
  for (const NodeConfig& node : nodes) {
    if (node.role == role) return &node;
  }
  return nullptr;
}

}  // namespace lego::fit
