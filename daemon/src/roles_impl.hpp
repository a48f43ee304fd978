// Roles' internals, shared by roles.cpp (start, reload, enrolment, control verbs) and proxy.cpp (the local-AE
// path on gateway A and the peer path on gateway B). Internal to the daemon module.
#pragma once

#include <chrono>
#include <functional>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "dauth/crypto/x509.hpp"
#include "dauth/crypto/token.hpp"
#include "dauth/daemon/log.hpp"
#include "dauth/rspf/esprim.hpp"
#include "event_log.hpp"
#include "roles.hpp"

namespace dauth::daemon {

std::int64_t unix_now();
// The key store names of our own raw keys (CertificateRecords with an empty chain); a local AE's is its AE-ID.
inline constexpr const char* kPeerRawKeyName = "raw-key:peer";
inline constexpr const char* kMefRawKeyName = "raw-key:mef";
// The key store name of a local AE's configured device certificate (enrolee.ae.certificate_file); an AE-ID
// certificate issued over EST is stored under the AE-ID itself.
std::string device_certificate_name(const std::string& ae_id);

// ---- state ------------------------------------------------------------------------------------------------

struct NodeDriver {
  std::string name;
  std::unique_ptr<transport::Node> node;
  EventLoop::Registration watch;
  EventLoop::Registration timer;
  // Roles::Impl::rearm(): when `timer` fires (max() once it fired), zero-delay turns in a row, and whether
  // node->process_ready() is running (after_io() re-arms once it returned).
  std::chrono::steady_clock::time_point timer_due = std::chrono::steady_clock::time_point::max();
  int immediate_turns = 0;
  bool in_round = false;
  // The node's transport failures by kind (its failure observer counts them; `stats` reports them).
  std::map<transport::FailureKind, std::uint64_t> failures;
};

struct LocalAeState {
  LocalAe config;
  std::unique_ptr<rspf::Enrolee> enrolee;
  EventLoop::Registration timer;
  std::uint64_t attempts_started = 0;
  std::uint64_t attempts_done = 0;
  std::uint64_t attempts_failed = 0;
  std::optional<std::string> last_error;
  std::int64_t last_attempt_at = 0;
  std::int64_t next_attempt_delay_ms = 0;  // the delay last scheduled (renewal or backoff step)
  std::int64_t next_attempt_at = 0;        // when that attempt is due (unix seconds)
  std::int64_t last_enrolled_at = 0;       // the latest successful attempt
  std::int64_t last_error_at = 0;          // when last_error happened
  std::int64_t last_request_at = 0;        // the latest request it sent through dauthd (A) or received (B)
};

// What dauthd saw of a remote AE lately, both directions (dauthctl show): sessions it authenticated in, requests
// proxied to it, and its refusals. Kept only for AEs a handshake authenticated or the configuration names.
struct PeerActivity {
  std::int64_t last_handshake_at = 0;  // the newest session that carried a request, either direction
  std::int64_t last_request_at = 0;    // the latest request to it (A) or from it (B)
  std::int64_t last_success_at = 0;    // the latest request answered 2.xx
  std::int64_t last_failure_at = 0;
  std::string last_failure;            // why: the transport error, or the refusal (code and detail)
};

// A session as dauthd saw it carry requests (transport has no session listing; libcoap owns the sessions).
struct SeenSession {
  std::string direction;  // "in" | "out"
  std::string peer_ae_id;
  std::string identity;   // PSK identity (KeID) or certificate AE-ID
  std::string kind;
  std::string remote;
  std::string cipher;
  std::int64_t created = 0;
  std::int64_t last_used = 0;
  std::uint64_t requests = 0;
};

struct PeerState {
  std::string address_text;
  std::string credential = "psk";  // peer.address.credential: psk | certificate
  std::string server_name;         // the SNI naming this AE (crypto::server_name_for_ae_id), set with the address
  std::optional<transport::Peer> address;
  std::uint64_t requests = 0;
  std::uint64_t failures = 0;
  std::uint64_t retries = 0;
  std::string last_outcome;
  std::int64_t last_at = 0;
  // Proxied requests to this AE not answered yet (their trackers hold it and count themselves out, proxy.cpp);
  // bounded by kMaxProxiedInFlightPerPeer so that a slow or unreachable peer cannot pile up work without end.
  std::shared_ptr<std::size_t> in_flight = std::make_shared<std::size_t>(0);
  bool esprim_required = false;  // peer.address esprim = "required" (PROTOCOL.md §7)
};

// A next hop ([[peer.hop]], relay.cpp): a CoAP forward proxy or relaying dauthd, authenticated with static DTLS-PSK.
struct HopState {
  std::string name;
  std::string address_text;  // "relay.example.net:5684" as configured
  transport::Peer address;   // resolved at start and reload
  std::string identity;      // the PSK identity we present
  std::shared_ptr<const SecretBuffer> key;
  std::string server_name;   // SNI: the configured host when it is a DNS name, else "" (none sent)
  transport::ClientCredentials credentials() const {
    return transport::ClientCredentials::psk(identity, key->clone(), server_name);
  }
};

// Relayed requests not answered yet beyond this many get 5.03 at once (relay.cpp): a slow or unreachable next hop
// must not pile up work without end.
inline constexpr std::size_t kMaxRelayedInFlight = 256;

// A local AE's request beyond this many unanswered ones to the same target AE gets 5.03 at once: each waits for up
// to four attempts of request_timeout, and an AE that keeps sending to a dead peer must not grow memory or the
// peer session's queue without bound. Far above what NSTART (at most 32 in flight per session) lets through.
inline constexpr std::size_t kMaxProxiedInFlightPerPeer = 256;

// Requests accepted for forwarding (A) or delivery (B), with a description for the log of a drain cut short by
// daemon.shutdown_timeout; one is in flight until its Responder has answered. Shared with the trackers (proxy.cpp
// track_in_flight()), which may outlive Impl: a Responder captured by a timer callback goes when the EventLoop
// drops that callback.
struct InFlightTable {
  struct Entry {
    std::string what;
    transport::Responder* responder;  // owned by the tracker (proxy.cpp track_in_flight)
  };
  std::uint64_t next_id = 0;
  std::map<std::uint64_t, Entry> requests;
  std::vector<std::string> unanswered() const {
    std::vector<std::string> out;
    for (const auto& [id, entry] : requests) {
      if (!entry.responder->answered()) out.push_back(entry.what);
    }
    return out;
  }
  // daemon.shutdown_timeout: answers every unanswered request with `response` (a later answer is ignored,
  // Responder::respond) so that no local AE or peer waits for a timeout; returns how many.
  std::size_t answer_unanswered(const transport::Response& response) {
    std::size_t answered = 0;
    for (auto& [id, entry] : requests) {
      if (entry.responder->answered()) continue;
      entry.responder->respond(response);
      ++answered;
    }
    return answered;
  }
};

// What put_key_tables() changes, computed without touching the store or an Enrolee: every record already built
// and checked, so that applying it can fail only on a write, which apply_key_tables() undoes.
struct KeyTablePlan {
  std::vector<crypto::Record> writes;  // each differs from the stored record
  struct Move {
    LocalAeState* ae;  // a running Enrolee bootstrapping with the KpmID being retired
    std::string to;    // its AE's configured kpm_id now; empty: none, the retired one stays until the restart
  };
  struct Removal {
    crypto::RecordKind kind;
    std::string id;
    std::vector<Move> moves;  // done first; the record stays if one fails
  };
  std::vector<Removal> removals;  // configured rows the new configuration no longer has
  std::set<std::string> kpm_ids;      // the new configured_kpm_ids
  std::set<std::string> enrolee_ids;  // the new configured_enrolee_ids
  std::vector<std::string> notices;   // logged once applied
};

struct EsprimSend;  // esprim_paths.cpp: one protected request on its way

struct Roles::Impl {
  explicit Impl(EventLoop& l) : loop(l) {}
  ~Impl();

  EventLoop& loop;
  Config config;  // the running configuration's typed sections (what_roles_keep): policy, addresses, listeners
  std::optional<crypto::KeyStore> store;
  // The PKCS#11 token crypto/ signs with (open_signing_token): EST keys generated in it (enrolee.ae.certificate_key)
  // and the MEF's issuing CA key (mef.issuing_ca_key = "pkcs11:..."); null when the configuration names none.
  std::shared_ptr<const crypto::Token> signing_token;
  // The token's user PIN (LoadedSecrets at start), for the transport's token keys made from store records.
  std::shared_ptr<const SecretBuffer> pkcs11_pin;
  rspf::PskLookupSlot mef_slot;
  rspf::PskLookupSlot peer_slot;
  std::vector<std::unique_ptr<NodeDriver>> drivers;  // mef, peer, enrolee (whichever exist)
  NodeDriver* mef_driver = nullptr;
  NodeDriver* peer_driver = nullptr;
  NodeDriver* enrolee_driver = nullptr;
  std::unique_ptr<rspf::Mef> mef;
  std::vector<std::unique_ptr<LocalAeState>> aes;
  std::unique_ptr<rspf::TargetKeys> target_keys;
  // The MEFs' certificate revocation lists, applied by the peer node's peer_check (server and client sessions);
  // only with peer.trust_anchors (certificate peer sessions) and an Enrolee (the MEFs to ask).
  std::unique_ptr<rspf::RevocationWatch> revocations;
  // The local AEs the peer endpoint serves as Enrolment Targets (endpoint + Enrolee; TargetKeys picks one by SNI
  // and names it in the PSK session's grant).
  std::vector<std::string> served_aes;
  // The local AEs whose X.509 certificates the peer endpoint presents, each to the handshakes whose SNI names it
  // (transport: NodeConfig::x509_by_server_name): the certificate carries its AE-ID (X509Credentials::local_ae_id)
  // into the grant of the sessions it is presented to.
  std::set<std::string> certificate_aes;
  // Presents ae_id's current certificate (x509_of_local_ae) on the peer endpoint from the next handshake naming
  // it, e.g. after EST issued or renewed it; live sessions keep theirs. Logs the outcome.
  void serve_certificate_of(const std::string& ae_id);
  std::string peer_trust_anchors_pem;  // peer.trust_anchors: the CAs of peers' AE-ID certificates
  // A local AE's certificate and key with peer.trust_anchors (local_ae_id = ae_id): its AE-ID certificate issued
  // over EST while valid, else its configured device certificate. Errors: not_found (neither).
  Result<transport::X509Credentials> x509_of_local_ae(const std::string& ae_id) const;
  // ---- raw public keys (RFC 7250; GnuTLS builds) ----
  // Our own raw key, a CertificateRecord with an empty chain under `name` (the peer endpoint's kPeerRawKeyName, the
  // MEF's kMefRawKeyName, a local AE's AE-ID), as `source` configures it: "generate" keeps it sealed in the store
  // (made now if there is none yet), a pkcs11: URI names one in a token (loaded now; the record keeps the URI).
  Result<transport::RpkCredentials> own_raw_key(const std::string& name, const std::string& source);
  // The pins: [[peer.rpk]] rows (key id -> AE-ID), replaced by each reload, and PinnedKeyRecords added with dauthctl
  // rpk add (never a configured key: the file's rows are not copied into the store, so that a row deleted from the
  // file while dauthd was stopped does not live on there).
  std::map<std::string, std::string> configured_pins;
  // The AE-ID a key id is pinned to, "" if none.
  std::string pinned_ae_of(const std::string& key_id) const;
  // The key ids pinned to ae_id: the servers an outgoing raw-key session to it accepts.
  std::set<std::string> keys_pinned_to(const std::string& ae_id) const;
  // The credentials of an outgoing raw-key session from local AE ae_id to target: its raw key and the keys pinned
  // to target. Errors: not_found (no raw_key for that AE, or no key pinned to target).
  Result<transport::RpkCredentials> raw_key_of_local_ae(const std::string& ae_id, const std::string& target) const;
  // The peer node's RawKeyLookup: the pin names the peer AE, the SNI the local AE (as for PSK sessions).
  Result<transport::RawKeyGrant> grant_raw_key(const transport::RawKeyRequest& request) const;
  // A pin removed or moved to another AE-ID: the key's live sessions (both directions) close, logged.
  void close_raw_key_sessions(const std::string& key_id, const std::string& why);
  std::map<std::string, PeerState> peers;
  std::map<std::string, SeenSession> seen;  // by note_session's key; bounded by forget_ended_sessions()
  // Drops the `seen` entries of sessions that ended (transport's live_sessions()): at each listing, and when
  // prune_seen_at is reached.
  void forget_ended_sessions();
  // The configured peer (its AE-ID) whose resolved address is remote_address ("127.0.0.1:5684"); "" if none, e.g.
  // an MEF the key retrievals go to.
  std::string peer_at(const std::string& remote_address) const;
  static constexpr std::size_t kMaxSeenSessions = 4096;
  // The size at which note_session prunes next: twice what survived the last pruning, so that with thousands of
  // live sessions a new one does not snapshot them all each time (the proxied-request path).
  std::size_t prune_seen_at = kMaxSeenSessions;
  std::map<std::string, PeerActivity> peer_activity;  // by remote AE-ID
  // Records a failure of the exchange with a remote AE (peer_activity) for dauthctl show.
  void note_peer_failure(const std::string& ae_id, const std::string& reason);
  std::map<std::uint64_t, EventLoop::Registration> retry_timers;  // pending first-use retries, by id
  std::uint64_t last_retry_id = 0;
  std::map<std::string, std::uint64_t> counters;
  // Expiry (unix seconds) of the MEF's certificate and issuing CA as loaded at start, for `stats`; 0: none.
  std::int64_t mef_certificate_expires_at = 0;
  std::int64_t mef_issuing_ca_expires_at = 0;
  bool stopping = false;
  // SIGTERM drain (Roles::begin_drain): new requests get 5.03, no enrolment starts, accepted work finishes.
  bool draining = false;
  std::shared_ptr<InFlightTable> in_flight = std::make_shared<InFlightTable>();

  rspf::LogSink log_sink() const {
    return [](rspf::LogKind kind, const std::string& subject, const std::string& line) {
      log_role_event(kind, subject, line);
    };
  }
  Result<void> drive(NodeDriver& driver);
  void after_io();
  void run_round(NodeDriver& driver);  // process_ready() of one node (fd readable or timer), then after_io()
  void rearm(NodeDriver& driver);
  // Puts the configured key tables into the store: plan_key_tables() then apply_key_tables() (roles.cpp).
  Result<void> put_key_tables(const Config& cfg, const LoadedSecrets& secrets);
  Result<KeyTablePlan> plan_key_tables(const Config& cfg, const LoadedSecrets& secrets) const;
  Result<void> apply_key_tables(KeyTablePlan plan);
  // The ids the configuration owns (put_key_tables): KpmIDs of [[enrolee.ae]] (BootstrapKeyRecords) and credential
  // ids of [[mef.enrolee]] (EnroleeRecords). Other records of those kinds were added with dauthctl at run time
  // (docs/control-protocol.md "Run-time credentials").
  std::set<std::string> configured_kpm_ids;
  std::set<std::string> configured_enrolee_ids;
  bool key_tables_loaded = false;
  // The KpmID a configured PSK AE bootstraps with: the one added for it with dauthctl, if any, else its kpm_id.
  std::string bootstrap_kpm_id_of(const LocalAe& ae) const;
  Result<crypto::CertificateRecord> device_certificate_record(const LocalAe& ae) const;
  Result<void> resolve_peers(const Config& cfg, std::map<std::string, PeerState>& out) const;
  LocalAeState* find_ae(const std::string& id);
  void schedule_enrolment(LocalAeState& ae, std::chrono::milliseconds delay);
  void start_enrolment(LocalAeState& ae);
  void on_local_request(const transport::Session& session, const transport::Request& request,
                        transport::Responder responder);
  void forward_to_peer(const std::string& target, const transport::Peer& address, std::string ke_id,
                       std::shared_ptr<SecretBuffer> key, transport::Request request,
                       std::shared_ptr<transport::Responder> responder, std::size_t attempt);
  // A proxied request that failed for good (proxy.cpp): logged with its likely causes and where to check them
  // (the peer's reason is only in the peer's log); a KeID the peer refused is checked with the MEF.
  void on_forward_failed(const std::string& originator, const std::string& target, const std::string& ke_id,
                         const Error& error);
  // Asks the AE's MEF whether it still accepts its KeID (Enrolee::confirm_enrolment); one it no longer accepts
  // (revoked, expired or unknown there) is replaced by an enrolment now.
  void confirm_enrolment_of(LocalAeState& ae);
  // ---- ESPrim (esprim_paths.cpp, PROTOCOL.md §7) ----
  // B: the receiver state (rand objects, sessions, replay windows), with peer.esprim = "accept"; in memory only, so
  // that nothing protected before a restart is accepted after it.
  std::unique_ptr<rspf::esprim::Receiver> esprim_receiver;
  // A: per (KeID, remote AE) the receiver object, our originator object and the message counter.
  rspf::esprim::Originator esprim_originator;
  // A: requests waiting for the one receiver-rand request per (KeID "\n" remote AE) in flight.
  std::map<std::string, std::vector<std::shared_ptr<EsprimSend>>> rand_waiters;
  // A: local AE ae's request to target (peer.address esprim = "required"), path/query at the target AE.
  void forward_protected(LocalAeState& ae, const std::string& target, transport::Request original,
                         std::vector<std::string> path, std::vector<std::string> query,
                         std::shared_ptr<transport::Responder> responder);
  void send_protected(const std::shared_ptr<EsprimSend>& send);
  void ask_receiver_rand(const std::shared_ptr<EsprimSend>& send, const std::string& kid);
  void on_protected_answer(const std::shared_ptr<EsprimSend>& send, const rspf::esprim::ProtectedRequest& sent,
                           Result<transport::Response> outcome);
  // Answers the local AE with a refusal, logged once (rate-limited) with both AE-IDs and counted.
  void fail_protected(const std::shared_ptr<EsprimSend>& send, int code, std::optional<std::uint32_t> rsc,
                      const Error& error, log::Level level);
  // B: POST /esprim (sit 3: our rand object; sit 5: open, check, deliver, protect the answer).
  void on_esprim_request(const transport::Session& session, const transport::Request& request,
                         transport::Responder responder);
  void on_esprim_key(const rspf::esprim::Inspected& object, const std::string& receiver, const std::string& remote,
                     const std::shared_ptr<transport::Responder>& responder, Result<rspf::EsprimKey> key);
  // A plain refusal (its reason crosses every hop), logged with `log_only` appended.
  void refuse_esprim(const std::string& remote, const std::string& receiver, const rspf::esprim::Refusal& refused,
                     transport::Responder& responder, const std::string& log_only = {});
  void note_session_activity_esprim(const std::string& originator, const std::string& receiver);
  // The access policy ([[peer.policy]]): whether the authenticated remote AE `requester` may use `method` on
  // local AE `local_ae`. The one place this is decided, for AE-pair sessions and ESPrim alike.
  bool policy_allows(const std::string& requester, const std::string& local_ae, const std::string& method) const;
  // Sends `delivered` as plain CoAP to local AE local_ae's enrolee.ae.endpoint; done gets its answer, or not_found
  // (no endpoint), invalid_argument (unresolvable) or the transport error (logged here, counted).
  void deliver_to_local_ae(const std::string& local_ae, transport::Request delivered,
                           std::function<void(Result<transport::Response>)> done);
  void on_peer_request(const transport::Session& session, const transport::Request& request,
                       transport::Responder responder);

  // ---- relay path (relay.cpp, docs/relay.md) ----
  std::map<std::string, HopState> hops;  // [[peer.hop]] by name; replaced whole by a reload
  // [[peer.hop_client]]: the hop identities the peer endpoint accepts, and their keys; replaced whole by a reload.
  std::map<std::string, std::shared_ptr<const SecretBuffer>> hop_clients;
  std::shared_ptr<std::size_t> relay_in_flight = std::make_shared<std::size_t>(0);
  // The hop and hop-client tables of cfg with their keys from secrets (start and reload; nothing changes on error).
  Result<void> resolve_hops(const Config& cfg, const LoadedSecrets& secrets, std::map<std::string, HopState>& out,
                            std::map<std::string, std::shared_ptr<const SecretBuffer>>& clients_out) const;
  // The peer endpoint's PSK lookup: a [[peer.hop_client]] identity first (grant: no peer AE, no local AE), then
  // TargetKeys' (if this dauthd serves AEs). Bound into peer_slot.
  transport::PskLookup peer_psk_lookup();
  // Whether the session was authenticated by a [[peer.hop_client]] identity: it has no AE identity and may carry
  // only outer ESPrim messages (POST /esprim) and relayed ones (Proxy-Uri).
  bool is_hop_session(const transport::Session& session) const;
  // The credentials of an outgoing AE-pair session from local AE `originator` to peer `target` (its
  // peer.address.credential): PSK with the KeID and key (ke_id, key: Enrolee::key_for_target), the AE's
  // certificate, or its raw key. Errors: as x509_of_local_ae / raw_key_of_local_ae; not_found (no such peer).
  Result<transport::ClientCredentials> credentials_to_peer(const std::string& originator, const std::string& target,
                                                           const std::string& ke_id, const SecretBuffer& key) const;
  // Sends an outer ESPrim message (POST /esprim?to=<target>, no oneM2M-FR/RQI) from local AE `originator` to the
  // gateway of peer AE `target`: through its [[peer.address]] via hop (Proxy-Uri coaps://<peer address>/esprim?
  // to=<target>, hop credentials), else directly over the AE-pair credentials (credentials_to_peer). `done` gets
  // the peer's answer unchanged, or the transport's error (not_found: no [[peer.address]], or via names no hop).
  // Called exactly once, on the loop thread; possibly before send_outer returns (set-up errors).
  void send_outer(const std::string& originator, const std::string& target_ae_id, transport::Request outer,
                  std::function<void(Result<transport::Response>)> done);
  // The peer endpoint's route (relay.cpp): a request with Proxy-Uri goes to on_relay_request; a hop session's
  // request other than POST /esprim gets 4.03; everything else goes to on_peer_request.
  void on_secure_request(const transport::Session& session, const transport::Request& request,
                         transport::Responder responder);
  // The secure endpoint's route for requests with Proxy-Uri ([relay]); answers 4.03/5.05/5.03 with a reason when
  // it does not forward.
  void on_relay_request(const transport::Session& session, const transport::Request& request,
                        transport::Responder responder);
  void on_node_failure(NodeDriver& driver, const transport::Failure& failure);
  void note_session(const std::string& direction, const transport::Session& session, const std::string& peer_ae_id);
  void count(const std::string& name) { ++counters[name]; }
};

// A request accepted for forwarding, delivery or relaying is listed in Roles::Impl::in_flight while its Responder
// lives (inside the tracker, which every copy of the returned pointer keeps alive); the drain waits until it
// answered. `counter`, if given, counts it too (PeerState::in_flight, Impl::relay_in_flight) for as long (proxy.cpp).
std::shared_ptr<transport::Responder> track_in_flight(Roles::Impl& roles, transport::Responder responder,
                                                      std::string what,
                                                      std::shared_ptr<std::size_t> counter = nullptr);

}  // namespace dauth::daemon
