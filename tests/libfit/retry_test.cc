// lego/retry.h: every errno lands in the class the header's table says, and the helpers
// agree with it. Guards the one classification the ExCache, the memory-node backend, the
// storage client and lego-run share (issue 15: three places classified differently).
#include <catch2/catch.hpp>

#include "lego/retry.h"

using lego::classify;
using lego::ErrorClass;

TEST_CASE("each errno lands in the class retry.h documents") {
  CHECK(classify(0) == ErrorClass::kOk);
  CHECK(classify(lego::Status()) == ErrorClass::kOk);
  for (int code : {ETIMEDOUT, ECONNRESET, EPIPE, EAGAIN, EINTR}) {
    INFO(code);
    CHECK(classify(code) == ErrorClass::kRetry);
    CHECK(classify(lego::Status(code, "x")) == ErrorClass::kRetry);
  }
  for (int code : {ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, EHOSTDOWN, ENETDOWN}) {
    INFO(code);
    CHECK(classify(code) == ErrorClass::kPeerGone);
  }
  for (int code : {EACCES, EPROTONOSUPPORT}) {
    INFO(code);
    CHECK(classify(code) == ErrorClass::kRefused);
  }
  for (int code : {EPROTO, EMSGSIZE}) {
    INFO(code);
    CHECK(classify(code) == ErrorClass::kProtocol);
  }
  for (int code : {ENOENT, ENOSPC, ENOMEM, ESTALE, EOPNOTSUPP, EEXIST, EINVAL, EIO}) {
    INFO(code);
    CHECK(classify(code) == ErrorClass::kAnswer);
  }
}

TEST_CASE("transport failures are the peer not asked or not answering usably") {
  CHECK(lego::transport_failure(ErrorClass::kRetry));
  CHECK(lego::transport_failure(ErrorClass::kPeerGone));
  CHECK(lego::transport_failure(ErrorClass::kProtocol));
  CHECK_FALSE(lego::transport_failure(ErrorClass::kRefused));
  CHECK_FALSE(lego::transport_failure(ErrorClass::kAnswer));
  CHECK_FALSE(lego::transport_failure(ErrorClass::kOk));
  static_assert(lego::kAttempts == 8, "README promises 8 tries of a miss");
  static_assert(classify(ETIMEDOUT) == ErrorClass::kRetry, "usable in constant expressions");
}
