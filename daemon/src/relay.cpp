// The relay path of outer ESPrim messages (docs/relay.md): the hop tables ([[peer.hop]], [[peer.hop_client]]),
// sending an outer message to a peer's gateway directly or through a next hop (a stock CoAP forward proxy or a
// relaying dauthd), and relaying: forwarding a POST /esprim named by a coaps:// Proxy-Uri to an allowed destination.
// A relay sees the outer message (destination, receiver AE-ID, sizes), never the JWE's content: it forwards the
// payload as it came, and never logs it.

#include <algorithm>
#include <cctype>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/daemon/log.hpp"
#include "dauth/rspf/messages.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/rspf/schedule.hpp"
#include "dauth/transport/address.hpp"
#include "roles_impl.hpp"

namespace dauth::daemon {

namespace {

using transport::Method;
using transport::Request;
using transport::Response;

// RFC 3986 §2.3 unreserved characters stay; every other byte of a path segment or query item is percent-encoded,
// except '=' between a query item's name and value (so that "to=<AE-ID>" reads as one).
std::string percent_encode(const std::string& text, bool keep_equals) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (std::isalnum(byte) != 0 || c == '-' || c == '.' || c == '_' || c == '~' || (keep_equals && c == '=')) {
      out += c;
    } else {
      out += '%';
      out += kHex[byte >> 4];
      out += kHex[byte & 0x0f];
    }
  }
  return out;
}

// A path segment or query item of a Proxy-Uri, decoded; nullopt for a '%' not followed by two hex digits.
std::optional<std::string> percent_decode(const std::string& text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out += text[i];
      continue;
    }
    const auto hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
    if (i + 2 >= text.size() || !hex(text[i + 1]) || !hex(text[i + 2])) return std::nullopt;
    out += static_cast<char>(std::stoi(text.substr(i + 1, 2), nullptr, 16));
    i += 2;
  }
  return out;
}

// "coaps://<authority>/<path>?<query>" as a relay reads it: the authority as written ("b.example.net:5684",
// "[::1]:5684"), the path segments and query items decoded (RFC 7252 §6.4 steps 6–8).
struct RelayTarget {
  std::string authority;
  std::vector<std::string> path;
  std::vector<std::string> query;
};
Result<RelayTarget> parse_relay_uri(const std::string& uri) {
  static const std::string kScheme = "coaps://";
  const auto bad = [&](const std::string& why) {
    return make_error(Errc::invalid_argument, "Proxy-Uri " + crypto::quote_for_error(uri) + ": " + why);
  };
  if (uri.compare(0, kScheme.size(), kScheme) != 0) {
    return bad("the scheme must be coaps (a relay forwards over DTLS only)");
  }
  const std::string rest = uri.substr(kScheme.size());
  const auto path_start = rest.find_first_of("/?#");
  RelayTarget target;
  target.authority = rest.substr(0, path_start);
  if (target.authority.empty()) return bad("no host");
  if (path_start == std::string::npos) return target;
  std::string path = rest.substr(path_start);
  if (path.find('#') != std::string::npos) return bad("a fragment is not allowed (RFC 7252 §6.4)");
  std::string query;
  if (const auto q = path.find('?'); q != std::string::npos) {
    query = path.substr(q + 1);
    path.resize(q);
  }
  const auto split = [&](const std::string& text, char separator, std::vector<std::string>& out) -> Result<void> {
    std::size_t start = 0;
    while (start < text.size()) {
      auto end = text.find(separator, start);
      if (end == std::string::npos) end = text.size();
      if (end > start) {
        auto decoded = percent_decode(text.substr(start, end - start));
        if (!decoded) return bad("a '%' not followed by two hex digits");
        out.push_back(std::move(*decoded));
      }
      start = end + 1;
    }
    return ok_result();
  };
  if (auto r = split(path, '/', target.path); !r) return r.error();
  if (auto r = split(query, '&', target.query); !r) return r.error();
  return target;
}

// The outer ESPrim message's shape (docs/PROTOCOL.md §7): POST /esprim with a JSON body.
bool is_outer_esprim(const Request& request) {
  return request.method == Method::post && request.path == std::vector<std::string>{std::string(rspf::esprim::kOuterPath)};
}

// A refusal in the outer messages' format: JSON {"error", "detail"} (Content-Format 50), no oneM2M option (a stock
// proxy on the way back would refuse an unknown critical one).
Response plain_refusal(int code, Errc errc, const std::string& why) {
  return rspf::refusal_response(code, make_error(errc, why), rspf::ContentFormat::json);
}

}  // namespace

// ---- hop tables ------------------------------------------------------------------------------------------------

Result<void> Roles::Impl::resolve_hops(const Config& cfg, const LoadedSecrets& secrets,
                                       std::map<std::string, HopState>& out,
                                       std::map<std::string, std::shared_ptr<const SecretBuffer>>& clients_out) const {
  if (!cfg.peer) return ok_result();
  const auto key_of = [&](const HopKeySource& source, const std::string& what) -> Result<std::shared_ptr<const SecretBuffer>> {
    const LoadedSecrets::Key* key = secrets.find_hop_key(source);
    if (key == nullptr) {
      return make_error(Errc::not_found, what + ": its key is not loaded (key_file or key_credential)");
    }
    return std::make_shared<const SecretBuffer>(key->key.clone());
  };
  for (const PeerHop& hop : cfg.peer->hops) {
    const std::string what = "peer.hop " + hop.name;
    auto split = transport::parse_host_port(hop.address);
    if (!split) return make_error(split.error().code, what + ": address: " + split.error().message);
    auto address = resolve_address(hop.address);
    if (!address) return make_error(address.error().code, what + ": " + address.error().message);
    auto key = key_of(hop.key, what);
    if (!key) return std::move(key).error();
    HopState state;
    state.name = hop.name;
    state.address_text = hop.address;
    state.address = *address;
    state.identity = hop.identity;
    state.key = std::move(key).value();
    // SNI (RFC 6066 §3) carries host names only, never IP literals.
    state.server_name = transport::numeric_address(split->host, 0) ? std::string() : split->host;
    out[hop.name] = std::move(state);
  }
  for (const PeerHopClient& client : cfg.peer->hop_clients) {
    auto key = key_of(client.key, "peer.hop_client " + client.identity);
    if (!key) return std::move(key).error();
    clients_out[client.identity] = std::move(key).value();
  }
  return ok_result();
}

transport::PskLookup Roles::Impl::peer_psk_lookup() {
  transport::PskLookup ae_keys = target_keys ? target_keys->psk_lookup() : transport::PskLookup();
  return [this, ae_keys](const transport::PskRequest& request) -> Result<transport::PskGrant> {
    // A hop identity first: it authenticates no AE, so its grant names none (its sessions carry outer ESPrim
    // messages only, on_secure_request).
    if (const auto hop = hop_clients.find(std::string(request.identity)); hop != hop_clients.end()) {
      return transport::PskGrant{hop->second->clone(), "", ""};
    }
    if (ae_keys) return ae_keys(request);
    return make_error(Errc::not_found, "unknown PSK identity: no [[peer.hop_client]] has it, and this dauthd "
                                       "serves no local AE (no KeIDs)");
  };
}

bool Roles::Impl::is_hop_session(const transport::Session& session) const {
  const auto& grant = session.grant();
  return session.peer().kind == transport::PeerKind::psk && grant.peer_ae_id.empty() && grant.local_ae_id.empty() &&
         hop_clients.count(session.peer().value) != 0;
}

// ---- sending an outer message (gateway A) ----------------------------------------------------------------------

void Roles::Impl::send_outer(const std::string& originator, const std::string& target_ae_id, Request outer,
                             std::function<void(Result<Response>)> done) {
  // Outer messages carry no oneM2M options: a stock proxy refuses unknown critical options (4.02).
  outer.originator.clear();
  outer.request_id.clear();
  const auto peer = peers.find(target_ae_id);
  if (peer == peers.end() || !peer->second.address) {
    done(make_error(Errc::not_found, "no [[peer.address]] configured for " + target_ae_id));
    return;
  }
  std::string via;
  if (config.peer) {
    for (const auto& entry : config.peer->addresses) {
      if (entry.ae_id == target_ae_id) via = entry.via;
    }
  }
  if (!via.empty()) {
    const auto hop = hops.find(via);
    if (hop == hops.end()) {
      done(make_error(Errc::not_found, "peer.address " + target_ae_id + ": via names no [[peer.hop]] " +
                                           crypto::quote_for_error(via)));
      return;
    }
    // The hop forwards to the peer's gateway (RFC 7252 §5.7.2): Proxy-Uri instead of Uri-Path and Uri-Query.
    std::string uri = "coaps://" + peer->second.address_text;
    for (const auto& segment : outer.path) uri += "/" + percent_encode(segment, false);
    if (outer.path.empty()) uri += "/";
    for (std::size_t i = 0; i < outer.query.size(); ++i) {
      uri += (i == 0 ? "?" : "&") + percent_encode(outer.query[i], true);
    }
    outer.proxy_uri = std::move(uri);
    outer.path.clear();
    outer.query.clear();
    peer_driver->node->request(hop->second.address, hop->second.credentials(), std::move(outer),
                               [done](Result<Response> outcome, const transport::Session*) { done(std::move(outcome)); });
    rearm(*peer_driver);
    return;
  }
  // Directly: the AE-pair session forward_to_peer uses (credentials_to_peer). A PSK first use is refused while
  // the peer fetches the key from its MEF: retried like forward_to_peer's (250 ms, 1 s, 3 s).
  std::string ke_id;
  auto key = std::make_shared<SecretBuffer>();
  if (peer->second.credential == "psk") {
    LocalAeState* ae = find_ae(originator);
    if (ae == nullptr || !ae->enrolee) {
      done(make_error(Errc::not_found, crypto::quote_for_error(originator) + " is not a local AE of this dauthd"));
      return;
    }
    auto target_key = ae->enrolee->key_for_target(target_ae_id);
    if (!target_key) {
      done(make_error(target_key.error().code,
                      originator + " -> " + target_ae_id + ": " + target_key.error().message));
      return;
    }
    ke_id = target_key->ke_id;
    *key = std::move(target_key->key);
  }
  auto credentials = credentials_to_peer(originator, target_ae_id, ke_id, *key);
  if (!credentials) {
    done(std::move(credentials).error());
    return;
  }
  struct Attempt {
    Roles::Impl* self;
    transport::Peer address;
    transport::ClientCredentials credentials;
    Request request;
    std::function<void(Result<Response>)> done;
    std::size_t tries = 0;
    static void send(const std::shared_ptr<Attempt>& attempt) {
      Roles::Impl& s = *attempt->self;
      s.peer_driver->node->request(
          attempt->address, attempt->credentials, attempt->request,
          [attempt](Result<Response> outcome, const transport::Session*) {
            Roles::Impl& roles = *attempt->self;
            const bool first_use = !outcome && outcome.error().code == Errc::unauthenticated;
            if (first_use && attempt->tries < std::size(kFirstUseRetryDelays) && !roles.stopping) {
              const auto delay = rspf::with_jitter(kFirstUseRetryDelays[attempt->tries++], rspf::random_jitter());
              const std::uint64_t retry_id = ++roles.last_retry_id;
              auto timer = roles.loop.add_timer(delay, std::chrono::milliseconds(0), [attempt, retry_id] {
                attempt->self->retry_timers.erase(retry_id);
                send(attempt);
              });
              if (timer) {
                roles.retry_timers.emplace(retry_id, std::move(timer).value());
                return;
              }
            }
            attempt->done(std::move(outcome));
          });
      s.rearm(*s.peer_driver);
    }
  };
  auto attempt = std::make_shared<Attempt>(
      Attempt{this, *peer->second.address, std::move(credentials).value(), std::move(outer), std::move(done)});
  Attempt::send(attempt);
}

// ---- the secure endpoint: relayed messages and hop sessions (any gateway) --------------------------------------

void Roles::Impl::on_secure_request(const transport::Session& session, const Request& request,
                                    transport::Responder responder) {
  if (!request.proxy_uri.empty()) {
    on_relay_request(session, request, std::move(responder));
    return;
  }
  if (is_outer_esprim(request)) {
    if (is_hop_session(session)) {
      log::debug("peer: outer ESPrim message from hop " + session.peer().value + " (" + session.remote_address() +
                 "), " + std::to_string(request.payload.size()) + " bytes");
    }
    // ESPrim: the object authenticates its originator, whichever session (AE pair or relay hop) carried it.
    on_esprim_request(session, request, std::move(responder));
    return;
  }
  if (is_hop_session(session)) {
    count("relay_refused_total");
    const std::string why = "hop identity " + crypto::quote_for_error(session.peer().value) +
                            " authenticates no AE: its session carries only outer ESPrim messages (POST /esprim) "
                            "and relayed ones (Proxy-Uri)";
    log::write_limited(log::Level::notice, "hop refused", session.peer().value,
                       "peer: refused " + std::string(transport::to_string(request.method)) + " " +
                           request.path_text() + " from " + session.remote_address() + ": " + why);
    responder.respond(plain_refusal(403, Errc::denied, why));
    return;
  }
  on_peer_request(session, request, std::move(responder));
}

void Roles::Impl::on_relay_request(const transport::Session& session, const Request& request,
                                   transport::Responder responder) {
  const auto& peer = session.peer();
  const bool hop = is_hop_session(session);
  const std::string who = hop ? "hop " + peer.value
                              : (session.grant().peer_ae_id.empty() ? peer.value : session.grant().peer_ae_id);
  const auto refuse = [&](int code, Errc errc, const std::string& why) {
    count("relay_refused_total");
    log::write_limited(log::Level::notice, "relay refused", peer.value,
                       "relay: refused " + std::string(transport::to_string(request.method)) + " Proxy-Uri " +
                           crypto::quote_for_error(request.proxy_uri) + " from " + who + " (" +
                           session.remote_address() + "): " + why);
    responder.respond(plain_refusal(code, errc, why));
  };
  if (draining) {
    refuse(503, Errc::denied, "dauthd is shutting down (SIGTERM); no new requests");
    return;
  }
  // Only authenticated sessions: a hop identity, or an AE the handshake authenticated.
  if (!hop && session.grant().peer_ae_id.empty()) {
    refuse(403, Errc::denied, "this session authenticates neither a hop ([[peer.hop_client]]) nor an AE");
    return;
  }
  if (!config.relay.enable) {
    refuse(505, Errc::unsupported, "this dauthd relays nothing ([relay] enable = false)");
    return;
  }
  auto target = parse_relay_uri(request.proxy_uri);
  if (!target) {
    refuse(505, Errc::unsupported, target.error().message);
    return;
  }
  const auto& allow = config.relay.allow;
  if (std::find(allow.begin(), allow.end(), target->authority) == allow.end()) {
    refuse(403, Errc::denied, "destination " + crypto::quote_for_error(target->authority) +
                                  " is not in relay.allow");
    return;
  }
  const HopState* next = nullptr;
  for (const auto& [name, state] : hops) {
    if (state.address_text == target->authority) next = &state;
  }
  if (next == nullptr) {
    refuse(505, Errc::not_found, "no [[peer.hop]] has address " + crypto::quote_for_error(target->authority) +
                                     " (its credentials would authenticate the next hop)");
    return;
  }
  Request forwarded;
  forwarded.method = request.method;
  forwarded.path = target->path;
  forwarded.query = target->query;
  forwarded.content_format = request.content_format;
  if (!is_outer_esprim(forwarded) || request.content_format != transport::kContentFormatJson) {
    refuse(403, Errc::denied, "a relay carries only outer ESPrim messages: POST /esprim with Content-Format 50");
    return;
  }
  if (*relay_in_flight >= kMaxRelayedInFlight) {
    refuse(503, Errc::limit, std::to_string(*relay_in_flight) + " relayed requests are still unanswered (at most " +
                                 std::to_string(kMaxRelayedInFlight) + "); try again later");
    return;
  }
  forwarded.accept = request.accept;
  forwarded.payload = request.payload;
  const std::string destination = target->authority;
  auto tracked = track_in_flight(*this, std::move(responder),
                                 "relayed POST /esprim from " + who + " to " + destination, relay_in_flight);
  peer_driver->node->request(
      next->address, next->credentials(), std::move(forwarded),
      [this, tracked, destination, who](Result<Response> outcome, const transport::Session*) {
        if (!outcome) {
          count("relay_failed_total");
          log::write_limited(log::Level::warning, "relay failed", destination,
                             "relay: " + who + " -> " + destination + " failed: " + outcome.error().message);
          const int code = outcome.error().code == Errc::timeout ? 504 : 502;
          tracked->respond(plain_refusal(code, outcome.error().code,
                                         "relay to " + destination + ": " + outcome.error().message));
          return;
        }
        count("relay_forwarded_total");
        // Sizes and codes only: the relay never reads, and so never logs, what the ESPrim object protects.
        log::debug("relay: POST /esprim from " + who + " to " + destination + " answered " +
                   rspf::coap_code_text(outcome->code) + ", " + std::to_string(outcome->payload.size()) + " bytes");
        // The answer as it came: code, Content-Format and payload (an ESPrim answer or a refusal of the receiver).
        Response answer;
        answer.code = outcome->code;
        answer.content_format = outcome->content_format;
        answer.payload = std::move(outcome->payload);
        tracked->respond(std::move(answer));
      });
  rearm(*peer_driver);
}

}  // namespace dauth::daemon
