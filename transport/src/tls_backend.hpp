// Per-backend pieces behind coap_session_get_tls(): the RFC 5705 exporter and the negotiated suite. Exactly one of
// tls_gnutls.cpp / tls_openssl.cpp is compiled, matching the libcoap flavour linked (never both in one binary).
#pragma once

#include <coap3/coap.h>

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

}  // namespace dauth::transport::detail
