// libFuzzer target: Certificate::parse (DER, and PEM with our own block splitter) and everything read from a parsed
// certificate (SAN walk, AE-ID, public key id, verification callback), plus the raw-public-key and private-key
// parsers. Hostile bytes must give an Error, never a crash, hang or out-of-bounds read.
#include <cstddef>
#include <cstdint>
#include <string>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/secret.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace crypto = dauth::crypto;
  const dauth::ByteView input(data, size);
  (void)crypto::public_key_id_from_spki(input);
  // Private keys (DER or PEM, a local file's content): what parses writes back as PEM and DER that parse to the
  // same key (to_pem is our own encoder, not mbedTLS's).
  if (auto key = crypto::PrivateKey::parse(dauth::SecretBuffer::copy_of(input)); key.ok()) {
    auto pem = key->to_pem();
    auto der = key->to_der();
    if (!pem.ok() || !der.ok()) __builtin_trap();
    auto from_pem = crypto::PrivateKey::parse(*pem);
    auto from_der = crypto::PrivateKey::parse(*der);
    if (!from_pem.ok() || !from_der.ok()) __builtin_trap();
    auto der_again = from_der->to_der();
    if (from_pem->public_key_der() != key->public_key_der() || !der_again.ok() || !der_again->equals(*der)) {
      __builtin_trap();
    }
  }

  auto certificate = crypto::Certificate::parse(input);
  if (!certificate.ok()) return 0;
  const auto uris = certificate->san_uris();
  (void)certificate->san_dns_names();
  (void)certificate->subject();
  (void)certificate->issuer();
  (void)certificate->serial_hex();
  (void)certificate->not_before();
  (void)certificate->not_after();
  (void)certificate->public_key_id();
  (void)certificate->verify(*certificate, certificate->not_before());
  auto ae_id = certificate->ae_id();
  if (ae_id.ok()) {
    // The AE-ID is one of the SAN URIs and a valid AE-ID.
    bool listed = false;
    for (const auto& uri : uris) listed = listed || uri == *ae_id;
    if (!listed || !crypto::validate_ae_id(*ae_id).ok()) __builtin_trap();
  }
  // What parses re-encodes (PEM) to the same chain.
  const std::string pem = certificate->pem();
  auto again = crypto::Certificate::parse(dauth::ByteView::of(pem));
  if (!again.ok() || again->chain_der() != certificate->chain_der()) __builtin_trap();
  return 0;
}
