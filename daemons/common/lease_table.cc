// LeaseTable's secrets (include/lego/lease_table.h): libsodium's, kept out of the header.
#include "lego/lease_table.h"

#include <sodium.h>

namespace lego {

void lease_new_secret(std::span<uint8_t, kLeaseSecretBytes> secret) {
  randombytes_buf(secret.data(), secret.size());
}

bool lease_secrets_equal(std::span<const uint8_t, kLeaseSecretBytes> a,
                         std::span<const uint8_t, kLeaseSecretBytes> b) {
  return sodium_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace lego
