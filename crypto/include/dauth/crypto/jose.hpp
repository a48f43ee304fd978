// The JOSE pieces ESPrim needs (PROTOCOL.md §7): base64url (RFC 7515 §2) and a JWE Compact Serialization
// (RFC 7516 §7.1) with alg "dir" and enc "A256GCM" (RFC 7518 §5.3), on mbedTLS. The protected header is handled as
// text here: parsing its JSON is the caller's (rspf/), so crypto/ stays free of a JSON dependency.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::crypto {

// base64url without padding. Decoding refuses padding, characters outside the url-safe alphabet (whitespace
// included), a length of 1 mod 4 and non-zero trailing bits (one text per byte string), with Errc::parse.
std::string base64url_encode(ByteView bytes);
Result<Bytes> base64url_decode(std::string_view text);

inline constexpr std::size_t kA256GcmKeySize = 32;
inline constexpr std::size_t kGcmIvSize = 12;
inline constexpr std::size_t kGcmTagSize = 16;
// Bounds what a parse allocates: a whole compact object of at most this many characters.
inline constexpr std::size_t kMaxJweCompactSize = 64 * 1024;

// The five parts of a compact JWE, decoded. The encrypted-key part must be empty ("dir").
struct JweCompact {
  std::string protected_b64;     // the first part as it travelled: its ASCII bytes are the AAD
  std::string protected_header;  // its decoded text (JSON, not parsed here)
  Bytes iv;                      // kGcmIvSize bytes
  Bytes ciphertext;
  Bytes tag;                     // kGcmTagSize bytes
};

// Structure only: five dot-separated base64url parts, a non-empty first and an empty second part, IV and tag of the
// sizes above, at most kMaxJweCompactSize characters. Errc::parse with which part is wrong; never quotes the input.
Result<JweCompact> parse_jwe_compact(std::string_view text);

// A compact JWE of plaintext under cek (kA256GcmKeySize bytes, else Errc::invalid_argument) with a fresh random
// IV; protected_header is the header's JSON text, sent as it is (base64url; empty: Errc::invalid_argument). An object
// longer than kMaxJweCompactSize, which no peer would parse, is Errc::limit.
Result<std::string> jwe_encrypt_dir_a256gcm(const SecretBuffer& cek, std::string_view protected_header,
                                            ByteView plaintext);
// The same with a caller-chosen IV (known-answer tests only; an IV must never repeat under one key). An IV other than
// kGcmIvSize bytes is Errc::invalid_argument.
Result<std::string> jwe_encrypt_dir_a256gcm_with_iv(const SecretBuffer& cek, std::string_view protected_header,
                                                    ByteView plaintext, ByteView iv);

// Decrypts and verifies: Errc::crypto when the tag does not verify (any change to the header, IV, ciphertext or tag,
// or another key); Errc::invalid_argument for a key, IV or tag of the wrong size (a JweCompact not made by the parse).
Result<Bytes> jwe_decrypt_dir_a256gcm(const SecretBuffer& cek, const JweCompact& object);

}  // namespace dauth::crypto
