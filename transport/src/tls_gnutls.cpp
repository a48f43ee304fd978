// GnuTLS side of the exporter and suite name (libcoap notes, Q2: gnutls_prf_rfc5705 through coap_session_get_tls).
#include <gnutls/gnutls.h>

#include "tls_backend.hpp"

namespace dauth::transport::detail {

Backend backend() noexcept { return Backend::gnutls; }

namespace {
gnutls_session_t tls_of(const coap_session_t* session) {
  coap_tls_library_t library = COAP_TLS_LIBRARY_NOTLS;
  void* tls = coap_session_get_tls(session, &library);
  if (tls == nullptr || library != COAP_TLS_LIBRARY_GNUTLS) return nullptr;
  return static_cast<gnutls_session_t>(tls);
}
}  // namespace

Result<SecretBuffer> export_keying_material(const coap_session_t* session, std::string_view label,
                                            std::size_t length) {
  gnutls_session_t tls = tls_of(session);
  if (tls == nullptr) {
    return make_error(Errc::internal, "RFC 5705 export: the session has no GnuTLS object (handshake not done?)");
  }
  SecretBuffer out(length);
  const int rc = gnutls_prf_rfc5705(tls, label.size(), label.data(), 0, nullptr, length,
                                    reinterpret_cast<char*>(out.data()));
  if (rc < 0) {
    return make_error(Errc::crypto, "RFC 5705 export with label '" + std::string(label) +
                                        "' failed: gnutls_prf_rfc5705: " + gnutls_strerror(rc));
  }
  return out;
}

std::string cipher_suite(const coap_session_t* session) {
  gnutls_session_t tls = tls_of(session);
  if (tls == nullptr) return {};
  // gnutls_ciphersuite_get (3.7.3+) gives the IANA name, the same spelling OpenSSL's standard name uses.
  const char* name = gnutls_ciphersuite_get(tls);
  return name != nullptr ? name : "";
}

std::string server_name(const coap_session_t* session) {
  gnutls_session_t tls = tls_of(session);
  if (tls == nullptr) return {};
  // RFC 6066 §3: at most one name per type; DNS names are at most 255 bytes (+ NUL).
  for (unsigned index = 0;; ++index) {
    char name[256];
    size_t length = sizeof(name);
    unsigned type = 0;
    const int rc = gnutls_server_name_get(tls, name, &length, &type, index);
    if (rc != GNUTLS_E_SUCCESS) return {};  // none sent, or longer than a DNS name may be
    if (type == GNUTLS_NAME_DNS) return std::string(name, length);
  }
}

}  // namespace dauth::transport::detail
