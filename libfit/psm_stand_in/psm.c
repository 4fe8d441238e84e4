// A stand-in for libpsm_infinipath.so.1 (True Scale PSM), which libfit loads in its place when this
// host has no True Scale (qib/ipath) device: see libfit/fabric_loader.cc for why and when.
//
// libfabric links libpsm_infinipath.so.1 for its psm provider. Without a device that provider
// cannot work, but the real library's constructor still costs every process that loads libfabric
// ~200 ms (its libinfinipath calibrates a timer with ~800 usleep()s, and takes over signals). This
// library has the same SONAME and defines every symbol libfabric imports from it (25, from `objdump
// -T libfabric.so.1`), so the dynamic linker takes it for the real one. Each call fails as the real
// library fails without a device, and the provider reports itself unavailable. No constructor, no
// signal handlers, no threads.
//
// The functions declare no parameters: callers pass theirs in registers and the stand-ins
// ignore them (safe in the System V x86-64 ABI); the return types are the real ones' (an
// error code, a pointer or a mask).
#include <stddef.h>
#include <stdint.h>

// PSM_EP_NO_DEVICE: what the real library answers when it finds no device.
enum { kNoDevice = 21 };

const char* psm_error_get_string(int error) {
  (void)error;
  return "libpsm_infinipath.so.1 is lego's stand-in: this host has no True Scale (qib/ipath) "
         "device";
}

int psm_am_get_parameters(void) {
  return kNoDevice;
}
int psm_am_register_handlers(void) {
  return kNoDevice;
}
int psm_am_reply_short(void) {
  return kNoDevice;
}
int psm_am_request_short(void) {
  return kNoDevice;
}
int psm_ep_close(void) {
  return kNoDevice;
}
int psm_ep_connect(void) {
  return kNoDevice;
}
int psm_ep_epid_lookup(void) {
  return kNoDevice;
}
int psm_ep_num_devunits(void) {
  return kNoDevice;
}
int psm_ep_open(void) {
  return kNoDevice;
}
int psm_ep_open_opts_get_defaults(void) {
  return kNoDevice;
}
void* psm_epaddr_getctxt(void) {
  return NULL;
}
int psm_epaddr_setctxt(void) {
  return kNoDevice;
}
int psm_error_register_handler(void) {
  return kNoDevice;
}
int psm_finalize(void) {
  return kNoDevice;
}
int psm_init(void) {
  return kNoDevice;
}
int psm_mq_cancel(void) {
  return kNoDevice;
}
int psm_mq_finalize(void) {
  return kNoDevice;
}
int psm_mq_init(void) {
  return kNoDevice;
}
int psm_mq_ipeek(void) {
  return kNoDevice;
}
int psm_mq_iprobe(void) {
  return kNoDevice;
}
int psm_mq_irecv(void) {
  return kNoDevice;
}
int psm_mq_isend(void) {
  return kNoDevice;
}
int psm_mq_send(void) {
  return kNoDevice;
}
int psm_mq_test(void) {
  return kNoDevice;
}
