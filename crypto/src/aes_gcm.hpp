// AES-256-GCM with a 96-bit IV and a 128-bit tag on an arbitrary AAD: the primitive under jose.cpp's JWE. Internal to
// dauth_crypto; tests/crypto/test_jose.cpp includes it for the NIST known answers, whose AADs are not base64url text.
#pragma once

#include "dauth/crypto/jose.hpp"

namespace dauth::crypto::detail {

struct GcmSealed {
  Bytes ciphertext;  // as long as the plaintext
  Bytes tag;         // kGcmTagSize bytes
};

// Errc::invalid_argument for a key other than kA256GcmKeySize bytes or an IV other than kGcmIvSize bytes.
Result<GcmSealed> aes256gcm_seal(const SecretBuffer& key, ByteView iv, ByteView aad, ByteView plaintext);
// The same checks, and a tag other than kGcmTagSize bytes; Errc::crypto when the tag does not verify (no plaintext
// leaves the function then).
Result<Bytes> aes256gcm_open(const SecretBuffer& key, ByteView iv, ByteView aad, ByteView ciphertext, ByteView tag);

}  // namespace dauth::crypto::detail
