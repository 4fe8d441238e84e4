#include "libfit/ofi.h"

#include <infiniband/verbs.h>

#include <dlfcn.h>
#include <signal.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "lego/startup_trace.h"
#include "libfit/auth.h"

namespace lego::fit::ofi {

Status error(long ret, const std::string& what) {
  int code = static_cast<int>(ret < 0 ? -ret : ret);
  // libfabric's own codes (FI_ETRUNC, FI_EAVAIL, ...) sit above the errno range.
  int errno_code = code < FI_ERRNO_OFFSET ? code : EIO;
  return Status(errno_code, what + ": " + fi_strerror(code));
}

// Called by fabric_loader.cc right after it loads libfabric.
void save_psm_signals(PsmSignals* out);
void restore_signals_taken_by_psm(const PsmSignals* before);

namespace {

// libfabric initialises every provider it was built with on first use: Debian builds
// them all into libfabric.so.1, and FI_PROVIDER does not stop an initialisation, it only
// hides the other providers from fi_getinfo afterwards. (Each initialisation's cost, and
// what fabric_loader.cc does about the costly ones, is at the top of that file.) libfit
// sets FI_PROVIDER for the first fi_getinfo, unless the user chose, so that libfabric
// registers only the providers FIT uses; the program's environment is left as it was.
// libinfinipath (linked by libfabric for its psm provider) installs handlers for SIGINT,
// SIGILL, SIGABRT, SIGBUS, SIGSEGV and SIGTERM from its constructor that turn them into
// exit(1). A lego process must die of its signals as it would without lego, so handlers
// that live in that library go back to the default.
}  // namespace

namespace {
constexpr int kPsmSignals[] = {SIGINT, SIGILL, SIGABRT, SIGBUS, SIGSEGV, SIGTERM, SIGHUP, SIGQUIT};
static_assert(std::size(kPsmSignals) == std::size(PsmSignals{}.actions));
}  // namespace

void save_psm_signals(PsmSignals* out) {
  for (size_t i = 0; i < std::size(kPsmSignals); i++) {
    if (sigaction(kPsmSignals[i], nullptr, &out->actions[i]) != 0) {
      out->actions[i] = {};
      out->actions[i].sa_handler = SIG_DFL;
    }
  }
}

// Handlers that live in libinfinipath/psm go back to what they were before it was loaded
// (`before`), or to the default. Restoring rather than resetting matters: libfabric is
// loaded lazily, maybe after the ExCache installed its SIGBUS handler, which psm's
// constructor replaced.
void restore_signals_taken_by_psm(const PsmSignals* before) {
  for (size_t i = 0; i < std::size(kPsmSignals); i++) {
    const int sig = kPsmSignals[i];
    struct sigaction sa {};
    if (sigaction(sig, nullptr, &sa) != 0) continue;
    void* handler = (sa.sa_flags & SA_SIGINFO) ? reinterpret_cast<void*>(sa.sa_sigaction)
                                               : reinterpret_cast<void*>(sa.sa_handler);
    if (handler == reinterpret_cast<void*>(SIG_DFL) ||
        handler == reinterpret_cast<void*>(SIG_IGN)) {
      continue;
    }
    Dl_info info{};
    if (dladdr(handler, &info) != 0 && info.dli_fname != nullptr &&
        (strstr(info.dli_fname, "infinipath") != nullptr ||
         strstr(info.dli_fname, "psm") != nullptr)) {
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      sigaction(sig, before != nullptr ? &before->actions[i] : &dfl, nullptr);
    }
  }
}

namespace {

// As early as possible in any process that links libfit (before lego's preload starts).
__attribute__((constructor(101))) void restore_signals_at_load() {
  restore_signals_taken_by_psm(nullptr);
}

void load_only_fit_providers() {
  static std::once_flag once;
  std::call_once(once, [] {
    PsmSignals before;
    save_psm_signals(&before);
    if (getenv("FI_PROVIDER") == nullptr) {
      setenv("FI_PROVIDER", "tcp,shm,verbs,ofi_rxm", 0);
      fi_info* all = nullptr;
      fi_getinfo(kApiVersion, nullptr, nullptr, 0, nullptr, &all);  // initialises libfabric
      startup_mark("libfit: libfabric's providers initialised");
      if (all != nullptr) fi_freeinfo(all);
      unsetenv("FI_PROVIDER");
    }
    restore_signals_taken_by_psm(&before);
  });
}

// libfabric's name for a provider: "ofi_tcp" is libfabric's tcp provider (plain "tcp" is
// libfit's own socket transport, which never comes here).
const char* libfabric_name(Provider provider) {
  switch (provider) {
    case Provider::kShm:
      return "shm";
    case Provider::kVerbs:
      return "verbs";
    case Provider::kTcp:
    case Provider::kOfiTcp:
      break;
  }
  return "tcp";
}

}  // namespace

Result<InfoPtr> get_info(Provider provider, const std::string& node, const std::string& service,
                         bool server) {
  load_only_fit_providers();
  InfoPtr hints(fi_allocinfo());
  if (!hints) return Status(ENOMEM, "fi_allocinfo");
  // shm speaks connectionless rdm endpoints; the others connection-oriented msg ones.
  bool msg = provider != Provider::kShm;
  hints->ep_attr->type = msg ? FI_EP_MSG : FI_EP_RDM;
  hints->caps = FI_MSG | FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;
  if (!msg) hints->caps |= FI_SOURCE;
  hints->mode = FI_CONTEXT | FI_CONTEXT2;
  hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY;
  hints->domain_attr->threading = FI_THREAD_SAFE;
  hints->addr_format = FI_FORMAT_UNSPEC;
  hints->fabric_attr->prov_name = strdup(libfabric_name(provider));
  fi_info* info = nullptr;
  const char* n = node.empty() ? nullptr : node.c_str();
  const char* s = service.empty() ? nullptr : service.c_str();
  int ret = fi_getinfo(kApiVersion, n, s, server ? FI_SOURCE : 0, hints.get(), &info);
  if (ret != 0) {
    Status st = error(ret, std::string("fi_getinfo(provider ") + provider_name(provider) + ", " +
                               (server ? "listen on " : "peer ") + node + ":" + service + ")");
    if (provider == Provider::kVerbs) {
      // Say why verbs found nothing: usually there is no RDMA device at all.
      int devices = 0;
      ibv_device** list = ibv_get_device_list(&devices);
      if (list != nullptr) ibv_free_device_list(list);
      st = st.with_context(std::to_string(devices) +
                           " RDMA devices found (ibv_get_device_list); the verbs provider needs "
                           "an RDMA NIC or soft-RoCE (rdma link add ... type rxe)");
    }
    return st;
  }
  return InfoPtr(info);
}

Result<std::unique_ptr<Domain>> Domain::open(InfoPtr info) {
  auto d = std::make_unique<Domain>();
  d->info = std::move(info);
  int ret = fi_fabric(d->info->fabric_attr, d->fabric.out(), nullptr);
  if (ret != 0) return error(ret, "fi_fabric");
  ret = fi_domain(d->fabric.get(), d->info.get(), d->domain.out(), nullptr);
  if (ret != 0) return error(ret, "fi_domain");
  uint64_t mode = d->info->domain_attr->mr_mode;
  d->local_mr = (mode & FI_MR_LOCAL) != 0;
  d->virt_addr = (mode & FI_MR_VIRT_ADDR) != 0;
  d->prov_key = (mode & FI_MR_PROV_KEY) != 0;
  return d;
}

Result<std::unique_ptr<Registration>> register_buffer(Domain& d, void* addr, size_t len,
                                                      uint64_t access) {
  auto r = std::make_unique<Registration>();
  uint64_t requested = d.prov_key ? 0 : auth::random_u64();
  // Some providers limit key size; keep requested keys within what the domain supports.
  size_t key_size = d.info->domain_attr->mr_key_size;
  if (!d.prov_key && key_size > 0 && key_size < 8) requested &= (1ull << (8 * key_size)) - 1;
  int ret = fi_mr_reg(d.domain.get(), addr, len, access, 0, requested, 0, r->mr.out(), nullptr);
  if (ret != 0) return error(ret, "fi_mr_reg(" + std::to_string(len) + " bytes)");
  r->desc = fi_mr_desc(r->mr.get());
  r->key = fi_mr_key(r->mr.get());
  return r;
}

}  // namespace lego::fit::ofi
