// base64url, AES-256-GCM and the JWE Compact Serialization with alg "dir" / enc "A256GCM" (docs/crypto.md, "JOSE").
#include "dauth/crypto/jose.hpp"

#include <sodium.h>

#include <mbedtls/gcm.h>

#include <array>
#include <cstdint>
#include <string>

#include "aes_gcm.hpp"
#include "mbedtls_error.hpp"

namespace dauth::crypto {

namespace {

constexpr int kBase64UrlVariant = sodium_base64_VARIANT_URLSAFE_NO_PADDING;

// RAII for a GCM context: mbedtls_gcm_free zeroes the expanded key schedule and the hash subkey.
class Aes256Gcm {
 public:
  Aes256Gcm() { mbedtls_gcm_init(&ctx_); }
  ~Aes256Gcm() { mbedtls_gcm_free(&ctx_); }
  Aes256Gcm(const Aes256Gcm&) = delete;
  Aes256Gcm& operator=(const Aes256Gcm&) = delete;

  Result<void> set_key(const SecretBuffer& key) {
    const int rc = mbedtls_gcm_setkey(&ctx_, MBEDTLS_CIPHER_ID_AES, key.data(),
                                      static_cast<unsigned>(key.size() * 8));
    if (rc != 0) return detail::mbedtls_error(rc, "AES-256-GCM: setting the key");
    return ok_result();
  }
  mbedtls_gcm_context* get() { return &ctx_; }

 private:
  mbedtls_gcm_context ctx_;
};

// mbedTLS and libsodium may check "length == 0 || pointer != NULL"; an empty view's data may be null, so empty
// inputs point here instead (never read: the length is 0). Empty outputs point at a local in the same way.
const std::uint8_t kNothing = 0;
const std::uint8_t* readable(ByteView bytes) { return bytes.size == 0 ? &kNothing : bytes.data; }

bool is_base64url_character(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

Result<void> check_gcm_sizes(const SecretBuffer& key, ByteView iv) {
  if (key.size() != kA256GcmKeySize) {
    return make_error(Errc::invalid_argument, "AES-256-GCM: key of " + std::to_string(key.size()) +
                                                  " bytes, must be " + std::to_string(kA256GcmKeySize));
  }
  if (iv.size != kGcmIvSize) {
    return make_error(Errc::invalid_argument, "AES-256-GCM: IV of " + std::to_string(iv.size) + " bytes, must be " +
                                                  std::to_string(kGcmIvSize));
  }
  return ok_result();
}

}  // namespace

std::string base64url_encode(ByteView bytes) {
  ensure_sodium_initialised();
  std::string text(sodium_base64_ENCODED_LEN(bytes.size, kBase64UrlVariant), '\0');  // with the terminating NUL
  sodium_bin2base64(text.data(), text.size(), readable(bytes), bytes.size, kBase64UrlVariant);
  text.resize(text.size() - 1);
  return text;
}

Result<Bytes> base64url_decode(std::string_view text) {
  ensure_sodium_initialised();
  const auto refused = [&] {
    return make_error(Errc::parse, "base64url: " + std::to_string(text.size()) +
                                       " characters are not unpadded canonical base64url (RFC 7515 §2)");
  };
  // libsodium 1.0.18 reads each character as a (signed) char in its constant-time lookup, and many bytes >= 0x80
  // come out as alphabet values: the alphabet is checked here. The text is never secret (it travels in messages).
  for (char c : text) {
    if (!is_base64url_character(c)) return refused();
  }
  // The rest of the strictness is libsodium's: without an `ignore` set and with b64_end null, a dangling sixth bit
  // group (length 1 mod 4) or non-zero bits left over in the last character fail the call.
  Bytes bytes(text.size() / 4 * 3 + 2);
  std::size_t decoded_size = 0;
  if (sodium_base642bin(bytes.data(), bytes.size(), text.data(), text.size(), nullptr, &decoded_size, nullptr,
                        kBase64UrlVariant) != 0) {
    return refused();
  }
  bytes.resize(decoded_size);
  return bytes;
}

namespace detail {

Result<GcmSealed> aes256gcm_seal(const SecretBuffer& key, ByteView iv, ByteView aad, ByteView plaintext) {
  if (auto sizes = check_gcm_sizes(key, iv); !sizes.ok()) return std::move(sizes).error();
  Aes256Gcm gcm;
  if (auto keyed = gcm.set_key(key); !keyed.ok()) return std::move(keyed).error();
  GcmSealed sealed{Bytes(plaintext.size), Bytes(kGcmTagSize)};
  std::uint8_t unused = 0;
  std::uint8_t* output = sealed.ciphertext.empty() ? &unused : sealed.ciphertext.data();
  const int rc = mbedtls_gcm_crypt_and_tag(gcm.get(), MBEDTLS_GCM_ENCRYPT, plaintext.size, iv.data, iv.size,
                                           readable(aad), aad.size, readable(plaintext), output, kGcmTagSize,
                                           sealed.tag.data());
  if (rc != 0) return mbedtls_error(rc, "AES-256-GCM: encrypting " + std::to_string(plaintext.size) + " bytes");
  return sealed;
}

Result<Bytes> aes256gcm_open(const SecretBuffer& key, ByteView iv, ByteView aad, ByteView ciphertext,
                             ByteView tag) {
  if (auto sizes = check_gcm_sizes(key, iv); !sizes.ok()) return std::move(sizes).error();
  if (tag.size != kGcmTagSize) {
    return make_error(Errc::invalid_argument, "AES-256-GCM: tag of " + std::to_string(tag.size) +
                                                  " bytes, must be " + std::to_string(kGcmTagSize));
  }
  Aes256Gcm gcm;
  if (auto keyed = gcm.set_key(key); !keyed.ok()) return std::move(keyed).error();
  Bytes plaintext(ciphertext.size);
  std::uint8_t unused = 0;
  std::uint8_t* output = plaintext.empty() ? &unused : plaintext.data();
  const int rc = mbedtls_gcm_auth_decrypt(gcm.get(), ciphertext.size, iv.data, iv.size, readable(aad), aad.size,
                                          tag.data, tag.size, readable(ciphertext), output);
  if (rc == MBEDTLS_ERR_GCM_AUTH_FAILED) {
    // mbedTLS has already zeroed the output; the caller learns only that the object is not authentic.
    return make_error(Errc::crypto, "AES-256-GCM: the tag does not verify (wrong key, or the object was changed)");
  }
  if (rc != 0) return mbedtls_error(rc, "AES-256-GCM: decrypting " + std::to_string(ciphertext.size) + " bytes");
  return plaintext;
}

}  // namespace detail

Result<JweCompact> parse_jwe_compact(std::string_view text) {
  if (text.size() > kMaxJweCompactSize) {
    return make_error(Errc::parse, "JWE compact: " + std::to_string(text.size()) + " characters, at most " +
                                       std::to_string(kMaxJweCompactSize) + " allowed");
  }
  constexpr std::size_t kParts = 5;
  static constexpr std::array<const char*, kParts> kPartNames = {"protected header", "encrypted key", "IV",
                                                                  "ciphertext", "tag"};
  std::array<std::string_view, kParts> parts;
  std::size_t count = 0;
  std::size_t start = 0;
  while (true) {
    const std::size_t dot = text.find('.', start);
    if (count == kParts) {
      count++;  // a sixth part: refused below
      break;
    }
    parts[count++] = text.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  if (count != kParts) {
    return make_error(Errc::parse, std::string("JWE compact: ") + (count < kParts ? "fewer" : "more") +
                                       " than 5 dot-separated parts (RFC 7516 §7.1)");
  }
  if (!parts[1].empty()) {
    return make_error(Errc::parse, "JWE compact: the encrypted key (part 2) must be empty for alg \"dir\"");
  }
  if (parts[0].empty()) {
    return make_error(Errc::parse, "JWE compact: the protected header (part 1) is empty");
  }
  std::array<Bytes, kParts> decoded;
  for (std::size_t i = 0; i < kParts; ++i) {
    auto bytes = base64url_decode(parts[i]);
    if (!bytes.ok()) {
      return make_error(Errc::parse, "JWE compact: the " + std::string(kPartNames[i]) + " (part " +
                                         std::to_string(i + 1) + ") is not base64url: " + bytes.error().message);
    }
    decoded[i] = std::move(*bytes);
  }
  if (decoded[2].size() != kGcmIvSize) {
    return make_error(Errc::parse, "JWE compact: IV of " + std::to_string(decoded[2].size()) + " bytes, must be " +
                                       std::to_string(kGcmIvSize));
  }
  if (decoded[4].size() != kGcmTagSize) {
    return make_error(Errc::parse, "JWE compact: tag of " + std::to_string(decoded[4].size()) +
                                       " bytes, must be " + std::to_string(kGcmTagSize));
  }
  JweCompact object;
  object.protected_b64 = std::string(parts[0]);
  object.protected_header.assign(decoded[0].begin(), decoded[0].end());
  object.iv = std::move(decoded[2]);
  object.ciphertext = std::move(decoded[3]);
  object.tag = std::move(decoded[4]);
  return object;
}

Result<std::string> jwe_encrypt_dir_a256gcm_with_iv(const SecretBuffer& cek, std::string_view protected_header,
                                                    ByteView plaintext, ByteView iv) {
  if (protected_header.empty()) {
    return make_error(Errc::invalid_argument, "JWE: the protected header is empty");
  }
  const std::string header_b64 = base64url_encode(ByteView::of(protected_header));
  // RFC 7516 §5.1 step 14: the AAD is the ASCII of the encoded protected header, exactly as it travels.
  auto sealed = detail::aes256gcm_seal(cek, iv, ByteView::of(header_b64), plaintext);
  if (!sealed.ok()) return std::move(sealed).error();
  std::string compact = header_b64 + ".." + base64url_encode(iv) + "." + base64url_encode(sealed->ciphertext) + "." +
                        base64url_encode(sealed->tag);
  // What a peer's parse_jwe_compact would refuse is never sent.
  if (compact.size() > kMaxJweCompactSize) {
    return make_error(Errc::limit, "JWE: the object would be " + std::to_string(compact.size()) +
                                       " characters, at most " + std::to_string(kMaxJweCompactSize) + " allowed");
  }
  return compact;
}

Result<std::string> jwe_encrypt_dir_a256gcm(const SecretBuffer& cek, std::string_view protected_header,
                                            ByteView plaintext) {
  std::array<std::uint8_t, kGcmIvSize> iv{};
  random_bytes(iv.data(), iv.size());  // 96 random bits per object: NIST SP 800-38D §8.2.2
  return jwe_encrypt_dir_a256gcm_with_iv(cek, protected_header, plaintext, ByteView(iv.data(), iv.size()));
}

Result<Bytes> jwe_decrypt_dir_a256gcm(const SecretBuffer& cek, const JweCompact& object) {
  return detail::aes256gcm_open(cek, object.iv, ByteView::of(object.protected_b64), object.ciphertext, object.tag);
}

}  // namespace dauth::crypto
