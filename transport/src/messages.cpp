// Value types of the public API: names, messages, credentials, the failure line format.
#include <array>
#include <string>

#include "dauth/crypto/token.hpp"
#include "dauth/transport/transport.hpp"
#include "tls_backend.hpp"

namespace dauth::transport {

Backend compiled_backend() noexcept { return detail::backend(); }

std::string_view to_string(Backend backend) noexcept {
  return backend == Backend::gnutls ? "gnutls" : "openssl";
}

bool backend_supports_rpk() noexcept { return compiled_backend() == Backend::gnutls; }


Result<void> check_token_key_uri(std::string_view uri) {
  if (!crypto::is_pkcs11_uri(uri)) return make_error(Errc::invalid_argument, "a token key is a pkcs11: URI (RFC 7512)");
  std::string lower(uri);
  for (char& c : lower) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  // Not quoted: it would put the PIN in the log.
  if (lower.find("pin-value") != std::string::npos || lower.find("pin-source") != std::string::npos) {
    return make_error(Errc::invalid_argument, "a token key URI carries no PIN (pin-value, pin-source): the PIN comes "
                                              "from its own credential");
  }
  if (lower.find("type=") != std::string::npos && lower.find("type=private") == std::string::npos) {
    return make_error(Errc::invalid_argument, "token key '" + std::string(uri) + "': type= names no private key");
  }
  if (uri.find_first_of(" \t\r\n\"") != std::string_view::npos) {
    return make_error(Errc::invalid_argument, "token key '" + std::string(uri) + "': spaces and quotes are "
                                              "percent-encoded in a pkcs11: URI (RFC 7512)");
  }
  return {};
}

// The name tables are switches without default: -Wswitch (an error here) names any enumerator left without a name.
std::string_view to_string(Method method) noexcept {
  switch (method) {
    case Method::get: return "GET";
    case Method::post: return "POST";
    case Method::put: return "PUT";
    case Method::del: return "DELETE";
    case Method::fetch: return "FETCH";
    case Method::patch: return "PATCH";
    case Method::ipatch: return "iPATCH";
  }
  return "?";
}

bool may_repeat(Method method) noexcept {
  switch (method) {
    case Method::get:
    case Method::put:
    case Method::del:
    case Method::fetch:
    case Method::ipatch: return true;
    case Method::post:
    case Method::patch: return false;
  }
  return false;
}

std::string_view to_string(PeerKind kind) noexcept {
  switch (kind) {
    case PeerKind::local: return "local";
    case PeerKind::psk: return "psk";
    case PeerKind::x509: return "x509";
    case PeerKind::rpk: return "rpk";
  }
  return "?";
}

std::string_view to_string(FailureKind kind) noexcept {
  switch (kind) {
    case FailureKind::handshake_failed: return "handshake_failed";
    case FailureKind::handshake_timeout: return "handshake_timeout";
    case FailureKind::request_rejected: return "request_rejected";
    case FailureKind::request_failed: return "request_failed";
    case FailureKind::limit: return "limit";
  }
  return "?";
}

std::string Request::path_text() const {
  std::string text;
  for (const auto& segment : path) text += "/" + segment;
  return text.empty() ? "/" : text;
}

Response Response::with_text(int code, std::string_view text) {
  Response response;
  response.code = code;
  response.payload.assign(text.begin(), text.end());
  return response;
}

ClientCredentials ClientCredentials::plain() { return {}; }

ClientCredentials ClientCredentials::psk(std::string identity, SecretBuffer key, std::string sni) {
  ClientCredentials credentials;
  credentials.kind = Kind::psk;
  credentials.psk_identity = std::move(identity);
  credentials.psk_key = std::move(key);
  credentials.sni = std::move(sni);
  return credentials;
}

ClientCredentials ClientCredentials::certificate(X509Credentials x509, std::string sni, std::string expected_peer) {
  ClientCredentials credentials;
  credentials.kind = Kind::x509;
  credentials.x509 = std::move(x509);
  credentials.sni = std::move(sni);
  credentials.expected_peer = std::move(expected_peer);
  return credentials;
}

ClientCredentials ClientCredentials::raw_public_key(RpkCredentials rpk, std::string sni) {
  ClientCredentials credentials;
  credentials.kind = Kind::rpk;
  credentials.rpk = std::move(rpk);
  credentials.sni = std::move(sni);
  return credentials;
}

ClientCredentials ClientCredentials::clone() const {
  ClientCredentials copy;
  copy.kind = kind;
  copy.psk_identity = psk_identity;
  copy.psk_key = psk_key.clone();
  if (x509) {
    copy.x509 = X509Credentials{x509->certificate_chain_pem, x509->private_key_pem.clone(), x509->trust_anchors_pem,
                                x509->local_ae_id, x509->token_key};
  }
  if (rpk) copy.rpk = RpkCredentials{rpk->private_key_pem.clone(), rpk->pinned_peer_keys, rpk->token_key};
  copy.sni = sni;
  copy.expected_peer = expected_peer;
  return copy;
}

namespace {
// Log values are quoted; quotes, backslashes and control bytes escaped so that one failure stays one line.
std::string quoted(std::string_view value) {
  std::string out = "\"";
  for (const char c : value) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (byte < 0x20 || byte >= 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[byte >> 4];
      out += kHex[byte & 0xf];
    } else {
      out += c;
    }
  }
  return out + "\"";
}
}  // namespace

std::string format_failure(const Failure& failure) {
  return "transport: event=" + std::string(to_string(failure.kind)) + " peer=" + failure.peer_address +
         " identity=" + quoted(failure.identity_offered) + " reason=" + quoted(failure.reason);
}

}  // namespace dauth::transport
