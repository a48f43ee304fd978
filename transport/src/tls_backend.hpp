// Per-backend pieces behind coap_session_get_tls(): the RFC 5705 exporter and the negotiated suite. Exactly one of
// tls_gnutls.cpp / tls_openssl.cpp is compiled, matching the libcoap flavour linked (never both in one binary).
#pragma once

#include <coap3/coap.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dauth/error.hpp"
#include "dauth/secret.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::transport::detail {

Backend backend() noexcept;
// RFC 5705 exporter, no context value (TS-0003 §10.3.1 uses none).
Result<SecretBuffer> export_keying_material(const coap_session_t* session, std::string_view label,
                                            std::size_t length);
std::string cipher_suite(const coap_session_t* session);
// The DNS name the client sent as SNI (RFC 6066 §3), read from the server's TLS object; "" if none. Valid from the
// ClientHello on, so inside validate_id_call_back. Read per session on purpose: libcoap 4.3.1's
// validate_sni_call_back runs once per distinct name per context (it caches the answer in psk_sni_entry_list).
std::string server_name(const coap_session_t* session);
// A value that changes with every DTLS record read from the peer on this session (its read sequence number, epoch
// included), whatever the record carries: a response, an empty ACK, an alert, a handshake message. nullopt without
// a TLS object, and always on the OpenSSL build (no public read counter there). Tells a silent peer from a slow one
// (Limits::silence_timeout).
std::optional<std::uint64_t> records_received(const coap_session_t* session);
// The same for the records we sent (retransmissions included); like records_received, also while the handshake
// runs (epoch 0), which is how a stalled handshake is told from a slow one (restart_stalled_handshakes).
std::optional<std::uint64_t> records_sent(const coap_session_t* session);

// ---- server PKI built once (docs/transport.md §3 "Certificates by server name", "Credentials built once") ----
//
// GnuTLS: libcoap 4.3.1 parses a context's PKI setup again for every new server session, PSK ones included
// (setup_server_ssl_session). So the server context gets no PKI setup there; the certificate credentials are built
// once per node (ServerPki) and attached to each new server session by node_server.cpp before its handshake needs
// them.
// OpenSSL: libcoap keeps the PKI setup (attaches_server_pki() is false, the functions below answer unsupported).

// What a server presents in one handshake, parsed once, shared by every handshake that presents it: a certificate
// chain and its private key, or a raw public key (RFC 7250: the SubjectPublicKeyInfo) and its private key. Held by
// shared_ptr: whoever chose it for a handshake keeps it alive until that handshake is over, so replacing a
// certificate or the raw key never frees one a running handshake still uses.
// Our private key as the caller has it: PEM text, or a key in a token (the TokenKey outlives the call).
struct KeySource {
  ByteView pem;
  const TokenKey* token = nullptr;
};
// A chain with its key; also what a client presents when its key is in a token (attach_client_certificate).
struct ServerCertificate;
Result<std::shared_ptr<const ServerCertificate>> load_server_certificate(std::string_view chain_pem, KeySource key);
Result<std::shared_ptr<const ServerCertificate>> load_server_raw_key(KeySource key);

// Called inside the handshake once the ClientHello (and its SNI) is read: what to present to this server
// session's client -- a certificate for `server_name`, or our raw key when the handshake negotiated raw public keys
// (`raw_key`) -- or nullptr to refuse the handshake (the lookup records and reports why).
using ServerCertificateLookup = std::shared_ptr<const ServerCertificate> (*)(coap_session_t* session,
                                                                            const std::string& server_name,
                                                                            bool raw_key);

// The credentials every server session of a node shares: the trust anchors client certificates must chain to (""
// = the node accepts no client certificate), the lookup of what to present, and the peer check. One endpoint
// serves certificates and raw keys together: GnuTLS negotiates the certificate types (RFC 7250) per handshake;
// a client that offers only a raw key of its own is presented our raw key (raw-key clients such as libcoap's also
// list X.509 as a server certificate type they take). `check` gets exactly what libcoap's validate_cn_call_back
// would get: the peer's leaf certificate (or SubjectPublicKeyInfo with cn COAP_DTLS_RPK_CERT_CN), depth 0,
// validated 1, `check_arg`; a chain that does not verify never reaches it (the reason is logged through libcoap's
// log handler, naming the session, as libcoap's own verification does); a certificate where no trust anchors are
// set reaches it with validated 0, for the check to refuse with its reason.
struct ServerPki;
bool attaches_server_pki() noexcept;  // GnuTLS only
Result<std::shared_ptr<const ServerPki>> make_server_pki(std::string_view trust_anchors_pem,
                                                         ServerCertificateLookup lookup,
                                                         coap_dtls_cn_callback_t check, void* check_arg);
// Gives this server session's handshake the node's certificate credentials, and with `psk_too` false takes the
// PSK credentials libcoap gave it away (a node without PSK keys offers no PSK suites). Must run after libcoap
// created the session's TLS object (on the first, cookieless ClientHello) and before the handshake reads the
// ClientHello that echoes the cookie (a later read). `pki` must outlive the session's TLS object.
// Errors: unsupported (OpenSSL build), internal (no TLS object).
Result<void> attach_server_pki(coap_session_t* session, const ServerPki& pki, bool psk_too);

// ---- client keys in a token ------------------------------------------------------------------------------------
//
// libcoap 4.3.1 takes a client key as PEM (or as file names, parsed again for every session); a key in a token goes
// around it: the client context's PKI setup carries no key of ours, and this gives the session's certificate
// credentials (libcoap's, one set per client session) a retrieve function that presents `certificate` when the
// server asks for one. Must run right after libcoap created the session (its ClientHello is out, the server's
// CertificateRequest not yet read). `certificate` must outlive the session's TLS object.
Result<void> attach_client_certificate(coap_session_t* session, const ServerCertificate& certificate);
// The SubjectPublicKeyInfo of a raw key load_server_raw_key loaded (from PEM or a token).
std::vector<std::uint8_t> subject_public_key_info(const ServerCertificate& certificate);

}  // namespace dauth::transport::detail
