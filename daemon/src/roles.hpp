// The network roles inside dauthd (internal to the daemon module): the key store, the transport Nodes, the MEF,
// one Enrolee per local AE, the target-key lookup and the local-AE proxy path (PROTOCOL.md §3–6, docs/rspf.md).
//
// Nodes (docs/rspf.md "Wiring"):
//   mef node      secure endpoint mef.listen, PSK lookup = Mef (PskLookupSlot), Mef routes;
//   peer node     secure endpoint peer.listen (lookup = TargetKeys), plain endpoint enrolee.local_listen, the
//                 proxy routes, and the client sessions to peers, MEFs (key retrieval) and local AEs;
//   enrolee node  client only: Enrolee::enrol() closes all of its node's client sessions (fresh exporter).
// Every node's fd() is watched by the EventLoop; after each process_ready() its next_timeout() re-arms a one-shot
// timer (TargetKeys starts its key retrievals itself, from posted work: target_keys.hpp loop contract).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "dauth/crypto/keystore.hpp"
#include "dauth/daemon/config.hpp"
#include "dauth/daemon/event_loop.hpp"
#include "dauth/error.hpp"
#include "dauth/rspf/enrolee.hpp"
#include "dauth/rspf/mef.hpp"
#include "dauth/rspf/revocation_watch.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/rspf/target_keys.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::daemon {

class MetricSet;

// "127.0.0.1:5684", "[::1]:5684", "localhost:5684" -> numeric transport::Peer (getaddrinfo at start and reload
// only: peer addresses are numeric inside the loop, docs/transport.md).
Result<transport::Peer> resolve_address(const std::string& text);

// PROTOCOL.md §4: the A side retries a refused first handshake (target still fetching the key) after these delays.
inline constexpr std::chrono::milliseconds kFirstUseRetryDelays[] = {std::chrono::milliseconds(250),
                                                                      std::chrono::milliseconds(1000),
                                                                      std::chrono::milliseconds(3000)};

// oneM2M-RSC for an originator that is not the authenticated AE (TS-0004 Table 6.6.3.3-1: ORIGINATOR_HAS_NO_PRIVILEGE
// is 4103; 4106 is the value PROTOCOL.md pins for the impersonation refusal).
inline constexpr std::uint32_t kRscImpersonation = 4106;
inline constexpr std::uint32_t kRscNoPrivilege = 4103;

class Roles {
 public:
  static Result<std::unique_ptr<Roles>> start(EventLoop& loop, const Config& config, const LoadedSecrets& secrets);
  ~Roles();
  Roles(const Roles&) = delete;
  Roles& operator=(const Roles&) = delete;

  // Applies the keys whose reload rule is live (config_schema.cpp): policy, peer addresses, key tables, local
  // AEs' local_source, endpoint and device certificate, mef.enrolment_lifetime; live sessions continue. The
  // others keep their running values (Daemon::reload names them). Nothing changes when it fails.
  Result<void> reload(const Config& config, const LoadedSecrets& secrets);

  bool has_mef() const;
  bool has_enrolee() const;
  bool has_peer() const;

  // Control verbs (docs/control-protocol.md).
  Result<nlohmann::json> enrol(const std::string& ae_id);
  Result<nlohmann::json> enrolment_status(const std::string& ae_id) const;
  Result<nlohmann::json> revoke(const std::string& id);
  Result<nlohmann::json> remove_credential(const std::string& kpm_id);
  // credentials.add: a BootstrapKeyRecord for a configured PSK-bootstrapped local AE, durable when it returns; the
  // AE's Enrolee uses it from its next attempt on (and after a restart), instead of the configured kpm_id.
  Result<nlohmann::json> add_credential(const std::string& kpm_id, const std::string& ae_id, SecretBuffer kpm);
  // The MEF's enrolee table at run time (enrolees.list/add/remove). A row is owned by the configuration
  // ([[mef.enrolee]]) or by dauthctl, never both: add and remove refuse configured ids.
  nlohmann::json enrolees() const;
  Result<nlohmann::json> add_enrolee(const MefEnrolee& row, SecretBuffer kpm);
  Result<nlohmann::json> remove_enrolee(const std::string& id);
  // rpk.show: our own raw public keys (peer endpoint, MEF, local AEs) with their ids in the printed forms.
  nlohmann::json raw_keys() const;
  // rpk.list/add/remove: the pinned peer keys. A pin is owned by the configuration ([[peer.rpk]]) or by dauthctl,
  // never both: add and remove refuse configured keys. remove refuses the key's next handshake and closes its live
  // sessions.
  nlohmann::json pinned_keys() const;
  Result<nlohmann::json> add_pin(const std::string& key, const std::string& ae_id);
  Result<nlohmann::json> remove_pin(const std::string& key);
  nlohmann::json credentials() const;
  // The key store, for the master-key rotation (verbs/rekey.cpp). Whether it is sealed under the current or
  // the next master key is decided at start (KeyStore::open's candidate keys) and by reseal().
  crypto::KeyStore& key_store();
  const crypto::KeyStore& key_store() const;
  nlohmann::json sessions() const;
  nlohmann::json peers() const;
  // dauthctl show: local AEs, remote AEs and (MEF) enrolees with their credentials, sessions and latest outcomes.
  nlohmann::json show() const;
  // The roles' metrics (metrics.hpp): nodes, local AEs, configured peers, the MEF, the key store.
  void stats(MetricSet& out) const;
  nlohmann::json ports() const;

  // SIGTERM (dauthd(8)): from now on new local-AE and peer requests get 5.03 and no enrolment attempt starts;
  // requests already accepted and running enrolments continue. idle() once they are all done; pending() names
  // what is still running, for the log when daemon.shutdown_timeout cuts the drain short.
  void begin_drain();
  bool idle() const;
  std::vector<std::string> pending() const;
  // daemon.shutdown_timeout reached: answers every request still in flight with 5.03 (the log lines of pending()
  // stay), and wakes the Nodes so that the answers leave on their next round. Returns how many were answered.
  std::size_t abandon_in_flight();

  struct Impl;

 private:
  explicit Roles(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dauth::daemon
