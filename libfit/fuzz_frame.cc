// libFuzzer target for decode_frame() and decode_compact(), the only readers of untrusted
// bytes in libfit.
// Build: bazel build --config=fuzz //libfit:fuzz_frame ; run: bazel-bin/libfit/fuzz_frame
// -max_total_time=30. Any crash, sanitizer report or an accepted frame whose payload view
// leaves the input is a bug.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>

#include "lego/fit_wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  for (size_t limit : {size_t{0}, size_t{64}, size_t{136 * 1024}}) {
    auto frame = lego::fit::wire::decode_frame(bytes, limit);
    if (!frame) continue;
    const auto& v = frame.value();
    const std::byte* end = bytes.data() + bytes.size();
    if (v.payload.data() < bytes.data() || v.payload.data() + v.payload.size() > end ||
        v.payload.size() != v.header.length || v.payload.size() > limit) {
      abort();
    }
  }
  // Compact frames: the first 8 bytes play the CQ data, the rest the payload.
  if (size >= 8) {
    uint64_t cq_data;
    memcpy(&cq_data, data, sizeof(cq_data));
    auto compact = lego::fit::wire::decode_compact(cq_data, bytes.subspan(8), 4096, 1);
    if (compact && compact.value().payload.size() > 4096) abort();
  }
  return 0;
}
