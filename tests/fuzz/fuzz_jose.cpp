// libFuzzer target: base64url_decode, parse_jwe_compact and, for what parses, jwe_decrypt_dir_a256gcm under a fixed
// key. Hostile text must give an Error, never a crash or OOB read; what decodes or parses must be canonical.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dauth/crypto/jose.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace crypto = dauth::crypto;
  const std::string_view text(reinterpret_cast<const char*>(data), size);

  // One text per byte string: whatever decodes encodes back to the same text.
  auto decoded = crypto::base64url_decode(text);
  if (decoded.ok() && crypto::base64url_encode(*decoded) != text) __builtin_trap();

  // Key 00 01 .. 1f: the seeds in tests/fuzz/corpus/fuzz_jose/*.jwe were made under it, so the verified-tag path
  // runs as well as the refusals.
  static const dauth::SecretBuffer key = [] {
    dauth::SecretBuffer fixed(crypto::kA256GcmKeySize);
    for (std::size_t i = 0; i < fixed.size(); ++i) fixed.data()[i] = static_cast<std::uint8_t>(i);
    return fixed;
  }();
  auto object = crypto::parse_jwe_compact(text);
  if (object.ok()) {
    if (object->iv.size() != crypto::kGcmIvSize || object->tag.size() != crypto::kGcmTagSize) __builtin_trap();
    auto header = crypto::base64url_decode(object->protected_b64);
    if (!header.ok() || std::string(header->begin(), header->end()) != object->protected_header) __builtin_trap();
    auto plaintext = crypto::jwe_decrypt_dir_a256gcm(key, *object);
    if (plaintext.ok() && plaintext->size() != object->ciphertext.size()) __builtin_trap();
  }

  // The input as a plaintext: what jwe_encrypt makes parses and opens to the same bytes.
  static const std::uint8_t kIv[crypto::kGcmIvSize] = {};
  auto made = crypto::jwe_encrypt_dir_a256gcm_with_iv(key, R"({"alg":"dir","enc":"A256GCM"})",
                                                      dauth::ByteView(data, size), dauth::ByteView(kIv, sizeof kIv));
  if (made.ok()) {
    auto parsed = crypto::parse_jwe_compact(*made);
    if (!parsed.ok()) __builtin_trap();
    auto opened = crypto::jwe_decrypt_dir_a256gcm(key, *parsed);
    if (!opened.ok() || *opened != dauth::Bytes(data, data + size)) __builtin_trap();
  }
  return 0;
}
