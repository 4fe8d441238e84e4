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
//
// Loading libfabric, when the host lacks the hardware some of its providers drive, costs
// more than all the rest of a run's start (measured: 200 ms to load, 85-100 ms for the
// first fi_getinfo, per process; a shm run has three such processes). Two costs go, each
// only on a host without the device concerned, so that a real device works as before:
// - psm and psm2 (True Scale, Omni-Path): libfabric links libpsm_infinipath.so.1 and
//   libpsm2.so.2, whose constructors sleep (~100 ms) and calibrate a timer (~800
//   usleep()s) whether or not a device exists. Without one, libfit first loads stand-ins
//   with the same SONAMEs (psm_stand_in/, built by Bazel and linked in as bytes): the
//   dynamic linker then resolves libfabric's dependencies to them, and the providers find
//   no device, as they would with the real libraries. A process that loads the real
//   library itself later gets the stand-in too; without a device it could not use it.
// - verbs: its initialisation reads all of /proc/kallsyms, twice, to learn whether the
//   kernel can register dma-buf and peer (GPU) memory. Without a verbs device (nothing in
//   /sys/class/infiniband_verbs) there is nothing to register with, so libfabric's own
//   fopen() of that one file fails as on a kernel that hides it (its code then assumes
//   neither): libfabric's GOT entry for fopen, and only libfabric's, points to
//   fopen_for_libfabric(). Everything else in the process, the program included, calls
//   fopen() as before.
// LEGO_FABRIC_AS_IS=1 turns both off (to compare, or should either ever misjudge a host).
#include <dlfcn.h>
#include <elf.h>
#include <glob.h>
#include <infiniband/verbs.h>
#include <link.h>
#include <rdma/fabric.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "lego/startup_trace.h"
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

#include "libfit/psm_stand_in_images.inc"

bool fabric_as_is() {
  const char* v = getenv("LEGO_FABRIC_AS_IS");
  return v != nullptr && *v != '\0' && strcmp(v, "0") != 0;
}

// True when any path matches one of `patterns` (glob(3)).
bool any_exists(std::initializer_list<const char*> patterns) {
  for (const char* p : patterns) {
    glob_t g{};
    const int r = glob(p, GLOB_NOSORT, nullptr, &g);
    const bool found = r == 0 && g.gl_pathc > 0;
    globfree(&g);
    if (found) return true;
  }
  return false;
}

// Loads the stand-in `image` for `soname` (see the top of this file), unless the real
// library is loaded already. Kept loaded for the life of the process, as libfabric is.
// Returns the descriptor of its image, for the caller to close once every stand-in is
// loaded: the dynamic linker knows an object by the path it was opened at too, and a
// second image at the same /proc/self/fd/N would be taken for the first.
int load_stand_in(const char* soname, const unsigned char* image, size_t size) {
  if (dlopen(soname, RTLD_NOW | RTLD_NOLOAD) != nullptr) return -1;
  const int fd = memfd_create(soname, MFD_CLOEXEC);
  if (fd < 0) return -1;  // then the real one loads: slower, not wrong
  if (write(fd, image, size) == static_cast<ssize_t>(size)) {
    const std::string path = "/proc/self/fd/" + std::to_string(fd);
    if (dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL) == nullptr) {
      fprintf(stderr, "libfit: cannot load the stand-in for %s (the real one loads): %s\n", soname,
              dlerror());
    }
  }
  return fd;
}

void load_psm_stand_ins() {
  int fds[2] = {-1, -1};
  if (!any_exists({"/dev/hfi1*", "/sys/class/infiniband/hfi1*"})) {
    fds[0] = load_stand_in("libpsm2.so.2", kPsm2StandIn, sizeof kPsm2StandIn);
  }
  if (!any_exists({"/dev/ipath*", "/sys/class/infiniband/qib*", "/sys/class/infiniband/ipath*"})) {
    fds[1] = load_stand_in("libpsm_infinipath.so.1", kPsmStandIn, sizeof kPsmStandIn);
  }
  for (int fd : fds) {
    if (fd >= 0) close(fd);  // the mappings stay
  }
}

bool g_no_verbs_device = false;

FILE* fopen_for_libfabric(const char* path, const char* mode) {
  if (g_no_verbs_device && path != nullptr && strcmp(path, "/proc/kallsyms") == 0) {
    errno = ENOENT;
    return nullptr;
  }
  return fopen(path, mode);
}

// Whether the page of `slot`, in the object of link map `map`, is one the dynamic linker
// made read-only after relocation (PT_GNU_RELRO, whole pages only).
bool in_relro(const link_map* map, const void* slot) {
  struct Query {
    const link_map* map;
    uintptr_t page, size;
    bool relro;
  } q{map, 0, static_cast<uintptr_t>(sysconf(_SC_PAGESIZE)), false};
  q.page = reinterpret_cast<uintptr_t>(slot) & ~(q.size - 1);
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        auto* q = static_cast<Query*>(data);
        if (info->dlpi_addr != q->map->l_addr) return 0;
        for (int i = 0; i < info->dlpi_phnum; i++) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          if (ph.p_type != PT_GNU_RELRO) continue;
          const uintptr_t start = (info->dlpi_addr + ph.p_vaddr) & ~(q->size - 1);
          const uintptr_t end = (info->dlpi_addr + ph.p_vaddr + ph.p_memsz) & ~(q->size - 1);
          if (q->page >= start && q->page + q->size <= end) q->relro = true;
        }
        return 1;
      },
      &q);
  return q.relro;
}

// Points the GOT entry through which the object of link map `map` calls
// `name` to `to`. False when it has none (nothing changed). x86-64 only.
bool redirect_import(const link_map* map, const char* name, void* to) {
#if !defined(__x86_64__)
  return false;
#endif
  const ElfW(Dyn)* dyn = map->l_ld;
  const ElfW(Sym)* symtab = nullptr;
  const char* strtab = nullptr;
  const ElfW(Rela) * rela[2] = {nullptr, nullptr};
  size_t rela_size[2] = {0, 0};
  for (; dyn->d_tag != DT_NULL; dyn++) {
    switch (dyn->d_tag) {
      case DT_SYMTAB:
        symtab = reinterpret_cast<const ElfW(Sym)*>(dyn->d_un.d_ptr);
        break;
      case DT_STRTAB:
        strtab = reinterpret_cast<const char*>(dyn->d_un.d_ptr);
        break;
      case DT_JMPREL:
        rela[0] = reinterpret_cast<const ElfW(Rela)*>(dyn->d_un.d_ptr);
        break;
      case DT_PLTRELSZ:
        rela_size[0] = dyn->d_un.d_val;
        break;
      case DT_RELA:
        rela[1] = reinterpret_cast<const ElfW(Rela)*>(dyn->d_un.d_ptr);
        break;
      case DT_RELASZ:
        rela_size[1] = dyn->d_un.d_val;
        break;
    }
  }
  if (symtab == nullptr || strtab == nullptr) return false;
  const long page = sysconf(_SC_PAGESIZE);
  bool done = false;
  for (int t = 0; t < 2; t++) {
    if (rela[t] == nullptr) continue;
    for (size_t i = 0; i < rela_size[t] / sizeof(ElfW(Rela)); i++) {
      const ElfW(Rela)& r = rela[t][i];
      const auto type = ELF64_R_TYPE(r.r_info);
      if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT) continue;
      const ElfW(Sym)& sym = symtab[ELF64_R_SYM(r.r_info)];
      if (sym.st_name == 0 || strcmp(strtab + sym.st_name, name) != 0) continue;
      auto* slot = reinterpret_cast<void**>(map->l_addr + r.r_offset);
      // Bound at load (RTLD_NOW), the GOT may sit in read-only RELRO: open its page for
      // the write, then close it again.
      auto* first = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(slot) &
                                            ~static_cast<uintptr_t>(page - 1));
      if (mprotect(first, static_cast<size_t>(page), PROT_READ | PROT_WRITE) != 0) continue;
      __atomic_store_n(slot, to, __ATOMIC_RELEASE);
      if (in_relro(map, slot)) mprotect(first, static_cast<size_t>(page), PROT_READ);
      done = true;
    }
  }
  return done;
}

void* symbol(Library& lib, const char* name, const char* version) {
  std::call_once(lib.once, [&lib] {
    const bool lean = &lib == &g_fabric && !fabric_as_is();
    if (lean) load_psm_stand_ins();
    // Its constructors may take over signals the process (the ExCache: SIGBUS) set up.
    lego::fit::ofi::PsmSignals before{};
    lego::fit::ofi::save_psm_signals(&before);
    lib.handle = dlopen(lib.soname, RTLD_NOW | RTLD_LOCAL);
    if (lib.handle == nullptr) {
      fprintf(stderr, "libfit: cannot load %s: %s\n", lib.soname, dlerror());
    }
    lego::fit::ofi::restore_signals_taken_by_psm(&before);
    lego::startup_mark(&lib == &g_fabric ? "libfit: libfabric loaded"
                                         : "libfit: libibverbs loaded");
    if (lean && lib.handle != nullptr && !any_exists({"/sys/class/infiniband_verbs/uverbs*"})) {
      link_map* map = nullptr;
      if (dlinfo(lib.handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr) {
        g_no_verbs_device = true;
        (void)redirect_import(map, "fopen", reinterpret_cast<void*>(&fopen_for_libfabric));
      }
    }
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
