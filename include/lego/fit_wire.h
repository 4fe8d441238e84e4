// The FIT wire format, version 1: what crosses the network between lego nodes.
//
// Every message is one frame: a 32-byte FrameHeader followed by `length` payload bytes.
// All fields are little-endian (lego runs on x86-64 and checks this at compile time).
// A receiver checks magic, version, kind and that `length` matches the bytes received and
// does not exceed its max_message_bytes before looking at the payload; decode_frame() does
// all of that and is the only way libfit reads a frame.
//
// Connection set-up (both ends must hold the cluster key, see fit.h):
//   client -> server  kHello      HelloPayload (client node id, client nonce, [shm name])
//   server -> client  kChallenge  ChallengePayload (server nonce, server's proof)
//   client -> server  kProof      ProofPayload (client's proof)
//   server -> client  kWelcome    (empty) — or kError with status EACCES, then close
// Then: kRequest frames (opcode, request_id) each answered by one kReply or kError frame
// with the same request_id. kError's payload is a UTF-8 message; status is an errno.
// A client sends nothing after kProof until it has read kWelcome.
//
// What a server does with a peer that breaks these rules. "Closes" means: sends the
// kError frame named (request_id and opcode echo the offending frame's), without waiting
// for a peer that does not read, then closes the connection (tcp, ofi_tcp, verbs) or
// forgets the peer's address and state (shm, whose endpoint is shared).
//   - bad magic, or an unknown kind                        kError(EPROTO), closes
//   - another version                                      kError(EPROTONOSUPPORT), closes
//   - a length over the limit: max_message_bytes once      kError(EMSGSIZE), closes
//     authenticated, kMaxHandshakePayload before
//   - before kWelcome, any frame but kHello (first) and    kError(EACCES), closes
//     kProof (after kChallenge): a request, a reply, ...
//   - a kHello or kProof of the wrong size, a 2nd kHello   kError(EPROTO), closes
//   - a wrong proof (the peer lacks the key)               kError(EACCES), closes
//   - after kWelcome, any frame but kRequest               kError(EPROTO), closes
//   - bytes after kProof, before kWelcome was sent         kError(EPROTO), closes
//   - not authenticated within the handshake deadline     kError(ETIMEDOUT), closes
//     (min(timeout_ms, 3 s) after the connection opened)
//   - over a cap on connections awaiting the handshake     kError(EAGAIN) to the one
//     (256 per node, 32 per source address): the oldest     chosen, closes it
//     that has not said hello goes (else the oldest), never  (a client retries the
//     the newest, never an honest handshake under way        handshake for timeout_ms)
//     while silent ones hold slots
//   - tcp: a reply the peer does not read (the socket      closes, no frame (it would
//     takes none of it for timeout_ms)                     not be read either)
// A header that arrives alone is judged at once (the socket transport checks magic,
// version, kind, length and the handshake state before waiting for the payload); a
// header whose payload never comes costs nothing but, before authentication, the
// handshake deadline. An unknown opcode (EOPNOTSUPP) or a handler's error is an answer,
// not a rejection: the connection stays open.
//
// Compact frames (shm only, after the handshake): a kRequest or kReply may travel as its
// bare payload, with kind, opcode and the low 32 bits of request_id in the message's
// 64-bit remote CQ data (compact_data()). A 4 KiB payload then stays within the shm
// provider's 4096-byte inject protocol instead of falling to cross-memory attach (one
// syscall per message, ~4 µs here). decode_compact() checks it like decode_frame().
// A compact reply over the inject size travels in parts of at most that size, each with
// the reply's CQ data; every part but the last carries kCompactPartMarker instead of
// kCompactMarker, and the receiver joins them. Why: shm completes a send over its inject
// size only once the receiver has copied it, and a sender's completions in order, so a
// large reply to a client that died (SIGKILL) would hold back every later completion of
// the server, for every client, for good. Parts within the inject size complete at once.
//
// Compatibility: a peer that sees another version answers kError(EPROTONOSUPPORT) if it
// can and closes; version 1 peers never guess at other versions' layouts.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>

#include "lego/status.h"

namespace lego::fit::wire {

static_assert(std::endian::native == std::endian::little, "FIT frames are little-endian");

inline constexpr uint32_t kMagic = 0x5449464c;  // "LFIT"
inline constexpr uint8_t kVersion = 1;

enum class Kind : uint8_t {
  kRequest = 1,
  kReply = 2,
  kError = 3,
  kHello = 4,
  kChallenge = 5,
  kProof = 6,
  kWelcome = 7,
};

struct FrameHeader {
  uint32_t magic;
  uint8_t version;
  uint8_t kind;          // Kind
  uint16_t opcode;       // kRequest/kReply/kError: the RPC opcode
  uint32_t length;       // payload bytes after the header
  int32_t status;        // kError: errno value; otherwise 0
  uint64_t request_id;   // kRequest: chosen by the caller; echoed by kReply/kError
  uint32_t source_node;  // sender's node id
  uint32_t reserved;     // 0
};
static_assert(sizeof(FrameHeader) == 32);

inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kProofBytes = 32;  // HMAC-SHA-256
inline constexpr size_t kMaxShmName = 128;

struct HelloPayload {
  uint32_t client_node;
  uint32_t window;  // requests the client may have outstanding on this connection
  uint8_t client_nonce[kNonceBytes];
  uint32_t name_length;  // shm: length of the client's endpoint name; else 0
  uint8_t name[kMaxShmName];
  uint32_t pid;  // shm: the client's pid, so the server can tell when it is gone; else 0
};
static_assert(sizeof(HelloPayload) == 176);

struct ChallengePayload {
  uint32_t server_node;
  uint32_t pid;  // shm: the server's pid; else 0
  uint8_t server_nonce[kNonceBytes];
  uint8_t server_proof[kProofBytes];
};
static_assert(sizeof(ChallengePayload) == 72);

struct ProofPayload {
  uint8_t client_proof[kProofBytes];
};
static_assert(sizeof(ProofPayload) == 32);

// A decoded frame: a view into the received bytes.
struct FrameView {
  FrameHeader header;
  std::span<const std::byte> payload;
};

// The largest payload a server accepts before a peer is authenticated: a HelloPayload.
// (A ProofPayload is smaller; requests are refused until kWelcome.)
inline constexpr size_t kMaxHandshakePayload = sizeof(HelloPayload);

// Checks a header alone: magic and kind (EPROTO), version (EPROTONOSUPPORT), length at
// most max_payload (EMSGSIZE). What decode_frame checks first; the socket transport calls
// it as soon as a header is in, so a bad frame is refused before its payload arrives.
Status check_header(const FrameHeader& h, size_t max_payload);

// Checks and decodes one received frame of `bytes` (exactly the bytes received).
// Errors (EPROTO unless noted): shorter than a header, bad magic, unknown kind, length
// not matching the bytes received; EPROTONOSUPPORT for another version; EMSGSIZE when the
// payload exceeds max_payload. Never reads outside `bytes`.
Result<FrameView> decode_frame(std::span<const std::byte> bytes, size_t max_payload);

// Writes a header for `payload_length` bytes into out (>= sizeof(FrameHeader)).
void encode_header(std::span<std::byte> out, Kind kind, uint16_t opcode, uint32_t payload_length,
                   int32_t status, uint64_t request_id, uint32_t source_node);

const char* kind_name(uint8_t kind);

// The CQ data of a compact frame: [63..32] request_id low bits, [31..16] opcode,
// [15..8] kind, [7..0] kCompactMarker.
inline constexpr uint8_t kCompactMarker = 0xC1;
inline constexpr uint8_t kCompactPartMarker = 0xC2;  // a part of a compact frame; more follow
uint64_t compact_data(Kind kind, uint16_t opcode, uint64_t request_id);
// The CQ data of a part of the compact frame whose CQ data is `data`, and back.
inline constexpr uint64_t compact_part_data(uint64_t data) {
  return (data & ~uint64_t{0xff}) | kCompactPartMarker;
}
inline constexpr bool is_compact_part(uint64_t data) {
  return (data & 0xff) == kCompactPartMarker;
}
// Rebuilds the header of a compact frame (request_id holds only its low 32 bits).
// EPROTO for a bad marker or a kind other than request/reply; EMSGSIZE above max_payload.
Result<FrameView> decode_compact(uint64_t data, std::span<const std::byte> payload,
                                 size_t max_payload, uint32_t source_node);

}  // namespace lego::fit::wire
