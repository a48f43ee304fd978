// Node, server side: request dispatch to the routes (deferred answers through Responder), observable resources,
// closing server sessions, and the server credentials (PKI set up once, certificates chosen by server name).
#include <coap3/coap.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "dauth/crypto/kdf.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/transport/transport.hpp"
#include "node_impl.hpp"
#include "tls_backend.hpp"

namespace dauth::transport {

// ---- Responder -------------------------------------------------------------------------------------------------

struct Responder::State {
  std::weak_ptr<bool> node_alive;
  bool in_handler = true;
  bool responder_alive = true;
  std::optional<Response> response;
  coap_async_t* async = nullptr;
};

Responder::Responder(std::shared_ptr<State> state) : state_(std::move(state)) {}
Responder::Responder(Responder&&) noexcept = default;
Responder& Responder::operator=(Responder&& other) noexcept {
  if (this != &other) {
    Responder previous(std::move(*this));  // answers 5.00 for a dropped deferred request, like the destructor
    state_ = std::move(other.state_);
  }
  return *this;
}

Responder::~Responder() {
  if (!state_) return;
  state_->responder_alive = false;
  if (!state_->response && !state_->in_handler) {
    respond(Response::with_text(500, "request dropped without a response"));
  }
}

void Responder::respond(Response response) {
  if (!state_ || state_->response) return;  // answered once; later calls are ignored
  state_->response = std::move(response);
  // A deferred answer: re-run the stored request through libcoap's async machinery (coap_async.c), which calls our
  // dispatcher again with the original token; it then sends this response as a separate CON response.
  if (!state_->in_handler && state_->async != nullptr && !state_->node_alive.expired()) {
    coap_async_trigger(state_->async);
  }
}

bool Responder::answered() const noexcept { return state_ && state_->response.has_value(); }

// ---- request dispatch (server side) --------------------------------------------------------------------------

namespace {

Request parse_request(const coap_pdu_t* pdu, bool legacy) {
  Request request;
  request.method = static_cast<Method>(coap_pdu_get_code(pdu));
  coap_opt_iterator_t iterator;
  coap_option_iterator_init(pdu, &iterator, COAP_OPT_ALL);
  while (const coap_opt_t* option = coap_option_next(&iterator)) {
    const std::string value(reinterpret_cast<const char*>(coap_opt_value(option)), coap_opt_length(option));
    const auto number = iterator.number;
    if (number == COAP_OPTION_URI_PATH) {
      request.path.push_back(value);
    } else if (number == COAP_OPTION_URI_QUERY) {
      request.query.push_back(value);
    } else if (number == COAP_OPTION_PROXY_URI) {
      request.proxy_uri = value;
    } else if (number == COAP_OPTION_CONTENT_FORMAT) {
      request.content_format =
          static_cast<std::uint16_t>(coap_decode_var_bytes(coap_opt_value(option), coap_opt_length(option)));
    } else if (number == COAP_OPTION_ACCEPT) {
      request.accept =
          static_cast<std::uint16_t>(coap_decode_var_bytes(coap_opt_value(option), coap_opt_length(option)));
    } else if (number == kOptionOneM2mFrom || (legacy && number == kLegacyOptionOneM2mFrom)) {
      request.originator = value;
    } else if (number == kOptionOneM2mRequestId || (legacy && number == kLegacyOptionOneM2mRequestId)) {
      request.request_id = value;
    }
  }
  return request;
}

}  // namespace

namespace detail {

void release_heap_bytes(coap_session_t* /*session*/, void* bytes) { delete static_cast<Bytes*>(bytes); }
void release_heap_secret(coap_session_t* /*session*/, void* secret) {
  delete static_cast<std::shared_ptr<const SecretBuffer>*>(secret);
}

}  // namespace detail

namespace {

// The ETag of a response body: derived from its content, so that two block-wise transfers of the same body agree
// and two of different bodies converge on the newest. libcoap 4.3.1 keeps one block-wise transfer per (session,
// resource) and serves every later block from the newest; given ETag 0 it draws a new ETag per response, and a
// client restarts a transfer whose later blocks carry another ETag than its first. Two subscriptions of one
// resource on one session then restarted each other for ever (docs/transport.md §6). Computed for every body:
// whether libcoap goes block-wise also depends on the Block2 size the client asked for. Keyed per Node (SipHash),
// so that the tag says nothing about a body beyond "same or not". Never 0 (libcoap's "draw one").
std::uint64_t content_etag(const SecretBuffer& key, const Bytes& payload) {
  const std::uint64_t tag = crypto::short_hash(key, ByteView(payload));
  return tag == 0 ? 1 : tag;
}

void fill_response(coap_resource_t* resource, coap_session_t* session, const coap_pdu_t* request,
                   const coap_string_t* query, coap_pdu_t* pdu, const Response& response, SessionImpl& state,
                   Node::Impl& impl) {
  const int code = response.code;
  coap_pdu_set_code(pdu, static_cast<coap_pdu_code_t>(((code / 100) << 5) | (code % 100)));
  if (!response.request_id.empty()) {
    coap_add_option(pdu, kOptionOneM2mRequestId, response.request_id.size(),
                    reinterpret_cast<const uint8_t*>(response.request_id.data()));
  }
  if (response.response_status) {
    uint8_t buffer[4];
    const unsigned length = coap_encode_var_safe(buffer, sizeof(buffer), *response.response_status);
    coap_add_option(pdu, kOptionOneM2mResponseStatus, length, buffer);
  }
  state.count.packets_out++;
  const std::size_t secret_size = response.secret_payload ? response.secret_payload->size() : 0;
  state.count.bytes_out += response.payload.size() + secret_size + 4;
  // Carried out in housekeeping, after coap_io_process has sent this response (closing here would drop it).
  if (response.close_session && state.secure && !state.client) impl.request_close(state);
  const bool has_body = !response.payload.empty() || secret_size != 0;
  // libcoap adds Content-Format only for a non-zero media type (block.c coap_add_data_large_response): 0 means
  // "none" there, so an explicit 0 (text/plain) is added here, and an unset one sends no option at all.
  if (has_body && response.content_format == std::uint16_t{0}) {
    coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, 0, nullptr);
  }
  if (secret_size != 0) {
    // Key material: ETag 0 lets libcoap draw one, so that no tag is derived from a key. Such bodies are one
    // datagram (a 32-byte key in a small map), so the block-wise ETag agreement below never matters for them.
    // libcoap holds a reference until release_heap_secret: no copy of the key is made here.
    auto* held = new std::shared_ptr<const SecretBuffer>(response.secret_payload);
    coap_add_data_large_response(resource, session, request, pdu, query, response.content_format.value_or(0), -1,
                                 0, (*held)->size(), (*held)->data(), release_heap_secret, held);
  } else if (!response.payload.empty()) {
    const std::uint64_t etag = content_etag(impl.etag_key, response.payload);
    auto* copy = new Bytes(response.payload);  // owned by libcoap until release_heap_bytes
    coap_add_data_large_response(resource, session, request, pdu, query, response.content_format.value_or(0), -1,
                                 etag, copy->size(), copy->data(), release_heap_bytes, copy);
  } else if (response.content_format) {
    uint8_t buffer[4];
    const unsigned length = coap_encode_var_safe(buffer, sizeof(buffer), *response.content_format);
    coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, length, buffer);
  }
}

bool prefix_matches(const std::vector<std::string>& prefix, const std::vector<std::string>& path) {
  if (prefix.size() > path.size()) return false;
  return std::equal(prefix.begin(), prefix.end(), path.begin());
}

}  // namespace

namespace detail {

void on_request(coap_resource_t* resource, coap_session_t* session, const coap_pdu_t* pdu,
                const coap_string_t* query, coap_pdu_t* response_pdu) {
  Node::Impl* impl = impl_of(session);
  if (impl == nullptr) return;
  SessionImpl& state = impl->state_for(session);
  const auto key = std::make_pair(session, token_key(coap_pdu_get_token(pdu)));

  // A deferred response coming back through coap_async_trigger().
  if (auto it = impl->deferred.find(key); it != impl->deferred.end()) {
    auto shared = it->second;
    impl->deferred.erase(it);
    fill_response(resource, session, pdu, query, response_pdu,
                  shared->response ? *shared->response : Response::with_text(500, "no response"), state,
                  *impl);
    return;
  }

  state.count.packets_in++;
  state.count.bytes_in += pdu_size(pdu);
  state.last_received = std::chrono::system_clock::now();
  auto reject = [&](int code, const std::string& reason) {
    impl->report(FailureKind::request_rejected, state.remote, state.identity.value, reason);
    fill_response(resource, session, pdu, query, response_pdu, Response::with_text(code, reason), state,
                  *impl);
  };

  if (state.secure) {
    // First request: the handshake is complete; the peer identity and exporter are readable now (docs/transport.md §3).
    impl->mark_established(state);
    if (!state.verified) {  // fail closed: never serve a DTLS peer that none of our callbacks vetted
      reject(401, "DTLS session completed without an identity from our callbacks");
      return;
    }
  } else if (!state.secure && !state.established) {
    state.identity = PeerIdentity{PeerKind::local, state.remote, {}, {}};
    state.established = true;
  }

  Request request = parse_request(pdu, impl->config.accept_legacy_onem2m_options);
  {
    size_t length = 0;
    const uint8_t* data = nullptr;
    size_t offset = 0;
    size_t total = 0;
    if (coap_get_data_large(pdu, &length, &data, &offset, &total) != 0) {
      if (total > impl->config.limits.max_request_size) {
        reject(413, "request body of " + std::to_string(total) + " bytes refused: at most " +
                        std::to_string(impl->config.limits.max_request_size) + " bytes allowed");
        return;
      }
      request.payload.assign(data, data + length);
    }
  }

  const Route* best = nullptr;
  for (const auto& route : impl->routes) {
    if (route.method != request.method || !prefix_matches(route.prefix, request.path)) continue;
    if (route.exact && route.prefix.size() != request.path.size()) continue;
    const bool allowed = route.access == Access::both || (route.access == Access::secure) == state.secure;
    if (!allowed) continue;
    const bool longer = best == nullptr || route.prefix.size() > best->prefix.size();
    const bool exact_over_prefix = best != nullptr && route.prefix.size() == best->prefix.size() && route.exact;
    if (longer || exact_over_prefix) best = &route;
  }
  if (best == nullptr) {
    reject(404, std::string(to_string(request.method)) + " " + request.path_text() + ": no such resource");
    return;
  }

  auto shared = std::make_shared<Responder::State>();
  shared->node_alive = impl->alive;
  coap_opt_iterator_t iterator_for_observe;
  best->handler(state, request, Responder(shared));
  shared->in_handler = false;
  // A subscription or a notification (libcoap calls again with the stored request): the answer must be in this
  // response PDU; libcoap's async re-dispatch would not carry the Observe option.
  const bool observing = best->exact && coap_check_option(pdu, COAP_OPTION_OBSERVE, &iterator_for_observe) != nullptr;
  // libcoap sends notifications as CON (COAP_RESOURCE_FLAGS_NOTIFY_CON); the first answer is an ACK or NON.
  const bool notification = observing && coap_pdu_get_type(response_pdu) == COAP_MESSAGE_CON;
  if (shared->response && notification && shared->response->code / 100 != 2) {
    // libcoap 4.3.1 frees the subscription on a non-2.xx notification and then uses it (resource.c
    // coap_notify_observers: coap_delete_observer, then obs->non_cnt and obs->session): a crash. So the refusal
    // ends the subscription with its session instead (close_notify after this round; the client's observation
    // ends with an error and a new subscription gets the refusal itself). Code 0 keeps libcoap off that path
    // (it only strips the Observe option); the client drops the empty notification, the close follows at once.
    impl->report(FailureKind::request_rejected, state.remote, state.identity.value,
                 "notification of " + request.path_text() + " refused with " + std::to_string(shared->response->code) +
                     ": subscription ended by closing the session");
    impl->request_close(state);
    coap_pdu_set_code(response_pdu, static_cast<coap_pdu_code_t>(0));
    return;
  }
  if (shared->response) {
    ++impl->counters.requests_served;
    Response response = std::move(*shared->response);
    if (response.request_id.empty()) response.request_id = request.request_id;
    fill_response(resource, session, pdu, query, response_pdu, response, state, *impl);
    return;
  }
  if (shared->responder_alive && !observing) {
    // Deferred: libcoap sends an empty ACK now and re-dispatches the request when we trigger it (RFC 7252 §5.2.2).
    shared->async = coap_register_async(session, pdu, 0);
    if (shared->async == nullptr) {
      reject(500, "cannot defer the response (duplicate token?)");
      return;
    }
    ++impl->counters.requests_served;
    impl->deferred[key] = shared;
    return;
  }
  fill_response(resource, session, pdu, query, response_pdu,
                Response::with_text(500, observing ? "observable resource handler did not answer at once"
                                                   : "handler gave no response"),
                state, *impl);
}

}  // namespace detail

// ---- routes, observables, server sessions --------------------------------------------------------------------

void Node::add_route(Method method, std::vector<std::string> prefix, Access access, RequestHandler handler) {
  impl_->routes.push_back(Route{method, std::move(prefix), access, std::move(handler)});
}

Result<void> Node::add_observable(std::vector<std::string> path, Access access, RequestHandler handler) {
  if (!impl_->server_context) {
    return make_error(Errc::invalid_argument, "add_observable: this node has no server endpoint");
  }
  std::string joined;
  for (const auto& segment : path) {
    if (segment.empty() || segment.find('/') != std::string::npos) {
      return make_error(Errc::invalid_argument, "add_observable: path segment '" + segment +
                                                    "' is empty or contains '/'");
    }
    joined += (joined.empty() ? "" : "/") + segment;
  }
  if (joined.empty()) return make_error(Errc::invalid_argument, "add_observable: empty path");
  if (impl_->observables.count(joined) != 0) {
    return make_error(Errc::invalid_argument, "add_observable: /" + joined + " is already observable");
  }
  // A real resource for the exact path: libcoap cannot observe its unknown (catch-all) resource (docs/transport.md
  // §5). Its handler is the same dispatcher, so every method on this path still reaches our routes.
  coap_str_const_t name{joined.size(), reinterpret_cast<const uint8_t*>(joined.data())};  // copied by libcoap
  coap_resource_t* resource = coap_resource_init(&name, COAP_RESOURCE_FLAGS_NOTIFY_CON);  // a lost one is noticed
  if (resource == nullptr) return make_error(Errc::internal, "coap_resource_init failed for /" + joined);
  for (const coap_request_t method : {COAP_REQUEST_GET, COAP_REQUEST_POST, COAP_REQUEST_PUT, COAP_REQUEST_DELETE,
                                      COAP_REQUEST_FETCH, COAP_REQUEST_PATCH, COAP_REQUEST_IPATCH}) {
    coap_register_request_handler(resource, method, on_request);
  }
  coap_resource_set_get_observable(resource, 1);
  coap_add_resource(impl_->server_context.get(), resource);
  impl_->observables.emplace(joined, resource);
  Route route{Method::get, std::move(path), access, std::move(handler)};
  route.exact = true;
  impl_->routes.push_back(std::move(route));
  return ok_result();
}

bool Node::notify_observers(const std::vector<std::string>& path) {
  std::string joined;
  for (const auto& segment : path) joined += (joined.empty() ? "" : "/") + segment;
  auto it = impl_->observables.find(joined);
  if (it == impl_->observables.end()) return false;
  // Only marks the resource dirty and arms libcoap's timer: the notifications go out in the next coap_io_process.
  return coap_resource_notify_observers(it->second, nullptr) == 1;
}

std::size_t Node::close_server_sessions(PeerKind kind, std::string_view identity) {
  std::size_t closed = 0;
  for (auto& [raw, state] : impl_->sessions) {
    if (state->client || !state->secure || state->close_requested) continue;
    const std::optional<PeerIdentity>& peer = state->established ? std::optional<PeerIdentity>(state->identity)
                                                                  : state->verified;
    if (!peer || peer->kind != kind || peer->value != identity) continue;
    if (coap_session_get_state(raw) == COAP_SESSION_STATE_NONE) continue;
    impl_->request_close(*state);  // carried out by housekeeping, never inside a libcoap callback
    ++closed;
  }
  if (closed > 0 && !impl_->in_libcoap) impl_->housekeeping();
  return closed;
}

namespace {
// Closes every live secure session, server and client, whose authenticated peer `matches`: server sessions by
// close_notify (carried out by housekeeping, never inside a libcoap callback), client sessions at once, their
// requests failing with `client_reason`. The one loop behind the revocation and unpinning calls below.
template <typename Matches>
std::size_t close_sessions_of_peer(Node::Impl& impl, const Matches& matches, const std::string& client_reason) {
  std::size_t closed = 0;
  for (auto& [raw, state] : impl.sessions) {
    if (!state->secure || state->dead || state->close_requested) continue;
    const std::optional<PeerIdentity>& peer = state->established ? std::optional<PeerIdentity>(state->identity)
                                                                  : state->verified;
    if (!peer || !matches(*peer)) continue;
    if (state->client) {
      impl.kill_client_session(*state, make_error(Errc::io, client_reason));
    } else {
      if (coap_session_get_state(raw) == COAP_SESSION_STATE_NONE) continue;
      impl.request_close(*state);
    }
    ++closed;
  }
  if (closed > 0 && !impl.in_libcoap) impl.housekeeping();
  return closed;
}
}  // namespace

std::size_t Node::close_sessions_with_certificate_serial(std::string_view serial, std::string_view issuer) {
  if (serial.empty()) return 0;
  return close_sessions_of_peer(
      *impl_,
      [&](const PeerIdentity& peer) {
        return peer.kind == PeerKind::x509 && peer.certificate_serial == serial &&
               (issuer.empty() || peer.certificate_issuer == issuer);
      },
      "client session closed by us: the server's certificate serial " + std::string(serial) + " was revoked");
}

std::size_t Node::close_sessions_with_raw_key(std::string_view key_id) {
  if (key_id.empty()) return 0;
  return close_sessions_of_peer(
      *impl_, [&](const PeerIdentity& peer) { return peer.kind == PeerKind::rpk && peer.value == key_id; },
      "client session closed by us: the server's raw public key " + std::string(key_id) + " is no longer accepted");
}

// ---- server credentials --------------------------------------------------------------------------------------

namespace {
std::shared_ptr<const detail::ServerCertificate> choose_server_certificate(coap_session_t* session,
                                                                          const std::string& server_name,
                                                                          bool raw_key);
}  // namespace

Result<void> Node::Impl::set_up_server_pki(const X509Credentials* x509) {
  server_policy.node = this;
  if (x509 != nullptr && x509->token_key && !detail::attaches_server_pki()) {
    return make_error(Errc::unsupported, "server key in a PKCS#11 token: needs the GnuTLS build; this is " +
                                             std::string(to_string(compiled_backend())));
  }
  if (x509 != nullptr && !x509->token_key) {
    // Checked here, with dauth's own parser, for both backends and with a clear message (a token key: when loaded).
    if (auto private_key = crypto::PrivateKey::parse(x509->private_key_pem); !private_key.ok()) {
      return make_error(Errc::invalid_argument, "server private key: " + private_key.error().message);
    }
  }
  if (detail::attaches_server_pki()) {
    // The credentials the node's handshakes share, parsed once here: a PSK handshake never touches them, a
    // certificate or raw-key one gets what it presents from choose_server_certificate (docs/transport.md §3).
    auto built = detail::make_server_pki(x509 != nullptr ? std::string_view(x509->trust_anchors_pem) : "",
                                         choose_server_certificate, on_peer_certificate, &server_policy);
    if (!built.ok()) return make_error(Errc::invalid_argument, "server credentials: " + built.error().message);
    if (config.x509 && !default_certificate) {
      const auto& token = config.x509->token_key;
      auto loaded = detail::load_server_certificate(
          config.x509->certificate_chain_pem,
          detail::KeySource{config.x509->private_key_pem.view(), token ? &*token : nullptr});
      if (!loaded.ok()) return make_error(Errc::invalid_argument, "server certificate: " + loaded.error().message);
      default_certificate = *std::move(loaded);
    }
    if (server_credentials) retired_server_credentials.push_back(std::move(server_credentials));
    server_credentials = *std::move(built);
  } else {
    if (x509 == nullptr) return make_error(Errc::unsupported, "raw public keys (RFC 7250) need the GnuTLS build");
    const SecretBuffer& key = x509->private_key_pem;
    coap_dtls_pki_t& pki = server_pki;
    std::memset(&pki, 0, sizeof(pki));
    pki.version = COAP_DTLS_PKI_SETUP_VERSION;
    pki.validate_cn_call_back = on_peer_certificate;
    pki.cn_call_back_arg = &server_policy;
    pki.pki_key.key_type = COAP_PKI_KEY_PEM_BUF;
    server_key_pem = nul_terminated(key.view());
    pki.pki_key.key.pem_buf.private_key = server_key_pem.data();
    pki.pki_key.key.pem_buf.private_key_len = server_key_pem.size();
    server_chain_pem = nul_terminated(ByteView::of(x509->certificate_chain_pem));
    server_trust_pem = nul_terminated(ByteView::of(x509->trust_anchors_pem));
    pki.verify_peer_cert = 1;         // mutual authentication: a client certificate is required
    pki.check_common_ca = 0;          // several MEF CAs may be trusted, not only our own issuer
    pki.allow_self_signed = 0;
    pki.allow_expired_certs = 0;
    pki.cert_chain_validation = 1;
    pki.cert_chain_verify_depth = 3;  // leaf, one intermediate, anchor (TS-0003 §10.1 profile)
    pki.pki_key.key.pem_buf.public_cert = server_chain_pem.data();
    pki.pki_key.key.pem_buf.public_cert_len = server_chain_pem.size();
    pki.pki_key.key.pem_buf.ca_cert = server_trust_pem.data();
    pki.pki_key.key.pem_buf.ca_cert_len = server_trust_pem.size();
    if (coap_context_set_pki(server_context.get(), &pki) != 1) {
      return make_error(Errc::invalid_argument,
                        "server certificate/key rejected by the TLS backend: " +
                            (libcoap_warnings().empty() ? std::string("no detail") : libcoap_warnings().back()));
    }
  }
  server_pki_set = true;
  if (x509 != nullptr) client_trust_anchors_pem = x509->trust_anchors_pem;
  server_policy.certificates = x509 != nullptr;
  server_policy.raw_keys = server_raw_key || config.raw_key_lookup;
  return {};
}

Result<void> Node::Impl::put_server_raw_key(RpkCredentials credentials) {
  const auto& token = credentials.token_key;
  if (!token) {  // checked with dauth's own parser first, for a clear message (a token key: when loaded)
    auto private_key = crypto::PrivateKey::parse(credentials.private_key_pem);
    if (!private_key.ok()) return make_error(Errc::invalid_argument, "raw public key: " + private_key.error().message);
  }
  auto loaded =
      detail::load_server_raw_key(detail::KeySource{credentials.private_key_pem.view(), token ? &*token : nullptr});
  if (!loaded.ok()) return std::move(loaded).error();
  const auto spki = detail::subject_public_key_info(**loaded);
  // Handshakes that chose the previous key keep it (SessionImpl::presented_certificate) until they end.
  server_raw_key = *std::move(loaded);
  server_raw_key_id = crypto::public_key_id_of_spki(ByteView{spki.data(), spki.size()});
  server_policy.pinned_keys = std::move(credentials.pinned_peer_keys);
  server_policy.raw_keys = true;
  return {};
}

Result<void> Node::Impl::put_named_certificate(const std::string& server_name, X509Credentials credentials) {
  if (server_name.empty()) return make_error(Errc::invalid_argument, "server certificate for an empty server name");
  auto chain = crypto::Certificate::parse(ByteView::of(credentials.certificate_chain_pem));
  if (!chain.ok()) {
    return make_error(Errc::invalid_argument, "server certificate for '" + server_name + "': " + chain.error().message);
  }
  // A token key is checked against the certificate when it is loaded (below), with the same message.
  if (!credentials.token_key) {
    auto key = crypto::PrivateKey::parse(credentials.private_key_pem);
    if (!key.ok()) {
      return make_error(Errc::invalid_argument, "server key for '" + server_name + "': " + key.error().message);
    }
    if (key->public_key_id() != chain->public_key_id()) {
      return make_error(Errc::invalid_argument, "server key for '" + server_name +
                                                    "' is not the key of its certificate '" + chain->subject() + "'");
    }
  }
  // One trust list per context: the client verification set up with the context's PKI setup applies to all.
  if (credentials.trust_anchors_pem != client_trust_anchors_pem) {
    return make_error(Errc::invalid_argument, "server certificate for '" + server_name +
                                                  "': its trust anchors differ from the ones client certificates "
                                                  "are verified against (one set per endpoint)");
  }
  const auto& token = credentials.token_key;
  auto loaded = detail::load_server_certificate(
      credentials.certificate_chain_pem,
      detail::KeySource{credentials.private_key_pem.view(), token ? &*token : nullptr});
  if (!loaded.ok()) {
    // A token's answer keeps its code (permission: PIN, not_found: token or key), the rest is the caller's input.
    const Errc code = token && loaded.error().code != Errc::crypto ? loaded.error().code : Errc::invalid_argument;
    return make_error(code, "server certificate for '" + server_name + "': " + loaded.error().message);
  }
  // Handshakes that chose the previous one keep it (SessionImpl::presented_certificate) until they end.
  named_certificates.insert_or_assign(server_name,
                                      NamedCertificate{*std::move(loaded), std::move(credentials.local_ae_id)});
  return {};
}

namespace {

// detail::ServerCertificateLookup: the certificate (or raw key) for one handshake, from the table as it is now.
std::shared_ptr<const detail::ServerCertificate> choose_server_certificate(coap_session_t* session,
                                                                          const std::string& server_name,
                                                                          bool raw_key) {
  Node::Impl* impl = impl_of(session);
  if (impl == nullptr) return nullptr;
  SessionImpl& state = impl->state_for(session);
  state.sni = server_name;
  if (raw_key) {
    state.presented_certificate = impl->server_raw_key;
    state.presented_local_ae_id.clear();
    state.credential = impl->server_raw_key_id;
    if (state.presented_certificate) return state.presented_certificate;
    state.refusal = "the client negotiated raw public keys and this node has no raw public key";
    impl->report_handshake_failure(state, FailureKind::handshake_failed, state.refusal);
    return nullptr;
  }
  const auto named = impl->named_certificates.find(server_name);
  // The default certificate answers names the table does not know.
  const bool by_name = named != impl->named_certificates.end();
  state.presented_certificate = by_name ? named->second.certificate : impl->default_certificate;
  state.presented_local_ae_id = by_name ? named->second.local_ae_id : impl->default_local_ae_id();
  if (state.presented_certificate) return state.presented_certificate;
  state.refusal = "no server certificate for the server name '" + server_name + "'" +
                  (server_name.empty() ? std::string(" (the client sent none)") : std::string());
  impl->report_handshake_failure(state, FailureKind::handshake_failed, state.refusal);
  return nullptr;
}

}  // namespace

void Node::Impl::select_certificates_by_name() {
  for (auto it = awaiting_server_credentials.begin(); it != awaiting_server_credentials.end();) {
    coap_session_t* raw = *it;
    auto found = sessions.find(raw);
    if (found == sessions.end()) {
      it = awaiting_server_credentials.erase(it);
      continue;
    }
    SessionImpl& state = *found->second;
    coap_tls_library_t library = COAP_TLS_LIBRARY_NOTLS;
    const void* tls = coap_session_get_tls(raw, &library);
    if (tls != nullptr && tls != state.server_pki_attached_to &&
        detail::attach_server_pki(raw, *server_credentials, static_cast<bool>(config.psk_lookup)).ok()) {
      state.server_pki_attached_to = tls;
    }
    // Failing that, the handshake has no certificate credentials: PSK only, or nothing (fail closed). Past the
    // cookie exchange (a SERVER session) libcoap keeps the TLS object for good: nothing left to attach.
    const bool done = tls != nullptr && tls == state.server_pki_attached_to &&
                      coap_session_get_type(raw) == COAP_SESSION_TYPE_SERVER;
    it = done ? awaiting_server_credentials.erase(it) : std::next(it);
  }
}

bool backend_selects_server_certificates() noexcept { return detail::attaches_server_pki(); }

Result<void> Node::set_server_certificate(const std::string& server_name, X509Credentials credentials) {
  if (!backend_selects_server_certificates()) {
    return make_error(Errc::unsupported, "server certificates chosen by server name (SNI) need the GnuTLS build; "
                                         "this is " + std::string(to_string(compiled_backend())));
  }
  if (!impl_->server_context || impl_->config.secure_addresses.empty()) {
    return make_error(Errc::unsupported, "server certificate for '" + server_name + "': this node has no secure "
                                         "endpoint");
  }
  if (!impl_->server_pki_set || impl_->client_trust_anchors_pem.empty()) {
    // First certificate of a node that had none (or only a raw key): the server credentials are built now, with
    // its trust anchors; the sessions begun from now on get them.
    if (auto set_up = impl_->set_up_server_pki(&credentials); !set_up.ok()) return set_up;
  }
  return impl_->put_named_certificate(server_name, std::move(credentials));
}

bool Node::remove_server_certificate(const std::string& server_name) {
  return impl_->named_certificates.erase(server_name) > 0;
}

Result<void> Node::set_server_raw_key(RpkCredentials credentials) {
  if (!backend_supports_rpk()) {
    return make_error(Errc::unsupported, "raw public keys (RFC 7250) need the GnuTLS build; this is " +
                                             std::string(to_string(compiled_backend())));
  }
  if (!impl_->server_context || impl_->config.secure_addresses.empty()) {
    return make_error(Errc::unsupported, "server raw public key: this node has no secure endpoint");
  }
  if (!impl_->server_pki_set) {
    // First asymmetric credential of a node that had only PSK: the server credentials are built now.
    if (auto set_up = impl_->set_up_server_pki(nullptr); !set_up.ok()) return set_up;
  }
  return impl_->put_server_raw_key(std::move(credentials));
}

}  // namespace dauth::transport
