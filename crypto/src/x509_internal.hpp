// Internal helpers of the X.509 module: RAII owners for mbedTLS 2.28 contexts, the CTR-DRBG, and the hand-written
// DER/PEM walkers (fuzzed through Certificate::parse / CertificateRequest::parse).
#pragma once

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>
#include <mbedtls/x509_csr.h>

#include <ctime>
#include <string>
#include <string_view>
#include <vector>

#include "dauth/crypto/x509.hpp"
#include "dauth/error.hpp"
#include "dauth/secret.hpp"
#include "mbedtls_error.hpp"

namespace dauth::crypto::detail {

// Owns one mbedTLS context: init in the constructor, free in the destructor (the *_free functions also zeroise
// key material). Not movable: mbedTLS chains point into these objects, so they live behind a unique_ptr.
template <class T, void (*Init)(T*), void (*Free)(T*)>
class Owned {
 public:
  Owned() { Init(&value_); }
  ~Owned() { Free(&value_); }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  T* get() noexcept { return &value_; }
  const T* get() const noexcept { return &value_; }
  T* operator->() noexcept { return &value_; }
  const T* operator->() const noexcept { return &value_; }
  T& operator*() noexcept { return value_; }
  const T& operator*() const noexcept { return value_; }

 private:
  T value_;
};

using PkContext = Owned<mbedtls_pk_context, mbedtls_pk_init, mbedtls_pk_free>;
using CrtChain = Owned<mbedtls_x509_crt, mbedtls_x509_crt_init, mbedtls_x509_crt_free>;
using CsrContext = Owned<mbedtls_x509_csr, mbedtls_x509_csr_init, mbedtls_x509_csr_free>;
using CrtWriter = Owned<mbedtls_x509write_cert, mbedtls_x509write_crt_init, mbedtls_x509write_crt_free>;
using CsrWriter = Owned<mbedtls_x509write_csr, mbedtls_x509write_csr_init, mbedtls_x509write_csr_free>;
using Mpi = Owned<mbedtls_mpi, mbedtls_mpi_init, mbedtls_mpi_free>;


// CTR-DRBG (AES-256) seeded from libsodium's CSPRNG (randombytes_buf), for key generation and ECDSA blinding.
// One per operation: cheap, and no state shared between threads.
class Drbg {
 public:
  Drbg();
  ~Drbg();
  Drbg(const Drbg&) = delete;
  Drbg& operator=(const Drbg&) = delete;
  Result<void> seed();  // must succeed before random() is used
  static int random(void* self, unsigned char* out, std::size_t size);  // mbedtls f_rng signature
  void* context() noexcept { return &ctx_; }

 private:
  mbedtls_ctr_drbg_context ctx_;
};

// Length of the DER element (tag + length + content) at the start of der; error if it is not a SEQUENCE or its
// length runs past the end. Used to reject trailing bytes that mbedTLS's parsers silently ignore.
Result<std::size_t> der_sequence_length(ByteView der);

// Decodes every "-----BEGIN <label>-----" block of text (RFC 7468 strict: only whitespace outside blocks, no
// headers). Error when there is no block, other text, bad base64, or more than max_blocks blocks.
Result<std::vector<Bytes>> pem_decode(std::string_view text, std::string_view label, std::size_t max_blocks);
std::string pem_encode(std::string_view label, ByteView der);

// True when the bytes look like DER (a SEQUENCE tag) rather than PEM text.
inline bool looks_like_der(ByteView bytes) { return bytes.size > 0 && bytes.data[0] == 0x30; }

// The URI entries (tag [6], 0x86) of the subjectAltName extension requested in a CSR's CertificationRequestInfo
// (RFC 2986 §4.1 attributes -> PKCS#9 extensionRequest -> RFC 5280 §4.2.1.6). mbedTLS 2.28 does not expose
// requested extensions (docs/crypto.md). Every length is bounds-checked; malformed structure is an error.
Result<std::vector<std::string>> csr_requested_san_uris(ByteView certification_request_info);

// DER of the extension values we write (mbedTLS 2.28 has no SAN or EKU setter, docs/crypto.md).
Result<Bytes> encode_subject_alt_names(const std::vector<std::string>& uris, const std::vector<std::string>& dns);
Result<Bytes> encode_eku_server_client();

// mbedtls_x509_time (UTC) as time_t; year/month/day were range-checked by mbedTLS's parser.
std::time_t to_time_t(const mbedtls_x509_time& time);
// "YYYYMMDDhhmmss" as mbedtls_x509write_crt_set_validity wants it; error for dates before 1950 or after 9999.
Result<std::string> to_validity_string(std::time_t time);

}  // namespace dauth::crypto::detail

namespace dauth::crypto {

// A key in memory (an mbedTLS EC key pair), or a key in a PKCS#11 token: then pk is set up with the token key
// type of token.cpp (the public point for mbedTLS's writers, signing in the token) and token_uri names it.
struct PrivateKey::Impl {
  detail::PkContext pk;
  std::string token_uri;
};

}  // namespace dauth::crypto
