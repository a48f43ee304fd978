// Node: the libcoap 4.3.1 contexts of this process, their DTLS credentials, sessions and request routing.
//
// Every libcoap trap this file works around is listed, with what was measured, in docs/transport.md §3. The loop is
// single-threaded; libcoap callbacks never block and never call back into user code that could re-enter libcoap,
// except request handlers, which must fill the response synchronously.
#include <arpa/inet.h>
#include <fcntl.h>
#include <coap3/coap.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

#include "dauth/crypto/kdf.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/transport/transport.hpp"
#include "tls_backend.hpp"

namespace dauth::transport {

namespace {

using Clock = std::chrono::steady_clock;

// Below FD_SETSIZE (1024) with room for the fds a GnuTLS handshake and libcoap open meanwhile.
constexpr int kHighestSelectableFd = 1000;

// ---- RAII for C handles (STYLE.md: no naked free) --------------------------------------------------------------

struct ContextDeleter {
  void operator()(coap_context_t* context) const noexcept { coap_free_context(context); }
};
using ContextPtr = std::unique_ptr<coap_context_t, ContextDeleter>;

struct OptlistDeleter {
  void operator()(coap_optlist_t* list) const noexcept { coap_delete_optlist(list); }
};

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const noexcept { return fd_; }
  void reset(int fd) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// ---- libcoap's own log lines: kept (never printed) so that a failure report can quote the backend's reason ----

std::deque<std::string>& libcoap_warnings() {
  static std::deque<std::string> lines;
  return lines;
}

// DAUTH_TRANSPORT_DEBUG=1 echoes libcoap's debug log to stderr (never on in production: it prints addresses and
// identities). Never keys: libcoap logs every PDU with its payload (coap_show_pdu), and payloads carry keys (a
// usage-constrained key, an enrolment answer), so its PDU lines are echoed without their payload.
bool libcoap_debug_enabled() {
  static const bool enabled = std::getenv("DAUTH_TRANSPORT_DEBUG") != nullptr;
  return enabled;
}

// A line of coap_show_pdu: "v:1 t:CON c:GET i:… {token} [ options ] :: payload", then for binary payloads a hex
// and a character dump, each "<<…>>". Returns what may be shown of it: the header and options, never the payload.
std::optional<std::string> pdu_line_without_payload(std::string_view line) {
  if (line.rfind("<<", 0) == 0) return std::string();  // a dump of the payload: nothing of it
  if (line.rfind("v:", 0) != 0) return std::nullopt;   // not a PDU line
  const auto payload = line.find(" :: ");
  if (payload == std::string_view::npos) return std::string(line);
  return std::string(line.substr(0, payload)) + " :: (payload not shown)\n";
}

void capture_libcoap_log(coap_log_t level, const char* message) {
  if (message != nullptr && libcoap_debug_enabled()) {
    const auto pdu = pdu_line_without_payload(message);
    if (!pdu) {
      std::cerr << "libcoap: " << message;
    } else if (!pdu->empty()) {
      std::cerr << "libcoap: " << *pdu;
    }
  }
  if (level > LOG_WARNING || message == nullptr) return;
  std::string line(message);
  while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
  const auto start = line.find_first_not_of(" *");
  line.erase(0, start == std::string::npos ? line.size() : start);
  auto& lines = libcoap_warnings();
  lines.push_back(std::move(line));
  if (lines.size() > 64) lines.pop_front();
}

// The newest backend warning that names this peer address, if any.
std::string libcoap_reason_for(const std::string& remote) {
  const auto& lines = libcoap_warnings();
  for (auto it = lines.rbegin(); it != lines.rend(); ++it) {
    if (it->find(remote) != std::string::npos) return *it;
  }
  return {};
}

void start_libcoap_once() {
  static const bool started = [] {
    coap_startup();
    coap_set_log_handler(capture_libcoap_log);
    // PDU lines through the handler above, not straight to stderr (libcoap's default): it keeps their payloads out.
    coap_set_show_pdu_output(0);
    coap_set_log_level(libcoap_debug_enabled() ? LOG_DEBUG : LOG_WARNING);
    coap_dtls_set_log_level(LOG_WARNING);
    return true;
  }();
  (void)started;
}

std::string address_text(const coap_address_t* address) {
  if (address == nullptr) return "?";
  unsigned char buffer[INET6_ADDRSTRLEN + 16] = {};
  const size_t length = coap_print_addr(address, buffer, sizeof(buffer));
  return std::string(reinterpret_cast<const char*>(buffer), length);
}

Result<coap_address_t> parse_address(const std::string& host, std::uint16_t port) {
  coap_address_t address;
  coap_address_init(&address);
  in_addr v4{};
  in6_addr v6{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) {
    address.addr.sin.sin_family = AF_INET;
    address.addr.sin.sin_addr = v4;
    address.addr.sin.sin_port = htons(port);
    address.size = sizeof(address.addr.sin);
  } else if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    address.addr.sin6.sin6_family = AF_INET6;
    address.addr.sin6.sin6_addr = v6;
    address.addr.sin6.sin6_port = htons(port);
    address.size = sizeof(address.addr.sin6);
  } else {
    return make_error(Errc::invalid_argument, "address '" + host +
                                                  "' is not a numeric IPv4 or IPv6 address (names are not resolved "
                                                  "here: no blocking DNS in the loop)");
  }
  return address;
}

bool is_loopback(const coap_address_t& address) {
  if (address.addr.sa.sa_family == AF_INET) return (ntohl(address.addr.sin.sin_addr.s_addr) >> 24) == 127;
  if (address.addr.sa.sa_family == AF_INET6) return IN6_IS_ADDR_LOOPBACK(&address.addr.sin6.sin6_addr);
  return false;
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

}  // namespace

// ---- Session ---------------------------------------------------------------------------------------------------

namespace {

class SessionImpl final : public Session {
 public:
  SessionImpl(coap_session_t* raw_session, bool client_side, bool secure_session)
      : raw(raw_session),
        client(client_side),
        secure(secure_session),
        remote(address_text(coap_session_get_addr_remote(raw_session))),
        created_at(std::chrono::system_clock::now()),
        started(Clock::now()) {}

  const PeerIdentity& peer() const override { return identity; }
  const std::string& credential_id() const override { return credential; }
  const std::string& remote_address() const override { return remote; }
  const std::string& server_name() const override { return sni; }
  const SessionGrant& grant() const override { return granted; }
  bool is_client() const override { return client; }
  Backend backend() const override { return detail::backend(); }
  std::string cipher_suite() const override { return secure && established ? detail::cipher_suite(raw) : ""; }
  std::chrono::system_clock::time_point created() const override { return created_at; }
  SessionCounters counters() const override { return count; }

  Result<SecretBuffer> export_keying_material(std::string_view label, std::size_t length) const override {
    if (!secure) {
      return make_error(Errc::unsupported, "RFC 5705 export on plain CoAP session with " + remote +
                                               ": only DTLS sessions have keying material");
    }
    if (!established) {
      return make_error(Errc::internal, "RFC 5705 export on session with " + remote +
                                            " before its handshake completed (use it from a request handler or "
                                            "a response callback)");
    }
    return detail::export_keying_material(raw, label, length);
  }

  coap_session_t* raw;
  bool client;
  bool secure;
  std::string remote;
  std::chrono::system_clock::time_point created_at;
  Clock::time_point started;
  PeerIdentity identity;
  std::string credential;
  SessionCounters count;

  // Handshake bookkeeping. Server sessions learn the peer in the DTLS callbacks and take it on the first request
  // (GnuTLS raises no DTLS_CONNECTED for server sessions: docs/transport.md §3).
  bool established = false;
  bool failure_reported = false;
  bool psk_key_supplied = false;
  bool timed_out = false;
  bool dead = false;                     // client: failed or closed; released after coap_io_process
  bool close_requested = false;          // server: a response asked to end the session once it is sent
  unsigned handshake_attempt = 1;        // client: which try at reaching this peer it is (restart_stalled_handshakes)
  // Client handshake: the records sent and received when last seen, and when either last moved.
  std::optional<std::pair<std::uint64_t, std::uint64_t>> handshake_records;
  Clock::time_point handshake_progress = Clock::now();
  std::string offered_identity;
  std::string sni;                       // server: the name the client's ClientHello carried
  std::optional<PeerIdentity> verified;  // from validate_id / validate_cn
  SessionGrant granted;                  // server: set with `verified`, by the same callback
  std::string refusal;                   // our own reason for refusing, set in a callback
  std::string cache_key;                 // client: key in the session cache
  std::string expected_peer;             // client, x509: required AE-ID or dNSName of the server
  // Server, GnuTLS (docs/transport.md §3): the TLS object the node's certificate credentials went on (libcoap
  // recreates it after a failed ClientHello), and the certificate its handshake presents, kept alive while GnuTLS
  // may use it even if the certificate is replaced meanwhile.
  const void* server_pki_attached_to = nullptr;
  std::shared_ptr<const detail::ServerCertificate> presented_certificate;
  std::string presented_local_ae_id;     // X509Credentials::local_ae_id of presented_certificate
};

}  // namespace

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

// ---- Observation (client side of RFC 7641) ---------------------------------------------------------------------

struct Observation::State {
  std::weak_ptr<bool> node_alive;
  Node::Impl* impl = nullptr;
  coap_session_t* session = nullptr;
  std::string token;
  NotificationHandler handler;
  std::optional<std::chrono::steady_clock::time_point> first_answer_deadline;  // until the first answer
  std::uint64_t packets_in_at_send = 0;  // as in PendingRequest
  std::optional<std::uint64_t> records_at_send;  // as in PendingRequest
  bool ended = false;      // the final call is queued or done
  bool cancelled = false;  // by the owner: no call from then on
};

// ---- Node::Impl ------------------------------------------------------------------------------------------------

namespace {

struct Route {
  Method method;
  std::vector<std::string> prefix;
  Access access;
  RequestHandler handler;
  bool exact = false;  // add_observable: the path itself only, not what lies below it
};

enum class ContextRole : std::uint8_t { server, client };

// restart_stalled_handshakes: how long a client handshake may send and receive nothing at all (longer than GnuTLS's
// second retransmission timer, 2 s, plus a round trip), and how many attempts a request gets.
constexpr std::chrono::milliseconds kHandshakeStall{2500};
constexpr unsigned kMaxHandshakeAttempts = 3;

// What a request needs to go again on a new session: kept for requests sent while their session's handshake ran
// (nothing of them has left yet, so sending them again is always safe: restart_stalled_handshakes).
struct Replay {
  Peer peer;
  ClientCredentials credentials;
  Request request;
  unsigned attempt = 1;
};

struct PendingRequest {
  ResponseHandler handler;
  Clock::time_point deadline;
  coap_session_t* session;
  std::uint64_t packets_in_at_send = 0;  // the session's count then: nothing since = the peer went silent
  // Limits::silence_timeout (DTLS sessions, requests that may_repeat): when to look whether the peer sent anything
  // at all since, and the session's DTLS read counter at the send (taken by mark_established for a request sent
  // while the handshake ran). Cleared once anything was heard (a slow peer, not a gone one) or where it cannot be
  // told.
  std::optional<Clock::time_point> silence_check;
  std::optional<std::uint64_t> records_at_send;
  std::shared_ptr<Replay> replay;  // set while the request waits for its session's handshake
};

// What a PKI context accepts from its peers (validate_cn_call_back argument).
struct PkiPolicy {
  Node::Impl* node = nullptr;
  bool rpk = false;
  std::set<std::string> pinned_keys;
};

// A client context for one PKI credential: coap_new_client_session_pki() overwrites the context's PKI setup
// (docs/transport.md §3), so each distinct credential gets its own context. libcoap keeps a shallow copy of the setup,
// so the buffers live here as long as the context.
struct ClientPkiContext {
  SecretBuffer key_pem;
  SecretBuffer chain_pem;
  SecretBuffer trust_pem;
  std::set<std::string> snis;  // stable storage: the context's shallow setup copy points at the last one used
  PkiPolicy policy;
  coap_dtls_pki_t setup{};
  std::string our_key_id;
  ContextPtr context;  // last: freed first
};

}  // namespace

struct Node::Impl {
  NodeConfig config;
  UniqueFd epoll;
  std::shared_ptr<bool> alive = std::make_shared<bool>(true);
  bool shutting_down = false;
  bool in_housekeeping = false;
  bool running_completions = false;
  std::vector<coap_session_t*> graveyard;  // dead client sessions still referenced by us, released in housekeeping

  // Server credentials that libcoap points into (must outlive server_context).
  SecretBuffer server_key_pem;
  SecretBuffer server_chain_pem;
  SecretBuffer server_trust_pem;
  PkiPolicy server_policy;
  coap_dtls_pki_t server_pki{};
  coap_dtls_spsk_t server_psk{};
  // GnuTLS: the certificate credentials, built once (set_up_server_pki) and attached to each server session
  // (select_certificates_by_name) instead of a PKI setup libcoap would parse for every session (docs/transport.md
  // §3); the server_*_pem above stay empty. The certificates it presents, parsed once: the default (x509) and those
  // by server name (x509_by_server_name, set_server_certificate).
  std::shared_ptr<const detail::ServerPki> server_credentials;
  std::shared_ptr<const detail::ServerCertificate> default_certificate;
  struct NamedCertificate {
    std::shared_ptr<const detail::ServerCertificate> certificate;
    std::string local_ae_id;  // X509Credentials::local_ae_id: the grant of the sessions it is presented to
  };
  std::map<std::string, NamedCertificate> named_certificates;
  // config.x509's local_ae_id: the grant of the sessions the default certificate is presented to (OpenSSL: all).
  const std::string& default_local_ae_id() const {
    static const std::string none;
    return config.x509 ? config.x509->local_ae_id : none;
  }
  std::set<coap_session_t*> awaiting_server_credentials;  // server sessions whose handshake may still need them
  bool server_pki_set = false;     // server credentials set up (either backend)
  std::string client_trust_anchors_pem;  // what client certificates are verified against (x509 or first named)
  SecretBuffer etag_key = SecretBuffer::random(crypto::kShortHashKeySize);  // content_etag()
  SecretBuffer psk_in_flight;  // returned by validate_id; libcoap copies it at once (docs/transport.md §3)
  coap_bin_const_t psk_in_flight_view{};

  std::uint16_t bound_secure_port = 0;
  std::uint16_t bound_local_port = 0;

  std::vector<Route> routes;
  FailureObserver observer;
  Stats counters;

  std::map<coap_session_t*, std::unique_ptr<SessionImpl>> sessions;
  // The loop's work follows what happened, not what exists (docs/transport.md §7): these name the few sessions a
  // round must look at, so that idle established sessions cost nothing per round.
  std::set<coap_session_t*> handshaking;          // secure sessions whose handshake has not ended (either side)
  std::vector<coap_session_t*> close_requests;    // server sessions to end once this round's responses are out
  bool client_session_died = false;               // some client session is dead: housekeeping releases it
  bool server_sweep_wanted = false;               // the server context must run once even if its fd is quiet
  bool client_contexts_touched = false;           // we opened, used or released a client session outside a round
  // The earliest request deadline, silence check or first-answer deadline: before it, housekeeping does not look
  // at the pending requests at all. Lowered by every new deadline (expect_by), recomputed by the scan.
  Clock::time_point next_deadline = Clock::time_point::max();
  std::map<std::string, coap_session_t*> client_cache;
  std::map<std::pair<coap_session_t*, std::string>, PendingRequest> pending;
  std::map<std::pair<coap_session_t*, std::string>, std::shared_ptr<Responder::State>> deferred;
  std::vector<std::function<void()>> completions;  // user callbacks, run after coap_io_process returns
  std::vector<std::function<void()>> posted;       // Node::post(), run after the completions
  std::multimap<Clock::time_point, std::function<void()>> timers;  // Node::post_after()
  std::map<int, std::function<void()>> watches;                     // Node::add_watch(): fd -> run each round
  std::uint64_t watches_generation = 0;                             // changes with every add_watch / remove_watch
  std::map<std::string, coap_resource_t*> observables;             // "a/b" -> its resource (owned by the context)
  std::map<std::pair<coap_session_t*, std::string>, std::shared_ptr<Observation::State>> observations;
  bool in_libcoap = false;  // inside coap_io_process: libcoap callbacks (request handlers) are running
  UniqueFd post_signal;                            // eventfd in `epoll`: readable while `posted` is not empty
  std::set<std::string> client_snis;  // the PSK client sessions' SNIs, which libcoap points into (client_session_for)

  // Declared last so they are freed first: freeing a context raises SESSION_DEL events that use the maps above.
  std::map<std::string, std::unique_ptr<ClientPkiContext>> client_pki_contexts;
  ContextPtr client_context;  // plain and PSK client sessions (each session carries its own PSK)
  ContextPtr server_context;

  ~Impl() {
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
  static void release_client_session(coap_session_t* session) {
    if (coap_session_get_state(session) != COAP_SESSION_STATE_ESTABLISHED) coap_session_set_no_observe_cancel(session);
    coap_session_release(session);
  }

  // -- failures --

  void report(FailureKind kind, const std::string& peer, const std::string& identity, const std::string& reason) {
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
  void publish(const Failure& failure) {
    if (shutting_down) return;
    if (observer) {
      observer(failure);
    } else {
      std::cerr << format_failure(failure) << '\n';
    }
  }

  void report_handshake_failure(SessionImpl& state, FailureKind kind, const std::string& reason) {
    if (state.failure_reported || state.established) return;
    state.failure_reported = true;
    report(kind, state.remote, state.offered_identity, reason);
  }

  std::string handshake_failure_reason(const SessionImpl& state) const {
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

  // -- sessions --

  SessionImpl& state_for(coap_session_t* session) {
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
  void forget_session(coap_session_t* session) {
    handshaking.erase(session);
    awaiting_server_credentials.erase(session);
    sessions.erase(session);
  }

  void expect_by(Clock::time_point deadline) { next_deadline = std::min(next_deadline, deadline); }

  // A client session that failed or was closed: no new request uses it, housekeeping releases it.
  void mark_dead(SessionImpl& state) {
    state.dead = true;
    if (state.client) client_session_died = true;
  }

  // A server session to end once this round's responses are out (housekeeping; never inside a libcoap callback).
  void request_close(SessionImpl& state) {
    if (state.close_requested) return;
    state.close_requested = true;
    close_requests.push_back(state.raw);
  }

  // The handshake is done: the identity our callbacks verified becomes the session's peer identity.
  void mark_established(SessionImpl& state) {
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

  // -- client sessions --

  void fail_pending_of(coap_session_t* session, const Error& error) {
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
  void notify(const std::shared_ptr<Observation::State>& observation, Result<Response> result,
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

  void complete(PendingRequest request, Result<Response> result, const SessionImpl* state) {
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
  void end_if_silent(SessionImpl& state, std::uint64_t packets_in_at_send,
                     const std::optional<std::uint64_t>& records_at_send) {
    if (!state.client || state.count.packets_in != packets_in_at_send) return;
    if (records_at_send && detail::records_received(state.raw) != records_at_send) return;
    mark_dead(state);
  }

  // Limits::silence_timeout: ends the established DTLS client sessions on which a request has waited that long
  // without a single record from the peer since it was sent.
  void end_silent_sessions(Clock::time_point now) {
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
  void restart_stalled_handshakes(Clock::time_point now) {
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

  void kill_client_session(SessionImpl& state, const Error& error) {
    mark_dead(state);
    fail_pending_of(state.raw, error);
  }

  void housekeeping();
  // Housekeeping's scan of the requests and subscriptions, run only once next_deadline has come: ends those past
  // their deadline or silent for too long, and computes next_deadline anew.
  void end_due_requests(Clock::time_point now);
  void run_posted() {
    if (posted.empty()) return;
    eventfd_t signalled = 0;
    const int cleared = eventfd_read(post_signal.get(), &signalled);  // non-blocking: resets the counter to 0
    (void)cleared;  // EAGAIN only if already 0: nothing to clear
    auto batch = std::move(posted);
    posted.clear();
    for (auto& work : batch) work();
  }
  void run_due_timers() {
    if (timers.empty()) return;
    const auto now = Clock::now();
    std::vector<std::function<void()>> due;
    while (!timers.empty() && timers.begin()->first <= now) {
      due.push_back(std::move(timers.begin()->second));
      timers.erase(timers.begin());
    }
    for (auto& work : due) work();
  }
  void run_watches() {
    const std::uint64_t generation = watches_generation;
    for (auto it = watches.begin(); it != watches.end(); ++it) {
      it->second();
      if (watches_generation != generation) break;  // a handler added or removed a watch: the rest run next round
    }
  }
  void run_completions() {
    if (running_completions) return;
    running_completions = true;
    while (!completions.empty()) {
      auto batch = std::move(completions);
      completions.clear();
      for (auto& call : batch) call();
    }
    running_completions = false;
  }

  Result<coap_session_t*> client_session_for(const Peer& peer, const ClientCredentials& credentials);
  // Node::request, and a request sent again by restart_stalled_handshakes (attempt > 1) with its first deadline.
  void send_request(const Peer& peer, const ClientCredentials& credentials, Request request, ResponseHandler handler,
                    Clock::time_point deadline, unsigned attempt);
  // A request PDU for session, with a fresh token (returned in token_out); Observe 0 when observe is set.
  coap_pdu_t* build_request_pdu(coap_session_t* session, SessionImpl& state, Request& request, bool observe,
                                std::string& token_out);
  // The session cache key: peer, credential, SNI, expected peer. Without create_pki_context, a PKI credential that
  // has no client context yet gets not_found (it cannot have a session either).
  Result<std::string> cache_key_for(const Peer& peer, const ClientCredentials& credentials, bool create_pki_context,
                                    ClientPkiContext** pki_out = nullptr);
  static std::string pki_context_key(const ClientCredentials& credentials);
  Result<ClientPkiContext*> client_pki_context(const ClientCredentials& credentials);
  Result<void> add_context_to_loop(coap_context_t* context);
  ContextPtr new_context(ContextRole role, std::string& error);

  // Server PKI from one certificate's trust anchors (x509; for named certificates, the first one's) or a raw key:
  // credentials built once (GnuTLS) or the context's setup (OpenSSL).
  Result<void> set_up_server_pki(const X509Credentials* x509, const RpkCredentials* rpk);
  Result<void> put_named_certificate(const std::string& server_name, X509Credentials credentials);
  // After each server round (GnuTLS): attaches the server credentials, whose certificate is chosen by server name,
  // to the handshakes that got a TLS object since. Touches only sessions still in their handshake's first flights.
  void select_certificates_by_name();
};

namespace {

Node::Impl* impl_of(const coap_session_t* session) {
  return static_cast<Node::Impl*>(coap_get_app_data(coap_session_get_context(session)));
}

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
    return nullptr;  // libcoap/GnuTLS answer with a fatal unknown_psk_identity alert
  }
  impl->psk_in_flight = std::move(granted->key);
  impl->psk_in_flight_view = {impl->psk_in_flight.size(), impl->psk_in_flight.data()};
  state.psk_key_supplied = true;
  state.verified = PeerIdentity{PeerKind::psk, state.offered_identity, {}};
  state.granted = SessionGrant{std::move(granted->peer_ae_id), std::move(granted->local_ae_id)};
  state.credential = state.offered_identity;
  return &impl->psk_in_flight_view;
}

bool client_side_of(const coap_session_t* session) {
  return coap_session_get_type(session) == COAP_SESSION_TYPE_CLIENT;
}

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
  if (policy->rpk != raw_key) {
    return refuse(policy->rpk ? "peer sent a certificate where a raw public key was required"
                              : "peer sent a raw public key where a certificate was required");
  }
  if (!validated) return refuse("peer certificate did not verify against the trust anchors");
  if (raw_key) {
    auto key_id = crypto::public_key_id_from_spki(bytes);
    if (!key_id.ok()) return refuse("peer raw public key unreadable: " + key_id.error().message);
    state.offered_identity = *key_id;
    if (policy->pinned_keys.count(*key_id) == 0) return refuse("raw public key " + *key_id + " is not pinned");
    PeerIdentity peer{PeerKind::rpk, *key_id, {}};
    if (impl->config.peer_check) {  // server and client sessions alike (transport.hpp)
      if (auto allowed = impl->config.peer_check(peer); !allowed.ok()) {
        return refuse("peer check refused raw public key " + *key_id + ": " + allowed.error().message);
      }
    }
    state.verified = std::move(peer);
    if (!client_side_of(session)) state.granted = SessionGrant{*key_id, {}};  // no local AE presents a raw key
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
  PeerIdentity peer{PeerKind::x509, state.offered_identity, certificate->serial_hex()};
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

// ---- events, responses, NACKs ------------------------------------------------------------------------------------

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

Bytes pdu_payload(const coap_pdu_t* pdu) {
  size_t length = 0;
  const uint8_t* data = nullptr;
  size_t offset = 0;
  size_t total = 0;
  if (coap_get_data_large(pdu, &length, &data, &offset, &total) == 0) return {};
  return Bytes(data, data + length);
}

int coap_code_to_int(coap_pdu_code_t code) {
  const auto value = static_cast<unsigned>(code);
  return static_cast<int>((value >> 5) * 100 + (value & 0x1f));
}

coap_response_t on_response(coap_session_t* session, const coap_pdu_t* /*sent*/, const coap_pdu_t* received,
                            const coap_mid_t /*mid*/) {
  Node::Impl* impl = impl_of(session);
  if (impl == nullptr) return COAP_RESPONSE_OK;
  SessionImpl& state = impl->state_for(session);
  impl->mark_established(state);  // a response came through the DTLS layer: the handshake is done
  state.count.packets_in++;
  state.count.bytes_in += pdu_size(received);
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
  response.payload = pdu_payload(received);
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

// ---- request dispatch (server side) --------------------------------------------------------------------------

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

void release_heap_bytes(coap_session_t* /*session*/, void* bytes) { delete static_cast<Bytes*>(bytes); }

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
  state.count.bytes_out += response.payload.size() + 4;
  // Carried out in housekeeping, after coap_io_process has sent this response (closing here would drop it).
  if (response.close_session && state.secure && !state.client) impl.request_close(state);
  if (!response.payload.empty()) {
    // libcoap adds Content-Format only for a non-zero media type (block.c coap_add_data_large_response): 0 means
    // "none" there, so an explicit 0 (text/plain) is added here, and an unset one sends no option at all.
    if (response.content_format == std::uint16_t{0}) coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, 0, nullptr);
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
    state.identity = PeerIdentity{PeerKind::local, state.remote, {}};
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

}  // namespace

// ---- Node::Impl: contexts, loop, client --------------------------------------------------------------------

ContextPtr Node::Impl::new_context(ContextRole role, std::string& error) {
  ContextPtr context(coap_new_context(nullptr));
  if (!context) {
    error = "coap_new_context failed";
    return nullptr;
  }
  coap_set_app_data(context.get(), this);
  // Bodies over one datagram arrive by Block1/Block2 (RFC 7959), reassembled by libcoap, so that the 4 KiB limit
  // (PROTOCOL.md §2) is checked on the whole body.
  coap_context_set_block_mode(context.get(), COAP_BLOCK_USE_LIBCOAP | COAP_BLOCK_SINGLE_BODY);
  // Unregistered critical options get 4.02 Bad Option in requests and an RST for responses (PROTOCOL.md §6). libcoap
  // 4.3.1's known-option filter has only two slots for numbers above 255 (COAP_OPT_FILTER_LONG = 2; a third
  // registration is silently lost), so each context registers the two it receives: a server context gets requests
  // (FR 279, RQI 283), a client context gets responses (RQI 283, RSC 307).
  if (role == ContextRole::server) {
    coap_register_option(context.get(), kOptionOneM2mFrom);
    coap_register_option(context.get(), kOptionOneM2mRequestId);
  } else {
    coap_register_option(context.get(), kOptionOneM2mRequestId);
    coap_register_option(context.get(), kOptionOneM2mResponseStatus);
  }
  coap_register_event_handler(context.get(), on_event);
  coap_register_response_handler(context.get(), on_response);
  coap_register_nack_handler(context.get(), on_nack);
  // Explicit limits instead of libcoap's defaults (docs/transport.md §2).
  coap_context_set_session_timeout(context.get(), static_cast<unsigned>(config.limits.idle_timeout.count()));
  coap_context_set_max_idle_sessions(context.get(), static_cast<unsigned>(config.limits.max_sessions));
  coap_context_set_max_handshake_sessions(context.get(), static_cast<unsigned>(config.limits.max_handshakes));
  return context;
}

Result<void> Node::Impl::add_context_to_loop(coap_context_t* context) {
  const int fd = coap_context_get_coap_fd(context);
  if (fd < 0) return make_error(Errc::unsupported, "libcoap was built without epoll support");
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = fd;
  if (epoll_ctl(epoll.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
    return make_error(Errc::io, std::string("epoll_ctl(ADD) of libcoap's fd failed: ") + std::strerror(errno));
  }
  return ok_result();
}

void Node::Impl::housekeeping() {
  // A completion handler may call close_client_sessions(), which lands here again: one pass at a time.
  if (in_housekeeping) return;
  in_housekeeping = true;
  struct Reset {
    bool& flag;
    ~Reset() { flag = false; }
  } reset{in_housekeeping};
  const auto now = Clock::now();
  restart_stalled_handshakes(now);
  // Handshakes: bounded by Limits::max_handshakes (server) and the client sessions being set up, whatever the
  // number of established sessions. A copy, since mark_established and the timeouts below change the set.
  std::vector<coap_session_t*> to_disconnect;
  const std::vector<coap_session_t*> unfinished(handshaking.begin(), handshaking.end());
  for (coap_session_t* raw : unfinished) {
    SessionImpl& state = *sessions.at(raw);
    if (state.established || state.dead || state.timed_out) {
      handshaking.erase(raw);
      continue;
    }
    if (coap_session_get_state(raw) == COAP_SESSION_STATE_ESTABLISHED) {
      mark_established(state);
      continue;
    }
    if (now - state.started > config.limits.handshake_timeout) {
      state.timed_out = true;
      handshaking.erase(raw);
      if (state.client) {
        // libcoap sends no alert for a wrong PSK: the client only ever sees silence (docs/transport.md §3).
        std::string reason = "DTLS handshake with " + state.remote + " did not complete within " +
                             std::to_string(config.limits.handshake_timeout.count()) + " ms";
        if (state.identity.kind == PeerKind::psk) {
          reason += " and the server sent no alert: most likely a wrong PSK for identity '" +
                    state.offered_identity + "' (libcoap answers a bad Finished with silence)";
        }
        state.refusal = reason;
        report_handshake_failure(state, FailureKind::handshake_timeout, reason);
        kill_client_session(state, make_error(Errc::timeout, reason));
      } else {
        to_disconnect.push_back(raw);
      }
    }
  }
  for (coap_session_t* raw : to_disconnect) {
    // Raises DTLS_CLOSED (reported in on_event); libcoap frees the session on its next sweep.
    coap_session_disconnected(raw, COAP_NACK_TLS_FAILED);
    server_sweep_wanted = true;
  }
  const auto closing = std::move(close_requests);
  close_requests.clear();
  for (coap_session_t* raw : closing) {
    auto found = sessions.find(raw);
    if (found == sessions.end()) continue;  // libcoap freed it meanwhile
    SessionImpl& state = *found->second;
    if (state.client || !state.close_requested) continue;
    state.close_requested = false;
    if (coap_session_get_state(raw) == COAP_SESSION_STATE_NONE) continue;
    // Sends close_notify (gnutls_bye / SSL_shutdown in coap_dtls_free_session) and sets the state to NONE; libcoap
    // frees the session at its next sweep (SERVER_SESSION_DEL). The response went out in coap_io_process already.
    coap_session_disconnected(raw, COAP_NACK_NOT_DELIVERABLE);
    server_sweep_wanted = true;
  }
  if (now >= next_deadline) end_due_requests(now);
  run_completions();
  // Release dead client sessions only now, outside libcoap's callbacks, and never while user callbacks of this
  // round still hold Session pointers (a handler may have called close_client_sessions()).
  if (running_completions) return;
  if (client_session_died) {
    client_session_died = false;
    for (auto it = client_cache.begin(); it != client_cache.end();) {
      auto found = sessions.find(it->second);
      if (found == sessions.end() || found->second->dead) {
        graveyard.push_back(it->second);
        it = client_cache.erase(it);
      } else {
        ++it;
      }
    }
  }
  while (!graveyard.empty()) {
    coap_session_t* raw = graveyard.back();
    graveyard.pop_back();
    fail_pending_of(raw, make_error(Errc::io, "client session closed"));
    run_completions();
    forget_session(raw);
    coap_session_set_app_data(raw, nullptr);
    release_client_session(raw);
    client_contexts_touched = true;
  }
  counters.live_client_sessions = client_cache.size();
}

void Node::Impl::end_due_requests(Clock::time_point now) {
  // Every deadline still ahead lowers next_deadline again (here, or in expect_by from the requests sent anew).
  next_deadline = Clock::time_point::max();
  for (auto it = observations.begin(); it != observations.end();) {
    auto observation = it->second;
    if (!observation->first_answer_deadline) {
      ++it;
    } else if (now <= *observation->first_answer_deadline) {
      expect_by(*observation->first_answer_deadline);
      ++it;
    } else {
      auto found = sessions.find(it->first.first);
      if (found != sessions.end()) {
        end_if_silent(*found->second, observation->packets_in_at_send, observation->records_at_send);
      }
      it = observations.erase(it);
      notify(observation,
             make_error(Errc::timeout, "no answer to the subscription within " +
                                           std::to_string(config.limits.request_timeout.count()) + " ms"),
             found != sessions.end() ? found->second.get() : nullptr, /*final=*/true);
    }
  }
  end_silent_sessions(now);
  for (auto it = pending.begin(); it != pending.end();) {
    if (now > it->second.deadline) {
      auto found = sessions.find(it->first.first);
      if (found != sessions.end()) {
        end_if_silent(*found->second, it->second.packets_in_at_send, it->second.records_at_send);
      }
      const SessionImpl* state = found != sessions.end() ? found->second.get() : nullptr;
      complete(std::move(it->second),
               make_error(Errc::timeout, "no response within " +
                                             std::to_string(config.limits.request_timeout.count()) + " ms"),
               state);
      it = pending.erase(it);
    } else {
      expect_by(it->second.deadline);
      ++it;
    }
  }
}

std::string Node::Impl::pki_context_key(const ClientCredentials& credentials) {
  const bool rpk = credentials.kind == ClientCredentials::Kind::rpk;
  const SecretBuffer& key = rpk ? credentials.rpk->private_key_pem : credentials.x509->private_key_pem;
  // One context per credential, not per SNI or expected peer: those two travel per session (SessionImpl and the
  // setup passed to each coap_new_client_session_pki call), so that contexts (2 fds each) stay few.
  std::string context_key = std::string(rpk ? "rpk|" : "x509|") + key.fingerprint();
  if (!rpk) {
    context_key += "|" + std::to_string(std::hash<std::string>{}(credentials.x509->certificate_chain_pem +
                                                                  credentials.x509->trust_anchors_pem));
  } else {
    for (const auto& pinned : credentials.rpk->pinned_peer_keys) context_key += "|" + pinned;
  }
  return context_key;
}

Result<ClientPkiContext*> Node::Impl::client_pki_context(const ClientCredentials& credentials) {
  const bool rpk = credentials.kind == ClientCredentials::Kind::rpk;
  const SecretBuffer& key = rpk ? credentials.rpk->private_key_pem : credentials.x509->private_key_pem;
  std::string context_key = pki_context_key(credentials);
  if (auto it = client_pki_contexts.find(context_key); it != client_pki_contexts.end()) return it->second.get();

  auto entry = std::make_unique<ClientPkiContext>();
  entry->key_pem = nul_terminated(key.view());
  entry->policy.node = this;
  entry->policy.rpk = rpk;
  auto private_key = crypto::PrivateKey::parse(key);
  if (!private_key.ok()) return make_error(Errc::invalid_argument, "client key: " + private_key.error().message);
  entry->our_key_id = private_key->public_key_id();
  coap_dtls_pki_t& setup = entry->setup;
  std::memset(&setup, 0, sizeof(setup));
  setup.version = COAP_DTLS_PKI_SETUP_VERSION;
  setup.validate_cn_call_back = on_peer_certificate;
  setup.cn_call_back_arg = &entry->policy;
  setup.pki_key.key_type = COAP_PKI_KEY_PEM_BUF;
  setup.pki_key.key.pem_buf.private_key = entry->key_pem.data();
  setup.pki_key.key.pem_buf.private_key_len = entry->key_pem.size();
  if (rpk) {
    entry->policy.pinned_keys = credentials.rpk->pinned_peer_keys;
    setup.is_rpk_not_cert = 1;
    // libcoap derives the SPKI from an "EC PRIVATE KEY" PEM given as both halves (docs/transport.md §3).
    setup.pki_key.key.pem_buf.public_cert = entry->key_pem.data();
    setup.pki_key.key.pem_buf.public_cert_len = entry->key_pem.size();
  } else {
    entry->chain_pem = nul_terminated(ByteView::of(credentials.x509->certificate_chain_pem));
    entry->trust_pem = nul_terminated(ByteView::of(credentials.x509->trust_anchors_pem));
    setup.verify_peer_cert = 1;
    setup.check_common_ca = 0;       // trust anchors may be several MEF CAs, not only our own issuer
    setup.allow_self_signed = 0;
    setup.allow_expired_certs = 0;
    setup.cert_chain_validation = 1;
    setup.cert_chain_verify_depth = 3;  // leaf, one intermediate, anchor: the MEF CA profile (TS-0003 §10.1)
    setup.pki_key.key.pem_buf.public_cert = entry->chain_pem.data();
    setup.pki_key.key.pem_buf.public_cert_len = entry->chain_pem.size();
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
    state.identity = PeerIdentity{PeerKind::psk, credentials.psk_identity, {}};
    state.verified = state.identity;
  } else if (credentials.kind == Kind::none) {
    state.identity = PeerIdentity{PeerKind::local, state.remote, {}};
    state.established = true;
  }
  client_cache[cache_key] = session;
  counters.live_client_sessions = client_cache.size();
  client_contexts_touched = true;  // its handshake's retransmission timer is armed by the context's next prepare
  return session;
}

// ---- Node ----------------------------------------------------------------------------------------------------

namespace {
// One round of a libcoap context without coap_io_process: that function walks all of the context's sessions
// before it reads (coap_io_prepare_epoll) and coap_io_do_epoll walks them all again after, so with thousands of
// live sessions each round costs two walks. coap_io_do_epoll alone reads what is ready, then prepares (sends due
// retransmissions, frees expired sessions, re-arms libcoap's timerfd): one walk per round, same work otherwise.
// (coap_io_process's other steps: the cache, unused here, and async responses, which the prepare also sends.)
// A context with nothing ready (no datagram, its timerfd not due) is not prepared at all unless `prepare` asks:
// libcoap arms its timerfd itself for what it schedules (retransmissions, notifications, async answers), so a quiet
// context has nothing to do; only what we did to it outside its rounds (a new client session's handshake timer,
// a session we disconnected) needs one prepare.
void run_libcoap(coap_context_t* context, bool prepare) {
  std::array<epoll_event, 16> events{};
  int count = 0;
  do {
    count = epoll_wait(coap_context_get_coap_fd(context), events.data(), static_cast<int>(events.size()), 0);
    if (count < 0) count = 0;  // EINTR: the fd stays readable if data is waiting
    if (count == 0 && !prepare) return;
    prepare = false;
    coap_io_do_epoll(context, events.data(), static_cast<size_t>(count));
  } while (count == static_cast<int>(events.size()));
}
}  // namespace

Node::Node(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Node::~Node() = default;

namespace {
std::uint16_t port_of_endpoint(const coap_endpoint_t* endpoint) {
  // coap_endpoint_str() prints the bound address, "[::]:5684" or "0.0.0.0:5684"; 4.3.1 has no getter for it.
  const std::string text = coap_endpoint_str(endpoint);
  const auto colon = text.rfind(':');
  if (colon == std::string::npos) return 0;
  std::size_t end = colon + 1;
  while (end < text.size() && text[end] >= '0' && text[end] <= '9') ++end;
  return static_cast<std::uint16_t>(std::stoul(text.substr(colon + 1, end - colon - 1)));
}
}  // namespace

namespace {
std::shared_ptr<const detail::ServerCertificate> choose_server_certificate(coap_session_t* session,
                                                                          const std::string& server_name);
}  // namespace

Result<void> Node::Impl::set_up_server_pki(const X509Credentials* x509, const RpkCredentials* rpk) {
  server_policy.node = this;
  const SecretBuffer& key = x509 != nullptr ? x509->private_key_pem : rpk->private_key_pem;
  // Checked here, with dauth's own parser, for both backends and with a clear message.
  if (auto private_key = crypto::PrivateKey::parse(key); !private_key.ok()) {
    return make_error(Errc::invalid_argument, "server private key: " + private_key.error().message);
  }
  if (rpk != nullptr) {
    server_policy.rpk = true;
    server_policy.pinned_keys = rpk->pinned_peer_keys;
  }
  if (detail::attaches_server_pki()) {
    // The credentials the node's handshakes share, parsed once here: a PSK handshake never touches them, an X.509
    // one gets its certificate from choose_server_certificate (docs/transport.md §3).
    auto built = rpk != nullptr ? detail::make_rpk_server_pki(key.view(), on_peer_certificate, &server_policy)
                                : detail::make_x509_server_pki(x509->trust_anchors_pem, choose_server_certificate,
                                                               on_peer_certificate, &server_policy);
    if (!built.ok()) return make_error(Errc::invalid_argument, "server credentials: " + built.error().message);
    if (config.x509) {
      auto loaded = detail::load_server_certificate(config.x509->certificate_chain_pem,
                                                    config.x509->private_key_pem.view());
      if (!loaded.ok()) return make_error(Errc::invalid_argument, "server certificate: " + loaded.error().message);
      default_certificate = *std::move(loaded);
    }
    server_credentials = *std::move(built);
  } else {
    coap_dtls_pki_t& pki = server_pki;
    std::memset(&pki, 0, sizeof(pki));
    pki.version = COAP_DTLS_PKI_SETUP_VERSION;
    pki.validate_cn_call_back = on_peer_certificate;
    pki.cn_call_back_arg = &server_policy;
    pki.pki_key.key_type = COAP_PKI_KEY_PEM_BUF;
    server_key_pem = nul_terminated(key.view());
    pki.pki_key.key.pem_buf.private_key = server_key_pem.data();
    pki.pki_key.key.pem_buf.private_key_len = server_key_pem.size();
    if (rpk != nullptr) {
      pki.is_rpk_not_cert = 1;
      pki.pki_key.key.pem_buf.public_cert = server_key_pem.data();
      pki.pki_key.key.pem_buf.public_cert_len = server_key_pem.size();
    } else {
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
    }
    if (coap_context_set_pki(server_context.get(), &pki) != 1) {
      return make_error(Errc::invalid_argument,
                        "server certificate/key rejected by the TLS backend: " +
                            (libcoap_warnings().empty() ? std::string("no detail") : libcoap_warnings().back()));
    }
  }
  server_pki_set = true;
  if (x509 != nullptr) client_trust_anchors_pem = x509->trust_anchors_pem;
  return {};
}

Result<void> Node::Impl::put_named_certificate(const std::string& server_name, X509Credentials credentials) {
  if (server_name.empty()) return make_error(Errc::invalid_argument, "server certificate for an empty server name");
  auto chain = crypto::Certificate::parse(ByteView::of(credentials.certificate_chain_pem));
  if (!chain.ok()) {
    return make_error(Errc::invalid_argument, "server certificate for '" + server_name + "': " + chain.error().message);
  }
  auto key = crypto::PrivateKey::parse(credentials.private_key_pem);
  if (!key.ok()) {
    return make_error(Errc::invalid_argument, "server key for '" + server_name + "': " + key.error().message);
  }
  if (key->public_key_id() != chain->public_key_id()) {
    return make_error(Errc::invalid_argument, "server key for '" + server_name + "' is not the key of its certificate '" +
                                                  chain->subject() + "'");
  }
  // One trust list per context: the client verification set up with the context's PKI setup applies to all.
  if (credentials.trust_anchors_pem != client_trust_anchors_pem) {
    return make_error(Errc::invalid_argument, "server certificate for '" + server_name +
                                                  "': its trust anchors differ from the ones client certificates "
                                                  "are verified against (one set per endpoint)");
  }
  auto loaded = detail::load_server_certificate(credentials.certificate_chain_pem, credentials.private_key_pem.view());
  if (!loaded.ok()) {
    return make_error(Errc::invalid_argument, "server certificate for '" + server_name + "': " +
                                                  loaded.error().message);
  }
  // Handshakes that chose the previous one keep it (SessionImpl::presented_certificate) until they end.
  named_certificates.insert_or_assign(server_name,
                                      NamedCertificate{*std::move(loaded), std::move(credentials.local_ae_id)});
  return {};
}

namespace {

// detail::ServerCertificateLookup: the certificate for one handshake, from the table as it is now.
std::shared_ptr<const detail::ServerCertificate> choose_server_certificate(coap_session_t* session,
                                                                          const std::string& server_name) {
  Node::Impl* impl = impl_of(session);
  if (impl == nullptr) return nullptr;
  SessionImpl& state = impl->state_for(session);
  state.sni = server_name;
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
  if (cfg.rpk && cfg.x509) {
    return make_error(Errc::invalid_argument,
                      "server credentials: x509 and rpk together: libcoap 4.3.1 keeps one PKI setup per context");
  }
  if (!cfg.x509_by_server_name.empty() && !backend_selects_server_certificates()) {
    return make_error(Errc::unsupported, "server certificates chosen by server name (SNI) need the GnuTLS build; "
                                         "this is " + std::string(to_string(compiled_backend())) +
                                         " (libcoap 4.3.1's OpenSSL backend has no per-handshake hook for it)");
  }
  if (cfg.rpk && !cfg.x509_by_server_name.empty()) {
    return make_error(Errc::invalid_argument,
                      "server credentials: rpk and certificates by server name together: libcoap 4.3.1 keeps one PKI "
                      "setup per context");
  }
  if (cfg.rpk && !backend_supports_rpk()) {
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
    if (cfg.x509 || cfg.rpk || !cfg.x509_by_server_name.empty()) {
      const X509Credentials* first_named =
          cfg.x509_by_server_name.empty() ? nullptr : &cfg.x509_by_server_name.begin()->second;
      auto set_up = impl->set_up_server_pki(cfg.x509 ? &*cfg.x509 : first_named, cfg.rpk ? &*cfg.rpk : nullptr);
      if (!set_up.ok()) return std::move(set_up).error();
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
      auto address = parse_address(host, port);
      if (!address.ok()) return std::move(address).error();
      coap_endpoint_t* endpoint = coap_new_endpoint(context, &*address, COAP_PROTO_DTLS);
      if (endpoint == nullptr) {
        return make_error(Errc::io, "cannot listen on coaps://" + host + ":" + std::to_string(port) +
                                        " (address in use or not configured?)");
      }
      port = port_of_endpoint(endpoint);  // with port 0, every address family gets the first one's port
      impl->bound_secure_port = port;
    }
    if (!cfg.local_address.empty()) {
      auto address = parse_address(cfg.local_address, cfg.local_port);
      if (!address.ok()) return std::move(address).error();
      if (!is_loopback(*address)) {
        return make_error(Errc::invalid_argument, "local (plain CoAP) endpoint '" + cfg.local_address +
                                                      "' is not a loopback address: only 127.0.0.0/8 or ::1 allowed");
      }
      coap_endpoint_t* endpoint = coap_new_endpoint(context, &*address, COAP_PROTO_UDP);
      if (endpoint == nullptr) {
        return make_error(Errc::io, "cannot listen on coap://" + cfg.local_address + ":" +
                                        std::to_string(cfg.local_port));
      }
      impl->bound_local_port = port_of_endpoint(endpoint);
    }
    // One catch-all resource; routing by method and path prefix is ours (add_route).
    coap_resource_t* resource = coap_resource_unknown_init2(on_request, 0);
    for (const coap_request_t method : {COAP_REQUEST_GET, COAP_REQUEST_POST, COAP_REQUEST_PUT,
                                        COAP_REQUEST_DELETE, COAP_REQUEST_FETCH, COAP_REQUEST_PATCH,
                                        COAP_REQUEST_IPATCH}) {
      coap_register_request_handler(resource, method, on_request);
    }
    coap_add_resource(context, resource);
    // Proxy-Uri requests (a local AE naming its target AE, PROTOCOL.md §6): without a proxy resource libcoap answers
    // them 5.05 itself (RFC 7252 §5.7.2). The one name it is "known by" is reserved (RFC 6761 .invalid), so no
    // Proxy-Uri host is ever taken for this node; the request reaches on_request and our routes with no Uri-Path.
    const char* own_proxy_names[] = {"dauthd.proxy.invalid"};  // copied by libcoap
    coap_resource_t* proxy = coap_resource_proxy_uri_init2(on_request, 1, own_proxy_names, 0);
    if (proxy == nullptr) return make_error(Errc::internal, "coap_resource_proxy_uri_init2 failed");
    coap_add_resource(context, proxy);
    if (auto added = impl->add_context_to_loop(context); !added.ok()) return std::move(added).error();
  }
  return std::unique_ptr<Node>(new Node(std::move(impl)));
}

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

std::size_t Node::close_sessions_with_certificate_serial(std::string_view serial) {
  if (serial.empty()) return 0;
  std::size_t closed = 0;
  for (auto& [raw, state] : impl_->sessions) {
    if (!state->secure || state->dead || state->close_requested) continue;
    const std::optional<PeerIdentity>& peer = state->established ? std::optional<PeerIdentity>(state->identity)
                                                                  : state->verified;
    if (!peer || peer->kind != PeerKind::x509 || peer->certificate_serial != serial) continue;
    if (state->client) {
      impl_->kill_client_session(*state, make_error(Errc::io, "client session closed by us: the server's "
                                                              "certificate serial " + std::string(serial) +
                                                              " was revoked"));
    } else {
      if (coap_session_get_state(raw) == COAP_SESSION_STATE_NONE) continue;
      impl_->request_close(*state);  // carried out by housekeeping, never inside a libcoap callback
    }
    ++closed;
  }
  if (closed > 0 && !impl_->in_libcoap) impl_->housekeeping();
  return closed;
}

Result<void> Node::set_server_certificate(const std::string& server_name, X509Credentials credentials) {
  if (!backend_selects_server_certificates()) {
    return make_error(Errc::unsupported, "server certificates chosen by server name (SNI) need the GnuTLS build; "
                                         "this is " + std::string(to_string(compiled_backend())));
  }
  if (!impl_->server_context || impl_->config.secure_addresses.empty()) {
    return make_error(Errc::unsupported, "server certificate for '" + server_name + "': this node has no secure "
                                         "endpoint");
  }
  if (impl_->config.rpk) {
    return make_error(Errc::unsupported, "server certificate for '" + server_name + "': this node presents a raw "
                                         "public key (one PKI setup per context)");
  }
  if (!impl_->server_pki_set) {
    // First certificate of a node that had none: the server credentials are built now, with its trust anchors;
    // the sessions begun from now on get them.
    if (auto set_up = impl_->set_up_server_pki(&credentials, nullptr); !set_up.ok()) return set_up;
  }
  return impl_->put_named_certificate(server_name, std::move(credentials));
}

bool Node::remove_server_certificate(const std::string& server_name) {
  return impl_->named_certificates.erase(server_name) > 0;
}

void Node::set_failure_observer(FailureObserver observer) { impl_->observer = std::move(observer); }

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
  PendingRequest entry{std::move(handler), deadline, raw, state.count.packets_in, std::nullopt, std::nullopt,
                       std::move(replay)};
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

void Node::post_after(std::chrono::milliseconds delay, std::function<void()> work) {
  if (!work) return;
  impl_->timers.emplace(Clock::now() + delay, std::move(work));
}

void Node::post(std::function<void()> work) {
  if (!work) return;
  impl_->posted.push_back(std::move(work));
  const int signalled = eventfd_write(impl_->post_signal.get(), 1);  // cannot block: far from counter overflow
  (void)signalled;
}

Result<void> Node::add_watch(int fd, std::function<void()> each_round) {
  if (fd < 0 || !each_round) return make_error(Errc::invalid_argument, "add_watch: needs a descriptor and a handler");
  if (impl_->watches.count(fd) != 0) {
    return make_error(Errc::exists, "add_watch: descriptor " + std::to_string(fd) + " is watched already");
  }
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = fd;
  if (epoll_ctl(impl_->epoll.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
    return make_error(Errc::io, std::string("epoll_ctl(ADD) of a watched descriptor: ") + std::strerror(errno));
  }
  impl_->watches.emplace(fd, std::move(each_round));
  ++impl_->watches_generation;
  return ok_result();
}

void Node::remove_watch(int fd) {
  if (impl_->watches.erase(fd) == 0) return;
  ++impl_->watches_generation;
  (void)epoll_ctl(impl_->epoll.get(), EPOLL_CTL_DEL, fd, nullptr);
}

int Node::fd() const noexcept { return impl_->epoll.get(); }

void Node::process_ready() {
  auto run = [this](coap_context_t* context, bool prepare) {
    if (context == nullptr) return;
    impl_->in_libcoap = true;
    run_libcoap(context, prepare);
    impl_->in_libcoap = false;
  };
  // libcoap 4.3.1 walks every session of a context each time it prepares one (coap_io_prepare_io), so a quiet
  // server context is not run at all: that walk is the cost that grows with live sessions (docs/transport.md §8).
  run(impl_->server_context.get(), std::exchange(impl_->server_sweep_wanted, false));
  // Between the first ClientHello (libcoap made the TLS object and answered HelloVerifyRequest) and the one with
  // the cookie, which a later round reads: the moment to hook certificate selection (docs/transport.md §3).
  impl_->select_certificates_by_name();
  const bool clients_touched = std::exchange(impl_->client_contexts_touched, false);
  run(impl_->client_context.get(), clients_touched);
  for (auto& [key, entry] : impl_->client_pki_contexts) run(entry->context.get(), clients_touched);
  // libcoap and GnuTLS copied the key the PSK callback returned; do not keep ours beyond this round.
  impl_->psk_in_flight = SecretBuffer();
  impl_->run_completions();
  impl_->run_watches();
  impl_->run_posted();
  impl_->run_due_timers();
  impl_->housekeeping();
}

std::chrono::milliseconds Node::next_timeout() {
  // libcoap arms a timerfd inside its own epoll fd (coap_update_epoll_timer), so its retransmissions and session
  // expiry wake fd() by themselves. We add our own deadlines: request timeouts and handshake timeouts. With none
  // pending we still look once a second, a cheap bound in case a libcoap timer is not armed.
  const auto now = Clock::now();
  auto next = std::min(now + std::chrono::seconds(1), impl_->next_deadline);
  if (!impl_->timers.empty()) next = std::min(next, impl_->timers.begin()->first);
  for (coap_session_t* raw : impl_->handshaking) {
    const auto& state = impl_->sessions.at(raw);
    if (!state->established && !state->timed_out) {
      next = std::min(next, state->started + impl_->config.limits.handshake_timeout);
    }
  }
  if (!impl_->completions.empty() || !impl_->posted.empty() || impl_->server_sweep_wanted ||
      impl_->client_contexts_touched || next <= now) {
    return std::chrono::milliseconds(0);
  }
  // +1 ms: epoll_wait rounds down, and waking just before a deadline would spin once more.
  return std::chrono::duration_cast<std::chrono::milliseconds>(next - now) + std::chrono::milliseconds(1);
}

bool Node::run_until(const std::function<bool()>& done, std::chrono::milliseconds max) {
  const auto end = Clock::now() + max;
  while (!done()) {
    const auto now = Clock::now();
    if (now >= end) break;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - now);
    epoll_event event{};
    const int wait = static_cast<int>(std::min(left, next_timeout()).count());
    (void)epoll_wait(fd(), &event, 1, wait);
    process_ready();
  }
  return done();
}

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

}  // namespace dauth::transport
