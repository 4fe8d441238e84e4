// Frame encoding and checking (see include/lego/fit_wire.h). decode_frame() is the only
// reader of untrusted bytes in libfit and is fuzzed (libfit/fuzz_frame.cc).
#include <cstring>
#include <string>

#include "lego/fit_wire.h"

namespace lego::fit::wire {

const char* kind_name(uint8_t kind) {
  switch (static_cast<Kind>(kind)) {
    case Kind::kRequest:
      return "request";
    case Kind::kReply:
      return "reply";
    case Kind::kError:
      return "error";
    case Kind::kHello:
      return "hello";
    case Kind::kChallenge:
      return "challenge";
    case Kind::kProof:
      return "proof";
    case Kind::kWelcome:
      return "welcome";
  }
  return "unknown";
}

Status check_header(const FrameHeader& h, size_t max_payload) {
  if (h.magic != kMagic) return Status(EPROTO, "not a FIT frame (bad magic)");
  if (h.version != kVersion) {
    return Status(EPROTONOSUPPORT, "FIT frame version " + std::to_string(h.version) +
                                       ", this node speaks version " + std::to_string(kVersion));
  }
  if (h.kind < static_cast<uint8_t>(Kind::kRequest) ||
      h.kind > static_cast<uint8_t>(Kind::kWelcome)) {
    return Status(EPROTO, "unknown FIT frame kind " + std::to_string(h.kind));
  }
  if (h.length > max_payload) {
    return Status(EMSGSIZE, "FIT frame payload of " + std::to_string(h.length) +
                                " bytes exceeds the limit of " + std::to_string(max_payload));
  }
  return Status();
}

Result<FrameView> decode_frame(std::span<const std::byte> bytes, size_t max_payload) {
  FrameView view{};
  if (bytes.size() < sizeof(FrameHeader)) {
    return Status(EPROTO, "truncated frame: " + std::to_string(bytes.size()) +
                              " bytes, a header needs " + std::to_string(sizeof(FrameHeader)));
  }
  std::memcpy(&view.header, bytes.data(), sizeof(FrameHeader));
  const FrameHeader& h = view.header;
  Status st = check_header(h, max_payload);
  if (!st.is_ok()) return st;
  size_t payload = bytes.size() - sizeof(FrameHeader);
  if (h.length != payload) {
    return Status(EPROTO, "FIT frame says " + std::to_string(h.length) + " payload bytes but " +
                              std::to_string(payload) + " arrived");
  }
  view.payload = bytes.subspan(sizeof(FrameHeader), payload);
  return view;
}

void encode_header(std::span<std::byte> out, Kind kind, uint16_t opcode, uint32_t payload_length,
                   int32_t status, uint64_t request_id, uint32_t source_node) {
  FrameHeader h{};
  h.magic = kMagic;
  h.version = kVersion;
  h.kind = static_cast<uint8_t>(kind);
  h.opcode = opcode;
  h.length = payload_length;
  h.status = status;
  h.request_id = request_id;
  h.source_node = source_node;
  std::memcpy(out.data(), &h, sizeof(h));
}

uint64_t compact_data(Kind kind, uint16_t opcode, uint64_t request_id) {
  return (request_id << 32) | (uint64_t{opcode} << 16) |
         (uint64_t{static_cast<uint8_t>(kind)} << 8) | kCompactMarker;
}

Result<FrameView> decode_compact(uint64_t data, std::span<const std::byte> payload,
                                 size_t max_payload, uint32_t source_node) {
  if ((data & 0xff) != kCompactMarker) return Status(EPROTO, "bad compact FIT frame marker");
  auto kind = static_cast<uint8_t>(data >> 8);
  if (kind != static_cast<uint8_t>(Kind::kRequest) && kind != static_cast<uint8_t>(Kind::kReply)) {
    return Status(EPROTO, std::string("compact FIT frame of kind ") + kind_name(kind));
  }
  if (payload.size() > max_payload) {
    return Status(EMSGSIZE, "compact FIT frame of " + std::to_string(payload.size()) +
                                " bytes exceeds the limit of " + std::to_string(max_payload));
  }
  FrameView v{};
  v.header.magic = kMagic;
  v.header.version = kVersion;
  v.header.kind = kind;
  v.header.opcode = static_cast<uint16_t>(data >> 16);
  v.header.length = static_cast<uint32_t>(payload.size());
  v.header.request_id = data >> 32;
  v.header.source_node = source_node;
  v.payload = payload;
  return v;
}

}  // namespace lego::fit::wire
