// Node's private internals, shared by its source files: Node::Impl, the session record (SessionImpl), routes,
// pending requests, RAII for libcoap handles, and the libcoap callbacks each file registers for another.
//
// Every libcoap trap this code works around is listed, with what was measured, in docs/transport.md §3. The loop is
// single-threaded; libcoap callbacks never block and never call back into user code that could re-enter libcoap,
// except request handlers, which must fill the response synchronously.
#pragma once

#include <coap3/coap.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dauth/unique_fd.hpp"
#include "dauth/crypto/kdf.hpp"
#include "dauth/transport/transport.hpp"
#include "tls_backend.hpp"

namespace dauth::transport::detail {

using Clock = std::chrono::steady_clock;

// ---- RAII for C handles (docs/conventions.md §16) --------------------------------------------------------------

struct ContextDeleter {
  void operator()(coap_context_t* context) const noexcept { coap_free_context(context); }
};
using ContextPtr = std::unique_ptr<coap_context_t, ContextDeleter>;

// libcoap_log.cpp: libcoap's own log lines, kept (never printed) so that a failure report can quote the backend's
// reason.
std::deque<std::string>& libcoap_warnings();
std::string libcoap_reason_for(const std::string& remote);
void start_libcoap_once();

// node.cpp
std::string address_text(const coap_address_t* address);
Result<coap_address_t> parse_address(const std::string& host, std::uint16_t port);
SecretBuffer nul_terminated(ByteView text);
std::string token_key(coap_bin_const_t token);
std::uint64_t pdu_size(const coap_pdu_t* pdu);

// node_server.cpp: frees a body handed to libcoap (coap_add_data_large_request / _response).
void release_heap_bytes(coap_session_t* session, void* bytes);

// ---- Session ---------------------------------------------------------------------------------------------------

class SessionImpl final : public Session {
 public:
  SessionImpl(coap_session_t* raw_session, bool client_side, bool secure_session)
      : raw(raw_session),
        client(client_side),
        secure(secure_session),
        remote(address_text(coap_session_get_addr_remote(raw_session))),
        created_at(std::chrono::system_clock::now()),
        last_received(created_at),
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
  std::chrono::system_clock::time_point last_received;  // the latest request (server) or response (client)
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

struct Route {
  Method method;
  std::vector<std::string> prefix;
  Access access;
  RequestHandler handler;
  bool exact = false;  // add_observable: the path itself only, not what lies below it
};

enum class ContextRole : std::uint8_t { server, client };

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
  bool answer_is_secret = false;   // Request::answer_is_secret: the body goes to Response::secret_payload
};

// What a PKI context accepts from its peers (validate_cn_call_back argument).
struct PkiPolicy {
  Node::Impl* node = nullptr;
  bool certificates = true;  // peers may authenticate with an X.509 certificate
  bool raw_keys = false;     // peers may authenticate with a raw public key
  // The raw keys accepted: a client's servers; a server's clients when it has no NodeConfig::raw_key_lookup.
  std::set<std::string> pinned_keys;
};

// A client context for one PKI credential: coap_new_client_session_pki() overwrites the context's PKI setup
// (docs/transport.md §3), so each distinct credential gets its own context. libcoap keeps a shallow copy of the setup,
// so the buffers live here as long as the context.
struct ClientPkiContext {
  SecretBuffer key_pem;  // NUL-terminated PEM for libcoap (a raw key in a token: its PIN)
  SecretBuffer chain_pem;
  SecretBuffer trust_pem;
  std::set<std::string> snis;  // stable storage: the context's shallow setup copy points at the last one used
  PkiPolicy policy;
  coap_dtls_pki_t setup{};
  std::string our_key_id;
  // A key in a token: the chain (or raw key) and the key every session of this context presents (libcoap has
  // neither); outlives the sessions, which are freed with the context.
  std::shared_ptr<const detail::ServerCertificate> token_certificate;
  std::string token_private_uri;  // raw key in a token: what libcoap loads per session (key_pem holds the PIN)
  std::string token_public_uri;
  ContextPtr context;  // last: freed first
};

// ---- libcoap callbacks (registered in one file, defined in another) ---------------------------------------------

Node::Impl* impl_of(const coap_session_t* session);
// dtls_callbacks.cpp: where the peer identity of a DTLS session is decided.
const coap_bin_const_t* on_psk_identity(coap_bin_const_t* identity, coap_session_t* session, void* arg);
int on_peer_certificate(const char* cn, const uint8_t* der, size_t der_length, coap_session_t* session,
                        unsigned depth, int validated, void* arg);
// node.cpp
int on_event(coap_session_t* session, coap_event_t event);
// node_client.cpp
coap_response_t on_response(coap_session_t* session, const coap_pdu_t* sent, const coap_pdu_t* received,
                            const coap_mid_t mid);
void on_nack(coap_session_t* session, const coap_pdu_t* sent, const coap_nack_reason_t reason, const coap_mid_t mid);
// node_server.cpp
void on_request(coap_resource_t* resource, coap_session_t* session, const coap_pdu_t* pdu,
                const coap_string_t* query, coap_pdu_t* response_pdu);

}  // namespace dauth::transport::detail

namespace dauth::transport {

// Node::Impl and the node files name the internals above unqualified, as when they were one file.
using namespace detail;

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
  // Our raw key (NodeConfig::rpk, set_server_raw_key), presented to handshakes that negotiate raw public keys, and
  // its RFC 6920 id (the credential_id of those sessions).
  std::shared_ptr<const detail::ServerCertificate> server_raw_key;
  std::string server_raw_key_id;
  // Credentials replaced when the first trust anchors came (set_server_certificate on a node that had only a raw
  // key): sessions whose handshake began with them still point into them.
  std::vector<std::shared_ptr<const detail::ServerPki>> retired_server_credentials;
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

  ~Impl();

  static void release_client_session(coap_session_t* session);

  // -- failures (node.cpp) --

  void report(FailureKind kind, const std::string& peer, const std::string& identity, const std::string& reason);
  void publish(const Failure& failure);
  void report_handshake_failure(SessionImpl& state, FailureKind kind, const std::string& reason);
  std::string handshake_failure_reason(const SessionImpl& state) const;

  // -- sessions (node.cpp; expect_by, mark_dead and request_close here) --

  SessionImpl& state_for(coap_session_t* session);
  void forget_session(coap_session_t* session);

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

  void mark_established(SessionImpl& state);

  // -- client sessions (node_client.cpp) --

  void fail_pending_of(coap_session_t* session, const Error& error);
  void notify(const std::shared_ptr<Observation::State>& observation, Result<Response> result,
              const SessionImpl* state, bool final);
  void complete(PendingRequest request, Result<Response> result, const SessionImpl* state);
  void end_if_silent(SessionImpl& state, std::uint64_t packets_in_at_send,
                     const std::optional<std::uint64_t>& records_at_send);
  void end_silent_sessions(Clock::time_point now);
  void restart_stalled_handshakes(Clock::time_point now);
  void kill_client_session(SessionImpl& state, const Error& error);
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

  // -- the loop (node_loop.cpp) --

  void housekeeping();
  // Housekeeping's scan of the requests and subscriptions, run only once next_deadline has come: ends those past
  // their deadline or silent for too long, and computes next_deadline anew.
  void end_due_requests(Clock::time_point now);
  void run_posted();
  void run_due_timers();
  void run_watches();
  void run_completions();
  Result<void> add_context_to_loop(coap_context_t* context);
  ContextPtr new_context(ContextRole role, std::string& error);

  // -- server credentials (node_server.cpp) --

  // Server PKI (re)built with one certificate's trust anchors (x509; for named certificates, the first one's), or
  // with none (x509 null: raw-key clients only): credentials built once (GnuTLS) or the context's setup (OpenSSL,
  // x509 required). Our raw key: put_server_raw_key.
  Result<void> set_up_server_pki(const X509Credentials* x509);
  Result<void> put_server_raw_key(RpkCredentials credentials);
  Result<void> put_named_certificate(const std::string& server_name, X509Credentials credentials);
  // After each server round (GnuTLS): attaches the server credentials, whose certificate is chosen by server name,
  // to the handshakes that got a TLS object since. Touches only sessions still in their handshake's first flights.
  void select_certificates_by_name();
};

}  // namespace dauth::transport
