// OpenSSL side of the exporter and suite name (docs/transport.md §3: SSL_export_keying_material).
#include <openssl/ssl.h>

#include "tls_backend.hpp"

namespace dauth::transport::detail {

Backend backend() noexcept { return Backend::openssl; }

namespace {
SSL* tls_of(const coap_session_t* session) {
  coap_tls_library_t library = COAP_TLS_LIBRARY_NOTLS;
  void* tls = coap_session_get_tls(session, &library);
  if (tls == nullptr || library != COAP_TLS_LIBRARY_OPENSSL) return nullptr;
  return static_cast<SSL*>(tls);
}
}  // namespace

std::optional<std::uint64_t> records_received(const coap_session_t* /*session*/) { return std::nullopt; }
std::optional<std::uint64_t> records_sent(const coap_session_t* /*session*/) { return std::nullopt; }

Result<SecretBuffer> export_keying_material(const coap_session_t* session, std::string_view label,
                                            std::size_t length) {
  SSL* tls = tls_of(session);
  if (tls == nullptr) {
    return make_error(Errc::internal, "RFC 5705 export: the session has no OpenSSL object (handshake not done?)");
  }
  SecretBuffer out(length);
  if (SSL_export_keying_material(tls, out.data(), length, label.data(), label.size(), nullptr, 0, 0) != 1) {
    return make_error(Errc::crypto,
                      "RFC 5705 export with label '" + std::string(label) + "' failed: SSL_export_keying_material");
  }
  return out;
}

std::string cipher_suite(const coap_session_t* session) {
  SSL* tls = tls_of(session);
  if (tls == nullptr) return {};
  const SSL_CIPHER* cipher = SSL_get_current_cipher(tls);
  const char* name = cipher != nullptr ? SSL_CIPHER_standard_name(cipher) : nullptr;
  return name != nullptr ? name : "";
}

std::string server_name(const coap_session_t* session) {
  SSL* tls = tls_of(session);
  if (tls == nullptr) return {};
  const char* name = SSL_get_servername(tls, TLSEXT_NAMETYPE_host_name);
  return name != nullptr ? name : "";
}

// Certificates by server name, and server credentials built once, need a per-handshake hook libcoap 4.3.1's
// OpenSSL backend leaves no room for: it hands the SSL object over from DTLSv1_listen and runs the handshake in the
// same call (coap_dtls_new_server_session), and its SNI callback caches one SSL_CTX per name
// (tls_server_name_call_back). The server context keeps libcoap's PKI setup here, which libcoap applies to each
// server SSL object again in its ClientHello callback (setup_pki_ssl); Node::create refuses certificates by name.
struct ServerCertificate {};
struct ServerPki {};

Result<std::shared_ptr<const ServerCertificate>> load_server_certificate(std::string_view /*chain_pem*/,
                                                                         KeySource /*key*/) {
  return make_error(Errc::unsupported, "server certificates loaded by dauth need the GnuTLS build");
}

Result<std::shared_ptr<const ServerCertificate>> load_server_raw_key(KeySource /*key*/) {
  return make_error(Errc::unsupported, "raw public keys (RFC 7250) need the GnuTLS build");
}

bool attaches_server_pki() noexcept { return false; }

Result<std::shared_ptr<const ServerPki>> make_server_pki(std::string_view /*trust_anchors_pem*/,
                                                         ServerCertificateLookup /*lookup*/,
                                                         coap_dtls_cn_callback_t /*check*/, void* /*arg*/) {
  return make_error(Errc::unsupported, "server credentials built by dauth need the GnuTLS build");
}

Result<void> attach_server_pki(coap_session_t* /*session*/, const ServerPki& /*pki*/, bool /*psk_too*/) {
  return make_error(Errc::unsupported, "server credentials built by dauth need the GnuTLS build");
}

Result<void> attach_client_certificate(coap_session_t* /*session*/, const ServerCertificate& /*certificate*/) {
  return make_error(Errc::unsupported, "keys in a PKCS#11 token need the GnuTLS build");
}

std::vector<std::uint8_t> subject_public_key_info(const ServerCertificate& /*certificate*/) { return {}; }

}  // namespace dauth::transport::detail

namespace dauth::transport {

// libcoap 4.3.1's OpenSSL backend loads PKCS#11 keys through an OpenSSL engine, per session (COAP_PKI_KEY_PKCS11);
// dauth does not go that way.
Result<void> use_pkcs11_module(const std::string& /*module_path*/) {
  return make_error(Errc::unsupported, "keys in a PKCS#11 token need the GnuTLS build; this is openssl");
}

Result<std::string> check_token_key(const TokenKey& /*key*/) {
  return make_error(Errc::unsupported, "keys in a PKCS#11 token need the GnuTLS build; this is openssl");
}

}  // namespace dauth::transport
