// What loading libfabric costs a process on a host without psm or verbs hardware
// (libfit/fabric_loader.cc): the psm stand-ins take the real libraries' place, libfabric
// does not read /proc/kallsyms, and the process's own fopen() is untouched. Each check
// needs a process whose libfabric is not loaded yet: this binary, one TEST_CASE.
#include <dlfcn.h>
#include <glob.h>
#include <link.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "lego/fit.h"
#include "tests/libfit/cluster_fixture.h"

using namespace lego;
using namespace lego::fit;

namespace {

bool any_exists(const char* pattern) {
  glob_t g{};
  const bool found = glob(pattern, GLOB_NOSORT, nullptr, &g) == 0 && g.gl_pathc > 0;
  globfree(&g);
  return found;
}

// Bytes this process has read so far (/proc/self/io rchar).
unsigned long long bytes_read() {
  std::ifstream in("/proc/self/io");
  std::string key;
  unsigned long long v = 0;
  while (in >> key >> v) {
    if (key == "rchar:") return v;
  }
  return 0;
}

unsigned long long kallsyms_bytes() {
  FILE* f = fopen("/proc/kallsyms", "r");
  if (f == nullptr) return 0;
  char buf[65536];
  unsigned long long n = 0;
  for (size_t got; (got = fread(buf, 1, sizeof buf, f)) > 0;) n += got;
  fclose(f);
  return n;
}

// The file a loaded library with this SONAME was loaded from ("" when none is loaded).
std::string loaded_from(const char* soname) {
  void* h = dlopen(soname, RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return "";
  link_map* map = nullptr;
  std::string path = dlinfo(h, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr ? map->l_name : "?";
  dlclose(h);
  return path;
}

bool mapped(const std::string& name) {
  std::ifstream in("/proc/self/maps");
  std::string line;
  while (std::getline(in, line)) {
    if (line.find(name) != std::string::npos) return true;
  }
  return false;
}

}  // namespace

TEST_CASE(
    "libfabric loads without psm's constructors or a kallsyms scan on a host without "
    "the hardware",
    "[fabric]") {
  if (any_exists("/dev/hfi1*") || any_exists("/sys/class/infiniband/*") ||
      any_exists("/sys/class/infiniband_verbs/uverbs*")) {
    WARN("skipped: this host has RDMA hardware, and libfabric loads as it is");
    return;
  }
  const unsigned long long kallsyms = kallsyms_bytes();
  REQUIRE(kallsyms > 0);  // readable here, so a scan would show in rchar

  // The first libfabric use of this process: a shm server and a call to it.
  ClusterConfig c = lego::testing::make_cluster(2, "shm");
  auto server = Node::create(c, 2);
  REQUIRE(server.is_ok());
  server.value()->handle(
      1, [](const RpcContext&, std::span<const std::byte>, std::span<std::byte>) -> Result<size_t> {
        return size_t{0};
      });
  REQUIRE(!mapped("libfabric.so"));
  const unsigned long long before = bytes_read();
  Status st = server.value()->start();
  INFO(st.message());
  REQUIRE(st.is_ok());
  const unsigned long long during = bytes_read() - before;
  auto client = Node::create(c, 1);
  REQUIRE(client.is_ok());
  std::vector<std::byte> reply(8);
  auto r = client.value()->send_reply(2, 1, {}, reply);
  INFO(r.status().message());
  REQUIRE(r.is_ok());  // shm works with the stand-ins in place
  REQUIRE(mapped("libfabric.so"));

  // The stand-ins, loaded from memory, stand for the real libraries; those and
  // libinfinipath (its timer calibration) are not loaded.
  CHECK(loaded_from("libpsm2.so.2").rfind("/proc/self/fd/", 0) == 0);
  CHECK(loaded_from("libpsm_infinipath.so.1").rfind("/proc/self/fd/", 0) == 0);
  CHECK(!mapped("libinfinipath.so"));
  CHECK(!mapped("/libpsm2.so"));
  CHECK(!mapped("/libpsm_infinipath.so"));

  // libfabric's initialisation read far less than /proc/kallsyms once (it read it twice).
  INFO("read " << during << " bytes while libfabric initialised; /proc/kallsyms has " << kallsyms);
  CHECK(during < kallsyms / 2);
  // The process's own fopen() still reads it.
  CHECK(kallsyms_bytes() == kallsyms);
}
