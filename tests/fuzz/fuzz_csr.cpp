// libFuzzer target: CertificateRequest::parse, the hand-written walk of the requested extensions (mbedTLS 2.28 does
// not expose them) and the self-signature check. Hostile bytes must give an Error, never a crash or OOB read.
#include <cstddef>
#include <cstdint>
#include <string>

#include "dauth/crypto/x509.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace crypto = dauth::crypto;
  auto request = crypto::CertificateRequest::parse(dauth::ByteView(data, size));
  if (!request.ok()) return 0;
  const auto uris = request->requested_san_uris();
  (void)request->subject();
  (void)request->public_key_der();
  (void)request->verify_signature();
  // What parses re-encodes (PEM) to the same request with the same requested names.
  auto again = crypto::CertificateRequest::parse(dauth::ByteView::of(request->pem()));
  if (!again.ok() || again->der() != request->der() || again->requested_san_uris() != uris) __builtin_trap();
  return 0;
}
