// What a failed call to another node means, and whether to send it again: the one
// classification every lego caller uses (the ExCache's miss and eviction paths, the
// memory-node backend, the storage client, lego-run), so that all of them judge an errno
// alike, and the one number of attempts they allow.
//
// The codes are errno values, as libfit returns them (include/lego/fit.h lists what each
// means there) or as a peer's handler answered. classify() looks at the code alone: a
// handler that answers ETIMEDOUT is taken for a timeout. lego's own handlers never answer
// with the codes of the first four classes except EACCES (a storage node's "permission
// denied"), which is why the refused class passes through to programs like an answer.
//
//   class       errno                       what happened                      what to do
//   kRetry      ETIMEDOUT                   no reply in time: the peer may be  send again,
//                                           slow, stopped or gone; the request up to
//                                           may or may not have been carried   kAttempts
//                                           out (requests that may be sent     in all
//                                           again are idempotent: a write-back
//                                           or a file write at an offset)
//               ECONNRESET, EPIPE           the connection broke (the peer died
//                                           or restarted); libfit opens a new
//                                           one on the next call
//               EAGAIN                      the peer kept closing our handshake
//                                           (its cap on connections awaiting
//                                           one; libfit already retried it for
//                                           timeout_ms)
//               EINTR                       interrupted before an answer
//   kPeerGone   ECONNREFUSED, EHOSTUNREACH, nothing listens at the peer's         give up: the
//               ENETUNREACH, EHOSTDOWN,     address, or it cannot be reached     peer is lost
//               ENETDOWN                    at all (libfit: EHOSTUNREACH also
//                                           for a node not in the cluster file)
//   kRefused    EACCES, EPROTONOSUPPORT     the peer refused us: we lack the     give up, and
//                                           cluster key, or speak another        say why
//                                           protocol version
//   kProtocol   EPROTO, EMSGSIZE            the exchange broke: a corrupt or     give up: the
//                                           truncated frame, a message over      same breaks
//                                           max_message_bytes                    the same way
//   kAnswer     anything else (ENOENT,      the peer answered with its own       pass it on
//               ENOSPC, ENOMEM, ESTALE,     error: sending again gets the same
//               EOPNOTSUPP, ...)            answer
//
// Thread-safety: pure functions. Async-signal-safe (the ExCache classifies inside its
// SIGBUS handler): no allocation, no locks.
#pragma once

#include <cerrno>
#include <cstdint>

#include "lego/status.h"

namespace lego {

enum class ErrorClass : uint8_t {
  kOk,        // not an error
  kRetry,     // may pass: send again (up to kAttempts tries in all)
  kPeerGone,  // the peer cannot be reached
  kRefused,   // the peer refused us: the key or the protocol version
  kProtocol,  // the exchange broke: a corrupt, truncated or oversized message
  kAnswer,    // the peer's own answer
};

// Tries of one request before its caller gives up, the first one included. A memory node
// that stops answering (stopped, or starved of CPU) is waited for this many timeouts
// before a program is told it is lost.
inline constexpr int kAttempts = 8;

constexpr ErrorClass classify(int code) {
  switch (code) {
    case 0:
      return ErrorClass::kOk;
    case ETIMEDOUT:
    case ECONNRESET:
    case EPIPE:
    case EAGAIN:
    case EINTR:
      return ErrorClass::kRetry;
    case ECONNREFUSED:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case EHOSTDOWN:
    case ENETDOWN:
      return ErrorClass::kPeerGone;
    case EACCES:
    case EPROTONOSUPPORT:
      return ErrorClass::kRefused;
    case EPROTO:
    case EMSGSIZE:
      return ErrorClass::kProtocol;
    default:
      return ErrorClass::kAnswer;
  }
}

inline ErrorClass classify(const Status& st) {
  return classify(st.code());
}

// Whether the transport failed rather than the peer answering: it could not be asked
// (kRetry after the attempts, kPeerGone) or did not answer usably (kProtocol). The storage
// client turns these into EIO for programs; lego-run keeps such a memory node's spaces to
// close later.
constexpr bool transport_failure(ErrorClass c) {
  return c == ErrorClass::kRetry || c == ErrorClass::kPeerGone || c == ErrorClass::kProtocol;
}

}  // namespace lego
