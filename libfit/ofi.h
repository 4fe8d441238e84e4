// Thin RAII and error helpers over libfabric, shared by libfit's transports.
// Internal to libfit.
#pragma once

#include <signal.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include <memory>
#include <string>

#include "lego/fit.h"
#include "libfit/transport.h"

namespace lego::fit::ofi {

// Dispositions of the signals libinfinipath (libfabric's psm provider) takes over when it
// is loaded; saved before libfabric is loaded and restored after (ofi.cc).
struct PsmSignals {
  struct sigaction actions[8];
};

inline constexpr uint32_t kApiVersion = FI_VERSION(1, 17);

// A libfabric return code (negative fi errno) as a Status naming what failed.
Status error(long ret, const std::string& what);

struct InfoDeleter {
  void operator()(fi_info* info) const { fi_freeinfo(info); }
};
using InfoPtr = std::unique_ptr<fi_info, InfoDeleter>;

// Closes any libfabric object (fid) on destruction.
template <typename T>
struct Fid {
  T* p = nullptr;
  Fid() = default;
  Fid(const Fid&) = delete;
  Fid& operator=(const Fid&) = delete;
  ~Fid() { reset(); }
  void reset() {
    if (p != nullptr) fi_close(&p->fid);
    p = nullptr;
  }
  T* get() const { return p; }
  T** out() {
    reset();
    return &p;
  }
};

// fi_getinfo for `provider` (ofi_tcp, verbs: msg endpoints; shm: rdm endpoints) with the
// capabilities FIT needs. `server` asks for a source address (node/service are ours),
// otherwise node/service name the peer.
Result<InfoPtr> get_info(Provider provider, const std::string& node, const std::string& service,
                         bool server);

// A fabric + domain opened from one fi_info, and what its memory-registration mode
// demands of us.
struct Domain {
  InfoPtr info;
  Fid<fid_fabric> fabric;
  Fid<fid_domain> domain;
  bool local_mr = false;   // FI_MR_LOCAL: local buffers need a descriptor
  bool virt_addr = false;  // FI_MR_VIRT_ADDR: RMA addresses are virtual addresses
  bool prov_key = false;   // FI_MR_PROV_KEY: the provider picks keys

  static Result<std::unique_ptr<Domain>> open(InfoPtr info);
};

// A registered buffer.
struct Registration : transport::Registration {
  Fid<fid_mr> mr;
  void* desc = nullptr;
  uint64_t key = 0;
};

// Registers [addr, addr+len) with `access` (FI_SEND|FI_RECV|FI_READ|FI_WRITE|FI_REMOTE_*).
// Keys are random unless the provider chooses them, so they cannot be guessed.
Result<std::unique_ptr<Registration>> register_buffer(Domain& d, void* addr, size_t len,
                                                      uint64_t access);

}  // namespace lego::fit::ofi
