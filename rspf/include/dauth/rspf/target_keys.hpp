// Target key retrieval (PROTOCOL.md §4, docs/rspf.md): the PSK lookup of a peer server whose local AE is an Enrolment
// Target. A KeID with a valid SessionKeyRecord gets its key at once. An unknown KeID whose MEF (after the '@') is
// configured is refused now (Errc::not_found: the client gets a fatal alert and retries, docs/transport.md §1)
// and queued for retrieval: GET /fetchCredentials/<KeID>/22 to that MEF with oneM2M-FR = our AE-ID, authenticated as
// ourselves (KeID/Ker). The answer is stored as a SessionKeyRecord (peer = the MEF's enroleeId, expiry = now +
// lifetime). Never blocks; at most one retrieval per KeID at a time.
//
// Several local AEs: the handshake's SNI names the target AE (PROTOCOL.md §2: clients send the peer AE-ID as SNI).
// Each served AE has its own MEF contacts (a retrieval authenticates as that AE). No SNI means the first AE
// (config.local_ae_id); an SNI that names none of them (e.g. the gateway's FQDN) is accepted for it only while it
// is the only AE served, and refused (denied) once there are several.
// The key differs per target AE (the derivation includes B-ID), so it is stored per (KeID, local AE)
// (crypto::session_key_id): one KeID that targets two local AEs keeps both keys.
//
// ESPrim (PROTOCOL.md §7): the pairwiseESPrimKey of a KeID for a served AE is the SUID 23 key, fetched the same
// way (GET /fetchCredentials/<KeID>/23) when an ESPrim object names it, not in a handshake: esprim_key() below. It
// is stored as its own SessionKeyRecord (suid 23, crypto::session_key_id(KeID, AE, 23)) next to the SUID 22 one;
// its retrievals share max_fetches_in_flight, the backoff after failures and the one-at-a-time rule (per KeID, AE
// and SUID) with the SUID 22 ones. The feed fetches only SUID 22 keys ahead; a revocation removes both.
//
// The MEF feed (PROTOCOL.md §4–5): with config.observe_feed, every MEF contact also
// observes GET /fetchCredentials?delta (oneM2M-FR = that served AE, its own credentials): the first answer lists
// every KeID issued for that AE and the revoked ones at the MEF's feed version n, each later notification only
// what changed since a version m (`since`). A notification whose m is above the version this contact has applied
// (a notification it never got: the MEF remembers what it answered, not what arrived) is a gap: the contact reads
// the whole state with a plain GET /fetchCredentials?full and goes on from its version; until that answer comes,
// deltas are held back (the newest one is checked again after it). A full read that fails is retried by the next
// gap or the next subscription refresh. An MEF of an earlier release answers the whole state without a version:
// it is applied as such each time. Issued KeIDs we hold no valid key for are retrieved ahead of the
// first handshake (each announcement once, within max_fetches_in_flight; the rest wait for free slots). Revoked
// KeIDs: their SessionKeyRecord is removed, the live server sessions that authenticated with them are closed
// (Node::close_server_sessions), and later handshakes with them are refused (denied) without a retrieval. A lost
// subscription (session closed, MEF gone, refusal, credentials not ready yet) is retried with Backoff (1 s doubling
// to 5 min, ± 10 %) through Node::post_after; a notification resets the backoff (MefSubscription).
//
// Loop contract: the lookup runs inside a libcoap DTLS callback, where opening another session would re-enter
// libcoap, so it only queues and posts the start to the loop (Node::post()): the one path every retrieval (also the
// feed's announced KeIDs and esprim_key()'s) starts by; owners call nothing.
//
// The lookup is the one place that maps a handshake's SNI to a served AE: its PskGrant names that AE (local) and the
// record's peer AE-ID (peer), and transport keeps both as the session's grant (transport::Session::grant()), which
// request handlers read instead of deciding again.
// The Node and KeyStore must outlive the TargetKeys; answers after its destruction are dropped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "dauth/crypto/keystore.hpp"
#include "dauth/error.hpp"
#include "dauth/rspf/mef_subscription.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/rspf/schedule.hpp"
#include "dauth/secret.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::rspf {

struct TargetKeysConfig {
  std::string local_ae_id;                 // the Enrolment Target we serve by default (oneM2M-FR of its retrievals)
  std::size_t max_fetches_in_flight = 32;  // bounds the MEF traffic that handshakes with made-up KeIDs can cause
  bool observe_feed = true;                // subscribe to each MEF's /fetchCredentials feed (see above)
  JitterSource jitter = random_jitter();   // of the re-subscription backoff
  UnixClock clock = system_unix_clock();
  LogSink log = stderr_log_sink();
};

// The pairwiseESPrimKey (SUID 23) of a KeID for a served AE, and the peer AE-ID the MEF named for it.
struct EsprimKey {
  std::shared_ptr<const SecretBuffer> key;  // 32 bytes
  std::string peer_ae_id;
};
using EsprimKeyCallback = std::function<void(Result<EsprimKey>)>;

enum class FetchState : std::uint8_t { queued, fetching, stored, failed };
std::string_view to_string(FetchState state) noexcept;

class TargetKeys {
 public:
  // Errors: invalid local AE-ID, max_fetches_in_flight == 0.
  static Result<std::unique_ptr<TargetKeys>> create(transport::Node& node, crypto::KeyStore& store,
                                                    TargetKeysConfig config);
  ~TargetKeys();
  TargetKeys(const TargetKeys&) = delete;
  TargetKeys& operator=(const TargetKeys&) = delete;

  // The MEF contact of one served AE: local_ae_id empty = config.local_ae_id; another AE-ID becomes a served AE
  // (reachable by SNI). Errors: invalid FQDN or AE-ID. Replaces an earlier contact for the same AE and MEF.
  Result<void> add_mef(std::string_view mef_fqdn, MefContact contact, std::string_view local_ae_id = {});

  // The peer server's PSK lookup (bind into a PskLookupSlot): the key stored for (KeID, target AE), with the grant
  // {peer = the record's peer AE-ID, local = the target AE chosen by SNI}. Errors, all refusing the handshake:
  //   not_found  - not a KeID; or unknown KeID, retrieval queued or already running ("retry shortly");
  //   denied     - SNI names no AE served here (with several served); or KeID of an MEF the target AE has no
  //                contact for (also reported to the fetch observer);
  //   limit      - too many retrievals in flight.
  Result<transport::PskGrant> lookup_psk(const transport::PskRequest& request);
  Result<transport::PskGrant> lookup_psk(std::string_view identity);  // no SNI: for config.local_ae_id
  transport::PskLookup psk_lookup();

  // The SUID 23 key of ke_id for the local AE local_ae_id (empty = config.local_ae_id): a stored valid record
  // answers at once (done is called before return); otherwise a retrieval GET /fetchCredentials/<KeID>/23 is
  // queued (or joined, when one for the same KeID and AE is running) and done runs from the loop when it ends.
  // On the loop thread; safe inside libcoap callbacks such as a request handler (it opens no session itself: the
  // retrieval starts from posted work, as above); done may call esprim_key() again. Errors: not_found (not a KeID); denied (MEF refused, no contact of that AE for the KeID's
  // MEF, or KeID revoked by the feed); limit (too many retrievals in flight); the transport's error when the MEF
  // cannot be asked (timeout, io, or unauthenticated: the DTLS handshake with it failed, e.g. port refused); the
  // error of the last failed retrieval while its backoff lasts (no new one is sent before). Callbacks still waiting
  // when the TargetKeys is destroyed are dropped uncalled.
  void esprim_key(std::string_view ke_id, std::string_view local_ae_id, EsprimKeyCallback done);

  std::size_t fetches_pending() const;  // queued + in flight, both SUIDs

  // Told once per retrieval outcome (and for refusals of unknown MEFs): KeID and ok or the reason.
  using FetchObserver = std::function<void(const std::string& ke_id, const Result<void>& outcome)>;
  void set_fetch_observer(FetchObserver observer);

  // Feed state, for status output and tests: contacts whose subscription is live, and every notification applied.
  std::size_t feeds_live() const;
  std::uint64_t feed_notifications() const;
  bool is_revoked(std::string_view ke_id) const;  // announced revoked by its MEF's feed (KeID in either case)
  struct FeedStats {
    std::uint64_t full_states = 0;  // whole-state bodies applied (first answers, full reads, MEFs without versions)
    std::uint64_t deltas = 0;       // deltas applied
    std::uint64_t gaps = 0;         // deltas that did not follow on from the version applied
    std::uint64_t full_reads = 0;   // GET /fetchCredentials?full sent after a gap
  };
  FeedStats feed_stats() const;  // summed over the contacts

  struct Impl;

 private:
  explicit TargetKeys(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace dauth::rspf
