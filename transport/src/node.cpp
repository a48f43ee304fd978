// Node: its creation (configuration checks, epoll, server context, credentials, endpoints), the session records
// and failure reports both sides share, libcoap's session events, and stats. The rest: node_server.cpp,
// node_client.cpp, node_loop.cpp, dtls_callbacks.cpp, libcoap_log.cpp; shared internals in node_impl.hpp.
#include <arpa/inet.h>
#include <coap3/coap.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iostream>
#include <string>
#include <utility>

#include "dauth/crypto/kdf.hpp"
#include "dauth/transport/address.hpp"
#include "dauth/transport/transport.hpp"
#include "node_impl.hpp"
#include "tls_backend.hpp"

namespace dauth::transport {

namespace detail {

std::string address_text(const coap_address_t* address) {
  if (address == nullptr) return "?";
  unsigned char buffer[INET6_ADDRSTRLEN + 16] = {};
  const size_t length = coap_print_addr(address, buffer, sizeof(buffer));
  return std::string(reinterpret_cast<const char*>(buffer), length);
}

// Names are not resolved here: no blocking DNS in the loop (numeric_address, address.hpp).
Result<coap_address_t> parse_address(const std::string& host, std::uint16_t port) {
  auto numeric = numeric_address(host, port);
  if (!numeric.ok()) return make_error(Errc::invalid_argument, "address '" + host + "': " + numeric.error().message);
  coap_address_t address;
  coap_address_init(&address);
  std::memcpy(&address.addr, &numeric->storage, numeric->length);
  address.size = numeric->length;
  return address;
}

// PEM for libcoap's *_PEM_BUF: we include the terminating NUL in the length so that libcoap 4.3.1 hands our buffer
// to the backend directly instead of making an unwiped heap copy (coap_gnutls.c setup_pki_credentials).
SecretBuffer nul_terminated(ByteView text) {
  SecretBuffer out(text.size + 1);
  if (text.size > 0) std::memcpy(out.data(), text.data, text.size);
  return out;
}

std::string token_key(coap_bin_const_t token) {
  return std::string(reinterpret_cast<const char*>(token.s), token.length);
}

std::uint64_t pdu_size(const coap_pdu_t* pdu) {
  size_t length = 0;
  const uint8_t* data = nullptr;
  size_t offset = 0;
  size_t total = 0;
  if (coap_get_data_large(pdu, &length, &data, &offset, &total) != 0) return total + 4;
  return 4;
}

Node::Impl* impl_of(const coap_session_t* session) {
  return static_cast<Node::Impl*>(coap_get_app_data(coap_session_get_context(session)));
}

// ---- session events ----------------------------------------------------------------------------------------------

int on_event(coap_session_t* session, coap_event_t event) {
  Node::Impl* impl = impl_of(session);
  if (impl == nullptr) return 0;
  switch (event) {
    case COAP_EVENT_SERVER_SESSION_NEW: {
      SessionImpl& state = impl->state_for(session);
      if (impl->server_credentials && state.secure) impl->awaiting_server_credentials.insert(session);
      break;
    }
    case COAP_EVENT_SERVER_SESSION_DEL: {
      auto it = impl->sessions.find(session);
      if (it != impl->sessions.end()) {
        SessionImpl& state = *it->second;
        if (state.secure && !state.established) {
          impl->report_handshake_failure(state,
                                         state.timed_out ? FailureKind::handshake_timeout
                                                         : FailureKind::handshake_failed,
                                         impl->handshake_failure_reason(state));
        }
        impl->forget_session(session);
      }
      break;
    }
    case COAP_EVENT_DTLS_CONNECTED: {
      SessionImpl& state = impl->state_for(session);
      if (state.client) impl->mark_established(state);
      break;
    }
    case COAP_EVENT_DTLS_CLOSED:
    case COAP_EVENT_DTLS_ERROR:
    case COAP_EVENT_SESSION_FAILED:
    case COAP_EVENT_SESSION_CLOSED: {
      auto it = impl->sessions.find(session);
      if (it == impl->sessions.end()) break;
      SessionImpl& state = *it->second;
      if (!state.established) {
        impl->report_handshake_failure(state,
                                       state.timed_out ? FailureKind::handshake_timeout
                                                       : FailureKind::handshake_failed,
                                       impl->handshake_failure_reason(state));
      }
      if (state.client && !state.dead) {
        const std::string reason = state.established ? "DTLS session with " + state.remote + " closed"
                                                     : impl->handshake_failure_reason(state);
        impl->kill_client_session(state, make_error(state.established ? Errc::io : Errc::unauthenticated,
                                                    reason));
      }
      break;
    }
    default: break;
  }
  return 0;
}

}  // namespace detail

namespace {

std::uint16_t port_of_endpoint(const coap_endpoint_t* endpoint) {
  // coap_endpoint_str() prints the bound address and the protocol, "[::]:5684 DTLS" or "0.0.0.0:5683 UDP"; 4.3.1
  // has no getter for the address.
  const std::string text = coap_endpoint_str(endpoint);
  auto bound = parse_host_port(std::string_view(text).substr(0, text.find(' ')), PortZero::allowed);
  return bound ? bound->port : 0;
}

// One endpoint, its UDP port ours alone (address.hpp, "exclusive UDP ports"): libcoap 4.3.1 binds with
// SO_REUSEADDR, which would let it share the port with any other socket that sets it.
Result<coap_endpoint_t*> bind_exclusively(coap_context_t* context, const std::string& host, std::uint16_t port,
                                          coap_proto_t proto) {
  const std::string url = std::string(proto == COAP_PROTO_DTLS ? "coaps://" : "coap://") + host + ":" +
                          std::to_string(port);
  const auto refuse = [&](const Error& error) {
    return make_error(error.code, "cannot listen on " + url + ": " + error.message);
  };
  auto wanted = parse_address(host, port);
  if (!wanted.ok()) return std::move(wanted).error();
  auto numeric = numeric_address(host, port);
  if (!numeric.ok()) return std::move(numeric).error();
  if (auto free = check_udp_port_free(*numeric); !free.ok()) return refuse(free.error());
  coap_endpoint_t* endpoint = coap_new_endpoint(context, &*wanted, proto);
  if (endpoint == nullptr) return make_error(Errc::io, "cannot listen on " + url + " (address not configured?)");
  auto bound = numeric_address(host, port_of_endpoint(endpoint));
  if (!bound.ok()) return std::move(bound).error();
  if (auto exclusive = make_udp_port_exclusive(*bound); !exclusive.ok()) return refuse(exclusive.error());
  return endpoint;
}

}  // namespace

// ---- Node::Impl: session records and failures ----------------------------------------------------------------

Node::Impl::~Impl() {
  *alive = false;
  shutting_down = true;  // sessions our own tear-down aborts are not peer failures: no reports, no callbacks
  for (auto& [key, session] : client_cache) release_client_session(session);
  client_cache.clear();
  for (coap_session_t* session : graveyard) release_client_session(session);
  graveyard.clear();
  client_pki_contexts.clear();
  client_context.reset();
  server_context.reset();
}

// Drops our reference to a client session (the last one: libcoap frees it now). libcoap 4.3.1's
// coap_session_mfree deregisters every observation the session still holds (coap_cancel_observe, NON), and on a
// session that is no longer ESTABLISHED (the peer's close_notify, a failed handshake) coap_send_pdu opens a new
// DTLS handshake to send that: a stray ClientHello, and a leaked GnuTLS session if its setup fails
// (docs/transport.md §5). A closed session's observations ended with it, so it deregisters nothing.
void Node::Impl::release_client_session(coap_session_t* session) {
  if (coap_session_get_state(session) != COAP_SESSION_STATE_ESTABLISHED) coap_session_set_no_observe_cancel(session);
  coap_session_release(session);
}

void Node::Impl::report(FailureKind kind, const std::string& peer, const std::string& identity,
                        const std::string& reason) {
  if (shutting_down) return;
  switch (kind) {
    case FailureKind::handshake_failed:
    case FailureKind::handshake_timeout: ++counters.handshakes_failed; break;
    case FailureKind::request_rejected: ++counters.requests_rejected; break;
    case FailureKind::request_failed: ++counters.client_requests_failed; break;
    case FailureKind::limit: break;
  }
  publish(Failure{kind, peer, identity, reason});
}

// To the failure observer (or stderr) without counting it as a failure.
void Node::Impl::publish(const Failure& failure) {
  if (shutting_down) return;
  if (observer) {
    observer(failure);
  } else {
    std::cerr << format_failure(failure) << '\n';
  }
}

void Node::Impl::report_handshake_failure(SessionImpl& state, FailureKind kind, const std::string& reason) {
  if (state.failure_reported || state.established) return;
  state.failure_reported = true;
  report(kind, state.remote, state.offered_identity, reason);
}

std::string Node::Impl::handshake_failure_reason(const SessionImpl& state) const {
  if (!state.refusal.empty()) return state.refusal;
  if (state.timed_out && state.psk_key_supplied) {
    return "DTLS handshake did not complete within " + std::to_string(config.limits.handshake_timeout.count()) +
           " ms after the key for this identity was supplied: the peer's Finished did not verify (wrong PSK?) "
           "or the peer went away";
  }
  if (state.timed_out) {
    return "DTLS handshake did not complete within " + std::to_string(config.limits.handshake_timeout.count()) +
           " ms";
  }
  std::string backend = libcoap_reason_for(state.remote);
  return backend.empty() ? "DTLS handshake failed" : "DTLS handshake failed: " + backend;
}

SessionImpl& Node::Impl::state_for(coap_session_t* session) {
  auto it = sessions.find(session);
  if (it == sessions.end()) {
    const bool client = coap_session_get_type(session) == COAP_SESSION_TYPE_CLIENT;
    const bool secure = coap_session_get_proto(session) == COAP_PROTO_DTLS;
    it = sessions.emplace(session, std::make_unique<SessionImpl>(session, client, secure)).first;
    coap_session_set_app_data(session, it->second.get());
    if (secure) handshaking.insert(session);
    // Every session passes here before it sends a CON (client: at creation; server: at SESSION_NEW or its first
    // request), so the limit holds for requests and separate responses alike.
    coap_session_set_nstart(session, secure ? config.limits.nstart : config.limits.plain_nstart);
  }
  return *it->second;
}

// Our record of a session ends (libcoap freed it, or we released our last reference).
void Node::Impl::forget_session(coap_session_t* session) {
  handshaking.erase(session);
  awaiting_server_credentials.erase(session);
  sessions.erase(session);
}

// The handshake is done: the identity our callbacks verified becomes the session's peer identity.
void Node::Impl::mark_established(SessionImpl& state) {
  if (state.established) return;
  state.established = true;
  handshaking.erase(state.raw);
  if (state.verified) state.identity = *state.verified;
  if (!state.secure) return;
  ++counters.handshakes_completed;
  // The requests that waited for the handshake: nothing to send again any more, and their silence is counted
  // from now (Limits::silence_timeout).
  const auto now = Clock::now();
  const auto records = detail::records_received(state.raw);
  for (auto it = pending.lower_bound({state.raw, std::string()}); it != pending.end() && it->first.first == state.raw;
       ++it) {
    PendingRequest& request = it->second;
    request.replay.reset();
    request.records_at_send = records;  // end_if_silent too: what came before this point was the handshake
    request.packets_in_at_send = state.count.packets_in;
    if (request.silence_check) {
      request.silence_check = now + config.limits.silence_timeout;
      expect_by(*request.silence_check);
    }
  }
}

// ---- Node ----------------------------------------------------------------------------------------------------

Node::Node(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Node::~Node() = default;

Result<std::unique_ptr<Node>> Node::create(NodeConfig config) {
  ensure_sodium_initialised();
  start_libcoap_once();
  auto impl = std::make_unique<Impl>();
  impl->config = std::move(config);
  NodeConfig& cfg = impl->config;
  const Limits& limits = cfg.limits;
  // (A silence_timeout at or above request_timeout is allowed: the request's own timeout then comes first.)
  if (limits.silence_timeout.count() <= 0) {
    return make_error(Errc::invalid_argument, "transport limits: silence_timeout " +
                                                  std::to_string(limits.silence_timeout.count()) +
                                                  " ms: must be above 0");
  }
  if (limits.max_request_size == 0 || limits.max_client_sessions == 0 || limits.max_client_sessions > 900 ||
      limits.max_handshakes == 0 || limits.idle_timeout.count() <= 0 || limits.handshake_timeout.count() <= 0 ||
      limits.request_timeout.count() <= 0) {
    return make_error(Errc::invalid_argument,
                      "transport limits: sizes, counts and timeouts must be > 0, and max_client_sessions at most "
                      "900 (GnuTLS client sessions use select(), which aborts past ~1000 fds); got "
                      "max_client_sessions=" + std::to_string(limits.max_client_sessions));
  }
  for (const std::uint16_t nstart : {limits.nstart, limits.plain_nstart}) {
    if (nstart == 0 || nstart > kMaxNstart) {
      return make_error(Errc::invalid_argument, "transport limits: nstart " + std::to_string(nstart) +
                                                    " out of range: 1 (RFC 7252 default) to " +
                                                    std::to_string(kMaxNstart) + " messages in flight per session");
    }
  }
  if (cfg.accept_legacy_onem2m_options) {
    // Legacy RQI 257 and RSC 265 are critical and would need a third and fourth long-option slot (see new_context).
    return make_error(Errc::unsupported,
                      "accept_legacy_onem2m_options: libcoap 4.3.1 can register only two option numbers above 255 "
                      "per context, and FR 279 / RQI 283 / RSC 307 already use them; legacy FR 256 (elective) is "
                      "accepted anyway, legacy RQI 257 and RSC 265 cannot be");
  }
  if (!cfg.x509_by_server_name.empty() && !backend_selects_server_certificates()) {
    return make_error(Errc::unsupported, "server certificates chosen by server name (SNI) need the GnuTLS build; "
                                         "this is " + std::string(to_string(compiled_backend())) +
                                         " (libcoap 4.3.1's OpenSSL backend has no per-handshake hook for it)");
  }
  if ((cfg.rpk || cfg.raw_key_lookup) && !backend_supports_rpk()) {
    // OpenSSL accepts the setup and fails every handshake later (docs/transport.md §3): refuse at configuration time.
    return make_error(Errc::unsupported, "raw public keys (RFC 7250) need the GnuTLS build; this is " +
                                             std::string(to_string(compiled_backend())));
  }
  impl->epoll.reset(epoll_create1(EPOLL_CLOEXEC));
  if (impl->epoll.get() < 0) return make_error(Errc::io, std::string("epoll_create1: ") + std::strerror(errno));
  impl->post_signal.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (impl->post_signal.get() < 0) return make_error(Errc::io, std::string("eventfd: ") + std::strerror(errno));
  {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = impl->post_signal.get();
    if (epoll_ctl(impl->epoll.get(), EPOLL_CTL_ADD, impl->post_signal.get(), &event) != 0) {
      return make_error(Errc::io, std::string("epoll_ctl(ADD) of the post eventfd: ") + std::strerror(errno));
    }
  }

  if (!cfg.secure_addresses.empty() || !cfg.local_address.empty()) {
    std::string error;
    impl->server_context = impl->new_context(ContextRole::server, error);
    if (!impl->server_context) return make_error(Errc::internal, error);
    coap_context_t* context = impl->server_context.get();

    // Credentials first: coap_new_endpoint(DTLS) fails unless PSK or PKI is set up. With GnuTLS the
    // context never gets a PKI setup (set_up_server_pki), so it always gets the PSK one; on a node without PSK
    // keys select_certificates_by_name takes the PSK credentials off each session (no PSK suites offered).
    if (cfg.psk_lookup || detail::attaches_server_pki()) {
      coap_dtls_spsk_t& psk = impl->server_psk;
      std::memset(&psk, 0, sizeof(psk));
      psk.version = COAP_DTLS_SPSK_SETUP_VERSION;
      psk.validate_id_call_back = on_psk_identity;
      psk.id_call_back_arg = impl.get();
      if (coap_context_set_psk2(context, &psk) != 1) return make_error(Errc::internal, "coap_context_set_psk2 failed");
    }
    if (cfg.x509 || cfg.rpk || cfg.raw_key_lookup || !cfg.x509_by_server_name.empty()) {
      // One endpoint, every kind together: client certificates verified against the anchors of x509 (or the first
      // named certificate), raw keys by the lookup or the pins (docs/transport.md §3).
      const X509Credentials* first_named =
          cfg.x509_by_server_name.empty() ? nullptr : &cfg.x509_by_server_name.begin()->second;
      auto set_up = impl->set_up_server_pki(cfg.x509 ? &*cfg.x509 : first_named);
      if (!set_up.ok()) return std::move(set_up).error();
      if (cfg.rpk) {
        RpkCredentials raw_key = std::move(*cfg.rpk);  // lives in server_raw_key from here on
        cfg.rpk.reset();
        if (auto put = impl->put_server_raw_key(std::move(raw_key)); !put.ok()) return std::move(put).error();
      }
      auto named = std::move(cfg.x509_by_server_name);  // the table lives in named_certificates from here on
      cfg.x509_by_server_name.clear();
      for (auto& [name, credentials] : named) {
        if (auto put = impl->put_named_certificate(name, std::move(credentials)); !put.ok()) {
          return std::move(put).error();
        }
      }
    }
    if (!cfg.secure_addresses.empty() && !cfg.psk_lookup && !impl->server_pki_set) {
      return make_error(Errc::invalid_argument,
                        "secure endpoint without credentials: configure PSK, X.509 or RPK (never run without DTLS)");
    }

    std::uint16_t port = cfg.secure_port;
    for (const auto& host : cfg.secure_addresses) {
      auto endpoint = bind_exclusively(context, host, port, COAP_PROTO_DTLS);
      if (!endpoint.ok()) return std::move(endpoint).error();
      port = port_of_endpoint(*endpoint);  // with port 0, every address family gets the first one's port
      impl->bound_secure_port = port;
    }
    if (!cfg.local_address.empty()) {
      auto address = parse_address(cfg.local_address, cfg.local_port);
      if (!address.ok()) return std::move(address).error();
      if (!is_loopback(address->addr.sa)) {
        return make_error(Errc::invalid_argument, "local (plain CoAP) endpoint '" + cfg.local_address +
                                                      "' is not a loopback address: only 127.0.0.0/8 or ::1 allowed");
      }
      auto endpoint = bind_exclusively(context, cfg.local_address, cfg.local_port, COAP_PROTO_UDP);
      if (!endpoint.ok()) return std::move(endpoint).error();
      impl->bound_local_port = port_of_endpoint(*endpoint);
    }
    // One catch-all resource; routing by method and path prefix is ours (add_route).
    coap_resource_t* resource = coap_resource_unknown_init2(on_request, 0);
    for (const coap_request_t method : {COAP_REQUEST_GET, COAP_REQUEST_POST, COAP_REQUEST_PUT,
                                        COAP_REQUEST_DELETE, COAP_REQUEST_FETCH, COAP_REQUEST_PATCH,
                                        COAP_REQUEST_IPATCH}) {
      coap_register_request_handler(resource, method, on_request);
    }
    coap_add_resource(context, resource);
    // Proxy-Uri requests (a local AE naming its target AE, PROTOCOL.md §6; on the secure endpoint, an outer ESPrim
    // message for a relay, docs/relay.md): without a proxy resource libcoap answers them 5.05 itself (RFC 7252
    // §5.7.2). The one name it is "known by" is reserved (RFC 6761 .invalid), so no
    // Proxy-Uri host is ever taken for this node; the request reaches on_request and our routes with no Uri-Path.
    const char* own_proxy_names[] = {"dauthd.proxy.invalid"};  // copied by libcoap
    coap_resource_t* proxy = coap_resource_proxy_uri_init2(on_request, 1, own_proxy_names, 0);
    if (proxy == nullptr) return make_error(Errc::internal, "coap_resource_proxy_uri_init2 failed");
    coap_add_resource(context, proxy);
    if (auto added = impl->add_context_to_loop(context); !added.ok()) return std::move(added).error();
  }
  return std::unique_ptr<Node>(new Node(std::move(impl)));
}

void Node::set_failure_observer(FailureObserver observer) { impl_->observer = std::move(observer); }

std::uint16_t Node::secure_port() const noexcept { return impl_->bound_secure_port; }
std::uint16_t Node::local_port() const noexcept { return impl_->bound_local_port; }

Stats Node::stats() const {
  Stats stats = impl_->counters;
  stats.live_server_sessions = 0;
  stats.live_server_handshakes = 0;
  for (const auto& [raw, state] : impl_->sessions) {
    if (state->client) continue;
    ++stats.live_server_sessions;
    if (state->secure && !state->established) ++stats.live_server_handshakes;
  }
  stats.live_client_sessions = impl_->client_cache.size();
  return stats;
}

std::vector<SessionSummary> Node::live_sessions() const {
  std::vector<SessionSummary> out;
  for (const auto& [raw, state] : impl_->sessions) {
    if (state->dead || (state->secure && !state->established)) continue;
    SessionSummary summary;
    summary.client = state->client;
    summary.secure = state->secure;
    summary.peer = state->identity;
    summary.grant = state->granted;
    summary.credential_id = state->credential;
    summary.remote_address = state->remote;
    summary.server_name = state->sni;
    summary.cipher_suite = state->cipher_suite();
    summary.created = state->created_at;
    summary.last_received = state->last_received;
    summary.counters = state->count;
    out.push_back(std::move(summary));
  }
  std::stable_sort(out.begin(), out.end(),
                   [](const SessionSummary& a, const SessionSummary& b) { return a.created < b.created; });
  return out;
}

}  // namespace dauth::transport
