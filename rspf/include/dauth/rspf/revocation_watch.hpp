// Certificate revocation applied in the handshake (PROTOCOL.md §5, docs/rspf.md "RevocationWatch"):
// observes GET /mef/revoked at each MEF this gateway is enrolled with (one MefSubscription per MEF FQDN, with the
// credentials of any local AE enrolled there), keeps each MEF's latest list of revoked certificate serials, and
// answers the transport's peer_check (server and client side) from it.
//
// Revocations are keyed by (issuer, serial): each MEF's list names the subject DN of the CA that issues its
// certificates ("issuer"), and the peer's leaf certificate names its issuer (PeerIdentity::certificate_issuer), so
// the same serial from two MEFs' CAs is two certificates. A list without an issuer (an MEF of an earlier release)
// applies to every issuer, as before.
//
// Fail closed per MEF: a certificate whose issuer a list names is judged by that MEF's list alone, and refused only
// while that list is stale (not sent or confirmed by its MEF for longer than config.max_list_age). A certificate
// whose issuer no list names yet is refused while some MEF's list is unknown (never received since start and none
// stored: it may be that MEF's) or stale. With config.store, every applied list is kept as a
// crypto::RevocationListRecord and loaded back by add_mef(), so a restart is neither blind nor blocked by an MEF
// that is unreachable then. A list received stays in force while its subscription is lost and re-subscribed
// (Backoff). A list is applied only if its version is not below the last one applied from that MEF (stored ones
// included: versions only grow).
//
// Raw public keys and PSK peers are not affected: revocation by serial does not apply to them (KeIDs are revoked
// through TargetKeys' /fetchCredentials feed).
//
// A newly revoked serial also closes the live sessions (server and client) of the watch's Node whose peer
// presented it under that issuer (Node::close_sessions_with_certificate_serial). Loop thread only; the Node (and
// the store) must outlive the watch.
#pragma once

#include <chrono>
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
#include "dauth/transport/transport.hpp"

namespace dauth::rspf {

// How long a list vouches for its MEF's certificates without a word from that MEF (a live subscription confirms it
// at every refresh, kSubscriptionRefresh): one day of MEF outage, after which that MEF's certificates are refused.
inline constexpr std::chrono::seconds kMaxRevocationListAge{24 * 3600};

struct RevocationWatchConfig {
  JitterSource jitter = random_jitter();  // of the re-subscription backoff and refresh
  LogSink log = stderr_log_sink();
  std::chrono::milliseconds subscription_refresh = kSubscriptionRefresh;  // see mef_subscription.hpp
  crypto::KeyStore* store = nullptr;  // keeps the applied lists across restarts; nullptr: memory only
  std::chrono::seconds max_list_age = kMaxRevocationListAge;
  UnixClock clock = system_unix_clock();
};

class RevocationWatch {
 public:
  // Subscribes through `node` (client sessions) and closes that node's sessions on new revocations.
  static std::unique_ptr<RevocationWatch> create(transport::Node& node, RevocationWatchConfig config = {});
  ~RevocationWatch();
  RevocationWatch(const RevocationWatch&) = delete;
  RevocationWatch& operator=(const RevocationWatch&) = delete;

  // Observes the MEF `mef_fqdn`, starting from its list in config.store if there is one. Several contacts for one
  // MEF (one per local AE enrolled there) share one subscription: it authenticates with the first contact whose
  // credentials are ready. The address is the first contact's. Errors: invalid FQDN.
  Result<void> add_mef(std::string_view mef_fqdn, MefContact contact);

  // The serial (any spelling crypto::canonical_serial accepts) is on a list held (received or stored) from one of
  // the MEFs, for any issuer.
  bool is_revoked(std::string_view serial) const;
  // Every added MEF's list has arrived at least once since start.
  bool complete() const;
  // The peer_check verdict (see the top of this file): an X.509 peer is refused if a list that applies to its issuer
  // names its serial, or while the list it depends on is unknown or stale; other peers pass. Memory only, never
  // blocks.
  Result<void> check(const transport::PeerIdentity& peer) const;
  // check() as a NodeConfig::peer_check that outlives nothing: after the watch is gone it refuses X.509 peers.
  std::function<Result<void>(const transport::PeerIdentity&)> peer_check() const;

  // Subscriptions waiting for their backoff delay try again in the next round (e.g. after an enrolment gave the
  // credentials they lacked).
  void retry_now();

  // Told once per serial newly revoked by a list (after its live sessions were closed), with the MEF's FQDN.
  using RevokedObserver = std::function<void(const std::string& serial, const std::string& mef_fqdn)>;
  void set_revoked_observer(RevokedObserver observer);

  // For status output and tests.
  std::size_t feeds_live() const;
  std::uint64_t notifications() const;  // lists applied
  std::size_t revoked_count() const;

  struct Impl;

 private:
  explicit RevocationWatch(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace dauth::rspf
