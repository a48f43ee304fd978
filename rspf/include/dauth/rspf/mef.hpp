// The MEF role (PROTOCOL.md §3–5, docs/rspf.md): authenticates enrolees by their bootstrap credential, derives and
// stores their enrolment keys, answers the targets' key retrieval, issues AE-ID certificates over EST-coaps
// (RFC 9148) and revokes.
//
// Ownership: the Mef keeps references to the Node and the KeyStore, which must outlive it. Its routes stay
// registered in the Node (transport has no route removal): destroy or stop driving the Node before the Mef.
// Single-threaded like the Node (docs/transport.md §1).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "dauth/crypto/keystore.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/error.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::rspf {

// EST-coaps Content-Formats (RFC 9148 §8.3 / IANA CoAP Content-Formats).
inline constexpr std::uint16_t kContentFormatPkcs10 = 286;    // application/pkcs10 (DER CSR)
inline constexpr std::uint16_t kContentFormatPkixCert = 287;  // application/pkix-cert (DER certificate)

// A 16-byte serial: unique per CA with overwhelming probability, well inside RFC 5280's 20 bytes.
inline constexpr std::size_t kCertificateSerialSize = 16;

struct MefConfig {
  std::string fqdn;                                          // MEF-FQDN: names every KeID we derive
  std::optional<crypto::CertificateAuthority> ca;            // EST is served only with a CA
  std::int64_t max_certificate_validity_s = 30 * 86400;      // issued certificates: min(this, enrolment expiry)
  // A target's key retrieval answers lifetime = min(this, the KeID's remaining enrolment): the target keeps the key
  // that long, then fetches it again (and so learns of a revocation it missed in the feed). PROTOCOL.md §4.
  std::int64_t session_key_lifetime_s = 86400;
  UnixClock clock = system_unix_clock();
  LogSink log = stderr_log_sink();
};

// What the MEF saw of one enrolee (an AE-ID of its enrolee table) since it started, for the operator (dauthctl show
// on the MEF). In memory only; kept for enrolees the table or an enrolment names, never for unknown identities, so
// a flood of strangers cannot grow it.
struct EnroleeActivity {
  std::int64_t last_seen_at = 0;      // the latest handshake, request or refusal attributed to this enrolee
  std::int64_t last_enrolled_at = 0;  // the latest enrolment answered (2.04)
  std::string last_ke_id;             // the KeID of that enrolment
  std::int64_t last_failure_at = 0;
  std::string last_failure;           // why, as logged (refused request or failed handshake)
  std::uint64_t enrolments = 0;
  std::uint64_t failures = 0;
};

class Mef {
 public:
  // Registers the routes on node (secure endpoint only): POST mef/enrolment, GET fetchCredentials/<KeID>/<SUID>,
  // the observable GET fetchCredentials feed (PROTOCOL.md §4: each target's issued and revoked KeIDs, the whole
  // state or, versioned with ?delta, only what changed since an observer's last answer; notified after an enrolment
  // naming targets is stored and after a revocation), the observable GET mef/revoked (PROTOCOL.md
  // §5: revoked certificate serials and KeIDs, notified after every revocation), and with a CA POST
  // .well-known/est/sen, .well-known/est/sren and GET .well-known/est/crts. Errors: invalid FQDN; a node without
  // server endpoint or whose fetchCredentials path is already observable (one Mef per Node).
  static Result<std::unique_ptr<Mef>> create(transport::Node& node, crypto::KeyStore& store, MefConfig config);
  ~Mef();
  Mef(const Mef&) = delete;
  Mef& operator=(const Mef&) = delete;

  // The Node's PSK lookup for the MEF's secure endpoint (bind it into a PskLookupSlot):
  //   a KpmID  -> that EnroleeRecord's Kpm (bootstrap, PROTOCOL.md §3.2);
  //   a KeID   -> Ker of that EnrolmentKeyRecord, unless revoked or expired (re-authentication, PROTOCOL.md §3.5).
  // Anything else: Errc::not_found. Never blocks (memory only).
  Result<transport::PskGrant> lookup_psk(std::string_view identity) const;  // peer = the enrolee's AE-ID
  transport::PskLookup psk_lookup();

  // Marks the KeID revoked (revoked_at = now), durably; every key derived from it is refused from then on, and, if
  // it names targets, the feed's observers are notified.
  // Errors: not_found, or the store's error. Idempotent: revoking twice keeps the first time.
  Result<void> revoke(std::string_view ke_id);
  // Marks an issued certificate revoked in its IssuanceRecord (serial as upper- or lower-case hex), durably, and
  // notifies the observers of mef/revoked (peers refuse the serial in handshakes and close its live sessions).
  Result<void> revoke_certificate(std::string_view serial_hex);

  const std::string& fqdn() const;

  // Per enrolee AE-ID (EnroleeRecord::enrolee_id), what it did lately (EnroleeActivity).
  const std::map<std::string, EnroleeActivity>& activity() const;
  // A handshake with this MEF failed (transport's FailureObserver): counted as the failure of the enrolee the
  // offered identity names (its KpmID, a KeID it holds, or its certificate's AE-ID). Unknown identities are ignored.
  void note_handshake_failure(std::string_view identity_offered, const std::string& reason);

  struct Impl;

 private:
  explicit Mef(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dauth::rspf
