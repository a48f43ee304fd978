// GnuTLS side of the exporter and suite name (libcoap notes, Q2: gnutls_prf_rfc5705 through coap_session_get_tls).
#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>

#include <cstring>

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

namespace {
std::optional<std::uint64_t> record_sequence(const coap_session_t* session, bool read) {
  gnutls_session_t tls = tls_of(session);
  if (tls == nullptr) return std::nullopt;
  unsigned char sequence[8];
  if (gnutls_record_get_state(tls, read ? 1 : 0, nullptr, nullptr, nullptr, sequence) < 0) return std::nullopt;
  std::uint64_t value = 0;
  for (unsigned char byte : sequence) value = (value << 8) | byte;
  return value;
}
}  // namespace

std::optional<std::uint64_t> records_received(const coap_session_t* session) { return record_sequence(session, true); }
std::optional<std::uint64_t> records_sent(const coap_session_t* session) { return record_sequence(session, false); }

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

// ---- certificates by server name ----------------------------------------------------------------------------
//
// libcoap 4.3.1's validate_sni_call_back cannot serve a renewed certificate: post_client_hello_gnutls_pki asks it
// once per distinct name per context and keeps the parsed credentials (pki_sni_entry_list) until the context is
// freed. What libcoap does per handshake is parse the context's PKI setup into credentials of the session's own
// (setup_server_ssl_session, from coap_dtls_hello on the first, cookieless ClientHello). We give those per-session
// credentials a GnuTLS retrieve function: GnuTLS calls it when it picks the server certificate, after reading the
// ClientHello, so it sees the SNI of this very handshake and our certificate table as it is now. The verify
// function and trust anchors libcoap put on the same credentials stay in place.

namespace {

ServerCertificateLookup the_lookup = nullptr;  // one per process: node.cpp's (it finds its Node from the session)

// GnuTLS frees what we return after use (GNUTLS_CERT_RETR_DEINIT_ALL): each handshake gets its own parsed copy,
// so a certificate replaced meanwhile can be freed by its owner at once.
int retrieve_server_certificate(gnutls_session_t tls, const gnutls_cert_retr_st* /*info*/, gnutls_pcert_st** certs,
                                unsigned int* certs_length, gnutls_ocsp_data_st** ocsp, unsigned int* ocsp_length,
                                gnutls_privkey_t* privkey, unsigned int* flags) {
  *certs = nullptr;
  *certs_length = 0;
  *ocsp = nullptr;
  *ocsp_length = 0;
  *privkey = nullptr;
  *flags = GNUTLS_CERT_RETR_DEINIT_ALL;
  auto* session = static_cast<coap_session_t*>(gnutls_transport_get_ptr(tls));
  if (session == nullptr || the_lookup == nullptr) return -1;
  std::string name;
  for (unsigned index = 0;; ++index) {
    char buffer[256];  // RFC 6066 §3: DNS names are at most 255 bytes
    size_t length = sizeof(buffer);
    unsigned type = 0;
    if (gnutls_server_name_get(tls, buffer, &length, &type, index) != GNUTLS_E_SUCCESS) break;
    if (type == GNUTLS_NAME_DNS) {
      name.assign(buffer, length);
      break;
    }
  }
  const auto chosen = the_lookup(session, name);
  if (!chosen) return -1;  // the handshake fails (GnuTLS: insufficient credentials); the lookup reported why

  constexpr unsigned kMaxChain = 4;  // leaf, intermediate, anchor (chain depth 3) and one spare
  auto* list = static_cast<gnutls_pcert_st*>(gnutls_calloc(kMaxChain, sizeof(gnutls_pcert_st)));
  if (list == nullptr) return -1;
  unsigned count = kMaxChain;
  const gnutls_datum_t chain{reinterpret_cast<unsigned char*>(const_cast<char*>(chosen->chain_pem.data())),
                             static_cast<unsigned>(chosen->chain_pem.size())};
  if (gnutls_pcert_list_import_x509_raw(list, &count, &chain, GNUTLS_X509_FMT_PEM, 0) < 0 || count == 0) {
    gnutls_free(list);
    return -1;
  }
  gnutls_privkey_t key = nullptr;
  const gnutls_datum_t key_pem{const_cast<unsigned char*>(chosen->key_pem.data),
                               static_cast<unsigned>(chosen->key_pem.size)};
  if (gnutls_privkey_init(&key) < 0 ||
      gnutls_privkey_import_x509_raw(key, &key_pem, GNUTLS_X509_FMT_PEM, nullptr, 0) < 0) {
    if (key != nullptr) gnutls_privkey_deinit(key);
    for (unsigned i = 0; i < count; ++i) gnutls_pcert_deinit(&list[i]);
    gnutls_free(list);
    return -1;
  }
  *certs = list;
  *certs_length = count;
  *privkey = key;
  return 0;
}

}  // namespace

bool selects_server_certificates() noexcept { return true; }

Result<void> select_server_certificate_by_name(coap_session_t* session, ServerCertificateLookup lookup) {
  gnutls_session_t tls = tls_of(session);
  if (tls == nullptr) return make_error(Errc::internal, "server certificate selection: the session has no TLS object yet");
  void* credentials = nullptr;
  if (gnutls_credentials_get(tls, GNUTLS_CRD_CERTIFICATE, &credentials) < 0 || credentials == nullptr) {
    return make_error(Errc::internal, "server certificate selection: the session has no certificate credentials");
  }
  the_lookup = lookup;
  // The credentials are this session's own (libcoap allocates them per session and frees them with it).
  gnutls_certificate_set_retrieve_function3(
      static_cast<gnutls_certificate_credentials_t>(credentials), retrieve_server_certificate);
  return {};
}

}  // namespace dauth::transport::detail
