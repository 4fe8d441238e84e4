// A stand-in for libpsm2.so.2 (Intel Omni-Path PSM2), which libfit loads in its place when this
// host has no Omni-Path (hfi1) device: see libfit/fabric_loader.cc for why and when.
//
// libfabric links libpsm2.so.2 for its psm2 provider. Without a device that provider cannot
// work, but the real library's constructor still costs every process that loads
// libfabric ~100 ms (it pins the CPU
// and sleeps). This library has the same SONAME and
// defines every symbol libfabric imports from it (32, from `objdump -T libfabric.so.1`),
// so the dynamic linker takes it for the real one. Each call fails as the real library
// fails without a device, and the provider reports itself unavailable. No constructor,
// no signal handlers, no threads.
//
// The functions declare no parameters: callers pass theirs in registers and the stand-ins
// ignore them (safe in the System V x86-64 ABI); the return types are the real ones' (an
// error code, a pointer or a mask).
#include <stddef.h>
#include <stdint.h>

// PSM2_EP_NO_DEVICE: what the real library answers when it finds no device.
enum { kNoDevice = 21 };

const char* psm2_error_get_string(int error) {
  (void)error;
  return "libpsm2.so.2 is lego's stand-in: this host has no Omni-Path (hfi1) device";
}

int psm2_am_get_parameters(void) {
  return kNoDevice;
}
int psm2_am_get_source(void) {
  return kNoDevice;
}
int psm2_am_register_handlers_2(void) {
  return kNoDevice;
}
int psm2_am_reply_short(void) {
  return kNoDevice;
}
int psm2_am_request_short(void) {
  return kNoDevice;
}
int psm2_ep_close(void) {
  return kNoDevice;
}
int psm2_ep_connect(void) {
  return kNoDevice;
}
int psm2_ep_disconnect2(void) {
  return kNoDevice;
}
int psm2_ep_epid_lookup2(void) {
  return kNoDevice;
}
int psm2_ep_open(void) {
  return kNoDevice;
}
int psm2_ep_open_opts_get_defaults(void) {
  return kNoDevice;
}
void* psm2_epaddr_getctxt(void) {
  return NULL;
}
int psm2_epaddr_setctxt(void) {
  return kNoDevice;
}
int psm2_epaddr_to_epid(void) {
  return kNoDevice;
}
int psm2_error_register_handler(void) {
  return kNoDevice;
}
int psm2_finalize(void) {
  return kNoDevice;
}
uint64_t psm2_get_capability_mask(void) {
  return 0;
}
int psm2_info_query(void) {
  return kNoDevice;
}
int psm2_init(void) {
  return kNoDevice;
}
int psm2_mq_cancel(void) {
  return kNoDevice;
}
int psm2_mq_improbe2(void) {
  return kNoDevice;
}
int psm2_mq_imrecv(void) {
  return kNoDevice;
}
int psm2_mq_init(void) {
  return kNoDevice;
}
int psm2_mq_ipeek(void) {
  return kNoDevice;
}
int psm2_mq_iprobe2(void) {
  return kNoDevice;
}
int psm2_mq_irecv2(void) {
  return kNoDevice;
}
int psm2_mq_isend2(void) {
  return kNoDevice;
}
int psm2_mq_send2(void) {
  return kNoDevice;
}
int psm2_mq_test2(void) {
  return kNoDevice;
}
int psm2_mq_wait2(void) {
  return kNoDevice;
}
int psm2_poll(void) {
  return kNoDevice;
}
