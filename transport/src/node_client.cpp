// Node, client side: client sessions (one per peer, credential, SNI and expected peer) and their PKI contexts,
// outgoing requests and observations, their responses and NACKs, and ending silent or stalled client sessions.
#include <coap3/coap.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "dauth/crypto/x509.hpp"
#include "dauth/transport/transport.hpp"
#include "node_impl.hpp"
#include "tls_backend.hpp"

namespace dauth::transport {

namespace {

// Below FD_SETSIZE (1024) with room for the fds a GnuTLS handshake and libcoap open meanwhile.
constexpr int kHighestSelectableFd = 1000;

struct OptlistDeleter {
  void operator()(coap_optlist_t* list) const noexcept { coap_delete_optlist(list); }
};

// restart_stalled_handshakes: how long a client handshake may send and receive nothing at all (longer than GnuTLS's
// second retransmission timer, 2 s, plus a round trip), and how many attempts a request gets.
constexpr std::chrono::milliseconds kHandshakeStall{2500};
constexpr unsigned kMaxHandshakeAttempts = 3;

}  // namespace

// ---- responses, NACKs --------------------------------------------------------------------------------------------

namespace {

std::string option_string(const coap_pdu_t* pdu, std::uint16_t number) {
  coap_opt_iterator_t iterator;
  const coap_opt_t* option = coap_check_option(pdu, number, &iterator);
  if (option == nullptr) return {};
  return std::string(reinterpret_cast<const char*>(coap_opt_value(option)), coap_opt_length(option));
}

std::optional<std::uint32_t> option_uint(const coap_pdu_t* pdu, std::uint16_t number) {
  coap_opt_iterator_t iterator;
  const coap_opt_t* option = coap_check_option(pdu, number, &iterator);
  if (option == nullptr) return std::nullopt;
  return coap_decode_var_bytes(coap_opt_value(option), coap_opt_length(option));
}

ByteView pdu_payload(const coap_pdu_t* pdu) {
  size_t length = 0;
  const uint8_t* data = nullptr;
  size_t offset = 0;
  size_t total = 0;
  if (coap_get_data_large(pdu, &length, &data, &offset, &total) == 0) return {};
  return ByteView(data, length);
}

int coap_code_to_int(coap_pdu_code_t code) {
  const auto value = static_cast<unsigned>(code);
  return static_cast<int>((value >> 5) * 100 + (value & 0x1f));
}

}  // namespace

namespace detail {

coap_response_t on_response(coap_session_t* session, const coap_pdu_t* /*sent*/, const coap_pdu_t* received,
                            const coap_mid_t /*mid*/) {
  Node::Impl* impl = impl_of(session);
  if (impl == nullptr) return COAP_RESPONSE_OK;
  SessionImpl& state = impl->state_for(session);
  impl->mark_established(state);  // a response came through the DTLS layer: the handshake is done
  state.count.packets_in++;
  state.count.bytes_in += pdu_size(received);
  state.last_received = std::chrono::system_clock::now();
  const auto key = std::make_pair(session, token_key(coap_pdu_get_token(received)));
  auto it = impl->pending.find(key);
  auto observed = impl->observations.find(key);
  if (it == impl->pending.end() && observed == impl->observations.end()) {
    // A notification nobody observes any more (cancelled, or given up before its first answer came): it must end
    // at the server, or every later notification costs a transfer (RFC 7641 §3.6). libcoap 4.3.1 ignores this
    // handler's answer for a body it assembled from blocks, so no RST would go out: deregister explicitly (GET
    // with Observe 1 on that subscription's token), and answer RST where libcoap knows no such subscription.
    if (!option_uint(received, COAP_OPTION_OBSERVE).has_value()) return COAP_RESPONSE_OK;
    const coap_bin_const_t token = coap_pdu_get_token(received);
    coap_binary_t cancel{token.length, const_cast<uint8_t*>(token.s)};
    return coap_cancel_observe(session, &cancel, COAP_MESSAGE_CON) == 1 ? COAP_RESPONSE_OK : COAP_RESPONSE_FAIL;
  }
  Response response;
  response.code = coap_code_to_int(coap_pdu_get_code(received));
  if (auto format = option_uint(received, COAP_OPTION_CONTENT_FORMAT)) {
    response.content_format = static_cast<std::uint16_t>(*format);
  }
  response.response_status = option_uint(received, kOptionOneM2mResponseStatus);
  if (!response.response_status && impl->config.accept_legacy_onem2m_options) {
    response.response_status = option_uint(received, kLegacyOptionOneM2mResponseStatus);
  }
  response.request_id = option_string(received, kOptionOneM2mRequestId);
  const ByteView body = pdu_payload(received);
  if (it != impl->pending.end() && it->second.answer_is_secret && response.code / 100 == 2) {
    response.secret_payload = std::make_shared<const SecretBuffer>(SecretBuffer::copy_of(body));
  } else {
    response.payload.assign(body.data, body.data + body.size);
  }
  if (observed != impl->observations.end()) {
    auto observation = observed->second;
    observation->first_answer_deadline.reset();
    // Only a success carries a live subscription (RFC 7641 §4.2: libcoap drops the option on other codes).
    if (response.code / 100 == 2) response.observe = option_uint(received, COAP_OPTION_OBSERVE);
    const bool final = !response.observe.has_value();
    if (final) impl->observations.erase(observed);
    impl->notify(observation, std::move(response), &state, final);
    return COAP_RESPONSE_OK;
  }
  impl->complete(std::move(it->second), std::move(response), &state);
  impl->pending.erase(it);
  return COAP_RESPONSE_OK;
}

void on_nack(coap_session_t* session, const coap_pdu_t* sent, const coap_nack_reason_t reason,
             const coap_mid_t /*mid*/) {
  Node::Impl* impl = impl_of(session);
  if (impl == nullptr || sent == nullptr) return;
  const auto key = std::make_pair(session, token_key(coap_pdu_get_token(sent)));
  auto it = impl->pending.find(key);
  auto observed = impl->observations.find(key);
  if (it == impl->pending.end() && observed == impl->observations.end()) return;
  SessionImpl& state = impl->state_for(session);
  Error error{Errc::io, ""};
  switch (reason) {
    case COAP_NACK_TOO_MANY_RETRIES:
      error = make_error(Errc::timeout, "no response from " + state.remote + " after CoAP retransmissions");
      break;
    case COAP_NACK_TLS_FAILED:
      error = make_error(Errc::unauthenticated, impl->handshake_failure_reason(state));
      break;
    case COAP_NACK_RST: error = make_error(Errc::io, "peer " + state.remote + " answered with RST"); break;
    default: error = make_error(Errc::io, "peer " + state.remote + " unreachable"); break;
  }
  if (reason == COAP_NACK_TOO_MANY_RETRIES) {
    if (observed != impl->observations.end()) {
      impl->end_if_silent(state, observed->second->packets_in_at_send, observed->second->records_at_send);
    } else {
      impl->end_if_silent(state, it->second.packets_in_at_send, it->second.records_at_send);
    }
  }
  if (observed != impl->observations.end()) {
    auto observation = observed->second;
    impl->observations.erase(observed);
    impl->notify(observation, std::move(error), &state, /*final=*/true);
    return;
  }
  impl->complete(std::move(it->second), std::move(error), &state);
  impl->pending.erase(it);
}

}  // namespace detail

// ---- Node::Impl: client sessions -----------------------------------------------------------------------------

void Node::Impl::fail_pending_of(coap_session_t* session, const Error& error) {
  auto found = sessions.find(session);
  const SessionImpl* state = found != sessions.end() ? found->second.get() : nullptr;
  for (auto it = pending.begin(); it != pending.end();) {
    if (it->first.first == session) {
      complete(std::move(it->second), error, state);
      it = pending.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = observations.begin(); it != observations.end();) {
    if (it->first.first == session) {
      auto observation = it->second;
      it = observations.erase(it);
      notify(observation, error, state, /*final=*/true);
    } else {
      ++it;
    }
  }
}

// Queues one call of an observation's handler (run after coap_io_process, like complete()).
void Node::Impl::notify(const std::shared_ptr<Observation::State>& observation, Result<Response> result,
                        const SessionImpl* state, bool final) {
  if (observation->ended) return;
  if (final) observation->ended = true;
  if (!result.ok()) {
    report(FailureKind::request_failed, state != nullptr ? state->remote : std::string("?"),
           state != nullptr ? state->offered_identity : std::string(),
           "observation ended: " + result.error().message);
  }
  auto shared = std::make_shared<Result<Response>>(std::move(result));
  std::weak_ptr<bool> node_alive = alive;
  completions.push_back([observation, shared, state, node_alive]() {
    if (observation->cancelled || !observation->handler) return;
    const bool alive_now = !node_alive.expired();
    // The handler may destroy its Observation (and with it this state's last owner): keep a copy.
    NotificationHandler handler = observation->handler;
    handler(std::move(*shared), alive_now ? state : nullptr);
  });
}

void Node::Impl::complete(PendingRequest request, Result<Response> result, const SessionImpl* state) {
  if (!result.ok()) {
    report(FailureKind::request_failed, state != nullptr ? state->remote : std::string("?"),
           state != nullptr ? state->offered_identity : std::string(), result.error().message);
  }
  auto shared = std::make_shared<Result<Response>>(std::move(result));
  std::weak_ptr<bool> node_alive = alive;
  completions.push_back([handler = std::move(request.handler), shared, state, node_alive]() {
    handler(std::move(*shared), node_alive.expired() ? nullptr : state);
  });
}

// A client request or subscription timed out and the peer sent nothing on its session since it went out: the
// peer is gone, or restarted and forgot the DTLS session (it drops records of sessions it does not know, and
// libcoap 4.3.1 keeps sending on an "established" session for ever). The session is released in this
// housekeeping round (its other pending requests fail), so the next request sets up a new one.
// Heard at all: a response, or (where the backend can tell) any DTLS record, e.g. the empty ACK of a request
// whose answer is merely slow, which must not cost the session's other requests.
void Node::Impl::end_if_silent(SessionImpl& state, std::uint64_t packets_in_at_send,
                               const std::optional<std::uint64_t>& records_at_send) {
  if (!state.client || state.count.packets_in != packets_in_at_send) return;
  if (records_at_send && detail::records_received(state.raw) != records_at_send) return;
  mark_dead(state);
}

// Limits::silence_timeout: ends the established DTLS client sessions on which a request has waited that long
// without a single record from the peer since it was sent.
void Node::Impl::end_silent_sessions(Clock::time_point now) {
  std::vector<SessionImpl*> silent;
  for (auto& [key, request] : pending) {
    if (!request.silence_check) continue;
    if (now < *request.silence_check) {
      expect_by(*request.silence_check);
      continue;
    }
    auto found = sessions.find(key.first);
    if (found == sessions.end() || found->second->dead) {
      request.silence_check.reset();
      continue;
    }
    SessionImpl& state = *found->second;
    if (!state.established) {  // the handshake has its own timeout; mark_established starts the wait
      request.silence_check = now + config.limits.silence_timeout;
      expect_by(*request.silence_check);
      continue;
    }
    const auto records = detail::records_received(key.first);
    if (!records || !request.records_at_send) {
      request.silence_check.reset();
      continue;
    }
    if (*records != *request.records_at_send || state.count.packets_in != request.packets_in_at_send) {
      request.silence_check.reset();
      continue;
    }
    if (std::find(silent.begin(), silent.end(), &state) == silent.end()) silent.push_back(&state);
  }
  for (SessionImpl* state : silent) {
    kill_client_session(*state, make_error(Errc::timeout,
                                           "nothing heard from " + state->remote + " for " +
                                               std::to_string(config.limits.silence_timeout.count()) +
                                               " ms after a request: DTLS session ended (the peer went away or "
                                               "restarted, or our address changed on the way, e.g. NAT "
                                               "rebinding); the next request sets up a new one"));
  }
}

// A client handshake during which not one record went either way for kHandshakeStall is given up and its
// waiting requests go again on a new session, at most kMaxHandshakeAttempts in all and within their deadlines.
// Measured through a lossy path: with libcoap 4.3.1 on GnuTLS, once part of the peer's flight has arrived and a
// datagram of it was lost, neither end retransmits any more ("DTLS retransmit timeout" with nothing sent) and the
// handshake dies after libcoap's fifth timeout, about 5 s later; a stock coap-client-gnutls loses 8 of 20 such
// handshakes at 10 % loss (docs/transport.md §3). A new ClientHello is the way out. A handshake that is merely
// slow keeps going: GnuTLS retransmits a flight after 1 s, then 2 s, so it sends within kHandshakeStall (only a
// flight lost a third time, 4 s later, is cut short, which costs one more ClientHello). Where the backend cannot
// count records (OpenSSL), the time since the handshake began stands in (doubling per try).
void Node::Impl::restart_stalled_handshakes(Clock::time_point now) {
  std::vector<coap_session_t*> stalled;
  for (coap_session_t* raw : handshaking) {
    const auto& state = sessions.at(raw);
    if (!state->client || state->established || state->dead) continue;
    if (coap_session_get_state(raw) == COAP_SESSION_STATE_ESTABLISHED) continue;
    const auto sent = detail::records_sent(raw);
    const auto received = detail::records_received(raw);
    if (sent && received) {
      const auto records = std::make_pair(*sent, *received);
      if (records != state->handshake_records) {
        state->handshake_records = records;
        state->handshake_progress = now;
      }
      if (now - state->handshake_progress >= kHandshakeStall) stalled.push_back(raw);
    } else if (now - state->started >= kHandshakeStall * (1u << std::min(state->handshake_attempt - 1, 4u))) {
      stalled.push_back(raw);
    }
  }
  for (coap_session_t* raw : stalled) {
    std::vector<PendingRequest> again;
    for (auto it = pending.begin(); it != pending.end();) {
      const PendingRequest& entry = it->second;
      if (it->first.first == raw && entry.replay && entry.replay->attempt < kMaxHandshakeAttempts &&
          now < entry.deadline) {
        again.push_back(std::move(it->second));
        it = pending.erase(it);
      } else {
        ++it;
      }
    }
    if (again.empty()) continue;  // nothing would go again: the handshake timeout decides
    SessionImpl& state = *sessions.at(raw);
    const std::string reason = "DTLS handshake with " + state.remote + " stalled " +
                               std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                  now - state.started).count()) +
                               " ms after it began (nothing sent or received for " +
                               std::to_string(kHandshakeStall.count()) +
                               " ms: datagrams lost): starting again, attempt " +
                               std::to_string(again.front().replay->attempt + 1) + " of " +
                               std::to_string(kMaxHandshakeAttempts);
    state.refusal = reason;
    // A handshake begun again is not a failure yet (Stats::handshakes_restarted counts it); the reason is still
    // reported, so that an operator sees the path losing datagrams.
    state.failure_reported = true;
    publish(Failure{FailureKind::handshake_timeout, state.remote, state.offered_identity, reason});
    kill_client_session(state, make_error(Errc::timeout, reason));
    // Out of the cache now, so that the requests below get a new session (released with the graveyard).
    if (auto cached = client_cache.find(state.cache_key); cached != client_cache.end() && cached->second == raw) {
      client_cache.erase(cached);
      graveyard.push_back(raw);
    }
    ++counters.handshakes_restarted;
    for (PendingRequest& entry : again) {
      Replay& replay = *entry.replay;
      send_request(replay.peer, replay.credentials, replay.request, std::move(entry.handler), entry.deadline,
                   replay.attempt + 1);
    }
  }
}

void Node::Impl::kill_client_session(SessionImpl& state, const Error& error) {
  mark_dead(state);
  fail_pending_of(state.raw, error);
}

std::string Node::Impl::pki_context_key(const ClientCredentials& credentials) {
  const bool rpk = credentials.kind == ClientCredentials::Kind::rpk;
  const SecretBuffer& key = rpk ? credentials.rpk->private_key_pem : credentials.x509->private_key_pem;
  const std::optional<TokenKey>& token_key = rpk ? credentials.rpk->token_key : credentials.x509->token_key;
  // One context per credential, not per SNI or expected peer: those two travel per session (SessionImpl and the
  // setup passed to each coap_new_client_session_pki call), so that contexts (2 fds each) stay few.
  std::string context_key = std::string(rpk ? "rpk|" : "x509|") + (token_key ? token_key->uri : key.fingerprint());
  if (!rpk) {
    context_key += "|" + std::to_string(std::hash<std::string>{}(credentials.x509->certificate_chain_pem +
                                                                  credentials.x509->trust_anchors_pem));
  } else {
    for (const auto& pinned : credentials.rpk->pinned_peer_keys) context_key += "|" + pinned;
  }
  return context_key;
}

namespace {
// The public key object beside a private key: same token, label and id, type=public (RFC 7512 §2.3).
std::string public_key_uri_of(const std::string& private_key_uri) {
  const std::string path = private_key_uri.substr(7, private_key_uri.find('?') - 7);  // after "pkcs11:", no query
  std::string uri = "pkcs11:";
  for (std::size_t start = 0; start < path.size();) {
    const std::size_t end = std::min(path.find(';', start), path.size());
    const std::string attribute = path.substr(start, end - start);
    if (!attribute.empty() && attribute.rfind("type=", 0) != 0) uri += attribute + ";";
    start = end + 1;
  }
  return uri + "type=public";
}
}  // namespace

Result<ClientPkiContext*> Node::Impl::client_pki_context(const ClientCredentials& credentials) {
  const bool rpk = credentials.kind == ClientCredentials::Kind::rpk;
  const SecretBuffer& key = rpk ? credentials.rpk->private_key_pem : credentials.x509->private_key_pem;
  std::string context_key = pki_context_key(credentials);
  if (auto it = client_pki_contexts.find(context_key); it != client_pki_contexts.end()) return it->second.get();

  const std::optional<TokenKey>& token_key = rpk ? credentials.rpk->token_key : credentials.x509->token_key;
  auto entry = std::make_unique<ClientPkiContext>();
  entry->policy.node = this;
  entry->policy.certificates = !rpk;
  entry->policy.raw_keys = rpk;
  if (token_key) {
    // Loaded here once, so that a wrong PIN or a missing token fails this request with the reason.
    auto loaded = rpk ? detail::load_server_raw_key(detail::KeySource{{}, &*token_key})
                      : detail::load_server_certificate(credentials.x509->certificate_chain_pem,
                                                        detail::KeySource{{}, &*token_key});
    if (!loaded.ok()) return make_error(loaded.error().code, "client key: " + loaded.error().message);
    if (rpk) {
      const auto spki = detail::subject_public_key_info(**loaded);
      entry->our_key_id = crypto::public_key_id_of_spki(ByteView{spki.data(), spki.size()});
    } else {
      auto chain = crypto::Certificate::parse(ByteView::of(credentials.x509->certificate_chain_pem));
      if (!chain.ok()) return make_error(Errc::invalid_argument, "client certificate: " + chain.error().message);
      entry->our_key_id = chain->public_key_id();
      // libcoap never sees this key: each session presents it through attach_client_certificate.
      entry->token_certificate = *std::move(loaded);
    }
  } else {
    auto private_key = crypto::PrivateKey::parse(key);
    if (!private_key.ok()) return make_error(Errc::invalid_argument, "client key: " + private_key.error().message);
    entry->our_key_id = private_key->public_key_id();
    entry->key_pem = nul_terminated(key.view());
  }
  coap_dtls_pki_t& setup = entry->setup;
  std::memset(&setup, 0, sizeof(setup));
  setup.version = COAP_DTLS_PKI_SETUP_VERSION;
  setup.validate_cn_call_back = on_peer_certificate;
  setup.cn_call_back_arg = &entry->policy;
  setup.pki_key.key_type = COAP_PKI_KEY_PEM_BUF;
  if (!token_key) {
    setup.pki_key.key.pem_buf.private_key = entry->key_pem.data();
    setup.pki_key.key.pem_buf.private_key_len = entry->key_pem.size();
  }
  if (rpk) {
    entry->policy.pinned_keys = credentials.rpk->pinned_peer_keys;
    setup.is_rpk_not_cert = 1;
    // libcoap derives the SPKI from an "EC PRIVATE KEY" PEM given as both halves (docs/transport.md §3).
    if (!token_key) {
      setup.pki_key.key.pem_buf.public_cert = entry->key_pem.data();
      setup.pki_key.key.pem_buf.public_cert_len = entry->key_pem.size();
    } else {
      // A raw key must be in the credentials before the ClientHello (it lists the client certificate types
      // they hold, RFC 7250 §3), which libcoap sends inside coap_new_client_session_pki: so here libcoap loads
      // the key itself, from the token, for every session (docs/transport.md §3 "Keys in a token").
      entry->token_private_uri = token_key->uri;
      entry->token_public_uri = public_key_uri_of(token_key->uri);
      entry->key_pem = nul_terminated(token_key->pin ? token_key->pin->view() : ByteView{});
      setup.pki_key.key_type = COAP_PKI_KEY_PKCS11;
      setup.pki_key.key.pkcs11.private_key = entry->token_private_uri.c_str();
      setup.pki_key.key.pkcs11.public_cert = entry->token_public_uri.c_str();
      setup.pki_key.key.pkcs11.user_pin =
          token_key->pin ? reinterpret_cast<const char*>(entry->key_pem.data()) : nullptr;
    }
  } else {
    entry->chain_pem = nul_terminated(ByteView::of(credentials.x509->certificate_chain_pem));
    entry->trust_pem = nul_terminated(ByteView::of(credentials.x509->trust_anchors_pem));
    setup.verify_peer_cert = 1;
    setup.check_common_ca = 0;       // trust anchors may be several MEF CAs, not only our own issuer
    setup.allow_self_signed = 0;
    setup.allow_expired_certs = 0;
    setup.cert_chain_validation = 1;
    setup.cert_chain_verify_depth = 3;  // leaf, one intermediate, anchor: the MEF CA profile (TS-0003 §10.1)
    if (!token_key) {  // libcoap takes the chain only with its key
      setup.pki_key.key.pem_buf.public_cert = entry->chain_pem.data();
      setup.pki_key.key.pem_buf.public_cert_len = entry->chain_pem.size();
    }
    setup.pki_key.key.pem_buf.ca_cert = entry->trust_pem.data();
    setup.pki_key.key.pem_buf.ca_cert_len = entry->trust_pem.size();
  }
  std::string error;
  entry->context = new_context(ContextRole::client, error);
  if (!entry->context) return make_error(Errc::internal, error);
  if (auto added = add_context_to_loop(entry->context.get()); !added.ok()) return std::move(added).error();
  auto* raw = entry.get();
  client_pki_contexts.emplace(std::move(context_key), std::move(entry));
  return raw;
}

Result<std::string> Node::Impl::cache_key_for(const Peer& peer, const ClientCredentials& credentials,
                                              bool create_pki_context, ClientPkiContext** pki_out) {
  using Kind = ClientCredentials::Kind;
  std::string identity_key;
  switch (credentials.kind) {
    case Kind::none: identity_key = "plain"; break;
    case Kind::psk: identity_key = "psk|" + credentials.psk_identity + "|" + credentials.psk_key.fingerprint(); break;
    case Kind::x509: identity_key = "x509|"; break;
    case Kind::rpk: identity_key = "rpk|"; break;
  }
  if ((credentials.kind == Kind::x509 && !credentials.x509) || (credentials.kind == Kind::rpk && !credentials.rpk)) {
    return make_error(Errc::invalid_argument, "client credentials of kind certificate/rpk without their data");
  }
  if (credentials.kind == Kind::rpk && !backend_supports_rpk()) {
    return make_error(Errc::unsupported, "raw public keys (RFC 7250) need the GnuTLS build; this is " +
                                             std::string(to_string(compiled_backend())));
  }
  ClientPkiContext* pki = nullptr;
  if (credentials.kind == Kind::x509 || credentials.kind == Kind::rpk) {
    if (create_pki_context) {
      auto context = client_pki_context(credentials);
      if (!context.ok()) return std::move(context).error();
      pki = *context;
    } else {
      auto it = client_pki_contexts.find(pki_context_key(credentials));
      if (it == client_pki_contexts.end()) return make_error(Errc::not_found, "no client context for this credential");
      pki = it->second.get();
    }
    identity_key += pki->our_key_id + "|" + std::to_string(reinterpret_cast<std::uintptr_t>(pki)) + "|" +
                    credentials.expected_peer;
  }
  if (pki_out != nullptr) *pki_out = pki;
  return peer.host + "|" + std::to_string(peer.port) + "|" + identity_key + "|" + credentials.sni;
}

Result<coap_session_t*> Node::Impl::client_session_for(const Peer& peer, const ClientCredentials& credentials) {
  using Kind = ClientCredentials::Kind;
  auto address = parse_address(peer.host, peer.port);
  if (!address.ok()) return std::move(address).error();
  ClientPkiContext* pki = nullptr;
  auto key = cache_key_for(peer, credentials, /*create_pki_context=*/true, &pki);
  if (!key.ok()) return std::move(key).error();
  const std::string cache_key = std::move(*key);
  if (auto it = client_cache.find(cache_key); it != client_cache.end()) {
    auto found = sessions.find(it->second);
    if (found != sessions.end() && !found->second->dead) return it->second;
    graveyard.push_back(it->second);  // dead: released by housekeeping, replaced below
    client_cache.erase(it);
  }
  if (client_cache.size() + graveyard.size() >= config.limits.max_client_sessions) {
    return make_error(Errc::limit, "outgoing session to " + peer.host + ":" + std::to_string(peer.port) +
                                       " refused: " + std::to_string(client_cache.size()) +
                                       " client sessions are open, the limit is " +
                                       std::to_string(config.limits.max_client_sessions) +
                                       " (GnuTLS client sessions use select(), which aborts past ~1000 fds)");
  }
  if (detail::backend() == Backend::gnutls) {
    // GnuTLS client sessions select() on their socket: an fd >= FD_SETSIZE (1024) aborts the process in glibc
    // (docs/transport.md §2). The new socket takes the lowest free fd, so probe it and refuse before libcoap gets
    // there.
    const int probe = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (probe >= 0) ::close(probe);
    if (probe < 0 || probe >= kHighestSelectableFd) {
      return make_error(Errc::limit, "outgoing session to " + peer.host + ":" + std::to_string(peer.port) +
                                         " refused: the next socket would be fd " + std::to_string(probe) +
                                         ", and GnuTLS client sessions use select(), which aborts at fd 1024");
    }
  }
  if (!client_context) {
    std::string error;
    client_context = new_context(ContextRole::client, error);
    if (!client_context) return make_error(Errc::internal, error);
    if (auto added = add_context_to_loop(client_context.get()); !added.ok()) return std::move(added).error();
  }

  coap_session_t* session = nullptr;
  std::string credential_id;
  std::string offered;
  switch (credentials.kind) {
    case Kind::none: session = coap_new_client_session(client_context.get(), nullptr, &*address, COAP_PROTO_UDP); break;
    case Kind::psk: {
      coap_dtls_cpsk_t setup;
      std::memset(&setup, 0, sizeof(setup));
      setup.version = COAP_DTLS_CPSK_SETUP_VERSION;
      // The session keeps a shallow copy of the setup and reads client_sni at every new handshake (a reconnect in
      // coap_send_pdu), so the name must outlive the session: stable storage for the Node's lifetime.
      setup.client_sni =
          credentials.sni.empty() ? nullptr : const_cast<char*>(client_snis.insert(credentials.sni).first->c_str());
      setup.psk_info.identity = {credentials.psk_identity.size(),
                                 reinterpret_cast<const uint8_t*>(credentials.psk_identity.data())};
      // libcoap copies the session PSK (docs/transport.md §3); the copy is unwiped heap: sessions are capped in time.
      setup.psk_info.key = {credentials.psk_key.size(), credentials.psk_key.data()};
      session = coap_new_client_session_psk2(client_context.get(), nullptr, &*address, COAP_PROTO_DTLS, &setup);
      credential_id = credentials.psk_identity;
      offered = credentials.psk_identity;
      break;
    }
    case Kind::x509:
    case Kind::rpk:
      // The setup (with this session's SNI) is copied into the context and used for this ClientHello.
      pki->setup.client_sni =
          credentials.sni.empty() ? nullptr : const_cast<char*>(pki->snis.insert(credentials.sni).first->c_str());
      session = coap_new_client_session_pki(pki->context.get(), nullptr, &*address, COAP_PROTO_DTLS, &pki->setup);
      credential_id = pki->our_key_id;
      if (session != nullptr && pki->token_certificate) {
        if (auto attached = detail::attach_client_certificate(session, *pki->token_certificate); !attached.ok()) {
          coap_session_release(session);
          return std::move(attached).error();
        }
      }
      break;
  }
  if (session == nullptr) {
    std::string backend = libcoap_warnings().empty() ? "" : ": " + libcoap_warnings().back();
    return make_error(Errc::io, "cannot open a session to " + peer.host + ":" + std::to_string(peer.port) + backend);
  }
  SessionImpl& state = state_for(session);
  state.credential = credential_id;
  state.offered_identity = offered;
  state.cache_key = cache_key;
  state.expected_peer = credentials.expected_peer;
  if (credentials.kind == Kind::psk) {
    state.identity = PeerIdentity{PeerKind::psk, credentials.psk_identity, {}, {}};
    state.verified = state.identity;
  } else if (credentials.kind == Kind::none) {
    state.identity = PeerIdentity{PeerKind::local, state.remote, {}, {}};
    state.established = true;
  }
  client_cache[cache_key] = session;
  counters.live_client_sessions = client_cache.size();
  client_contexts_touched = true;  // its handshake's retransmission timer is armed by the context's next prepare
  return session;
}

coap_pdu_t* Node::Impl::build_request_pdu(coap_session_t* raw, SessionImpl& state, Request& request, bool observe,
                                          std::string& token_out) {
  coap_pdu_t* pdu = coap_new_pdu(COAP_MESSAGE_CON, static_cast<coap_pdu_code_t>(request.method), raw);
  if (pdu == nullptr) return nullptr;
  uint8_t token[8];
  size_t token_length = 0;
  coap_session_new_token(raw, &token_length, token);
  coap_add_token(pdu, token_length, token);
  token_out.assign(reinterpret_cast<const char*>(token), token_length);

  coap_optlist_t* options = nullptr;
  auto add = [&](std::uint16_t number, const std::string& value) {
    coap_insert_optlist(&options, coap_new_optlist(number, value.size(),
                                                   reinterpret_cast<const uint8_t*>(value.data())));
  };
  auto add_uint = [&](std::uint16_t number, unsigned value) {
    uint8_t buffer[4];
    const unsigned length = coap_encode_var_safe(buffer, sizeof(buffer), value);
    coap_insert_optlist(&options, coap_new_optlist(number, length, buffer));
  };
  if (observe) add_uint(COAP_OPTION_OBSERVE, COAP_OBSERVE_ESTABLISH);
  for (const auto& segment : request.path) add(COAP_OPTION_URI_PATH, segment);
  for (const auto& item : request.query) add(COAP_OPTION_URI_QUERY, item);
  if (request.content_format) add_uint(COAP_OPTION_CONTENT_FORMAT, *request.content_format);
  if (request.accept) add_uint(COAP_OPTION_ACCEPT, *request.accept);
  if (!request.originator.empty()) add(kOptionOneM2mFrom, request.originator);
  if (!request.request_id.empty()) add(kOptionOneM2mRequestId, request.request_id);
  if (!request.proxy_uri.empty()) add(COAP_OPTION_PROXY_URI, request.proxy_uri);
  coap_add_optlist_pdu(pdu, &options);
  std::unique_ptr<coap_optlist_t, OptlistDeleter> options_owner(options);

  state.count.packets_out++;
  state.count.bytes_out += request.payload.size() + 4;
  if (!request.payload.empty()) {
    auto* copy = new Bytes(std::move(request.payload));  // owned by libcoap until release_heap_bytes
    coap_add_data_large_request(raw, pdu, copy->size(), copy->data(), release_heap_bytes, copy);
  }
  return pdu;
}

void Node::request(const Peer& peer, const ClientCredentials& credentials, Request request,
                   ResponseHandler handler) {
  impl_->send_request(peer, credentials, std::move(request), std::move(handler),
                      Clock::now() + impl_->config.limits.request_timeout, 1);
}

void Node::Impl::send_request(const Peer& peer, const ClientCredentials& credentials, Request request,
                              ResponseHandler handler, Clock::time_point deadline, unsigned attempt) {
  // Set-up errors reach Node::request's caller before it returns (its contract); a request sent again from
  // housekeeping gets its answer from the completions like any other.
  auto fail_now = [&](Error error) {
    if (attempt == 1) return handler(std::move(error), nullptr);
    complete(PendingRequest{std::move(handler), deadline, nullptr, 0, std::nullopt, std::nullopt, nullptr},
             std::move(error), nullptr);
  };
  auto session = client_session_for(peer, credentials);
  if (!session.ok()) {
    report(session.error().code == Errc::limit ? FailureKind::limit : FailureKind::request_failed,
           peer.host + ":" + std::to_string(peer.port), credentials.psk_identity, session.error().message);
    return fail_now(std::move(session).error());
  }
  coap_session_t* raw = *session;
  SessionImpl& state = state_for(raw);
  state.handshake_attempt = std::max(state.handshake_attempt, attempt);
  std::shared_ptr<Replay> replay;
  if (state.secure && !state.established && coap_session_get_state(raw) != COAP_SESSION_STATE_ESTABLISHED) {
    replay = std::make_shared<Replay>(Replay{peer, credentials.clone(), request, attempt});
  }
  std::string token;
  coap_pdu_t* pdu = build_request_pdu(raw, state, request, /*observe=*/false, token);
  if (pdu == nullptr) return fail_now(make_error(Errc::internal, "coap_new_pdu failed"));
  const auto key = std::make_pair(raw, token);
  PendingRequest entry{std::move(handler), deadline, raw,          state.count.packets_in, std::nullopt,
                       std::nullopt,       std::move(replay), request.answer_is_secret};
  // While the handshake runs the counter exists too (epoch 0), but the handshake itself moves it:
  // mark_established takes the reading then.
  if (state.secure && state.established) entry.records_at_send = detail::records_received(raw);
  if (state.secure && may_repeat(request.method)) entry.silence_check = Clock::now() + config.limits.silence_timeout;
  expect_by(entry.silence_check ? std::min(deadline, *entry.silence_check) : deadline);
  pending[key] = std::move(entry);
  client_contexts_touched = true;
  if (coap_send(raw, pdu) == COAP_INVALID_MID) {
    auto it = pending.find(key);
    if (it != pending.end()) {
      complete(std::move(it->second),
               make_error(Errc::io, "cannot send to " + state.remote + ": " + handshake_failure_reason(state)),
               &state);
      pending.erase(it);
    }
    mark_dead(state);
  }
}

Observation Node::observe(const Peer& peer, const ClientCredentials& credentials, Request request,
                          NotificationHandler handler) {
  auto session = impl_->client_session_for(peer, credentials);
  if (!session.ok()) {
    impl_->report(session.error().code == Errc::limit ? FailureKind::limit : FailureKind::request_failed,
                  peer.host + ":" + std::to_string(peer.port), credentials.psk_identity, session.error().message);
    handler(std::move(session).error(), nullptr);
    return Observation();
  }
  coap_session_t* raw = *session;
  SessionImpl& state = impl_->state_for(raw);
  request.method = Method::get;
  auto observation = std::make_shared<Observation::State>();
  observation->node_alive = impl_->alive;
  observation->impl = impl_.get();
  observation->session = raw;
  observation->handler = std::move(handler);
  observation->first_answer_deadline = Clock::now() + impl_->config.limits.request_timeout;
  impl_->expect_by(*observation->first_answer_deadline);
  observation->packets_in_at_send = state.count.packets_in;
  if (state.secure && state.established) observation->records_at_send = detail::records_received(raw);
  coap_pdu_t* pdu = impl_->build_request_pdu(raw, state, request, /*observe=*/true, observation->token);
  if (pdu == nullptr) {
    observation->handler(make_error(Errc::internal, "coap_new_pdu failed"), nullptr);
    return Observation();
  }
  impl_->observations[{raw, observation->token}] = observation;
  impl_->client_contexts_touched = true;
  if (coap_send(raw, pdu) == COAP_INVALID_MID) {
    impl_->observations.erase({raw, observation->token});
    impl_->notify(observation,
                  make_error(Errc::io, "cannot send to " + state.remote + ": " + impl_->handshake_failure_reason(state)),
                  &state, /*final=*/true);
    impl_->mark_dead(state);
  }
  return Observation(observation);
}

// ---- Observation (client side of RFC 7641) ----------------------------------------------------------------------

Observation::Observation(std::shared_ptr<State> state) : state_(std::move(state)) {}
Observation::Observation(Observation&&) noexcept = default;
Observation& Observation::operator=(Observation&& other) noexcept {
  if (this != &other) {
    cancel();
    state_ = std::move(other.state_);
  }
  return *this;
}
Observation::~Observation() { cancel(); }

bool Observation::active() const noexcept { return state_ && !state_->cancelled && !state_->ended; }

void Observation::cancel() {
  if (!state_ || state_->cancelled) return;
  state_->cancelled = true;
  if (state_->ended || state_->node_alive.expired()) return;
  state_->ended = true;
  Node::Impl* impl = state_->impl;
  impl->observations.erase({state_->session, state_->token});
  auto found = impl->sessions.find(state_->session);
  if (found == impl->sessions.end() || found->second->dead) return;
  // On a session that is not ESTABLISHED, coap_cancel_observe would open a new handshake just to send this.
  if (coap_session_get_state(state_->session) != COAP_SESSION_STATE_ESTABLISHED) return;
  // Deregister now (GET with Observe 1 on the subscription's token); libcoap can only once the first notification
  // arrived. Otherwise the next notification gets an RST (on_response), which ends it at the server as well.
  coap_binary_t token{state_->token.size(), reinterpret_cast<uint8_t*>(state_->token.data())};
  impl->client_contexts_touched = true;
  (void)coap_cancel_observe(state_->session, &token, COAP_MESSAGE_CON);
}

void Node::close_client_sessions() {
  for (auto& [key, raw] : impl_->client_cache) {
    auto found = impl_->sessions.find(raw);
    if (found != impl_->sessions.end()) {
      impl_->kill_client_session(*found->second, make_error(Errc::io, "client session closed by us"));
    }
  }
  impl_->housekeeping();
}

bool Node::close_client_session(const Peer& peer, const ClientCredentials& credentials) {
  auto key = impl_->cache_key_for(peer, credentials, /*create_pki_context=*/false);
  if (!key.ok()) return false;
  auto it = impl_->client_cache.find(*key);
  if (it == impl_->client_cache.end()) return false;
  auto found = impl_->sessions.find(it->second);
  if (found == impl_->sessions.end() || found->second->dead) return false;
  impl_->kill_client_session(*found->second, make_error(Errc::io, "client session closed by us"));
  impl_->housekeeping();
  return true;
}

}  // namespace dauth::transport
