// HMAC-SHA-256 and HKDF-SHA-256 (RFC 5869), on mbedTLS. Outputs are secrets.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::crypto {

inline constexpr std::size_t kSha256Size = 32;

SecretBuffer hmac_sha256(const SecretBuffer& key, ByteView message);
// Overload for a message made of two parts (label || data) without concatenating into non-secret memory.
SecretBuffer hmac_sha256(const SecretBuffer& key, ByteView part1, ByteView part2);

// RFC 5869 extract-and-expand. length must be 1..255*32 (errc::invalid_argument otherwise).
Result<SecretBuffer> hkdf_sha256(const SecretBuffer& ikm, ByteView salt, ByteView info, std::size_t length);

// SHA-256 of public data (certificate and public-key fingerprints).
Bytes sha256(ByteView data);

// A keyed 64-bit tag of data (SipHash-2-4, libsodium crypto_shorthash) under a kShortHashKeySize-byte key, where a
// tag must say "same or not" and nothing else about the data, at a few ns per byte: e.g. transport's ETags of
// response bodies. Not a MAC for authentication (64 bits). A key of another size throws std::invalid_argument.
inline constexpr std::size_t kShortHashKeySize = 16;
std::uint64_t short_hash(const SecretBuffer& key, ByteView data);

}  // namespace dauth::crypto
