// Private keys never pass through mbedTLS 2.28 code that leaves copies behind. mbedtls_pk_write_key_pem hands the
// key to mbedtls_pem_write_buffer, which base64-encodes it into a heap buffer and frees it without wiping (measured
// with a free() hook on Debian's 2.28.3: the key's base64 is in freed memory afterwards). This executable interposes
// that function (libmbedcrypto calls it through its PLT) and counts the private keys it sees.
#include <dlfcn.h>
#include <mbedtls/pem.h>
#include <mbedtls/pk.h>
#include <mbedtls/platform_util.h>

#include <catch2/catch.hpp>
#include <cstring>

#include "dauth/crypto/x509.hpp"

namespace {
int private_key_pem_writes = 0;
int all_pem_writes = 0;

using PemWriter = int (*)(const char*, const char*, const unsigned char*, size_t, unsigned char*, size_t, size_t*);
}  // namespace

extern "C" int mbedtls_pem_write_buffer(const char* header, const char* footer, const unsigned char* der_data,
                                        size_t der_len, unsigned char* buf, size_t buf_len, size_t* olen) {
  static const auto real = reinterpret_cast<PemWriter>(dlsym(RTLD_NEXT, "mbedtls_pem_write_buffer"));
  ++all_pem_writes;
  if (std::strstr(header, "PRIVATE KEY") != nullptr) ++private_key_pem_writes;
  return real(header, footer, der_data, der_len, buf, buf_len, olen);
}

TEST_CASE("x509: to_pem() never gives the private key to mbedTLS's PEM writer (it frees an unwiped copy)",
          "[x509][hygiene]") {
  auto key = dauth::crypto::PrivateKey::generate_p256();
  REQUIRE(key.ok());
  const auto der = key->to_der();
  REQUIRE(der.ok());

  // Control: the interposition works in this build, or the check below would pass for the wrong reason.
  mbedtls_pk_context pk;
  mbedtls_pk_init(&pk);
  REQUIRE(mbedtls_pk_parse_key(&pk, der->data(), der->size(), nullptr, 0) == 0);
  unsigned char pem[1024];
  const int before_control = private_key_pem_writes;
  REQUIRE(mbedtls_pk_write_key_pem(&pk, pem, sizeof pem) == 0);
  mbedtls_pk_free(&pk);
  mbedtls_platform_zeroize(pem, sizeof pem);
  REQUIRE(private_key_pem_writes == before_control + 1);

  const int before = private_key_pem_writes;
  const auto ours = key->to_pem();
  REQUIRE(ours.ok());
  CHECK(private_key_pem_writes == before);
  CHECK(ours->size() > 200);
}
