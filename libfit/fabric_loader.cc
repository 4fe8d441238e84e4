// libfabric and libibverbs, loaded on first use instead of at program start.
//
// Why: every process lego-run starts loads libfit, and libfabric's dependencies are costly
// to load: libinfinipath's constructor (pulled in for the psm provider) calibrates a timer
// with ~800 usleep() calls, ~200 ms per process, and installs signal handlers. A program
// whose memory node is reached over libfit's own tcp transport never needs libfabric, and a
// shell script under lego-run starts many processes. So libfit does not link libfabric:
// these are the only libfabric/libibverbs functions it calls by symbol (the rest are
// inline calls through the ops tables of objects these return), and each loads the
// library on first call, with the symbol version libfit was compiled against.
// Hidden: they must not interpose a program's own libfabric.
#include <dlfcn.h>
#include <infiniband/verbs.h>
#include <rdma/fabric.h>

#include <cerrno>
#include <cstdio>
#include <mutex>

#include "libfit/ofi.h"

namespace lego::fit::ofi {
struct PsmSignals;
void save_psm_signals(PsmSignals* out);                       // ofi.cc
void restore_signals_taken_by_psm(const PsmSignals* before);  // ofi.cc
}  // namespace lego::fit::ofi

namespace {

struct Library {
  const char* soname;
  std::once_flag once;
  void* handle = nullptr;
};
Library g_fabric{"libfabric.so.1", {}, nullptr};
Library g_verbs{"libibverbs.so.1", {}, nullptr};

void* symbol(Library& lib, const char* name, const char* version) {
  std::call_once(lib.once, [&lib] {
    // Its constructors may take over signals the process (the ExCache: SIGBUS) set up.
    lego::fit::ofi::PsmSignals before{};
    lego::fit::ofi::save_psm_signals(&before);
    lib.handle = dlopen(lib.soname, RTLD_NOW | RTLD_LOCAL);
    if (lib.handle == nullptr) {
      fprintf(stderr, "libfit: cannot load %s: %s\n", lib.soname, dlerror());
    }
    lego::fit::ofi::restore_signals_taken_by_psm(&before);
  });
  if (lib.handle == nullptr) return nullptr;
  void* f = dlvsym(lib.handle, name, version);
  return f != nullptr ? f : dlsym(lib.handle, name);
}

template <typename F>
F* fabric_fn(const char* name, const char* version) {
  return reinterpret_cast<F*>(symbol(g_fabric, name, version));
}

}  // namespace

#define LEGO_HIDDEN __attribute__((visibility("hidden")))

extern "C" {

LEGO_HIDDEN int fi_getinfo(uint32_t version, const char* node, const char* service, uint64_t flags,
                           const struct fi_info* hints, struct fi_info** info) {
  static auto* f = fabric_fn<decltype(fi_getinfo)>("fi_getinfo", "FABRIC_1.3");
  return f != nullptr ? f(version, node, service, flags, hints, info) : -FI_ENOSYS;
}

LEGO_HIDDEN void fi_freeinfo(struct fi_info* info) {
  static auto* f = fabric_fn<decltype(fi_freeinfo)>("fi_freeinfo", "FABRIC_1.3");
  if (f != nullptr) f(info);
}

LEGO_HIDDEN struct fi_info* fi_dupinfo(const struct fi_info* info) {
  static auto* f = fabric_fn<decltype(fi_dupinfo)>("fi_dupinfo", "FABRIC_1.3");
  return f != nullptr ? f(info) : nullptr;
}

LEGO_HIDDEN int fi_fabric(struct fi_fabric_attr* attr, struct fid_fabric** fabric, void* context) {
  static auto* f = fabric_fn<decltype(fi_fabric)>("fi_fabric", "FABRIC_1.1");
  return f != nullptr ? f(attr, fabric, context) : -FI_ENOSYS;
}

LEGO_HIDDEN const char* fi_strerror(int errnum) {
  static auto* f = fabric_fn<decltype(fi_strerror)>("fi_strerror", "FABRIC_1.0");
  return f != nullptr ? f(errnum) : "libfabric is not available";
}

LEGO_HIDDEN struct ibv_device** ibv_get_device_list(int* num_devices) {
  static auto* f = reinterpret_cast<decltype(ibv_get_device_list)*>(
      symbol(g_verbs, "ibv_get_device_list", "IBVERBS_1.1"));
  if (f == nullptr) {
    if (num_devices != nullptr) *num_devices = 0;
    errno = ENOSYS;
    return nullptr;
  }
  return f(num_devices);
}

LEGO_HIDDEN void ibv_free_device_list(struct ibv_device** list) {
  static auto* f = reinterpret_cast<decltype(ibv_free_device_list)*>(
      symbol(g_verbs, "ibv_free_device_list", "IBVERBS_1.1"));
  if (f != nullptr) f(list);
}

}  // extern "C"
