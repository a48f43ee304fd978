// Target key retrieval (SPEC.md §4, docs/rspf.md): the PSK lookup of a peer server whose local AE is an Enrolment
// Target. A KeID with a valid SessionKeyRecord gets its key at once. An unknown KeID whose MEF (after the '@') is
// configured is refused now (Errc::not_found: the client gets unknown_psk_identity and retries, DESIGN.md §3) and
// queued for retrieval: GET /fetchCredentials/<KeID>/22 to that MEF with oneM2M-FR = our AE-ID, authenticated as
// ourselves (KeID/Ker). The answer is stored as a SessionKeyRecord (peer = the MEF's enroleeId, expiry = now +
// lifetime). Never blocks; at most one retrieval per KeID at a time.
//
// Loop contract: the lookup runs inside a libcoap DTLS callback, where opening another session would re-enter
// libcoap, so it only queues. The owner calls start_pending_fetches() after each Node::process_ready().
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
#include "dauth/rspf/role_support.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::rspf {

// How to reach one MEF and authenticate to it (e.g. from Enrolee::mef_credentials()).
struct MefContact {
  transport::Peer address;
  std::function<Result<transport::ClientCredentials>()> credentials;
};

struct TargetKeysConfig {
  std::string local_ae_id;                 // the Enrolment Target we serve (oneM2M-FR of the retrieval)
  std::size_t max_fetches_in_flight = 32;  // bounds the MEF traffic that handshakes with made-up KeIDs can cause
  UnixClock clock = system_unix_clock();
  LogSink log = stderr_log_sink();
};

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

  // Errors: invalid FQDN. Replaces an earlier contact for the same MEF.
  Result<void> add_mef(std::string_view mef_fqdn, MefContact contact);

  // The peer server's PSK lookup (bind into a PskLookupSlot). Errors, all refusing the handshake:
  //   not_found  - not a KeID; or unknown KeID, retrieval queued or already running ("retry shortly");
  //   denied     - KeID of an MEF we have no contact for (also reported to the fetch observer);
  //   limit      - too many retrievals in flight.
  Result<SecretBuffer> lookup_psk(std::string_view identity);
  transport::PskLookup psk_lookup();

  // Starts the queued retrievals (see the loop contract above). Cheap when nothing is queued.
  void start_pending_fetches();
  std::size_t fetches_pending() const;  // queued + in flight

  // Told once per retrieval outcome (and for refusals of unknown MEFs): KeID and ok or the reason.
  using FetchObserver = std::function<void(const std::string& ke_id, const Result<void>& outcome)>;
  void set_fetch_observer(FetchObserver observer);

  struct Impl;

 private:
  explicit TargetKeys(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace dauth::rspf
