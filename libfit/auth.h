// Challenge-response proof that a peer holds the cluster key (libsodium HMAC-SHA-256).
// Each side proves knowledge of the key over both nonces and both node ids, with a
// different label per direction so a proof cannot be reflected back.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "lego/fit_wire.h"

namespace lego::fit::auth {

// Fills `nonce` with fresh random bytes.
void make_nonce(uint8_t (&nonce)[wire::kNonceBytes]);

enum class Direction : uint8_t { kServerToClient, kClientToServer };

// The proof a node in `direction` sends: HMAC(key, label | client_nonce | server_nonce |
// client_node | server_node).
void prove(const std::vector<uint8_t>& key, Direction direction,
           const uint8_t (&client_nonce)[wire::kNonceBytes],
           const uint8_t (&server_nonce)[wire::kNonceBytes], uint32_t client_node,
           uint32_t server_node, uint8_t (&proof)[wire::kProofBytes]);

// Constant-time check of a received proof.
bool verify(const std::vector<uint8_t>& key, Direction direction,
            const uint8_t (&client_nonce)[wire::kNonceBytes],
            const uint8_t (&server_nonce)[wire::kNonceBytes], uint32_t client_node,
            uint32_t server_node, const uint8_t (&proof)[wire::kProofBytes]);

// A random 64-bit value for memory-region keys.
uint64_t random_u64();

}  // namespace lego::fit::auth
