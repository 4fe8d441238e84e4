// Builds small clusters for libfit tests: a fresh random key and ports that parallel test
// runs do not share.
#pragma once

#include <dirent.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <string_view>

#include "lego/fit.h"

namespace lego::testing {

// A port base unlikely to collide with other tests running at the same time. Below
// Linux's ephemeral range (32768-60999): a port there may be taken at any moment by the
// local end of some other test's connection, and bind() would fail with EADDRINUSE.
inline uint16_t test_port_base() {
  static std::atomic<int> next{0};
  std::random_device rd;
  static const int base = 20000 + static_cast<int>((getpid() * 37 + rd()) % 10000);
  return static_cast<uint16_t>(base + (next += 8) % 2000);
}

// Writes `c` as a cluster file $TEST_TMPDIR/<tag>-<pid>.toml (or under /tmp) for the
// daemons and peers a test starts; returns its path.
inline std::string write_cluster_file(const fit::ClusterConfig& c, const std::string& tag) {
  const char* tmp = getenv("TEST_TMPDIR");
  std::string path =
      std::string(tmp ? tmp : "/tmp") + "/" + tag + "-" + std::to_string(getpid()) + ".toml";
  std::ofstream(path) << c.to_toml();
  return path;
}

inline std::vector<uint8_t> random_key() {
  std::vector<uint8_t> key(32);
  std::random_device rd;
  for (auto& b : key) b = static_cast<uint8_t>(rd());
  return key;
}

// shm nodes are named "lego-test-<this pid>:<port>" (make_cluster), and libfabric unlinks a
// node's region in /dev/shm when the node closes, as libfit does its doorbell
// ("lego-fit-bell-lego-test-<this pid>-<port>-...", libfit/doorbell.cc). A node a test
// kills (SIGKILL, in a forked child) cannot: what is left under this process's name goes
// when this process exits.
inline void remove_test_shm_regions_at_exit() {
  static std::once_flag once;
  static pid_t owner = 0;
  std::call_once(once, [] {
    owner = getpid();
    atexit([] {
      if (getpid() != owner) return;  // a forked child: the names are its parent's
      char region[48], bell[64];
      snprintf(region, sizeof region, "lego-test-%d:", static_cast<int>(owner));
      snprintf(bell, sizeof bell, "lego-fit-bell-lego-test-%d-", static_cast<int>(owner));
      DIR* d = opendir("/dev/shm");
      if (d == nullptr) return;
      while (dirent* e = readdir(d)) {
        if (strncmp(e->d_name, region, strlen(region)) == 0 ||
            strncmp(e->d_name, bell, strlen(bell)) == 0) {
          unlinkat(dirfd(d), e->d_name, 0);
        }
      }
      closedir(d);
    });
  });
}

// Nodes 1..n, all on `address`, consecutive ports; node 1 a processor, the rest memory.
inline fit::ClusterConfig make_cluster(int n, fit::Provider provider,
                                       fit::Progress progress = fit::Progress::kPolling,
                                       const std::string& address = "127.0.0.1") {
  fit::ClusterConfig c;
  c.key = random_key();
  c.origin = "test cluster";
  c.timeout = std::chrono::milliseconds(3000);
  uint16_t port = test_port_base();
  const bool shm = provider == fit::Provider::kShm;
  if (shm) remove_test_shm_regions_at_exit();
  for (int i = 1; i <= n; i++) {
    fit::NodeConfig nc;
    nc.id = static_cast<fit::NodeId>(i);
    nc.role = i == 1 ? fit::Role::kProcessor : fit::Role::kMemory;
    nc.address = shm ? "lego-test-" + std::to_string(getpid()) : address;
    nc.port = static_cast<uint16_t>(port + i);
    nc.provider = provider;
    nc.progress = progress;
    c.nodes.push_back(nc);
  }
  return c;
}

// The same, the provider named as in a cluster file ("tcp", "shm", ...).
inline fit::ClusterConfig make_cluster(int n, std::string_view provider,
                                       fit::Progress progress = fit::Progress::kPolling,
                                       const std::string& address = "127.0.0.1") {
  auto p = fit::parse_provider(provider);
  if (!p) {
    fprintf(stderr, "make_cluster: unknown provider '%.*s'\n", static_cast<int>(provider.size()),
            provider.data());
    abort();
  }
  return make_cluster(n, *p, progress, address);
}

inline std::span<const std::byte> as_bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

}  // namespace lego::testing
