// The request paths of the peer role (PROTOCOL.md §6): gateway A's local endpoint, where a local AE names its target
// in Proxy-Uri and dauthd forwards over the AE-pair DTLS session; and gateway B's secure endpoint, where the
// authenticated AE-ID is checked (impersonation, policy) before delivery to the local AE.

#include <algorithm>
#include <cctype>
#include <cstring>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/daemon/log.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/rspf/schedule.hpp"
#include "dauth/transport/address.hpp"
#include "proxy_support.hpp"
#include "roles_impl.hpp"

namespace dauth::daemon {

namespace {

using transport::Method;
using transport::Request;
using transport::Response;


// Parses "coap://<AE-ID>/a/b?x=1" (RFC 7252 §6.4 subset: no port). An AE-ID that cannot be a URI host as it is
// (SP-relative "/in-cse/CAE-x") is percent-encoded there (RFC 3986 §3.2.2 reg-name): coap://%2Fin-cse%2FCAE-x/a.
struct ProxyTarget {
  std::string ae_id;
  std::vector<std::string> path;
  std::vector<std::string> query;
};
Result<ProxyTarget> parse_proxy_uri(const std::string& uri) {
  const auto bad = [&](const std::string& why) {
    return make_error(Errc::invalid_argument, "Proxy-Uri " + crypto::quote_for_error(uri) + ": " + why +
                                                  "; expected coap://<target AE-ID>/<path>");
  };
  std::string rest;
  for (const char* scheme : {"coap://", "coaps://"}) {
    if (uri.rfind(scheme, 0) == 0) rest = uri.substr(std::strlen(scheme));
  }
  if (rest.empty()) return bad("scheme must be coap or coaps");
  ProxyTarget target;
  const auto path_start = rest.find_first_of("/?");
  const std::string host = rest.substr(0, path_start);
  for (std::size_t i = 0; i < host.size(); ++i) {
    if (host[i] != '%') {
      target.ae_id += host[i];
      continue;
    }
    const auto hex_digit = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
    if (i + 2 >= host.size() || !hex_digit(host[i + 1]) || !hex_digit(host[i + 2])) {
      return bad("host has a '%' not followed by two hex digits");
    }
    target.ae_id += static_cast<char>(std::stoi(host.substr(i + 1, 2), nullptr, 16));
    i += 2;
  }
  if (auto valid = crypto::validate_ae_id(target.ae_id); !valid) return bad("host is not an AE-ID");
  if (path_start == std::string::npos) return target;
  std::string path = rest.substr(path_start);
  std::string query;
  if (const auto q = path.find('?'); q != std::string::npos) {
    query = path.substr(q + 1);
    path = path.substr(0, q);
  }
  std::size_t start = 0;
  while (start < path.size()) {
    if (path[start] == '/') {
      ++start;
      continue;
    }
    const auto end = path.find('/', start);
    target.path.push_back(path.substr(start, end == std::string::npos ? std::string::npos : end - start));
    start = end == std::string::npos ? path.size() : end;
  }
  start = 0;
  while (start < query.size()) {
    const auto end = query.find('&', start);
    target.query.push_back(query.substr(start, end == std::string::npos ? std::string::npos : end - start));
    start = end == std::string::npos ? query.size() : end + 1;
  }
  return target;
}

// The address part of a session's "127.0.0.2:40000" / "[::1]:40000" (local AEs: the port is ephemeral).
std::string source_address(const std::string& remote) {
  auto split = transport::parse_host_port(remote);
  return split ? split->host : remote;
}

// Equal IP literals, however written ("::1" and "0:0::1"); false if either is empty or not an address.
bool same_ip(const std::string& a, const std::string& b) {
  auto x = transport::numeric_address(a, 0);
  auto y = transport::numeric_address(b, 0);
  return x && y && x->length == y->length && std::memcmp(&x->storage, &y->storage, x->length) == 0;
}

}  // namespace

// Every refusal carries the body every dauth role answers with (PROTOCOL.md §2): CBOR { "error": <word of the
// Errc>, "detail": <text> }, Content-Format 60, from the one helper the MEF uses too.
Response refusal(int code, std::optional<std::uint32_t> rsc, const Error& error) {
  Response response = rspf::refusal_response(code, error);
  response.response_status = rsc;
  return response;
}

// oneM2M-RSC (option 307) is critical (odd number): a plain CoAP client that did not send oneM2M-RQI (a stock
// client) rejects a response carrying it with RST (RFC 7252 §5.4.1). Only oneM2M-aware local AEs get it.
Response for_local_ae(Response response, const Request& request) {
  if (request.request_id.empty()) response.response_status.reset();
  return response;
}

// SIGTERM drain (Roles::begin_drain): new work is refused with 5.03; the caller may retry with another dauthd or
// after the restart.
bool refuse_while_draining(const Roles::Impl& roles, const Request& request, transport::Responder& responder) {
  if (!roles.draining) return false;
  responder.respond(for_local_ae(
      refusal(503, std::nullopt, make_error(Errc::denied, "dauthd is shutting down (SIGTERM); no new requests")),
      request));
  return true;
}

std::shared_ptr<transport::Responder> track_in_flight(Roles::Impl& roles, transport::Responder responder,
                                                      std::string what, std::shared_ptr<std::size_t> per_peer) {
  struct Tracked {
    Tracked(std::shared_ptr<InFlightTable> t, std::uint64_t i, transport::Responder r, std::shared_ptr<std::size_t> c)
        : table(std::move(t)), id(i), responder(std::move(r)), counter(std::move(c)) {
      if (counter) ++*counter;
    }
    Tracked(const Tracked&) = delete;
    Tracked& operator=(const Tracked&) = delete;
    ~Tracked() {
      table->requests.erase(id);
      if (counter) --*counter;
    }
    std::shared_ptr<InFlightTable> table;
    std::uint64_t id;
    transport::Responder responder;
    std::shared_ptr<std::size_t> counter;
  };
  const std::uint64_t id = ++roles.in_flight->next_id;
  auto tracked = std::make_shared<Tracked>(roles.in_flight, id, std::move(responder), std::move(per_peer));
  roles.in_flight->requests.emplace(id, InFlightTable::Entry{std::move(what), &tracked->responder});
  return std::shared_ptr<transport::Responder>(tracked, &tracked->responder);
}

// ---- the local AE side (A): proxy to the target's dauthd -----------------------------------------------------

void Roles::Impl::on_local_request(const transport::Session& session, const Request& request,
                                   transport::Responder responder) {
  count("proxy_requests_total");
  if (refuse_while_draining(*this, request, responder)) return;
  if (request.proxy_uri.empty()) {
    responder.respond(for_local_ae(refusal(404, std::nullopt,
                                           make_error(Errc::not_found,
                                                      "dauthd local endpoint: send the request with Proxy-Uri "
                                                      "coap://<target AE-ID>/<path> (coap-client -P)")), request));
    return;
  }
  auto target = parse_proxy_uri(request.proxy_uri);
  if (!target) {
    count("proxy_rejected_total");
    responder.respond(for_local_ae(refusal(400, std::nullopt, target.error()), request));
    return;
  }
  // PROTOCOL.md §6: the local originator is the configured local AE named by oneM2M-FR, or the AE whose
  // enrolee.ae.local_source is the request's source address; anything else gets 4.03. An AE with a local_source
  // is bound to it: its oneM2M-FR from another source is refused too.
  const std::string source = source_address(session.remote_address());
  LocalAeState* mapped = nullptr;
  for (auto& candidate : aes) {
    if (same_ip(candidate->config.local_source, source)) mapped = candidate.get();
  }
  LocalAeState* named = request.originator.empty() ? nullptr : find_ae(request.originator);
  const bool bound_elsewhere = named && !named->config.local_source.empty() && named != mapped;
  if ((mapped && named && named != mapped) || bound_elsewhere) {
    count("proxy_rejected_total");
    const std::string why = "oneM2M-FR " + crypto::quote_for_error(request.originator) + " from source " + source +
                            ": " + (bound_elsewhere ? named->config.id + " sends from local_source " +
                                                          named->config.local_source
                                                    : "that source is " + mapped->config.id + "'s (local_source)");
    log::write_limited(log::Level::notice, "proxy refused", source, "proxy: refused request to " + target->ae_id + ": " + why);
    responder.respond(for_local_ae(refusal(403, kRscNoPrivilege, make_error(Errc::denied, why)), request));
    return;
  }
  LocalAeState* ae = mapped ? mapped : named;
  if (ae == nullptr || !ae->enrolee) {
    count("proxy_rejected_total");
    const std::string why =
        request.originator.empty()
            ? "no oneM2M-FR, and source " + source + " is no local AE's local_source ([[enrolee.ae]])"
            : "oneM2M-FR " + crypto::quote_for_error(request.originator) +
                  " is not a local AE of this dauthd ([[enrolee.ae]] ids)";
    log::write_limited(log::Level::notice, "proxy refused", source,
                       "proxy: refused request from " + session.remote_address() + " to " + target->ae_id + ": " + why);
    responder.respond(for_local_ae(refusal(403, kRscNoPrivilege, make_error(Errc::denied, why)), request));
    return;
  }
  auto peer = peers.find(target->ae_id);
  // peer.address esprim = "required": the request is protected end to end (esprim_paths.cpp), with the ESPrim key
  // (SUID 23) instead of this session key.
  const bool esprim = peer != peers.end() && peer->second.esprim_required;
  std::optional<rspf::TargetKey> key;
  if (!esprim) {
    auto derived = ae->enrolee->key_for_target(target->ae_id);
    if (!derived) {
      count("proxy_rejected_total");
      // The AE cannot reach its target (not enrolled, enrolment expired or revoked): the operator must act.
      log::write_limited(log::Level::warning, "proxy refused", ae->config.id,
                         "proxy: " + ae->config.id + " -> " + target->ae_id + " refused: " + derived.error().message);
      responder.respond(for_local_ae(refusal(403, kRscNoPrivilege,
                                             make_error(derived.error().code, ae->config.id + " -> " +
                                                                                  target->ae_id + ": " +
                                                                                  derived.error().message)),
                                     request));
      return;
    }
    key = std::move(derived).value();
  }
  if (peer == peers.end() || !peer->second.address) {
    count("proxy_rejected_total");
    responder.respond(for_local_ae(refusal(404, std::nullopt,
                                           make_error(Errc::not_found, "no [[peer.address]] configured for " +
                                                                           target->ae_id)), request));
    return;
  }
  if (*peer->second.in_flight >= kMaxProxiedInFlightPerPeer) {
    count("proxy_rejected_total");
    const std::string why = std::to_string(*peer->second.in_flight) + " requests to " + target->ae_id +
                            " are still unanswered (at most " + std::to_string(kMaxProxiedInFlightPerPeer) +
                            "): its dauthd is slow or unreachable; try again later";
    log::write_limited(log::Level::warning, "proxy refused", target->ae_id,
                       "proxy: " + ae->config.id + " -> " + target->ae_id + " refused: " + why);
    responder.respond(for_local_ae(refusal(503, std::nullopt, make_error(Errc::limit, why)), request));
    return;
  }
  if (esprim) {
    auto tracked = track_in_flight(*this, std::move(responder),
                                   "ESPrim-protected request " + ae->config.id + " -> " + target->ae_id + " " +
                                       std::string(transport::to_string(request.method)) + " (from " +
                                       session.remote_address() + ")",
                                   peer->second.in_flight);
    ++peer->second.requests;
    forward_protected(*ae, target->ae_id, request, target->path, target->query, std::move(tracked));
    return;
  }
  Request forwarded;
  forwarded.method = request.method;
  forwarded.path = target->path;
  forwarded.query = target->query;
  forwarded.content_format = request.content_format;
  forwarded.accept = request.accept;
  forwarded.originator = ae->config.id;
  forwarded.request_id = request.request_id;
  forwarded.payload = request.payload;
  auto tracked = track_in_flight(*this, std::move(responder),
                                 "proxied request " + ae->config.id + " -> " + target->ae_id + " " +
                                     std::string(transport::to_string(request.method)) + " " + forwarded.path_text() +
                                     " (from " + session.remote_address() + ")",
                                 peer->second.in_flight);
  forward_to_peer(target->ae_id, *peer->second.address, key->ke_id, std::make_shared<SecretBuffer>(std::move(key->key)),
                  std::move(forwarded), std::move(tracked), 0);
}

void Roles::Impl::forward_to_peer(const std::string& target, const transport::Peer& address, std::string ke_id,
                                  std::shared_ptr<SecretBuffer> key, Request request,
                                  std::shared_ptr<transport::Responder> responder, std::size_t attempt) {
  const auto configured = peers.find(target);
  if (configured == peers.end()) {  // a reload removed its [[peer.address]] while this request waited for a retry
    responder->respond(for_local_ae(refusal(404, std::nullopt,
                                            make_error(Errc::not_found, "no [[peer.address]] configured for " + target +
                                                                            " any more (removed by a reload)")),
                                    request));
    return;
  }
  auto& peer_state = configured->second;
  ++peer_state.requests;
  auto credentials = credentials_to_peer(request.originator, target, ke_id, *key);
  if (!credentials) {
    ++peer_state.failures;
    peer_state.last_outcome = credentials.error().message;
    note_peer_failure(target, credentials.error().message);
    count("proxy_failed_total");
    log::write_limited(log::Level::warning, "proxy refused", request.originator,
                       "proxy: " + request.originator + " -> " + target + " refused: " + credentials.error().message);
    responder->respond(for_local_ae(refusal(403, kRscNoPrivilege, credentials.error()), request));
    return;
  }
  Request copy = request;
  peer_driver->node->request(
      address, *credentials, std::move(request),
      [this, target, address, ke_id, key, copy, responder, attempt](Result<Response> outcome,
                                                                     const transport::Session* session) mutable {
        // Recorded on the peer's state while it is configured (a reload may have removed it meanwhile).
        PeerState removed;
        const auto configured_now = peers.find(target);
        PeerState& state = configured_now != peers.end() ? configured_now->second : removed;
        state.last_at = unix_now();
        if (outcome) {
          if (session) note_session("out", *session, target);
          if (outcome->code >= 400) {
            // The peer's dauthd (policy, impersonation) or its AE refused: an answer, but not a success.
            const std::string why = rspf::error_from_response(target, *outcome).message;
            ++state.failures;
            state.last_outcome = "refused: " + why;
            note_peer_failure(target, why);
          } else {
            state.last_outcome = "answered " + rspf::coap_code_text(outcome->code);
            peer_activity[target].last_success_at = state.last_at;
          }
          count("proxy_forwarded_total");
          responder->respond(for_local_ae(std::move(outcome).value(), copy));
          return;
        }
        ++state.failures;
        state.last_outcome = outcome.error().message;
        note_peer_failure(target, outcome.error().message);
        // A first use is refused while the target fetches the key from the MEF (unknown identity): retry after
        // 250 ms, 1 s, 3 s; a handshake failure is what the client sees of that refusal. A timeout (B silent:
        // restarted, gone, or our address changed; transport then ended the session) is retried on a new session
        // too, but only for a method that may be repeated (B may have carried out the request whose answer was
        // lost).
        const Errc failure = outcome.error().code;
        const bool retry = failure == Errc::unauthenticated ||
                           (failure == Errc::timeout && transport::may_repeat(copy.method));
        if (retry && attempt < std::size(kFirstUseRetryDelays) && !stopping) {
          ++state.retries;
          count("proxy_retries_total");
          // ± 10 %: requests that failed together (a peer restart) do not come back in lockstep.
          const auto delay = rspf::with_jitter(kFirstUseRetryDelays[attempt], rspf::random_jitter());
          log::write_limited(log::Level::info, "proxy retry", target,
                             "proxy: " + copy.originator + " -> " + target + " (KeID " + ke_id + ") attempt " +
                                 std::to_string(attempt + 1) + " failed (" + outcome.error().message +
                                 "); retrying in " + std::to_string(delay.count()) + " ms");
          // The one-shot timer removes its own registration when it fires (EventLoop allows that), so retries
          // leave nothing behind.
          const std::uint64_t retry_id = ++last_retry_id;
          auto timer = loop.add_timer(delay, std::chrono::milliseconds(0),
                                      [this, retry_id, target, address, ke_id, key, copy, responder,
                                       attempt]() mutable {
                                        auto retried = std::move(copy);
                                        retry_timers.erase(retry_id);
                                        forward_to_peer(target, address, ke_id, key, std::move(retried), responder,
                                                        attempt + 1);
                                      });
          if (timer) {
            retry_timers.emplace(retry_id, std::move(timer).value());
            return;
          }
        }
        count("proxy_failed_total");
        on_forward_failed(copy.originator, target, ke_id, outcome.error());
        responder->respond(
            for_local_ae(refusal(502, std::nullopt,
                                        make_error(outcome.error().code,
                                                   "peer dauthd for " + target + ": " + outcome.error().message)),
            copy));
      });
  rearm(*peer_driver);
}

Result<transport::ClientCredentials> Roles::Impl::credentials_to_peer(const std::string& originator,
                                                                      const std::string& target,
                                                                      const std::string& ke_id,
                                                                      const SecretBuffer& key) const {
  const auto configured = peers.find(target);
  if (configured == peers.end()) {
    return make_error(Errc::not_found, "no [[peer.address]] configured for " + target);
  }
  const PeerState& peer_state = configured->second;
  if (peer_state.credential == "certificate") {
    // SAEF with X.509: the local AE's AE-ID certificate; the peer must present the target's (SAN URI = target).
    auto x509 = x509_of_local_ae(originator);
    if (!x509) return std::move(x509).error();
    return transport::ClientCredentials::certificate(std::move(x509).value(), peer_state.server_name, target);
  }
  if (peer_state.credential == "rpk") {
    // RFC 7250: the local AE's raw key (made at start, [[enrolee.ae]] raw_key); the peer must present a key pinned
    // to the target AE-ID.
    auto rpk = raw_key_of_local_ae(originator, target);
    if (!rpk) return std::move(rpk).error();
    return transport::ClientCredentials::raw_public_key(std::move(rpk).value(), peer_state.server_name);
  }
  // SNI names the target AE (PROTOCOL.md §2; an AE-ID that is no DNS name as its hashed name, PROTOCOL.md §2).
  return transport::ClientCredentials::psk(ke_id, key.clone(), peer_state.server_name);
}

void Roles::Impl::on_forward_failed(const std::string& originator, const std::string& target,
                                    const std::string& ke_id, const Error& error) {
  const auto configured = peers.find(target);
  const bool psk = configured == peers.end() || configured->second.credential == "psk";
  const std::string where =
      configured == peers.end() ? std::string("its former address") : configured->second.address_text;
  std::string line = "proxy: " + originator + " -> " + target + " failed: " + error.message;
  if (error.code == Errc::unauthenticated && psk) {
    line += "; likely: the peer refused KeID " + ke_id + ": it was revoked or has expired at the MEF, the peer's "
            "dauthd cannot fetch its key from the MEF, or it serves no " + target + " at " + where +
            " (check `dauthctl credentials list` here, and on the peer `dauthctl credentials list` and its log "
            "for \"target\"); asking the MEF whether it still accepts " + ke_id;
  } else if (error.code == Errc::unauthenticated && configured != peers.end() &&
             configured->second.credential == "rpk") {
    line += "; likely: the peer has not pinned " + originator + "'s raw key (dauthctl rpk show here, dauthctl rpk "
            "add there) or presented a key not pinned to " + target + " here (dauthctl rpk list)";
  } else if (error.code == Errc::unauthenticated) {
    line += "; likely: the peer refused our certificate (revoked, or its peer.trust_anchors lack our CA) or we "
            "refused its (it must name " + target + "; check peer.trust_anchors here and `dauthctl credentials "
            "list` on both)";
  } else if (error.code == Errc::timeout) {
    line += "; likely: no dauthd answers at " + where + " (down, unreachable, or another address: "
            "check `dauthctl peers` here and `dauthctl status` there)";
  }
  log::write_limited(log::Level::warning, "proxy failed", originator + " -> " + target, line);
  if (error.code == Errc::unauthenticated && psk) {
    if (LocalAeState* ae = find_ae(originator)) confirm_enrolment_of(*ae);
  }
}

void Roles::Impl::confirm_enrolment_of(LocalAeState& ae) {
  if (stopping || draining || !ae.enrolee) return;
  ae.enrolee->confirm_enrolment([this, &ae](Result<void> outcome) {
    const std::string& id = ae.config.id;
    if (outcome) {
      log::write_limited(log::Level::notice, "KeID check", id,
                         "enrolee " + id + ": the MEF accepts KeID " + ae.enrolee->ke_id().value_or("?") +
                             ": the peer refused it for a reason of its own (see its log)");
      return;
    }
    if (outcome.error().code == Errc::limit) return;  // enrolling, or a check is running
    if (outcome.error().code == Errc::denied) {
      log::notice("enrolee " + id + ": enrolling again (" + outcome.error().message + ")");
      start_enrolment(ae);
      return;
    }
    log::write_limited(log::Level::notice, "KeID check", id,
                       "enrolee " + id + ": cannot check its KeID with the MEF: " + outcome.error().message);
  });
  if (enrolee_driver) rearm(*enrolee_driver);
}

// ---- the receiving side (B): authenticate, check, deliver to the local AE -------------------------------------

void Roles::Impl::on_peer_request(const transport::Session& session, const Request& request,
                                  transport::Responder responder) {
  count("peer_requests_total");
  if (refuse_while_draining(*this, request, responder)) return;
  // Who asks and which local AE they reach were decided in the handshake (transport::SessionGrant): PSK by
  // TargetKeys' lookup (the record's peer AE-ID, the served AE the SNI named), X.509 by the peer certificate's AE-ID
  // and the local AE whose certificate the SNI selected, a raw public key by its pin (grant_raw_key) and the SNI.
  const auto& peer = session.peer();
  const auto& grant = session.grant();
  const bool authenticated_ae = peer.kind == transport::PeerKind::psk || peer.kind == transport::PeerKind::x509 ||
                                peer.kind == transport::PeerKind::rpk;
  const std::string requester = authenticated_ae ? grant.peer_ae_id : std::string();
  const std::string& local_ae = grant.local_ae_id;
  if (requester.empty() || local_ae.empty()) {
    count("peer_rejected_total");
    log::write_limited(log::Level::warning, "peer refused", peer.value,
                       "peer: refused request from " + session.remote_address() + ": identity " +
                           crypto::quote_for_error(peer.value) + "'s session names " +
                           (requester.empty() ? "no peer AE" : "no local AE"));
    responder.respond(refusal(403, kRscNoPrivilege,
                              make_error(Errc::denied, requester.empty() ? "no peer AE-ID for this session's identity"
                                                                         : "this session reaches no local AE")));
    return;
  }
  note_session("in", session, requester);
  // Impersonation check: the request's originator must be the AE the session authenticated.
  if (request.originator != requester) {
    count("peer_impersonation_total");
    note_peer_failure(requester, "impersonation refused: oneM2M-FR " + crypto::quote_for_error(request.originator));
    log::write_limited(log::Level::warning, "peer impersonation", requester,
                       "peer: refused impersonation from " + session.remote_address() + ": session authenticated " +
                           requester + ", oneM2M-FR " + crypto::quote_for_error(request.originator) + " (RSC 4106)");
    responder.respond(refusal(403, kRscImpersonation,
                              make_error(Errc::unauthenticated, "oneM2M-FR " +
                                                                    crypto::quote_for_error(request.originator) +
                                                                    " differs from the authenticated AE-ID " +
                                                                    requester)));
    return;
  }
  const std::string method(transport::to_string(request.method));
  if (!policy_allows(requester, local_ae, method)) {
    count("peer_denied_total");
    note_peer_failure(requester, "policy denies " + method + " " + request.path_text() + " on " + local_ae);
    // The policy doing its job: a notice, not a warning.
    log::write_limited(log::Level::notice, "peer policy", requester,
                       "peer: policy denies " + requester + " " + method + " " + request.path_text() + " on " +
                           local_ae);
    responder.respond(refusal(403, kRscNoPrivilege,
                              make_error(Errc::denied,
                                         "policy: " + requester + " may not " + method + " " + local_ae)));
    return;
  }
  // Plain CoAP to the AE without the options we consumed (oneM2M-FR/RQI are critical: a stock server rejects
  // them with 4.02).
  Request delivered;
  delivered.method = request.method;
  delivered.path = request.path;
  delivered.query = request.query;
  delivered.content_format = request.content_format;
  delivered.accept = request.accept;
  delivered.payload = request.payload;
  auto shared = track_in_flight(*this, std::move(responder), "delivery of " + requester + "'s " + method + " " +
                                                                 request.path_text() + " to local AE " + local_ae);
  const std::string request_id = request.request_id;
  deliver_to_local_ae(local_ae, std::move(delivered), [shared, request_id](Result<Response> outcome) {
    if (!outcome) {
      shared->respond(refusal(delivery_failure_code(outcome.error()), std::nullopt, outcome.error()));
      return;
    }
    Response answer = std::move(outcome).value();
    answer.request_id = request_id;
    shared->respond(std::move(answer));
  });
}

bool Roles::Impl::policy_allows(const std::string& requester, const std::string& local_ae,
                                const std::string& method) const {
  if (!config.peer) return false;
  for (const auto& rule : config.peer->policy) {
    if (rule.peer != "*" && rule.peer != requester) continue;
    if (std::find(rule.local_aes.begin(), rule.local_aes.end(), local_ae) == rule.local_aes.end()) continue;
    if (std::find(rule.methods.begin(), rule.methods.end(), method) == rule.methods.end()) continue;
    return true;
  }
  return false;
}

int delivery_failure_code(const Error& error) {
  switch (error.code) {
    case Errc::not_found: return 404;  // no endpoint configured for that AE
    case Errc::invalid_argument: return 500;  // its endpoint does not resolve
    default: return 504;  // the AE did not answer
  }
}

void Roles::Impl::deliver_to_local_ae(const std::string& local_ae, Request delivered,
                                      std::function<void(Result<Response>)> done) {
  const LocalAe* target = nullptr;
  if (config.enrolee) {
    for (const auto& ae : config.enrolee->aes) {
      if (ae.id == local_ae) target = &ae;
    }
  }
  if (target == nullptr || target->endpoint.empty()) {
    done(make_error(Errc::not_found, local_ae + " has no endpoint (enrolee.ae.endpoint)"));
    return;
  }
  auto endpoint = resolve_address(target->endpoint);
  if (!endpoint) {
    done(make_error(Errc::invalid_argument, endpoint.error().message));
    return;
  }
  peer_driver->node->request(*endpoint, transport::ClientCredentials::plain(), std::move(delivered),
                             [this, local_ae, done = std::move(done)](Result<Response> outcome,
                                                                       const transport::Session*) {
                               if (!outcome) {
                                 count("peer_delivery_failed_total");
                                 log::write_limited(log::Level::warning, "peer delivery", local_ae,
                                                    "peer: delivery to " + local_ae +
                                                        " failed: " + outcome.error().message);
                                 done(make_error(outcome.error().code, local_ae + ": " + outcome.error().message));
                                 return;
                               }
                               count("peer_delivered_total");
                               done(std::move(outcome));
                             });
  rearm(*peer_driver);
}

void Roles::Impl::note_session(const std::string& direction, const transport::Session& session,
                               const std::string& peer_ae_id) {
  const std::string key = direction + " " + session.remote_address() + " " + session.peer().value;
  if (seen.size() >= prune_seen_at && !seen.count(key)) {
    forget_ended_sessions();
    prune_seen_at = std::max(kMaxSeenSessions, 2 * seen.size());
  }
  auto& entry = seen[key];
  const auto now = unix_now();
  if (entry.created == 0) {
    entry.direction = direction;
    entry.remote = session.remote_address();
    entry.identity = direction == "out" ? session.credential_id() : session.peer().value;
    entry.kind = std::string(transport::to_string(session.peer().kind));
    entry.cipher = session.cipher_suite();
    entry.created =
        std::chrono::duration_cast<std::chrono::seconds>(session.created().time_since_epoch()).count();
  }
  entry.peer_ae_id = peer_ae_id;
  entry.last_used = now;
  ++entry.requests;
  auto& activity = peer_activity[peer_ae_id];
  activity.last_handshake_at = std::max(activity.last_handshake_at, entry.created);
  activity.last_request_at = now;
  // The local AE this request came from (A: the KeID's enrolee) or goes to (B: the session's grant).
  for (auto& ae : aes) {
    const bool ours = direction == "in" ? session.grant().local_ae_id == ae->config.id
                                        : ae->enrolee && ae->enrolee->ke_id() == session.credential_id();
    if (ours) ae->last_request_at = now;
  }
}

void Roles::Impl::note_peer_failure(const std::string& ae_id, const std::string& reason) {
  auto& activity = peer_activity[ae_id];
  activity.last_failure_at = unix_now();
  activity.last_failure = reason;
}

}  // namespace dauth::daemon
