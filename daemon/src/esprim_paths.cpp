// ESPrim on both gateways (PROTOCOL.md §7). Gateway A protects a local AE's request end to end and sends it on the
// peer's path, directly or through relay hops that cannot read it; gateway B opens it, checks the inner originator
// against the AE-ID bound to the key (4116) and the access policy, delivers it to its local AE and protects the
// answer. The protocol itself (rand objects, session keys, replay windows) is rspf::esprim's; this file moves the
// outer messages and finds the keys.

#include <algorithm>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/daemon/log.hpp"
#include "dauth/rspf/esprim.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/rspf/schedule.hpp"
#include "proxy_support.hpp"
#include "roles_impl.hpp"

namespace dauth::daemon {

namespace esp = rspf::esprim;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

// oneM2M operations ESPrim carries (TS-0004 m2m:operation); other CoAP methods have no inner form.
std::optional<int> operation_of(Method method) {
  switch (method) {
    case Method::post: return 1;
    case Method::get: return 2;
    case Method::put: return 3;
    case Method::del: return 4;
    default: return std::nullopt;
  }
}
std::optional<Method> method_of(int operation) {
  switch (operation) {
    case 1: return Method::post;
    case 2: return Method::get;
    case 3: return Method::put;
    case 4: return Method::del;
    default: return std::nullopt;
  }
}

// The outer message every hop sees: POST /esprim?to=<receiver AE-ID>, JSON m2m:securityInfo, no oneM2M options.
Request outer_request(const std::string& receiver, const esp::SecurityInfo& info) {
  Request outer;
  outer.method = Method::post;
  outer.path = {std::string(esp::kOuterPath)};
  outer.query = {"to=" + receiver};
  outer.content_format = esp::kOuterContentFormat;
  const std::string body = esp::to_json_text(info);
  outer.payload.assign(body.begin(), body.end());
  return outer;
}

std::string_view text_of(const Bytes& payload) {
  return {reinterpret_cast<const char*>(payload.data()), payload.size()};
}

// An ESPrim refusal as PROTOCOL.md §7.4 writes it (plain: no session key can be trusted yet), not dauth's error body.
Response esprim_refusal(const esp::Refusal& refusal) {
  Response response;
  response.code = refusal.coap_code();
  response.content_format = esp::kOuterContentFormat;
  const std::string body = esp::refusal_body(refusal);
  response.payload.assign(body.begin(), body.end());
  return response;
}

Response security_info_answer(const esp::SecurityInfo& info) {
  Response response;
  response.code = 205;
  response.content_format = esp::kOuterContentFormat;
  const std::string body = esp::to_json_text(info);
  response.payload.assign(body.begin(), body.end());
  return response;
}

// A request id unique per protected message: the answer must name it (rspf::esprim checks).
std::string new_request_id() {
  std::uint8_t random[8];
  random_bytes(random, sizeof random);
  static const char* hex = "0123456789abcdef";
  std::string id = "esp-";
  for (const std::uint8_t byte : random) {
    id += hex[byte >> 4];
    id += hex[byte & 15];
  }
  return id;
}

std::string rsc_text(esp::Rsc rsc) { return std::to_string(static_cast<std::uint32_t>(rsc)); }

// 4113/4114 follow a restart or a rotation at B and are resolved by one resend; the others mean tampering, a key
// problem or an attack: an operator must look.
log::Level level_of(esp::Rsc rsc) {
  return rsc == esp::Rsc::unknown_originator_rand_id || rsc == esp::Rsc::unknown_receiver_rand_id ||
                 rsc == esp::Rsc::replayed
             ? log::Level::notice
             : log::Level::warning;
}

}  // namespace

// ---- gateway A: protect, send, open the answer --------------------------------------------------------------

struct EsprimSend {
  std::string ae_id;   // the local AE (originator)
  std::string target;  // the remote AE (receiver)
  esp::InnerRequest inner;
  Request original;  // what the local AE sent (for_local_ae: which options its answer may carry)
  std::shared_ptr<transport::Responder> responder;
  bool rand_asked = false;    // a receiver rand object was asked for on behalf of this request
  int resends = 0;            // after 4113/4114 (at most one)
  std::size_t transport_attempt = 0;  // kFirstUseRetryDelays index
};

void Roles::Impl::forward_protected(LocalAeState& ae, const std::string& target, Request original,
                                    std::vector<std::string> path, std::vector<std::string> query,
                                    std::shared_ptr<transport::Responder> responder) {
  const auto operation = operation_of(original.method);
  if (!operation) {
    count("proxy_rejected_total");
    responder->respond(for_local_ae(
        refusal(405, std::nullopt,
                make_error(Errc::unsupported, "ESPrim carries GET, POST, PUT and DELETE only (peer.address esprim "
                                              "= \"required\" for " + target + ")")),
        original));
    return;
  }
  auto send = std::make_shared<EsprimSend>();
  send->ae_id = ae.config.id;
  send->target = target;
  send->inner.operation = *operation;
  send->inner.to = target;
  send->inner.from = ae.config.id;
  send->inner.path = std::move(path);
  send->inner.query = std::move(query);
  send->inner.content_format = original.content_format;
  send->inner.accept = original.accept;
  send->inner.content = original.payload;
  // One rqi for the request however often it is sent: B carries out a create (POST) at most once per rqi, so a
  // resend after a refusal a hop forged cannot run it twice (PROTOCOL.md §7.5).
  send->inner.request_id = new_request_id();
  send->original = std::move(original);
  send->responder = std::move(responder);
  send_protected(send);
}

void Roles::Impl::fail_protected(const std::shared_ptr<EsprimSend>& send, int code, std::optional<std::uint32_t> rsc,
                                 const Error& error, log::Level level) {
  count("esprim_failed_total");
  auto configured = peers.find(send->target);
  if (configured != peers.end()) {
    ++configured->second.failures;
    configured->second.last_outcome = error.message;
    configured->second.last_at = unix_now();
  }
  note_peer_failure(send->target, error.message);
  log::write_limited(level, "esprim failed", send->ae_id + " -> " + send->target,
                     "esprim: " + send->ae_id + " -> " + send->target + ": " + error.message);
  send->responder->respond(for_local_ae(refusal(code, rsc, error), send->original));
}

void Roles::Impl::send_protected(const std::shared_ptr<EsprimSend>& send) {
  LocalAeState* ae = find_ae(send->ae_id);
  if (ae == nullptr || !ae->enrolee) {
    fail_protected(send, 403, kRscNoPrivilege,
                   make_error(Errc::not_found, send->ae_id + " is no local AE any more (removed by a reload)"),
                   log::Level::warning);
    return;
  }
  auto key = ae->enrolee->key_for_target(send->target, crypto::Suid::rspf_key_for_esprim);
  if (!key) {
    fail_protected(send, 403, kRscNoPrivilege,
                   make_error(key.error().code, "no pairwise ESPrim key (SUID 23) for " + send->target + ": " +
                                                    key.error().message),
                   log::Level::warning);
    return;
  }
  if (!send->rand_asked && esprim_originator.needs_receiver_rand(key->ke_id, send->target)) {
    ask_receiver_rand(send, key->ke_id);
    return;
  }
  auto protected_request = esprim_originator.protect(key->ke_id, key->key, send->inner);
  if (!protected_request) {
    fail_protected(send, protected_request.error().code == Errc::not_found ? 502 : 500,
                   protected_request.error().code == Errc::not_found
                       ? std::optional<std::uint32_t>()
                       : std::optional<std::uint32_t>(static_cast<std::uint32_t>(esp::Rsc::encryption_error)),
                   make_error(protected_request.error().code,
                              "cannot protect the request: " + protected_request.error().message),
                   log::Level::warning);
    return;
  }
  auto sent = std::make_shared<esp::ProtectedRequest>(std::move(protected_request).value());
  esp::SecurityInfo info;
  info.type = 5;
  info.object = sent->compact;
  count("esprim_sent_total");
  send_outer(send->ae_id, send->target, outer_request(send->target, info),
             [this, send, sent](Result<Response> outcome) { on_protected_answer(send, *sent, std::move(outcome)); });
}

void Roles::Impl::ask_receiver_rand(const std::shared_ptr<EsprimSend>& send, const std::string& kid) {
  send->rand_asked = true;
  const std::string waiting_key = kid + "\n" + send->target;
  auto& waiting = rand_waiters[waiting_key];
  waiting.push_back(send);
  if (waiting.size() > 1) return;  // one sit 3 request per (key, receiver) at a time; the others wait for it
  esp::SecurityInfo ask;
  ask.type = 3;
  count("esprim_rand_requests_total");
  const std::string target = send->target;
  send_outer(send->ae_id, target, outer_request(target, ask),
             [this, waiting_key, kid, target](Result<Response> outcome) {
               auto node = rand_waiters.extract(waiting_key);
               if (node.empty()) return;
               std::vector<std::shared_ptr<EsprimSend>> waiters = std::move(node.mapped());
               Result<void> stored = make_error(Errc::internal, "no answer");
               if (!outcome) {
                 stored = make_error(outcome.error().code,
                                     "asking " + target + "'s dauthd for a receiver rand object failed: " +
                                         outcome.error().message);
               } else {
                 auto info = outcome->code == 205 && outcome->content_format == esp::kOuterContentFormat
                                 ? esp::parse_security_info(text_of(outcome->payload))
                                 : Result<esp::SecurityInfo>(make_error(Errc::unsupported, "answered " +
                                                                        rspf::coap_code_text(outcome->code)));
                 if (info && info->type == 4 && info->receiver_rand) {
                   stored = esprim_originator.set_receiver_rand(kid, target, *info->receiver_rand);
                 } else {
                   // Anything but a rand object: that dauthd (or whatever answers on the path) does not do ESPrim.
                   // Never a fallback to the unprotected path (peer.address esprim = "required").
                   stored = make_error(Errc::unsupported,
                                       target + "'s dauthd does not support ESPrim: asked for a receiver rand "
                                       "object, it " + (info ? std::string("answered securityInfo type ") +
                                                                   std::to_string(info->type)
                                                             : info.error().message) +
                                           "; not sent unprotected (peer.address esprim = \"required\")");
                 }
               }
               for (auto& waiter : waiters) {
                 if (stored) {
                   send_protected(waiter);
                 } else {
                   fail_protected(waiter, 502, std::nullopt, stored.error(), log::Level::warning);
                 }
               }
             });
}

void Roles::Impl::on_protected_answer(const std::shared_ptr<EsprimSend>& send, const esp::ProtectedRequest& sent,
                                      Result<Response> outcome) {
  if (!outcome) {
    // As for AE-pair sessions (proxy.cpp): for a method that may be repeated, a timeout is tried again on a new
    // session; the object is made anew (new seq, same rqi).
    const Errc failure = outcome.error().code;
    // A refused first handshake (B still fetching the session key) was already tried again by send_outer.
    const bool retry = failure == Errc::timeout && transport::may_repeat(send->original.method);
    if (retry && send->transport_attempt < std::size(kFirstUseRetryDelays) && !stopping) {
      const auto delay = rspf::with_jitter(kFirstUseRetryDelays[send->transport_attempt], rspf::random_jitter());
      ++send->transport_attempt;
      count("proxy_retries_total");
      const std::uint64_t retry_id = ++last_retry_id;
      auto timer = loop.add_timer(delay, std::chrono::milliseconds(0), [this, retry_id, send]() {
        retry_timers.erase(retry_id);
        send_protected(send);
      });
      if (timer) {
        retry_timers.emplace(retry_id, std::move(timer).value());
        return;
      }
    }
    fail_protected(send, 502, std::nullopt,
                   make_error(failure, "ESPrim path to " + send->target + ": " + outcome.error().message),
                   log::Level::warning);
    return;
  }
  const Response& answer = *outcome;
  if (answer.code == 205) {
    auto info = esp::parse_security_info(text_of(answer.payload));
    if (!info || info->type != 5) {
      fail_protected(send, 502, std::nullopt,
                     make_error(Errc::parse, "the answer from " + send->target + "'s path is no ESPrim object: " +
                                                 (info ? "securityInfo type " + std::to_string(info->type)
                                                       : info.error().message)),
                     log::Level::warning);
      return;
    }
    auto inner = esprim_originator.open_response(sent, info->object);
    if (!inner) {
      // Altered on the way, or not from B: nothing of it reaches the local AE.
      count("esprim_answers_rejected_total");
      fail_protected(send, 502, static_cast<std::uint32_t>(esp::Rsc::bad_mac),
                     make_error(inner.error().code, "the protected answer from " + send->target +
                                                        " failed verification: " + inner.error().message),
                     log::Level::warning);
      return;
    }
    count("esprim_answered_total");
    auto configured = peers.find(send->target);
    if (configured != peers.end()) {
      configured->second.last_at = unix_now();
      configured->second.last_outcome = "answered " + rspf::coap_code_text(inner->coap_code) + " (ESPrim)";
      if (inner->coap_code < 400) peer_activity[send->target].last_success_at = configured->second.last_at;
    }
    Response delivered;
    delivered.code = inner->coap_code;
    delivered.content_format = inner->content_format;
    delivered.response_status = inner->rsc;
    delivered.request_id = send->original.request_id;
    delivered.payload = std::move(inner->content);
    send->responder->respond(for_local_ae(std::move(delivered), send->original));
    return;
  }
  auto refused = answer.content_format == esp::kOuterContentFormat ? esp::parse_refusal_body(text_of(answer.payload))
                                                                   : std::nullopt;
  if (refused) {
    esprim_originator.on_refusal(sent, refused->rsc);
    // B answers a true 4113 only to an object without oro; one with oro refused so was forged on the way.
    const bool resend = (refused->rsc == esp::Rsc::unknown_originator_rand_id && !sent.carried_oro) ||
                        refused->rsc == esp::Rsc::unknown_receiver_rand_id;
    if (resend && send->resends == 0) {
      // Not delivered at B (its rand object is gone: restart, rotation, expiry): safe to send again for every
      // method, with a new rand object or the originator object in-band.
      ++send->resends;
      send->rand_asked = false;
      log::write_limited(log::Level::info, "esprim resend", send->target,
                         "esprim: " + send->ae_id + " -> " + send->target + ": refused with RSC " +
                             rsc_text(refused->rsc) + " (" + refused->reason + "); sending again");
      send_protected(send);
      return;
    }
    fail_protected(send, refused->coap_code(), static_cast<std::uint32_t>(refused->rsc),
                   make_error(Errc::denied, send->target + "'s dauthd refused the ESPrim object: RSC " +
                                                rsc_text(refused->rsc) + " (" + refused->reason + ")"),
                   level_of(refused->rsc));
    return;
  }
  // Neither an ESPrim answer nor an ESPrim refusal: a hop or a dauthd without ESPrim answered.
  fail_protected(send, 502, std::nullopt,
                 rspf::error_from_response("the ESPrim path to " + send->target, answer), log::Level::warning);
}

// ---- gateway B: POST /esprim ---------------------------------------------------------------------------------

void Roles::Impl::on_esprim_request(const transport::Session& session, const Request& request,
                                    transport::Responder responder) {
  count("esprim_requests_total");
  if (refuse_while_draining(*this, request, responder)) return;
  if (!esprim_receiver) {
    responder.respond(refusal(404, std::nullopt,
                              make_error(Errc::not_found, "ESPrim is off on this dauthd (peer.esprim = \"off\")")));
    return;
  }
  std::string receiver;
  for (const auto& item : request.query) {
    if (item.rfind("to=", 0) == 0) receiver = item.substr(3);
  }
  const bool served =
      config.enrolee && std::any_of(config.enrolee->aes.begin(), config.enrolee->aes.end(),
                                    [&](const LocalAe& ae) { return ae.id == receiver && !ae.endpoint.empty(); });
  if (!served) {
    responder.respond(refusal(404, std::nullopt,
                              make_error(Errc::not_found, "no local AE " + crypto::quote_for_error(receiver) +
                                                              " with an endpoint here (Uri-Query to=<AE-ID>)")));
    return;
  }
  if (request.method != Method::post || request.content_format != esp::kOuterContentFormat) {
    responder.respond(refusal(400, std::nullopt,
                              make_error(Errc::invalid_argument,
                                         "ESPrim messages are POSTed as application/json (Content-Format 50)")));
    return;
  }
  auto info = esp::parse_security_info(text_of(request.payload));
  if (!info) {
    esp::Refusal unsupported{esp::Rsc::unsupported_option, "securityInfo: " + info.error().message};
    responder.respond(esprim_refusal(unsupported));
    return;
  }
  if (info->type == 3) {
    esp::SecurityInfo answer;
    answer.type = 4;
    answer.receiver_rand = esprim_receiver->current_rand_object();
    count("esprim_rand_objects_handed_total");
    responder.respond(security_info_answer(answer));
    return;
  }
  if (info->type != 5) {
    responder.respond(esprim_refusal({esp::Rsc::unsupported_option,
                                     "securityInfo type " + std::to_string(info->type) + " (dauth answers 3 and 5)"}));
    return;
  }
  const std::string remote = session.remote_address();
  auto inspected = esprim_receiver->inspect(info->object);
  if (auto* refused = std::get_if<esp::Refusal>(&inspected)) {
    refuse_esprim(remote, receiver, *refused, responder);
    return;
  }
  auto object = std::get<esp::Inspected>(std::move(inspected));
  if (auto early = esprim_receiver->check_before_key(object, receiver)) {
    refuse_esprim(remote, receiver, *early, responder);
    return;
  }
  if (!target_keys) {
    refuse_esprim(remote, receiver, {esp::Rsc::unknown_key_id, "this dauthd retrieves no target keys"}, responder);
    return;
  }
  auto tracked = track_in_flight(*this, std::move(responder),
                                 "ESPrim request for " + receiver + " (kid " + object.header.kid + ") from " + remote);
  const std::string kid = object.header.kid;
  target_keys->esprim_key(kid, receiver, [this, object, receiver, remote, tracked](Result<rspf::EsprimKey> key) {
    on_esprim_key(object, receiver, remote, tracked, std::move(key));
  });
  rearm(*peer_driver);
}

void Roles::Impl::refuse_esprim(const std::string& remote, const std::string& receiver, const esp::Refusal& refused,
                                transport::Responder& responder, const std::string& log_only) {
  count("esprim_refused_total");
  if (refused.rsc == esp::Rsc::impersonation) count("esprim_impersonation_total");
  log::write_limited(level_of(refused.rsc), "esprim refused", remote,
                     "esprim: refused an object for " + receiver + " from " + remote + ": RSC " +
                         rsc_text(refused.rsc) + ", " + refused.reason + log_only);
  responder.respond(esprim_refusal(refused));
}

void Roles::Impl::on_esprim_key(const esp::Inspected& object, const std::string& receiver, const std::string& remote,
                                const std::shared_ptr<transport::Responder>& responder,
                                Result<rspf::EsprimKey> key) {
  if (!esprim_receiver) return;  // stopping
  if (!key) {
    // Why there is no key (revoked, unknown MEF, fetch failed) is for our log only: the refusal crosses every hop.
    const Errc why = key.error().code;
    if (why == Errc::limit || why == Errc::timeout || why == Errc::io || why == Errc::unauthenticated) {
      count("esprim_refused_total");
      log::write_limited(log::Level::warning, "esprim key", object.header.kid,
                         "esprim: no pairwise key for kid " + object.header.kid + " and " + receiver +
                             " yet (from " + remote + "): " + key.error().message + "; answered 5.03");
      responder->respond(refusal(503, std::nullopt,
                                 make_error(Errc::limit, "the key for this kid cannot be fetched now; try again")));
      return;
    }
    log::write_limited(log::Level::warning, "esprim key", object.header.kid,
                       "esprim: no pairwise key for kid " + object.header.kid + " and " + receiver + ": " +
                           key.error().message);
  }
  const SecretBuffer* pairwise = key ? key->key.get() : nullptr;
  const std::string bound = key ? key->peer_ae_id : std::string();
  auto opened = esprim_receiver->open(object, pairwise, bound, receiver);
  if (auto* refused = std::get_if<esp::Refusal>(&opened)) {
    // The refusal body crosses every hop: who the key belongs to goes to our log only.
    refuse_esprim(remote, receiver, *refused, *responder,
                  refused->rsc == esp::Rsc::impersonation ? " (the key is " + bound + "'s)" : std::string());
    return;
  }
  auto request = std::make_shared<esp::OpenedRequest>(std::get<esp::OpenedRequest>(std::move(opened)));
  const std::string& originator = request->request.from;
  note_session_activity_esprim(originator, receiver);
  const auto method = method_of(request->request.operation);
  const std::string method_text = method ? std::string(transport::to_string(*method)) : std::string("?");
  const auto answer_protected = [this, request, responder, receiver](esp::InnerResponse inner) {
    inner.request_id = request->request.request_id;
    auto compact = esprim_receiver ? esprim_receiver->protect_response(*request, inner)
                                   : esp::Checked<std::string>(esp::Refusal{esp::Rsc::encryption_error, "stopping"});
    if (auto* refused = std::get_if<esp::Refusal>(&compact)) {
      responder->respond(esprim_refusal(*refused));
      return;
    }
    esp::SecurityInfo info;
    info.type = 5;
    info.object = std::get<std::string>(std::move(compact));
    responder->respond(security_info_answer(info));
  };
  const auto protected_refusal = [&](int code, std::uint32_t rsc, const Error& error) {
    const Response body = refusal(code, rsc, error);
    esp::InnerResponse inner;
    inner.coap_code = code;
    inner.rsc = rsc;
    inner.content_format = body.content_format;
    inner.content = body.payload;
    answer_protected(std::move(inner));
  };
  if (!method || !policy_allows(originator, receiver, method_text)) {
    count("peer_denied_total");
    note_peer_failure(originator, "policy denies " + method_text + " on " + receiver + " (ESPrim)");
    log::write_limited(log::Level::notice, "peer policy", originator,
                       "esprim: policy denies " + originator + " " + method_text + " on " + receiver);
    protected_refusal(403, kRscNoPrivilege,
                      make_error(Errc::denied, "policy: " + originator + " may not " + method_text + " " + receiver));
    return;
  }
  count("esprim_accepted_total");
  Request delivered;
  delivered.method = *method;
  delivered.path = request->request.path;
  delivered.query = request->request.query;
  delivered.content_format = request->request.content_format;
  delivered.accept = request->request.accept;
  delivered.payload = request->request.content;
  deliver_to_local_ae(receiver, std::move(delivered), [answer_protected](Result<Response> outcome) {
    esp::InnerResponse inner;
    if (!outcome) {
      const Response body = refusal(delivery_failure_code(outcome.error()), std::nullopt, outcome.error());
      inner.coap_code = body.code;
      inner.rsc = esp::rsc_for_coap_code(body.code);
      inner.content_format = body.content_format;
      inner.content = body.payload;
    } else {
      inner.coap_code = outcome->code;
      inner.rsc = outcome->response_status.value_or(esp::rsc_for_coap_code(outcome->code));
      inner.content_format = outcome->content_format;
      inner.content = std::move(outcome->payload);
    }
    answer_protected(std::move(inner));
  });
}

void Roles::Impl::note_session_activity_esprim(const std::string& originator, const std::string& receiver) {
  const auto now = unix_now();
  peer_activity[originator].last_request_at = now;
  for (auto& ae : aes) {
    if (ae->config.id == receiver) ae->last_request_at = now;
  }
}

}  // namespace dauth::daemon
