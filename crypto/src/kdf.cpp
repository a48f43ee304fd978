#include "dauth/crypto/kdf.hpp"

#include <sodium.h>

#include <mbedtls/hkdf.h>
#include <mbedtls/md.h>
#include <mbedtls/sha256.h>

#include <stdexcept>
#include <string>

#include "mbedtls_error.hpp"

namespace dauth::crypto {

namespace {

// RAII for an HMAC context; mbedtls_md_free zeroes the key-derived pads.
class HmacSha256 {
 public:
  explicit HmacSha256(const SecretBuffer& key) {
    mbedtls_md_init(&ctx_);
    if (mbedtls_md_setup(&ctx_, mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), 1) != 0 ||
        mbedtls_md_hmac_starts(&ctx_, key.data(), key.size()) != 0) {
      mbedtls_md_free(&ctx_);
      throw std::runtime_error("HMAC-SHA-256 set-up failed in mbedTLS");
    }
  }
  ~HmacSha256() { mbedtls_md_free(&ctx_); }
  HmacSha256(const HmacSha256&) = delete;
  HmacSha256& operator=(const HmacSha256&) = delete;

  void update(ByteView part) {
    if (part.size > 0 && mbedtls_md_hmac_update(&ctx_, part.data, part.size) != 0) {
      throw std::runtime_error("HMAC-SHA-256 update failed in mbedTLS");
    }
  }
  SecretBuffer finish() {
    SecretBuffer mac(kSha256Size);
    if (mbedtls_md_hmac_finish(&ctx_, mac.data()) != 0) {
      throw std::runtime_error("HMAC-SHA-256 finish failed in mbedTLS");
    }
    return mac;
  }

 private:
  mbedtls_md_context_t ctx_;
};

}  // namespace

SecretBuffer hmac_sha256(const SecretBuffer& key, ByteView message) {
  HmacSha256 hmac(key);
  hmac.update(message);
  return hmac.finish();
}

SecretBuffer hmac_sha256(const SecretBuffer& key, ByteView part1, ByteView part2) {
  HmacSha256 hmac(key);
  hmac.update(part1);
  hmac.update(part2);
  return hmac.finish();
}

Result<SecretBuffer> hkdf_sha256(const SecretBuffer& ikm, ByteView salt, ByteView info, std::size_t length) {
  constexpr std::size_t kMaxLength = 255 * kSha256Size;  // RFC 5869 §2.3: L <= 255*HashLen
  if (length == 0 || length > kMaxLength) {
    return make_error(Errc::invalid_argument, "HKDF-SHA-256 output length " + std::to_string(length) +
                                                  ": must be 1–" + std::to_string(kMaxLength) + " bytes");
  }
  SecretBuffer okm(length);
  const int rc = mbedtls_hkdf(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), salt.data, salt.size, ikm.data(),
                              ikm.size(), info.data, info.size, okm.data(), okm.size());
  if (rc != 0) {
    return detail::mbedtls_error(rc, "HKDF-SHA-256 of " + std::to_string(length) + " bytes");
  }
  return okm;
}

Bytes sha256(ByteView data) {
  Bytes digest(kSha256Size);
  if (mbedtls_sha256_ret(data.data, data.size, digest.data(), 0) != 0) {
    throw std::runtime_error("SHA-256 failed in mbedTLS");
  }
  return digest;
}

std::uint64_t short_hash(const SecretBuffer& key, ByteView data) {
  static_assert(kShortHashKeySize == crypto_shorthash_KEYBYTES, "SipHash-2-4 key size");
  if (key.size() != kShortHashKeySize) {
    throw std::invalid_argument("short_hash: key of " + std::to_string(key.size()) + " bytes, needs " +
                                std::to_string(kShortHashKeySize));
  }
  unsigned char tag[crypto_shorthash_BYTES];
  crypto_shorthash(tag, data.data, data.size, key.data());
  std::uint64_t value = 0;
  for (unsigned char byte : tag) value = (value << 8) | byte;
  return value;
}

}  // namespace dauth::crypto
