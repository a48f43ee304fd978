// transport: CoAP over DTLS 1.2 (PSK, X.509, raw public keys) and plain CoAP for local AEs, on libcoap 4.3.1.
//
// The only module that includes libcoap and TLS-backend headers; nothing of theirs appears here. One `Node` owns
// every libcoap context of the process and joins the daemon's epoll loop through fd() / process_ready() /
// next_timeout() (docs/transport.md §1: single thread, no callback blocks). Contract details, pinned parameters and the
// libcoap traps behind them: docs/transport.md.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "dauth/crypto/onem2m.hpp"
#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::transport {

// ---- Backend --------------------------------------------------------------------------------------------------

enum class Backend : std::uint8_t { gnutls, openssl };
Backend compiled_backend() noexcept;               // fixed at configure time (DAUTH_TLS_BACKEND)
std::string_view to_string(Backend backend) noexcept;
bool backend_supports_rpk() noexcept;              // GnuTLS only (docs/transport.md §3)
bool backend_selects_server_certificates() noexcept;  // NodeConfig::x509_by_server_name: GnuTLS only

// ---- Keys in a PKCS#11 token (GnuTLS builds only, docs/transport.md §3 "Keys in a token") --------------------

// A private key that stays in a token, named by an RFC 7512 URI ("pkcs11:token=...;object=..."); the handshake
// asks the token to sign. The PIN logs in when the key is loaded, and again if the token forgets the login; keys
// share it, so it is held by shared_ptr. The URI is logged, so it never carries a PIN (pin-value, pin-source).
struct TokenKey {
  std::string uri;
  std::shared_ptr<const SecretBuffer> pin;  // the token's user PIN; nullptr: the token asks for none
};
// The checks a token key URI passes before use: the "pkcs11:" scheme, no PIN in it, a private key (no
// type= other than private). invalid_argument names what is wrong (never the PIN: a URI with one is not quoted).
Result<void> check_token_key_uri(std::string_view uri);
// The PKCS#11 module token keys are looked up in, for the whole process: "" = the modules p11-kit registers
// (/usr/share/p11-kit/modules), else one module's path. Called before the first token key is loaded; a later call
// with another module fails (GnuTLS initialises PKCS#11 once per process). Errors: unsupported (OpenSSL build),
// invalid_argument (another module chosen already), crypto (the module does not load).
Result<void> use_pkcs11_module(const std::string& module_path);
// Loads the token key once (log-in with its PIN included) and answers the RFC 6920 id of its public key, the
// way Node::create and set_server_certificate would load it: for a configuration check or a reload, which then
// report a wrong PIN or a missing token or key before anything changes. Errors: unsupported, not_found (no such
// token, or no such key in it), permission (the token refused the PIN), crypto.
Result<std::string> check_token_key(const TokenKey& key);

// ---- Messages -------------------------------------------------------------------------------------------------

enum class Method : std::uint8_t { get = 1, post = 2, put = 3, del = 4, fetch = 5, patch = 6, ipatch = 7 };
std::string_view to_string(Method method) noexcept;
// Whether a request with this method may be sent again on a new session when its answer may have been lost
// (RFC 7252 §5.1, RFC 8132: GET, PUT, DELETE, FETCH and iPATCH are idempotent; POST and PATCH are not, and the
// peer may have carried one out already). Decides both where transport ends a silent session for a request
// (Limits::silence_timeout) and where the proxy retries a timed-out one.
bool may_repeat(Method method) noexcept;

// oneM2M CoAP option numbers, TS-0008 current numbering (PROTOCOL.md §2), and the pre-2022 ones.
inline constexpr std::uint16_t kOptionOneM2mFrom = 279;
inline constexpr std::uint16_t kOptionOneM2mRequestId = 283;
inline constexpr std::uint16_t kOptionOneM2mResponseStatus = 307;
inline constexpr std::uint16_t kLegacyOptionOneM2mFrom = 256;
inline constexpr std::uint16_t kLegacyOptionOneM2mRequestId = 257;
inline constexpr std::uint16_t kLegacyOptionOneM2mResponseStatus = 265;

inline constexpr std::uint16_t kContentFormatJson = 50;
inline constexpr std::uint16_t kContentFormatCbor = 60;

struct Request {
  Method method = Method::get;
  std::vector<std::string> path;      // Uri-Path segments, without '/'
  std::vector<std::string> query;     // Uri-Query items ("k=v")
  std::optional<std::uint16_t> content_format;
  std::optional<std::uint16_t> accept;
  std::string originator;             // oneM2M-FR (empty: absent)
  std::string request_id;             // oneM2M-RQI (empty: absent)
  // Proxy-Uri (RFC 7252 §5.10.2, §5.7.2), e.g. "coap://CAE-valve/temp": a local AE names the target AE as host
  // (PROTOCOL.md §6). Empty: absent. A request carrying it has no Uri-Path, so it reaches the route with prefix {}.
  std::string proxy_uri;
  Bytes payload;
  // Client side: a success's body carries key material (a fetchCredentials answer, PROTOCOL.md §4). It arrives in
  // Response::secret_payload, never in Response::payload: keys never pass through ordinary heap memory of ours.
  // Error bodies ({error, detail}) still arrive in payload.
  bool answer_is_secret = false;

  std::string path_text() const;      // "/a/b"
};

struct Response {
  int code = 205;                     // CoAP code as class*100 + detail: 205 = 2.05 Content, 413 = 4.13
  std::optional<std::uint16_t> content_format;  // unset: no Content-Format option is sent
  std::optional<std::uint32_t> response_status;  // oneM2M-RSC
  std::string request_id;             // oneM2M-RQI, echoed when the request had one
  Bytes payload;
  // A body that carries key material, in guarded memory (set it instead of payload). Sending: copied into libcoap's
  // PDU only (which libcoap frees unwiped, docs/transport.md §3), no ETag derived from it. Receiving: filled
  // instead of payload when the request set answer_is_secret. Shared, so that copies of a Response never copy the
  // key; it is wiped when the last copy goes.
  std::shared_ptr<const SecretBuffer> secret_payload;
  // Server side: end the DTLS session (close_notify) once this response has been sent. Only for a piggybacked
  // answer of one datagram: a Block2 body or a separate (CON) response loses its remaining blocks /
  // retransmissions (why the MEF leaves closing the enrolment session to the Enrolee, PROTOCOL.md §3.4). Ignored
  // on plain (local) sessions and by clients.
  bool close_session = false;
  // Client side, Node::observe(): the Observe option (RFC 7641) of a notification; unset on a response that ends
  // or never started the subscription. Ignored when sending (libcoap numbers the notifications).
  std::optional<std::uint32_t> observe;

  static Response with_text(int code, std::string_view text);
};

// ---- Identities and sessions ----------------------------------------------------------------------------------

enum class PeerKind : std::uint8_t {
  local,  // plain CoAP on the loopback endpoint: a local AE, not authenticated by DTLS
  psk,    // value: the PSK identity the peer used (KpmID, KeID)
  x509,   // value: the AE-ID from the subjectAltName URI (our own DER parsing, TS-0003 §8.1.2.5); for a server
          //        certificate without AE-ID (an MEF FQDN certificate) its first dNSName
  rpk,    // value: RFC 6920 "ni:///sha-256;..." of the peer's SubjectPublicKeyInfo (PROTOCOL.md §4)
};
std::string_view to_string(PeerKind kind) noexcept;

struct PeerIdentity {
  PeerKind kind = PeerKind::local;
  std::string value;
  std::string certificate_serial;  // x509: the leaf's serial as crypto::canonical_serial; "" otherwise
  // x509: the leaf's issuer DN (crypto::Certificate::issuer(), as an MEF's revocation list names its CA); "" otherwise.
  // A serial is unique per issuer only: revocation checks compare both.
  std::string certificate_issuer;
};

struct SessionCounters {        // CoAP messages this node sent and received on the session (payload + header)
  std::uint64_t packets_in = 0;
  std::uint64_t packets_out = 0;
  std::uint64_t bytes_in = 0;
  std::uint64_t bytes_out = 0;
};

// An authenticated (or local) CoAP session. Server-side objects live until libcoap drops the session (idle
// timeout, peer close); request handlers get a reference that is valid for the duration of the call. The RFC 5705
// exporter works once the handshake is complete: in a request handler, or in a client's response callback.
// Whom a server session serves, decided once, in its handshake, by the credentials lookup that let it in (PSK:
// the PskLookup's answer; X.509: the peer certificate's AE-ID and X509Credentials::local_ae_id of the certificate
// the SNI selected; RPK: the RawKeyLookup's answer, or without a lookup the peer's key id and no local AE).
// Request handlers read it and never decide it again.
// Empty on client and plain sessions.
struct SessionGrant {
  std::string peer_ae_id;   // the AE the peer authenticated as ("" = the lookup did not say; RPK without a
                            // RawKeyLookup: the key id)
  std::string local_ae_id;  // the local AE the session reaches ("" = none)
};

class Session : public crypto::KeyingMaterialExporter {
 public:
  virtual const PeerIdentity& peer() const = 0;
  virtual const std::string& credential_id() const = 0;  // PSK identity, or our certificate / key id used
  virtual const std::string& remote_address() const = 0;  // "127.0.0.1:40000", "[::1]:40000"
  // Server side: the server name (SNI) the client sent in its ClientHello (PROTOCOL.md §2: our FQDN or the target
  // AE-ID); "" when none was sent, on client sessions and on plain sessions.
  virtual const std::string& server_name() const = 0;
  virtual const SessionGrant& grant() const = 0;  // server side, what the handshake granted (see SessionGrant)
  virtual bool is_client() const = 0;
  virtual Backend backend() const = 0;
  virtual std::string cipher_suite() const = 0;            // IANA name, e.g. "TLS_PSK_WITH_AES_128_CCM_8"; "" if plain
  virtual std::chrono::system_clock::time_point created() const = 0;
  virtual SessionCounters counters() const = 0;
  // RFC 5705 with no context value. Errors: plain session (unsupported), handshake not done (internal).
  Result<SecretBuffer> export_keying_material(std::string_view label, std::size_t length) const override = 0;
};

// ---- Server credentials ---------------------------------------------------------------------------------------

// What a PSK handshake asks for. The views are valid during the lookup call only.
struct PskRequest {
  std::string_view identity;  // the PSK identity the client offered (KpmID, KeID)
  std::string_view sni;       // the server name the client sent (PROTOCOL.md §2: our FQDN or the target AE-ID); "" none
  std::string_view remote;    // "127.0.0.1:40000", for logs
};

// A PSK lookup's answer: the key, and whom the session then serves (Session::grant(); the key is not kept there).
struct PskGrant {
  SecretBuffer key;
  std::string peer_ae_id;   // the AE the identity belongs to, "" if the lookup does not know it
  std::string local_ae_id;  // the local AE the session reaches, "" if none
};

// PSK lookup. Must answer from memory and never block (docs/transport.md §1): an identity it does not know yet gets
// Errc::not_found (the handshake is refused: GnuTLS builds send the fatal alert handshake_failure, not
// unknown_psk_identity, docs/transport.md §1; the caller may start an asynchronous fetch, e.g. through Node::post(),
// and the client retries). The Error message becomes the logged refusal reason.
using PskLookup = std::function<Result<PskGrant>(const PskRequest& request)>;

// What a raw-public-key handshake (RFC 7250) asks for, once the client proved its key. The views are valid during
// the lookup call only.
struct RawKeyRequest {
  std::string_view key_id;  // RFC 6920 "ni:///sha-256;..." of the client's SubjectPublicKeyInfo (PeerIdentity::value)
  std::string_view sni;     // the server name the client sent; "" none
  std::string_view remote;  // "127.0.0.1:40000", for logs
};

// A raw-key lookup's answer: whom the session then serves (Session::grant()).
struct RawKeyGrant {
  std::string peer_ae_id;   // the AE the key is pinned to, "" if the lookup does not know it
  std::string local_ae_id;  // the local AE the session reaches, "" if none
};

// Raw-key lookup (NodeConfig::raw_key_lookup): decides which client raw keys a server lets in, like PskLookup for
// PSK identities. Memory only, never blocks. An Error refuses the handshake (access_denied), its message being the
// reason reported to the failure observer with the key id (e.g. Errc::not_found "not pinned").
using RawKeyLookup = std::function<Result<RawKeyGrant>(const RawKeyRequest& request)>;

// Our certificate chain and key, and the CAs our peers' certificates must chain to. PEM text; keys EC P-256.
struct X509Credentials {
  std::string certificate_chain_pem;   // leaf first
  SecretBuffer private_key_pem;        // "EC PRIVATE KEY" or "PRIVATE KEY"; empty with token_key
  std::string trust_anchors_pem;       // one or more CA certificates
  // Server side: the local AE whose certificate this is, SessionGrant::local_ae_id of the sessions it is presented
  // to ("" = they reach none). Unused by clients.
  std::string local_ae_id{};
  std::optional<TokenKey> token_key{};  // the key in a token instead of private_key_pem (GnuTLS builds)
};

// Raw public keys (RFC 7250, GnuTLS builds only). Our SubjectPublicKeyInfo is derived from the key.
struct RpkCredentials {
  SecretBuffer private_key_pem;            // SEC1 "EC PRIVATE KEY" (libcoap 4.3.1 needs this form for RPK)
  // Accepted peers, RFC 6920 ids of their SubjectPublicKeyInfo: the servers a client accepts, and the clients a
  // server accepts when it has no NodeConfig::raw_key_lookup (which then decides instead).
  std::set<std::string> pinned_peer_keys;
  std::optional<TokenKey> token_key{};     // the key in a token instead of private_key_pem (GnuTLS builds)
};

// ---- Client credentials ---------------------------------------------------------------------------------------

struct ClientCredentials {
  enum class Kind : std::uint8_t { none, psk, x509, rpk } kind = Kind::none;
  std::string psk_identity;
  SecretBuffer psk_key;
  std::optional<X509Credentials> x509;
  std::optional<RpkCredentials> rpk;
  std::string sni;               // server name sent in the ClientHello (PROTOCOL.md §2: peer FQDN or AE-ID)
  std::string expected_peer;     // x509: required AE-ID or dNSName of the server ("" = any trusted)

  static ClientCredentials plain();
  static ClientCredentials psk(std::string identity, SecretBuffer key, std::string sni);
  static ClientCredentials certificate(X509Credentials credentials, std::string sni, std::string expected_peer);
  static ClientCredentials raw_public_key(RpkCredentials credentials, std::string sni);
  ClientCredentials clone() const;
};

struct Peer {
  std::string host;      // numeric IPv4 / IPv6 address
  std::uint16_t port = 5684;
};

// ---- Configuration ------------------------------------------------------------------------------------------

struct Limits {
  // Pinned defaults (docs/transport.md §2 asks for explicit values; docs/transport.md gives the reasons).
  std::size_t max_sessions = 1000;                          // live server sessions (libcoap max idle sessions)
  std::size_t max_handshakes = 100;                         // concurrent server handshakes; beyond, libcoap
                                                            // ignores new ClientHellos (their DTLS rtx retries)
  std::chrono::seconds idle_timeout{300};                   // idle server session lifetime: bounds unwiped PSK copies
  std::chrono::milliseconds handshake_timeout{10000};       // a handshake not done by then is dropped and reported
  std::size_t max_client_sessions = 512;                    // <= 900: GnuTLS select()s, glibc aborts at fd 1024
  std::chrono::milliseconds request_timeout{20000};         // client: request sent -> response (incl. handshake)
  // Client: a request that may be repeated (may_repeat) over an established DTLS session after which nothing at
  // all (no response, no empty ACK) came from the peer for this long ends that session, failing its requests with
  // Errc::timeout, so that the next request (or a caller's retry) sets up a new one: the peer restarted and forgot
  // the session, or our address changed on the way (NAT rebinding; libcoap 4.3.1 has no DTLS Connection ID).
  // Longer than one CoAP retransmission round (ACK_TIMEOUT 2 s × ACK_RANDOM_FACTOR 1.5 = 3 s, RFC 7252 §4.8) plus
  // a round trip, so one lost datagram does not cost a new handshake; two do (3.6 % of requests at 10 % loss each
  // way), which the caller's retry absorbs. A POST or PATCH never ends a session this way (a retry could repeat
  // it): it waits for CoAP's retransmissions and request_timeout. Counted from the send, or from the end of the
  // handshake for a request sent while it ran. GnuTLS build only (it needs the session's read counter).
  std::chrono::milliseconds silence_timeout{4000};
  std::size_t max_request_size = 4096;                      // PROTOCOL.md §2: larger requests get 4.13
  // RFC 7252 §4.7 NSTART: confirmable messages in flight per session (client: requests; server: separate
  // responses and notifications); libcoap queues the rest until an ACK or response frees a slot. 1 is the RFC's
  // default; a higher value only where both ends are known (two dauthds, or loopback). 1..kMaxNstart.
  std::uint16_t nstart = 1;                                 // DTLS sessions of this Node
  std::uint16_t plain_nstart = 1;                           // plain CoAP sessions (local AEs on loopback)
};

inline constexpr std::uint16_t kMaxNstart = 64;  // bounds the burst one session can put on the network

struct NodeConfig {
  // Secure endpoints ("0.0.0.0", "::", "127.0.0.1", "::1"); empty = no coaps server. Port 0 = ephemeral.
  std::vector<std::string> secure_addresses;
  std::uint16_t secure_port = 5684;
  // Plain CoAP endpoint for local AEs: must be a loopback address; empty = none.
  std::string local_address;
  std::uint16_t local_port = 5683;

  PskLookup psk_lookup;                      // PSK server credentials (optional)
  std::optional<X509Credentials> x509;       // certificate server credentials (optional)
  // Our raw public key (GnuTLS builds only), presented to clients that negotiate raw public keys (RFC 7250): one
  // endpoint serves PSK, certificates and raw keys together (docs/transport.md §3). Node::set_server_raw_key()
  // sets or replaces it later, effective from the next handshake.
  std::optional<RpkCredentials> rpk;
  // Which client raw keys get in, and whom their sessions serve (optional; GnuTLS builds only). Unset: the keys
  // pinned in `rpk`, granted as their key id. Raw-key clients need our raw key too (`rpk` or set_server_raw_key).
  RawKeyLookup raw_key_lookup;
  // Server certificates chosen per handshake by the SNI the client sent (PROTOCOL.md §2: the target AE-ID), exact
  // match; Node::set_server_certificate() adds or replaces one later, effective from the next handshake. A name
  // not in the table gets `x509` if set, else the handshake is refused. Clients are verified against the trust
  // anchors of `x509`, or else of the first certificate set here: every entry must carry the same anchors.
  // GnuTLS builds only (Node::create: unsupported otherwise). docs/transport.md §3.
  std::map<std::string, X509Credentials> x509_by_server_name;
  // PROTOCOL.md §2's legacy switch (FR 256 / RQI 257 / RSC 265). Node::create refuses it with libcoap 4.3.1: its
  // known-option filter has two slots for numbers above 255, used by 279/283 (server) and 283/307 (client).
  bool accept_legacy_onem2m_options = false;
  Limits limits;
  // Optional: a last word on every certificate or raw-key peer once our own checks passed (chain, AE-ID,
  // pinning, expected server), inside the handshake, on server sessions and on client sessions of this Node
  // alike: an Error refuses it (server: access_denied, a refused client never reaches a handler; client: the
  // request fails), the message being the logged reason. E.g. an MEF revocation list by certificate_serial
  // (rspf::RevocationWatch). Memory only, never blocks (like PskLookup).
  std::function<Result<void>(const PeerIdentity& peer)> peer_check;
};

// ---- Handlers -------------------------------------------------------------------------------------------------

// Answers one request, now or later. Move-only. If the handler returns without calling respond() and without
// keeping the Responder, the request gets 5.00. If it keeps it, the client gets an empty ACK now and the response
// (a separate response, RFC 7252 §5.2.2) when respond() is called, on the loop thread.
class Responder {
 public:
  Responder() = default;
  Responder(Responder&&) noexcept;
  Responder& operator=(Responder&&) noexcept;
  Responder(const Responder&) = delete;
  Responder& operator=(const Responder&) = delete;
  ~Responder();

  void respond(Response response);
  bool answered() const noexcept;

  struct State;
  explicit Responder(std::shared_ptr<State> state);

 private:
  std::shared_ptr<State> state_;
};

enum class Access : std::uint8_t { secure, local, both };

using RequestHandler = std::function<void(const Session& session, const Request& request, Responder responder)>;

// Completion of a client request. session is the client session (for the exporter) when the handshake completed,
// otherwise nullptr. Called exactly once, on the loop thread.
using ResponseHandler = std::function<void(Result<Response> response, const Session* session)>;

// Every answer of an observation (Node::observe), on the loop thread. A Response with `observe` set is a
// notification: the subscription is live. The last call is either a Response without `observe` (the server refused
// or ended the subscription, e.g. 4.03, or the resource is not observable) or an error (session closed or lost,
// request timeout, RST): after it the subscription is gone and the owner may subscribe again (with backoff).
using NotificationHandler = std::function<void(Result<Response> notification, const Session* session)>;

// A client subscription (RFC 7641). Destroying it, or cancel(), deregisters: a GET with Observe 1 on the same
// token if the session is still up (libcoap's coap_cancel_observe); a later notification gets an RST. No handler
// call follows a cancel. Move-only; safe to destroy after the Node (then it does nothing).
class Observation {
 public:
  Observation() = default;
  Observation(Observation&&) noexcept;
  Observation& operator=(Observation&&) noexcept;
  Observation(const Observation&) = delete;
  Observation& operator=(const Observation&) = delete;
  ~Observation();

  void cancel();
  bool active() const noexcept;  // neither cancelled nor ended (its final call may still be queued)

  struct State;
  explicit Observation(std::shared_ptr<State> state);

 private:
  std::shared_ptr<State> state_;
};

// ---- Failures and statistics ------------------------------------------------------------------------------------

enum class FailureKind : std::uint8_t {
  handshake_failed,    // refused or aborted by us or the backend (reason says which)
  handshake_timeout,   // never completed: on the client the typical sign of a wrong PSK (no alert is sent)
  request_rejected,    // a request refused before any handler ran (size, no route, access)
  request_failed,      // client side: a request that got no response
  limit,               // a configured cap refused something
};
std::string_view to_string(FailureKind kind) noexcept;

struct Failure {
  FailureKind kind;
  std::string peer_address;
  std::string identity_offered;   // PSK identity, AE-ID or key id as far as known; "" if none
  std::string reason;
};

struct Stats {
  std::uint64_t handshakes_completed = 0;
  std::uint64_t handshakes_failed = 0;     // includes timeouts
  std::uint64_t handshakes_restarted = 0;  // client handshakes that stalled and were begun again (datagrams lost)
  std::uint64_t requests_served = 0;
  std::uint64_t requests_rejected = 0;
  std::uint64_t client_requests_failed = 0;
  std::size_t live_server_sessions = 0;
  std::size_t live_server_handshakes = 0;
  std::size_t live_client_sessions = 0;
};

// A live session as the operator sees it (Node::live_sessions(); dauthctl show and sessions): established DTLS
// sessions and plain ones, not those still in their handshake or already failed or closed.
struct SessionSummary {
  bool client = false;
  bool secure = false;
  PeerIdentity peer;             // whom the peer authenticated as (server: once its first request came)
  SessionGrant grant;            // server side: what the handshake granted
  std::string credential_id;     // PSK identity, or our certificate / key id used
  std::string remote_address;
  std::string server_name;       // server: the SNI the client sent; client: "" (see Session::server_name)
  std::string cipher_suite;      // IANA name; "" if plain
  std::chrono::system_clock::time_point created;        // when the session began (its handshake)
  std::chrono::system_clock::time_point last_received;  // the latest request (server) or response (client)
  SessionCounters counters;
};

// Receives each failure once, as it happens. The default writes one structured line to stderr:
//   transport: event=handshake_failed peer=127.0.0.1:40000 identity="CAE-x" reason="..."
using FailureObserver = std::function<void(const Failure&)>;
std::string format_failure(const Failure& failure);

// ---- Node ----------------------------------------------------------------------------------------------------

class Node {
 public:
  // Creates the contexts and endpoints. Errors: invalid configuration (RPK or a raw-key lookup on OpenSSL,
  // non-loopback local endpoint, bad credentials), or the endpoint could not bind (io, with the address).
  static Result<std::unique_ptr<Node>> create(NodeConfig config);
  ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // Routes requests whose path starts with prefix (segment-wise) and whose method matches; longest prefix wins.
  void add_route(Method method, std::vector<std::string> prefix, Access access, RequestHandler handler);
  // Makes exactly `path` observable (RFC 7641) and routes GET requests for exactly that path to handler (other
  // methods and longer paths still go to add_route's routes; an exact route wins over a prefix of equal length).
  // A GET with Observe 0 subscribes (libcoap keeps one subscription per session + token; it dies with the
  // session). After notify_observers(path) libcoap calls handler once per subscriber, with that subscriber's
  // Session and original request, so each answer is per peer; a non-2.xx answer ends that subscription. The
  // handler must answer a subscription or notification synchronously (a kept Responder gets 5.00 there).
  // Errors: invalid_argument (empty path, a segment with '/', path already observable, no server endpoint).
  Result<void> add_observable(std::vector<std::string> path, Access access, RequestHandler handler);
  // Announces a change of the observable path: notifications go out (CON) from the next process_ready(). Safe to
  // call anywhere on the loop thread, also inside a request handler. Returns whether it has subscribers.
  bool notify_observers(const std::vector<std::string>& path);
  // Closes (close_notify) every live server session whose peer authenticated as (kind, identity), handshake done
  // or done but not yet used, e.g. those of a revoked KeID. Their subscriptions and deferred answers end with them.
  // Returns how many (the caller logs it: transport has no log of its own beyond failures). Called inside a libcoap
  // callback (a request handler), the close happens at the end of that process_ready() round.
  std::size_t close_server_sessions(PeerKind kind, std::string_view identity);
  // Closes every live session, server (as close_server_sessions) and client (as close_client_session: pending
  // requests and observations fail with Errc::io), whose peer presented the X.509 certificate with this serial
  // (PeerIdentity::certificate_serial, canonical) from this issuer (PeerIdentity::certificate_issuer; "" = any
  // issuer), e.g. one its MEF revoked. Returns how many.
  std::size_t close_sessions_with_certificate_serial(std::string_view serial, std::string_view issuer = {});
  // Closes every live session, server (as close_server_sessions) and client (as close_client_session), whose peer
  // authenticated with the raw public key of this RFC 6920 id (PeerKind::rpk), e.g. one whose pin was removed.
  // Returns how many.
  std::size_t close_sessions_with_raw_key(std::string_view key_id);
  // Presents `credentials` to every later handshake whose SNI is `server_name` (NodeConfig::x509_by_server_name),
  // replacing what that name had; live sessions keep theirs. Works on a Node created without certificates too (its
  // secure endpoint then starts accepting X.509 handshakes). Errors: unsupported (OpenSSL build, or a Node
  // without a secure endpoint), invalid_argument (unparsable chain or key, a key that is not the leaf's,
  // trust anchors other than the ones clients are verified against).
  Result<void> set_server_certificate(const std::string& server_name, X509Credentials credentials);
  // Stops presenting a certificate for server_name (then as an unknown name). Returns whether it had one.
  bool remove_server_certificate(const std::string& server_name);
  // Presents this raw key to every later handshake that negotiates raw public keys, replacing NodeConfig::rpk (its
  // pinned_peer_keys too, for a node without raw_key_lookup); live sessions keep theirs. Works on a Node created
  // without one (its secure endpoint then starts accepting raw-key clients). Errors: unsupported (OpenSSL build,
  // or no secure endpoint), invalid_argument (unparsable key).
  Result<void> set_server_raw_key(RpkCredentials credentials);
  void set_failure_observer(FailureObserver observer);

  // Sends request to peer with credentials, setting up or reusing a session (one per peer + credential + SNI +
  // expected peer). handler is called exactly once, from process_ready() -- or before request() returns for
  // set-up errors (bad address, limit). Handlers still pending when the Node is destroyed are dropped uncalled.
  void request(const Peer& peer, const ClientCredentials& credentials, Request request, ResponseHandler handler);
  // Closes the cached client sessions (e.g. after an MEF exchange).
  void close_client_sessions();
  // Closes the one cached session request() would use for (peer, credentials), if any (close_notify is sent);
  // its pending requests fail with Errc::io. Returns whether there was one. The next request() opens a new
  // session (fresh handshake, fresh exporter: the Enrolee before each enrolment).
  bool close_client_session(const Peer& peer, const ClientCredentials& credentials);

  // Subscribes to request's resource on peer (request sent as GET with Observe 0; method is forced to GET) over the
  // same session cache as request(). handler: see NotificationHandler; the first answer must come within
  // request_timeout. Set-up errors (bad address, limit) reach handler before observe() returns, and the returned
  // Observation is then inactive. Keep the Observation: destroying it cancels.
  Observation observe(const Peer& peer, const ClientCredentials& credentials, Request request,
                      NotificationHandler handler);

  // Runs work on the loop thread during the next process_ready(), outside every libcoap callback (so it may call
  // request()): e.g. a PSK lookup that queues a key fetch. fd() stays readable until it has run. Call it from the
  // loop thread only (not thread-safe). Work posted while posted work runs waits for the next round; work still
  // queued when the Node is destroyed is dropped uncalled.
  void post(std::function<void()> work);
  // The same, not before `delay` has passed (a timer of the loop: next_timeout() accounts for it), e.g. a
  // re-subscription backoff. Timers still pending when the Node is destroyed are dropped uncalled.
  void post_after(std::chrono::milliseconds delay, std::function<void()> work);

  // Joins an outside source of work to this loop, e.g. a KeyStore's durable_fd(): while `fd` is readable
  // (level-triggered), fd() is too, and every process_ready() round runs `each_round` on the loop thread, outside
  // libcoap callbacks (after the round's completions, so it may answer deferred requests). each_round must be cheap
  // when there is nothing to do, and must clear fd's readiness when there is. One watch per fd; remove_watch()
  // before fd is closed.
  Result<void> add_watch(int fd, std::function<void()> each_round);
  void remove_watch(int fd);

  // ---- event loop ----
  int fd() const noexcept;                                // level-triggered epoll fd: readable = work to do
  void process_ready();                                   // does all pending I/O and timers, never blocks
  std::chrono::milliseconds next_timeout();               // upper bound for the caller's epoll_wait
  // Convenience for tools and tests: loops on fd() until done() or max elapsed. Returns done().
  bool run_until(const std::function<bool()>& done, std::chrono::milliseconds max);

  std::uint16_t secure_port() const noexcept;             // the bound port (useful with port 0)
  std::uint16_t local_port() const noexcept;
  Stats stats() const;
  // The live sessions of both sides, oldest first (dauthctl show): a snapshot, cheap enough for a control verb
  // (one pass over the sessions), never for the per-packet path.
  std::vector<SessionSummary> live_sessions() const;

  struct Impl;

 private:
  explicit Node(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dauth::transport
