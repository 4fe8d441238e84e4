#include "libfit/auth.h"

#include <sodium.h>

#include <cstdlib>
#include <cstring>

namespace lego::fit::auth {
namespace {

void ensure_sodium() {
  // sodium_init is idempotent and thread-safe; it fails only if no entropy source exists,
  // and nothing in FIT is safe without one.
  if (sodium_init() < 0) abort();
}

void compute(const std::vector<uint8_t>& key, Direction direction,
             const uint8_t (&client_nonce)[wire::kNonceBytes],
             const uint8_t (&server_nonce)[wire::kNonceBytes], uint32_t client_node,
             uint32_t server_node, uint8_t (&mac)[crypto_auth_hmacsha256_BYTES]) {
  ensure_sodium();
  crypto_auth_hmacsha256_state st;
  crypto_auth_hmacsha256_init(&st, key.data(), key.size());
  const char* label = direction == Direction::kServerToClient ? "lego-fit-v1 server proof"
                                                              : "lego-fit-v1 client proof";
  crypto_auth_hmacsha256_update(&st, reinterpret_cast<const uint8_t*>(label), strlen(label));
  crypto_auth_hmacsha256_update(&st, client_nonce, wire::kNonceBytes);
  crypto_auth_hmacsha256_update(&st, server_nonce, wire::kNonceBytes);
  uint32_t ids[2] = {client_node, server_node};
  crypto_auth_hmacsha256_update(&st, reinterpret_cast<const uint8_t*>(ids), sizeof(ids));
  crypto_auth_hmacsha256_final(&st, mac);
}

}  // namespace

static_assert(wire::kProofBytes == crypto_auth_hmacsha256_BYTES);

void make_nonce(uint8_t (&nonce)[wire::kNonceBytes]) {
  ensure_sodium();
  randombytes_buf(nonce, sizeof(nonce));
}

void prove(const std::vector<uint8_t>& key, Direction direction,
           const uint8_t (&client_nonce)[wire::kNonceBytes],
           const uint8_t (&server_nonce)[wire::kNonceBytes], uint32_t client_node,
           uint32_t server_node, uint8_t (&proof)[wire::kProofBytes]) {
  compute(key, direction, client_nonce, server_nonce, client_node, server_node, proof);
}

bool verify(const std::vector<uint8_t>& key, Direction direction,
            const uint8_t (&client_nonce)[wire::kNonceBytes],
            const uint8_t (&server_nonce)[wire::kNonceBytes], uint32_t client_node,
            uint32_t server_node, const uint8_t (&proof)[wire::kProofBytes]) {
  uint8_t expected[wire::kProofBytes];
  compute(key, direction, client_nonce, server_nonce, client_node, server_node, expected);
  return sodium_memcmp(expected, proof, wire::kProofBytes) == 0;
}

uint64_t random_u64() {
  ensure_sodium();
  uint64_t v;
  randombytes_buf(&v, sizeof(v));
  return v;
}

}  // namespace lego::fit::auth
