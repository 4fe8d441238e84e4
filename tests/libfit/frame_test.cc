// decode_frame() refuses every malformed frame with the right errno and accepts exactly
// the well-formed ones.
#include <catch2/catch.hpp>

#include <cstring>
#include <vector>

#include "lego/fit_wire.h"

using namespace lego::fit::wire;

namespace {
std::vector<std::byte> frame(Kind kind, size_t payload, uint32_t declared) {
  std::vector<std::byte> b(sizeof(FrameHeader) + payload, std::byte{0x42});
  encode_header(b, kind, 7, declared, 0, 99, 3);
  return b;
}
}  // namespace

TEST_CASE("a well-formed frame decodes to its header and payload") {
  auto b = frame(Kind::kRequest, 10, 10);
  auto f = decode_frame(b, 1024);
  REQUIRE(f.is_ok());
  CHECK(f->header.opcode == 7);
  CHECK(f->header.request_id == 99);
  CHECK(f->header.source_node == 3);
  CHECK(f->payload.size() == 10);
  CHECK(f->payload.data() == b.data() + sizeof(FrameHeader));
}

TEST_CASE("malformed frames are refused with the right errno") {
  SECTION("shorter than a header") {
    auto b = frame(Kind::kRequest, 0, 0);
    CHECK(decode_frame(std::span(b).first(31), 1024).status().code() == EPROTO);
    CHECK(decode_frame({}, 1024).status().code() == EPROTO);
  }
  SECTION("bad magic") {
    auto b = frame(Kind::kRequest, 0, 0);
    b[0] = std::byte{0};
    CHECK(decode_frame(b, 1024).status().code() == EPROTO);
  }
  SECTION("another version") {
    auto b = frame(Kind::kRequest, 0, 0);
    b[4] = std::byte{2};
    auto f = decode_frame(b, 1024);
    CHECK(f.status().code() == EPROTONOSUPPORT);
    CHECK_THAT(f.status().message(), Catch::Contains("version 2"));
  }
  SECTION("unknown kind") {
    auto b = frame(Kind::kRequest, 0, 0);
    b[5] = std::byte{0};
    CHECK(decode_frame(b, 1024).status().code() == EPROTO);
    b[5] = std::byte{200};
    CHECK(decode_frame(b, 1024).status().code() == EPROTO);
  }
  SECTION("length says more than arrived (truncated)") {
    auto b = frame(Kind::kReply, 10, 20);
    CHECK(decode_frame(b, 1024).status().code() == EPROTO);
  }
  SECTION("length says less than arrived") {
    auto b = frame(Kind::kReply, 10, 5);
    CHECK(decode_frame(b, 1024).status().code() == EPROTO);
  }
  SECTION("payload above the limit") {
    auto b = frame(Kind::kReply, 100, 100);
    CHECK(decode_frame(b, 99).status().code() == EMSGSIZE);
    CHECK(decode_frame(b, 100).is_ok());
  }
}

TEST_CASE("compact frames carry kind, opcode and the request id's low bits") {
  std::vector<std::byte> payload(4096, std::byte{7});
  uint64_t data = compact_data(Kind::kReply, 0x1234, 0xabcdef0012345678ull);
  auto f = decode_compact(data, payload, 4096, 9);
  REQUIRE(f.is_ok());
  CHECK(f->header.kind == static_cast<uint8_t>(Kind::kReply));
  CHECK(f->header.opcode == 0x1234);
  CHECK(f->header.request_id == 0x12345678u);
  CHECK(f->header.source_node == 9);
  CHECK(f->payload.size() == 4096);
}

TEST_CASE("malformed compact frames are refused") {
  std::vector<std::byte> payload(100);
  CHECK(decode_compact(0, payload, 1024, 0).status().code() == EPROTO);  // no marker
  CHECK(decode_compact(compact_data(Kind::kHello, 1, 1), payload, 1024, 0).status().code() ==
        EPROTO);  // only requests and replies travel compact
  CHECK(decode_compact(compact_data(Kind::kRequest, 1, 1), payload, 99, 0).status().code() ==
        EMSGSIZE);
}

// The socket server judges a header before its payload arrives (fit_wire.h).
TEST_CASE("check_header judges a header alone, as decode_frame would") {
  auto b = frame(Kind::kHello, 0, 100000);  // declares a payload that has not come
  FrameHeader h;
  memcpy(&h, b.data(), sizeof(h));
  CHECK(check_header(h, 200000).is_ok());
  CHECK(check_header(h, kMaxHandshakePayload).code() == EMSGSIZE);
  FrameHeader bad = h;
  bad.magic = 0;
  CHECK(check_header(bad, 200000).code() == EPROTO);
  bad = h;
  bad.version = 2;
  CHECK(check_header(bad, 200000).code() == EPROTONOSUPPORT);
  bad = h;
  bad.kind = 0;
  CHECK(check_header(bad, 200000).code() == EPROTO);
  bad.kind = static_cast<uint8_t>(Kind::kWelcome) + 1;
  CHECK(check_header(bad, 200000).code() == EPROTO);
}
