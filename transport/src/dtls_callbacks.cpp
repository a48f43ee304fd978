// The DTLS callbacks, where the peer identity of every DTLS session is decided: the PSK lookup (server side) and
// the certificate / raw-public-key check (both sides). Nothing else here: read alone.
#include <coap3/coap.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "dauth/crypto/x509.hpp"
#include "node_impl.hpp"
#include "tls_backend.hpp"

namespace dauth::transport::detail {

// ---- DTLS callbacks ----------------------------------------------------------------------------------------------

// PSK server lookup (validate_id_call_back). Never blocks: the lookup answers from memory (docs/transport.md §1).
const coap_bin_const_t* on_psk_identity(coap_bin_const_t* identity, coap_session_t* session, void* arg) {
  auto* impl = static_cast<Node::Impl*>(arg);
  SessionImpl& state = impl->state_for(session);
  state.offered_identity.assign(reinterpret_cast<const char*>(identity->s), identity->length);
  impl->psk_in_flight = SecretBuffer();
  if (!impl->config.psk_lookup) {
    state.refusal = "PSK handshake refused: this node has no PSK credentials";
    impl->report_handshake_failure(state, FailureKind::handshake_failed, state.refusal);
    return nullptr;
  }
  state.sni = detail::server_name(session);
  auto granted = impl->config.psk_lookup(PskRequest{state.offered_identity, state.sni, state.remote});
  if (!granted.ok() || granted->key.empty()) {
    state.refusal = granted.ok() ? "PSK handshake refused: empty key for the identity"
                                 : "PSK handshake refused: " + granted.error().message;
    impl->report_handshake_failure(state, FailureKind::handshake_failed, state.refusal);
    return nullptr;  // libcoap/GnuTLS answer with a fatal handshake_failure alert (docs/transport.md §1)
  }
  impl->psk_in_flight = std::move(granted->key);
  impl->psk_in_flight_view = {impl->psk_in_flight.size(), impl->psk_in_flight.data()};
  state.psk_key_supplied = true;
  state.verified = PeerIdentity{PeerKind::psk, state.offered_identity, {}, {}};
  state.granted = SessionGrant{std::move(granted->peer_ae_id), std::move(granted->local_ae_id)};
  state.credential = state.offered_identity;
  return &impl->psk_in_flight_view;
}

namespace {

bool client_side_of(const coap_session_t* session) {
  return coap_session_get_type(session) == COAP_SESSION_TYPE_CLIENT;
}

}  // namespace

// Certificate / raw-public-key check (validate_cn_call_back). The identity comes from our own parsing of the DER:
// libcoap's cn argument differs per backend (docs/transport.md §3). GnuTLS calls this for depth 0 only, after its own
// chain verification; OpenSSL also for depth 1.
int on_peer_certificate(const char* cn, const uint8_t* der, size_t der_length, coap_session_t* session,
                        unsigned depth, int validated, void* arg) {
  auto* policy = static_cast<PkiPolicy*>(arg);
  Node::Impl* impl = policy->node;
  SessionImpl& state = impl->state_for(session);
  if (depth > 0) return validated ? 1 : 0;
  if (!client_side_of(session)) state.sni = detail::server_name(session);
  auto refuse = [&](std::string reason) {
    state.refusal = std::move(reason);
    impl->report_handshake_failure(state, FailureKind::handshake_failed, state.refusal);
    return 0;  // GnuTLS sends access_denied
  };
  const ByteView bytes(der, der_length);
  const bool raw_key = cn != nullptr && std::strcmp(cn, COAP_DTLS_RPK_CERT_CN) == 0;
  if (raw_key ? !policy->raw_keys : !policy->certificates) {
    return refuse(raw_key ? "peer sent a raw public key where a certificate was required"
                          : "peer sent a certificate where a raw public key was required");
  }
  if (!validated) return refuse("peer certificate did not verify against the trust anchors");
  if (raw_key) {
    auto key_id = crypto::public_key_id_from_spki(bytes);
    if (!key_id.ok()) return refuse("peer raw public key unreadable: " + key_id.error().message);
    state.offered_identity = *key_id;
    const bool server_side = !client_side_of(session);
    SessionGrant grant{*key_id, {}};  // without a lookup: the key id, and no local AE
    if (server_side && impl->config.raw_key_lookup) {
      auto granted = impl->config.raw_key_lookup(RawKeyRequest{*key_id, state.sni, state.remote});
      if (!granted.ok()) return refuse("raw public key " + *key_id + " refused: " + granted.error().message);
      grant = SessionGrant{std::move(granted->peer_ae_id), std::move(granted->local_ae_id)};
    } else if (policy->pinned_keys.count(*key_id) == 0) {
      return refuse("raw public key " + *key_id + " is not pinned");
    }
    PeerIdentity peer{PeerKind::rpk, *key_id, {}, {}};
    if (impl->config.peer_check) {  // server and client sessions alike (transport.hpp)
      if (auto allowed = impl->config.peer_check(peer); !allowed.ok()) {
        return refuse("peer check refused raw public key " + *key_id + ": " + allowed.error().message);
      }
    }
    state.verified = std::move(peer);
    if (server_side) state.granted = std::move(grant);
    return 1;
  }
  auto certificate = crypto::Certificate::parse(bytes);
  if (!certificate.ok()) return refuse("peer certificate unreadable: " + certificate.error().message);
  auto ae_id = certificate->ae_id();
  const bool client_side = coap_session_get_type(session) == COAP_SESSION_TYPE_CLIENT;
  if (ae_id.ok()) {
    state.offered_identity = *ae_id;
  } else {
    const auto dns = certificate->san_dns_names();
    state.offered_identity = dns.empty() ? certificate->subject() : dns.front();
    // A server may authenticate by FQDN (an MEF's certificate, PROTOCOL.md §3.2); a client must carry an AE-ID.
    if (!client_side || dns.empty()) {
      return refuse("peer certificate '" + certificate->subject() + "' carries no AE-ID: " + ae_id.error().message);
    }
  }
  if (client_side && !state.expected_peer.empty()) {
    const auto dns = certificate->san_dns_names();
    const bool matches = (ae_id.ok() && *ae_id == state.expected_peer) ||
                         std::find(dns.begin(), dns.end(), state.expected_peer) != dns.end();
    if (!matches) {
      return refuse("server certificate names '" + state.offered_identity + "', expected '" + state.expected_peer +
                    "'");
    }
  }
  PeerIdentity peer{PeerKind::x509, state.offered_identity, certificate->serial_hex(), certificate->issuer()};
  if (impl->config.peer_check) {  // server and client sessions alike: a revoked server is refused too
    if (auto allowed = impl->config.peer_check(peer); !allowed.ok()) {
      return refuse("peer check refused " + std::string(client_side ? "server" : "client") +
                    " certificate serial " + peer.certificate_serial + " of '" + peer.value +
                    "': " + allowed.error().message);
    }
  }
  if (!client_side) {
    // The local AE is the one whose certificate this handshake presented (GnuTLS: chosen by SNI in
    // choose_server_certificate; OpenSSL: always config.x509).
    state.granted = SessionGrant{peer.value, state.presented_certificate ? state.presented_local_ae_id
                                                                         : impl->default_local_ae_id()};
  }
  state.verified = std::move(peer);
  return 1;
}

}  // namespace dauth::transport::detail
