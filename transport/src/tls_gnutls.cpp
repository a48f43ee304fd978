// GnuTLS side of the exporter and suite name (docs/transport.md §3: gnutls_prf_rfc5705 through coap_session_get_tls).
#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <gnutls/pkcs11.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

#include "dauth/crypto/x509.hpp"
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

// ---- server PKI built once ---------------------------------------------------------------------------------
//
// libcoap 4.3.1 builds certificate credentials for every new server session from the context's PKI setup
// (setup_server_ssl_session -> setup_pki_credentials): it parses the PEM key, chain and trust anchors again and
// lets GnuTLS check that key and certificate match by signing and verifying, PSK sessions included. Its SNI
// callback cannot serve a renewed certificate either (post_client_hello_gnutls_pki keeps the first answer per name
// until the context is freed). So node_server.cpp gives the server context no PKI setup on this backend: one
// gnutls_certificate_credentials_t per node carries the trust anchors, the verification and a retrieve function,
// and node_server.cpp attaches it to each server session between the cookieless ClientHello and the one with the cookie
// (docs/transport.md §3). GnuTLS calls the retrieve function when it picks the server certificate, after reading
// the ClientHello, so it sees the SNI of this very handshake and the certificate table as it is now.

struct ServerCertificate {
  ServerCertificate() = default;
  ServerCertificate(const ServerCertificate&) = delete;
  ServerCertificate& operator=(const ServerCertificate&) = delete;
  ~ServerCertificate() {
    for (unsigned i = 0; i < chain_length; ++i) gnutls_pcert_deinit(&chain[i]);
    if (key != nullptr) gnutls_privkey_deinit(key);  // GnuTLS wipes the key's numbers on release
  }
  static constexpr unsigned kMaxChain = 4;  // leaf, intermediate, anchor (chain depth 3) and one spare
  gnutls_pcert_st chain[kMaxChain]{};
  unsigned chain_length = 0;
  gnutls_privkey_t key = nullptr;
  std::shared_ptr<const SecretBuffer> pin;  // a token key's PIN, for GnuTLS's PIN callback while the key lives
  std::vector<std::uint8_t> spki;           // raw keys (load_server_raw_key): our SubjectPublicKeyInfo
};

struct ServerPki {
  ServerPki() = default;
  ServerPki(const ServerPki&) = delete;
  ServerPki& operator=(const ServerPki&) = delete;
  ~ServerPki() {
    if (credentials != nullptr) gnutls_certificate_free_credentials(credentials);
  }
  gnutls_certificate_credentials_t credentials = nullptr;
  bool accepts_certificates = false;  // trust anchors set: clients may authenticate with a certificate
  ServerCertificateLookup lookup = nullptr;
  coap_dtls_cn_callback_t check = nullptr;
  void* check_arg = nullptr;
};

namespace {

gnutls_datum_t datum_of(const void* data, std::size_t size) {
  return {static_cast<unsigned char*>(const_cast<void*>(data)), static_cast<unsigned>(size)};
}

// The SubjectPublicKeyInfo (DER) of a public key.
Result<std::vector<std::uint8_t>> spki_of(gnutls_pubkey_t key) {
  gnutls_datum_t der{};
  const int rc = gnutls_pubkey_export2(key, GNUTLS_X509_FMT_DER, &der);
  if (rc < 0) return make_error(Errc::crypto, std::string("gnutls_pubkey_export2: ") + gnutls_strerror(rc));
  std::vector<std::uint8_t> out(der.data, der.data + der.size);
  gnutls_free(der.data);
  return out;
}

Result<std::vector<std::uint8_t>> spki_of_private_key(gnutls_privkey_t key) {
  gnutls_pubkey_t public_key = nullptr;
  if (gnutls_pubkey_init(&public_key) < 0) return make_error(Errc::crypto, "gnutls_pubkey_init failed");
  const int rc = gnutls_pubkey_import_privkey(public_key, key, 0, 0);
  auto spki = rc < 0 ? Result<std::vector<std::uint8_t>>(make_error(
                           Errc::crypto, std::string("gnutls_pubkey_import_privkey: ") + gnutls_strerror(rc)))
                     : spki_of(public_key);
  gnutls_pubkey_deinit(public_key);
  return spki;
}

// ---- keys in a token ----

// The module chosen for the process (use_pkcs11_module), or none yet.
std::mutex pkcs11_mutex;
std::optional<std::string> pkcs11_module;

// GnuTLS's PIN callback for one token key: the PIN the key was loaded with, once. A second attempt means the token
// refused the first: answering again would spend its remaining tries (it locks the PIN after a few).
int give_pin(void* userdata, int attempt, const char* /*token_url*/, const char* /*token_label*/, unsigned flags,
             char* pin, size_t pin_max) {
  const auto* secret = static_cast<const SecretBuffer*>(userdata);
  if (secret == nullptr || attempt > 0 || (flags & GNUTLS_PIN_WRONG) != 0) return GNUTLS_E_PKCS11_PIN_ERROR;
  if (secret->size() + 1 > pin_max) return GNUTLS_E_PKCS11_PIN_ERROR;
  std::memcpy(pin, secret->data(), secret->size());
  pin[secret->size()] = '\0';
  return 0;
}

// Why a token key did not load, in words an operator acts on.
Error token_key_error(const TokenKey& token, int rc) {
  const std::string key = "token key '" + token.uri + "': ";
  switch (rc) {
    case GNUTLS_E_PKCS11_PIN_ERROR:
    case GNUTLS_E_PKCS11_PIN_EXPIRED:
    case GNUTLS_E_PKCS11_PIN_LOCKED:
      return make_error(Errc::permission, key + "the token refused the PIN (" + gnutls_strerror(rc) + ")" +
                                              (token.pin ? "" : "; no PIN configured"));
    case GNUTLS_E_PKCS11_REQUESTED_OBJECT_NOT_AVAILBLE:
    case GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE: {
      // Missing token or missing key: the token's flags answer only if a token matches the URI's token part.
      unsigned int flags = 0;
      const bool token_found = gnutls_pkcs11_token_get_flags(token.uri.c_str(), &flags) >= 0;
      return make_error(Errc::not_found, key + (token_found ? "no such private key in the token"
                                                            : "no token matches it (not inserted, or another label?)"));
    }
    case GNUTLS_E_PKCS11_TOKEN_ERROR:
    case GNUTLS_E_PKCS11_SLOT_ERROR:
    case GNUTLS_E_PKCS11_DEVICE_ERROR:
      return make_error(Errc::not_found, key + "the token is not available (" + gnutls_strerror(rc) + ")");
    default:
      return make_error(Errc::crypto, key + gnutls_strerror(rc));
  }
}

// A private key in a token, logged in with its PIN. GnuTLS keeps the token session and the PIN callback (the key
// keeps `token.pin` alive through its owner: ServerCertificate::pin, or the ServerPki).
Result<gnutls_privkey_t> import_token_key(const TokenKey& token) {
  if (auto checked = check_token_key_uri(token.uri); !checked.ok()) return std::move(checked).error();
  {
    // The first token key of the process decides, if use_pkcs11_module did not: p11-kit's registered modules.
    std::lock_guard<std::mutex> lock(pkcs11_mutex);
    if (!pkcs11_module) pkcs11_module = std::string();
  }
  gnutls_privkey_t key = nullptr;
  if (gnutls_privkey_init(&key) < 0) return make_error(Errc::crypto, "gnutls_privkey_init failed");
  gnutls_privkey_set_pin_function(key, give_pin, const_cast<SecretBuffer*>(token.pin.get()));
  const int rc = gnutls_privkey_import_url(key, token.uri.c_str(), 0);
  if (rc < 0) {
    gnutls_privkey_deinit(key);
    return token_key_error(token, rc);
  }
  return key;
}

Result<gnutls_privkey_t> import_private_key(KeySource source) {
  if (source.token != nullptr) return import_token_key(*source.token);
  gnutls_privkey_t key = nullptr;
  if (gnutls_privkey_init(&key) < 0) return make_error(Errc::crypto, "gnutls_privkey_init failed");
  const gnutls_datum_t pem = datum_of(source.pem.data, source.pem.size);
  const int rc = gnutls_privkey_import_x509_raw(key, &pem, GNUTLS_X509_FMT_PEM, nullptr, 0);
  if (rc < 0) {
    gnutls_privkey_deinit(key);
    return make_error(Errc::invalid_argument, std::string("server private key: ") + gnutls_strerror(rc));
  }
  return key;
}

const ServerPki* pki_of(gnutls_session_t tls) { return static_cast<const ServerPki*>(gnutls_session_get_ptr(tls)); }

std::string sni_of(gnutls_session_t tls) {
  for (unsigned index = 0;; ++index) {
    char buffer[256];  // RFC 6066 §3: DNS names are at most 255 bytes
    size_t length = sizeof(buffer);
    unsigned type = 0;
    if (gnutls_server_name_get(tls, buffer, &length, &type, index) != GNUTLS_E_SUCCESS) return {};
    if (type == GNUTLS_NAME_DNS) return std::string(buffer, length);
  }
}

// GnuTLS's certificate retrieve function (gnutls_certificate_set_retrieve_function3), for certificates and the raw
// key alike. No DEINIT flags: GnuTLS uses the parsed chain and key in place; the lookup's owner keeps them alive
// for the handshake.
int retrieve_server_certificate(gnutls_session_t tls, const gnutls_cert_retr_st* /*info*/, gnutls_pcert_st** certs,
                                unsigned int* certs_length, gnutls_ocsp_data_st** ocsp, unsigned int* ocsp_length,
                                gnutls_privkey_t* privkey, unsigned int* flags) {
  *certs = nullptr;
  *certs_length = 0;
  *ocsp = nullptr;
  *ocsp_length = 0;
  *privkey = nullptr;
  *flags = 0;
  const ServerPki* pki = pki_of(tls);
  auto* session = static_cast<coap_session_t*>(gnutls_transport_get_ptr(tls));
  if (pki == nullptr || pki->lookup == nullptr || session == nullptr) return -1;
  // The certificate types are negotiated by now (RFC 7250 extensions are read before the suite is chosen).
  const bool raw_key = gnutls_certificate_type_get2(tls, GNUTLS_CTYPE_OURS) == GNUTLS_CRT_RAW;
  const std::shared_ptr<const ServerCertificate> chosen = pki->lookup(session, sni_of(tls), raw_key);
  if (!chosen) return -1;  // the handshake fails (GnuTLS: insufficient credentials); the lookup reported why
  *certs = const_cast<gnutls_pcert_st*>(chosen->chain);
  *certs_length = chosen->chain_length;
  *privkey = chosen->key;
  return 0;
}

// Why a chain did not verify, in a line libcoap's log handler takes like libcoap's own verification lines (they
// name the session, so node.cpp's failure report quotes it for this peer).
void log_unverified(coap_session_t* session, unsigned status) {
  const char* reason = "the chain did not verify";
  if ((status & (GNUTLS_CERT_NOT_ACTIVATED | GNUTLS_CERT_EXPIRED)) != 0) {
    reason = "The certificate has an invalid usage date";
  } else if ((status & GNUTLS_CERT_SIGNER_NOT_FOUND) != 0) {
    reason = "The peer certificate's CA is unknown (or it is self-signed)";
  } else if ((status & GNUTLS_CERT_SIGNER_CONSTRAINTS_FAILURE) != 0) {
    reason = "The chain is longer than allowed or breaks its issuers' constraints";
  }
  coap_log(LOG_WARNING, "   %s: client certificate refused: %s (GnuTLS status 0x%x)\n", coap_session_str(session),
           reason, status);
}

int refuse_peer(gnutls_session_t tls, gnutls_alert_description_t alert) {
  (void)gnutls_alert_send(tls, GNUTLS_AL_FATAL, alert);
  return -1;  // GNUTLS_E_CERTIFICATE_ERROR: libcoap ends the session
}

// GnuTLS's verify function (gnutls_certificate_set_verify_function): what libcoap's cert_verify_gnutls does with
// dauth's setup (verify_peer_cert, no self-signed, no expired, chain validation; raw keys to the check unverified
// by any chain), then the same peer check as every other handshake.
int verify_client(gnutls_session_t tls) {
  const ServerPki* pki = pki_of(tls);
  auto* session = static_cast<coap_session_t*>(gnutls_transport_get_ptr(tls));
  if (pki == nullptr || session == nullptr) return -1;
  if (gnutls_auth_get_type(tls) != GNUTLS_CRD_CERTIFICATE) return 0;
  unsigned count = 0;
  const gnutls_datum_t* peers = gnutls_certificate_get_peers(tls, &count);
  if (count == 0 || peers == nullptr) return refuse_peer(tls, GNUTLS_A_BAD_CERTIFICATE);  // GNUTLS_CERT_REQUIRE
  if (gnutls_certificate_type_get2(tls, GNUTLS_CTYPE_PEERS) == GNUTLS_CRT_RAW) {
    // The SubjectPublicKeyInfo as GnuTLS re-encodes it (libcoap's check_rpk_cert does the same).
    gnutls_pcert_st raw{};
    if (gnutls_pcert_import_rawpk_raw(&raw, &peers[0], GNUTLS_X509_FMT_DER, 0, 0) < 0) {
      return refuse_peer(tls, GNUTLS_A_BAD_CERTIFICATE);
    }
    auto spki = spki_of(raw.pubkey);
    gnutls_pcert_deinit(&raw);
    if (!spki.ok()) return refuse_peer(tls, GNUTLS_A_BAD_CERTIFICATE);
    if (pki->check(COAP_DTLS_RPK_CERT_CN, spki->data(), spki->size(), session, 0, 1, pki->check_arg) == 0) {
      return refuse_peer(tls, GNUTLS_A_ACCESS_DENIED);
    }
    return 0;
  }
  if (!pki->accepts_certificates) {
    // No chain verification without trust anchors: the check refuses a certificate where a raw key is required.
    (void)pki->check(nullptr, peers[0].data, peers[0].size, session, 0, 0, pki->check_arg);
    return refuse_peer(tls, GNUTLS_A_UNSUPPORTED_CERTIFICATE);
  }
  unsigned status = 0;
  if (gnutls_certificate_verify_peers(tls, nullptr, 0, &status) < 0) return refuse_peer(tls, GNUTLS_A_BAD_CERTIFICATE);
  if (status != 0) {
    log_unverified(session, status);
    const bool issuer_unknown = (status & GNUTLS_CERT_SIGNER_NOT_FOUND) != 0;
    return refuse_peer(tls, issuer_unknown ? GNUTLS_A_UNKNOWN_CA : GNUTLS_A_BAD_CERTIFICATE);
  }
  if (pki->check(nullptr, peers[0].data, peers[0].size, session, 0, 1, pki->check_arg) == 0) {
    return refuse_peer(tls, GNUTLS_A_ACCESS_DENIED);
  }
  return 0;
}

Result<std::shared_ptr<ServerPki>> new_server_pki(coap_dtls_cn_callback_t check, void* check_arg) {
  auto pki = std::make_shared<ServerPki>();
  if (gnutls_certificate_allocate_credentials(&pki->credentials) < 0) {
    return make_error(Errc::crypto, "gnutls_certificate_allocate_credentials failed");
  }
  pki->check = check;
  pki->check_arg = check_arg;
  gnutls_certificate_set_verify_function(pki->credentials, verify_client);
  return pki;
}

// RFC 7250 certificate types a ClientHello offers (IANA values: 0 X.509, 2 RawPublicKey).
struct OfferedTypes {
  bool client_x509 = true;  // no client_certificate_type extension: X.509 only (RFC 7250 §4.1)
  bool client_raw_key = false;
  bool server_raw_key = false;
};

int note_offered_type(void* context, unsigned extension, const unsigned char* data, unsigned size) {
  constexpr unsigned kClientCertificateType = 19;
  constexpr unsigned kServerCertificateType = 20;
  constexpr unsigned char kX509 = 0;
  constexpr unsigned char kRawPublicKey = 2;
  if ((extension != kClientCertificateType && extension != kServerCertificateType) || size < 1) return 0;
  auto* offered = static_cast<OfferedTypes*>(context);
  const unsigned char* first = data + 1;
  const unsigned char* last = first + std::min<unsigned>(data[0], size - 1);
  const auto lists = [&](unsigned char type) { return std::find(first, last, type) != last; };
  if (extension == kClientCertificateType) {
    offered->client_x509 = lists(kX509);
    offered->client_raw_key = lists(kRawPublicKey);
  } else {
    offered->server_raw_key = lists(kRawPublicKey);
  }
  return 0;
}

// libcoap's priorities (coap_gnutls.c, GnuTLS >= 3.6.6) with RawPublicKey as the only server certificate type
// (NORMAL lists X.509 already: it is taken off first).
// Built once per process; each session that uses it holds a reference.
gnutls_priority_t raw_key_server_priority() {
  static const gnutls_priority_t priority = [] {
    gnutls_priority_t built = nullptr;
    const char* text = "NORMAL:+ECDHE-PSK:+PSK:+ECDHE-ECDSA:+AES-128-CCM-8:+CTYPE-CLI-ALL:"
                       "-CTYPE-SRV-ALL:+CTYPE-SRV-RAWPK:+SHA256";
    return gnutls_priority_init(&built, text, nullptr) < 0 ? nullptr : built;
  }();
  return priority;
}

// Runs before GnuTLS reads a ClientHello. GnuTLS picks the server certificate type in the client's order of
// preference, and raw-key clients (libcoap's among them) list X.509 first: a client whose own credential is a raw
// key only is presented our raw key, by taking X.509 off the server certificate types of this handshake.
int present_raw_key_if_asked(gnutls_session_t tls, unsigned /*type*/, unsigned /*when*/, unsigned /*incoming*/,
                             const gnutls_datum_t* message) {
  OfferedTypes offered;
  if (gnutls_ext_raw_parse(&offered, note_offered_type, message, GNUTLS_EXT_RAW_FLAG_DTLS_CLIENT_HELLO) < 0) {
    return 0;  // GnuTLS's own parsing refuses a malformed ClientHello
  }
  if (offered.client_raw_key && !offered.client_x509 && offered.server_raw_key &&
      raw_key_server_priority() != nullptr) {
    (void)gnutls_priority_set(tls, raw_key_server_priority());
  }
  return 0;
}

}  // namespace

Result<std::shared_ptr<const ServerCertificate>> load_server_certificate(std::string_view chain_pem,
                                                                         KeySource key_source) {
  auto certificate = std::make_shared<ServerCertificate>();
  unsigned count = ServerCertificate::kMaxChain;
  const gnutls_datum_t chain = datum_of(chain_pem.data(), chain_pem.size());
  int rc = gnutls_pcert_list_import_x509_raw(certificate->chain, &count, &chain, GNUTLS_X509_FMT_PEM, 0);
  if (rc < 0 || count == 0) {
    return make_error(Errc::invalid_argument, std::string("server certificate chain: ") +
                                                  (rc < 0 ? gnutls_strerror(rc) : "no certificate in the PEM"));
  }
  certificate->chain_length = count;
  auto key = import_private_key(key_source);
  if (!key.ok()) return std::move(key).error();
  certificate->key = *key;
  if (key_source.token != nullptr) certificate->pin = key_source.token->pin;
  // The one key/certificate match check, here instead of in every handshake.
  auto key_spki = spki_of_private_key(certificate->key);
  auto certificate_spki = spki_of(certificate->chain[0].pubkey);
  if (!key_spki.ok()) return std::move(key_spki).error();
  if (!certificate_spki.ok()) return std::move(certificate_spki).error();
  if (*key_spki != *certificate_spki) {
    return make_error(Errc::invalid_argument, "server private key is not the key of its certificate");
  }
  return std::shared_ptr<const ServerCertificate>(std::move(certificate));
}

bool attaches_server_pki() noexcept { return true; }

Result<std::shared_ptr<const ServerPki>> make_server_pki(std::string_view trust_anchors_pem,
                                                         ServerCertificateLookup lookup,
                                                         coap_dtls_cn_callback_t check, void* check_arg) {
  auto pki = new_server_pki(check, check_arg);
  if (!pki.ok()) return std::move(pki).error();
  (*pki)->lookup = lookup;
  gnutls_certificate_credentials_t credentials = (*pki)->credentials;
  gnutls_certificate_set_retrieve_function3(credentials, retrieve_server_certificate);
  if (trust_anchors_pem.empty()) return std::shared_ptr<const ServerPki>(*std::move(pki));
  const gnutls_datum_t anchors = datum_of(trust_anchors_pem.data(), trust_anchors_pem.size());
  const int added = gnutls_certificate_set_x509_trust_mem(credentials, &anchors, GNUTLS_X509_FMT_PEM);
  if (added <= 0) {
    return make_error(Errc::invalid_argument, std::string("trust anchors: ") +
                                                  (added < 0 ? gnutls_strerror(added) : "no certificate in the PEM"));
  }
  (*pki)->accepts_certificates = true;
  // libcoap's mapping of dauth's setup: chain depth 3 (leaf, intermediate, anchor) allows depth + 2 certificates
  // (setup_pki_credentials), no CRLs (check_cert_revocation 0: revocation is the peer check's, by serial).
  gnutls_certificate_set_verify_limits(credentials, 0, 3 + 2);
  gnutls_certificate_set_verify_flags(credentials, GNUTLS_VERIFY_DISABLE_CRL_CHECKS);
  return std::shared_ptr<const ServerPki>(*std::move(pki));
}

Result<void> attach_server_pki(coap_session_t* session, const ServerPki& pki, bool psk_too) {
  gnutls_session_t tls = tls_of(session);
  if (tls == nullptr) return make_error(Errc::internal, "server credentials: the session has no TLS object yet");
  if (!psk_too) gnutls_credentials_clear(tls);  // libcoap's PSK credentials stay libcoap's; it frees them
  const int rc = gnutls_credentials_set(tls, GNUTLS_CRD_CERTIFICATE, pki.credentials);
  if (rc < 0) return make_error(Errc::internal, std::string("gnutls_credentials_set: ") + gnutls_strerror(rc));
  gnutls_session_set_ptr(tls, const_cast<ServerPki*>(&pki));
  gnutls_handshake_set_hook_function(tls, GNUTLS_HANDSHAKE_CLIENT_HELLO, GNUTLS_HOOK_PRE, present_raw_key_if_asked);
  // A client certificate or raw key is required (an anonymous client has no identity to serve); no CA names in the
  // CertificateRequest (several MEF CAs may be trusted).
  gnutls_certificate_server_set_request(tls, GNUTLS_CERT_REQUIRE);
  gnutls_certificate_send_x509_rdn_sequence(tls, 1);
  return {};
}

// ---- client keys in a token ----

namespace {
// The retrieve function of a client session's certificate credentials (attach_client_certificate): what the
// session's pointer names, whatever the server asked for (our one certificate or raw key).
int retrieve_client_certificate(gnutls_session_t tls, const gnutls_cert_retr_st* /*info*/, gnutls_pcert_st** certs,
                                unsigned int* certs_length, gnutls_ocsp_data_st** ocsp, unsigned int* ocsp_length,
                                gnutls_privkey_t* privkey, unsigned int* flags) {
  *certs = nullptr;
  *certs_length = 0;
  *ocsp = nullptr;
  *ocsp_length = 0;
  *privkey = nullptr;
  *flags = 0;
  const auto* ours = static_cast<const ServerCertificate*>(gnutls_session_get_ptr(tls));
  if (ours == nullptr) return 0;  // no certificate to offer: the server decides
  *certs = const_cast<gnutls_pcert_st*>(ours->chain);
  *certs_length = ours->chain_length;
  *privkey = ours->key;
  return 0;
}
}  // namespace

Result<void> attach_client_certificate(coap_session_t* session, const ServerCertificate& certificate) {
  gnutls_session_t tls = tls_of(session);
  if (tls == nullptr) return make_error(Errc::internal, "client credentials: the session has no TLS object");
  void* credentials = nullptr;
  const int rc = gnutls_credentials_get(tls, GNUTLS_CRD_CERTIFICATE, &credentials);
  if (rc < 0 || credentials == nullptr) {
    return make_error(Errc::internal, "client credentials: libcoap gave the session no certificate credentials");
  }
  // libcoap allocates these credentials for this one session (setup_client_ssl_session), so the function is ours
  // alone; libcoap does not use the session pointer.
  gnutls_certificate_set_retrieve_function3(static_cast<gnutls_certificate_credentials_t>(credentials),
                                            retrieve_client_certificate);
  gnutls_session_set_ptr(tls, const_cast<ServerCertificate*>(&certificate));
  return {};
}

Result<std::shared_ptr<const ServerCertificate>> load_server_raw_key(KeySource key_source) {
  auto loaded = std::make_shared<ServerCertificate>();
  auto key = import_private_key(key_source);
  if (!key.ok()) return std::move(key).error();
  loaded->key = *key;
  if (key_source.token != nullptr) loaded->pin = key_source.token->pin;
  gnutls_pubkey_t public_key = nullptr;
  int rc = gnutls_pubkey_init(&public_key);
  if (rc >= 0) rc = gnutls_pubkey_import_privkey(public_key, loaded->key, 0, 0);
  if (rc >= 0) {
    auto spki = spki_of(public_key);
    if (!spki.ok()) {
      gnutls_pubkey_deinit(public_key);
      return std::move(spki).error();
    }
    loaded->spki = *std::move(spki);
    rc = gnutls_pcert_import_rawpk(&loaded->chain[0], public_key, 0);  // on success the pcert owns the public key
  }
  if (rc < 0) {
    if (public_key != nullptr) gnutls_pubkey_deinit(public_key);
    return make_error(Errc::invalid_argument, std::string("raw public key: ") + gnutls_strerror(rc));
  }
  loaded->chain_length = 1;
  return std::shared_ptr<const ServerCertificate>(std::move(loaded));
}

std::vector<std::uint8_t> subject_public_key_info(const ServerCertificate& certificate) { return certificate.spki; }

}  // namespace dauth::transport::detail

// ---- public: token keys ----------------------------------------------------------------------------------------

namespace dauth::transport {

Result<void> use_pkcs11_module(const std::string& module_path) {
  std::lock_guard<std::mutex> lock(detail::pkcs11_mutex);
  if (detail::pkcs11_module) {
    if (*detail::pkcs11_module == module_path) return {};
    return make_error(Errc::invalid_argument,
                      "PKCS#11 module '" + module_path + "': the process uses " +
                          (detail::pkcs11_module->empty() ? std::string("p11-kit's registered modules")
                                                          : "'" + *detail::pkcs11_module + "'") +
                          " already (chosen once per process: restart to change it)");
  }
  if (!module_path.empty()) {
    // GnuTLS would otherwise load every module p11-kit registers, on first use.
    int rc = gnutls_pkcs11_init(GNUTLS_PKCS11_FLAG_MANUAL, nullptr);
    if (rc >= 0) rc = gnutls_pkcs11_add_provider(module_path.c_str(), nullptr);
    if (rc < 0) {
      return make_error(Errc::crypto, "PKCS#11 module '" + module_path + "' does not load: " + gnutls_strerror(rc));
    }
  }
  detail::pkcs11_module = module_path;
  return {};
}

Result<std::string> check_token_key(const TokenKey& key) {
  auto loaded = detail::load_server_raw_key(detail::KeySource{{}, &key});
  if (!loaded.ok()) return std::move(loaded).error();
  const auto spki = detail::subject_public_key_info(**loaded);
  return crypto::public_key_id_of_spki(ByteView{spki.data(), spki.size()});
}

}  // namespace dauth::transport
