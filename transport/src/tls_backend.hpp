// Per-backend pieces behind coap_session_get_tls(): the RFC 5705 exporter and the negotiated suite. Exactly one of
// tls_gnutls.cpp / tls_openssl.cpp is compiled, matching the libcoap flavour linked (never both in one binary).
#pragma once

#include <coap3/coap.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

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

// ---- server certificates chosen per handshake by SNI (docs/transport.md §3 "Certificates by server name") ----

// A chain and key for one handshake; the views must stay valid during the lookup call only (the backend copies).
struct ServerCertificatePem {
  std::string_view chain_pem;  // leaf first
  ByteView key_pem;
};
// Called by the backend inside the handshake, once the ClientHello (and its SNI) is read: the certificate to present
// to this server session's client, or nullopt to refuse the handshake (the lookup records and reports why).
using ServerCertificateLookup = std::optional<ServerCertificatePem> (*)(coap_session_t* session,
                                                                       const std::string& server_name);
bool selects_server_certificates() noexcept;  // GnuTLS only
// Makes this server session's handshake ask `lookup` for its certificate instead of presenting the context's PKI
// setup. Must run after libcoap created the session's TLS object (on the first, cookieless ClientHello) and before
// the handshake reaches certificate selection (the ClientHello that echoes the cookie, a later read).
// Errors: unsupported (OpenSSL build), internal (no TLS object or credentials yet).
Result<void> select_server_certificate_by_name(coap_session_t* session, ServerCertificateLookup lookup);

}  // namespace dauth::transport::detail
