// Certificate revocation applied in the handshake (PROTOCOL.md §5, docs/rspf.md "RevocationWatch"):
// observes GET /mef/revoked at each MEF this gateway is enrolled with (one MefSubscription per MEF FQDN, with the
// credentials of any local AE enrolled there), keeps each MEF's latest list of revoked certificate serials in
// memory, and answers the transport's peer_check (server and client side) from it.
//
// Fail closed without persistence: the lists are not stored. Until the list of every added MEF has arrived once
// since start, every X.509 peer is refused ("revocation list of MEF … not received yet"), so a serial revoked
// before a restart is never accepted while the MEF is unreachable; certificate peer sessions wait for the MEF
// instead. A list received once stays in force while its subscription is lost and re-subscribed (Backoff).
// A list is applied only if its version is not below the last one applied from that MEF (versions only grow).
//
// Serials are compared without their issuer (PeerIdentity has none): the MEF's serials are 16 random bytes, so a
// collision with another CA's serial only ever refuses more. Raw public keys and PSK peers are not affected:
// revocation by serial does not apply to them (KeIDs are revoked through TargetKeys' /fetchCredentials feed).
//
// A newly revoked serial also closes the live sessions (server and client) of the watch's Node whose peer
// presented it (Node::close_sessions_with_certificate_serial). Loop thread only; the Node must outlive the watch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "dauth/error.hpp"
#include "dauth/rspf/mef_subscription.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/rspf/schedule.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::rspf {

struct RevocationWatchConfig {
  JitterSource jitter = random_jitter();  // of the re-subscription backoff and refresh
  LogSink log = stderr_log_sink();
  std::chrono::milliseconds subscription_refresh = kSubscriptionRefresh;  // see mef_subscription.hpp
};

class RevocationWatch {
 public:
  // Subscribes through `node` (client sessions) and closes that node's sessions on new revocations.
  static std::unique_ptr<RevocationWatch> create(transport::Node& node, RevocationWatchConfig config = {});
  ~RevocationWatch();
  RevocationWatch(const RevocationWatch&) = delete;
  RevocationWatch& operator=(const RevocationWatch&) = delete;

  // Observes the MEF `mef_fqdn`. Several contacts for one MEF (one per local AE enrolled there) share one
  // subscription: it authenticates with the first contact whose credentials are ready. The address is the first
  // contact's. Errors: invalid FQDN.
  Result<void> add_mef(std::string_view mef_fqdn, MefContact contact);

  // The serial (any spelling crypto::canonical_serial accepts) is on a list received from one of the MEFs.
  bool is_revoked(std::string_view serial) const;
  // Every added MEF's list has arrived at least once.
  bool complete() const;
  // The peer_check verdict: an X.509 peer is refused if its serial is revoked, or while the watch is not
  // complete(); other peers pass. Memory only, never blocks.
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
