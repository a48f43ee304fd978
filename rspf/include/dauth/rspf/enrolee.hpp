// The Enrolee role for one local AE (PROTOCOL.md §3, §4; docs/rspf.md): runs the RSPF with its MEF, bootstrapped by a
// pre-provisioned symmetric key, a certificate or a raw public key, keeps the enrolment key, optionally gets an AE-ID
// certificate over EST-coaps, and hands out the usage-constrained key for each Enrolment Target.
//
// State machine (docs/conventions.md §14): idle -> enrolling -> enrolled | failed; enrolled/failed -> enrolling on the
// next enrol(). Every transition is logged with the MEF address, old -> new and the reason. The daemon owns the timers:
// next_attempt_delay() says when to call enrol() again (renewal at 2/3 of the lifetime, or backoff after failure).
// The Node and KeyStore must outlive the Enrolee; a pending enrol() completes through the Node's loop.
// enrol() first closes the one cached client session to the MEF with the bootstrap credential
// (Node::close_client_session): Ke/KeID come from the session exporter, so each enrolment needs a new DTLS session.
// Other client sessions of the Node stay open, so the Enrolee can share the Node of its gateway.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dauth/crypto/keystore.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/error.hpp"
#include "dauth/rspf/messages.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/rspf/schedule.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::rspf {

// The enrolment request (docs/PROTOCOL.md §3): POST /mef/enrolment with a CBOR body, CBOR asked for in return,
// oneM2M-FR = the enrolling AE-ID.
transport::Request enrolment_request(const std::string& ae_id, const EnrolmentRequest& body);

struct EnroleeConfig {
  std::string kpm_id;                 // names the BootstrapKeyRecord (KpmID, Kpm, local AE-ID) in the store
  transport::Peer mef_address;        // numeric address of the MEF's coaps endpoint
  std::string mef_fqdn;               // SNI, KeID suffix (made canonical_fqdn); "" = the KpmID's issuer
  bool request_certificate = false;   // ask for certificate enrolment (EST) when the MEF offers it
  // Certificate-bootstrapped RSPF (PROTOCOL.md §3.1, TS-0003 §8.3.2.1 "certificate-based"): the name of a
  // CertificateRecord (our AE-ID certificate and its key) to authenticate with instead of KpmID/Kpm. Then kpm_id
  // stays empty, mef_fqdn is required, and the MEF's certificate must chain to mef_trust_anchors_pem and carry
  // mef_fqdn as dNSName. A certificate issued over EST afterwards replaces that record (same name = AE-ID).
  std::string certificate_name;
  std::string mef_trust_anchors_pem;
  // Raw-public-key bootstrapped RSPF (PROTOCOL.md §3.1, RFC 7250; GnuTLS builds only): the name of a CertificateRecord
  // with an empty chain_der (a raw public key credential: our AE-ID as name, our P-256 key as private_key_der), whose
  // RFC 6920 key id the MEF pins as enrolee "rpk:<id>". Then kpm_id and certificate_name stay empty, mef_fqdn is
  // required (SNI and KeID suffix) and the MEF must present a key in mef_pinned_keys ("ni:///sha-256;..." ids).
  // request_certificate is refused: an EST certificate would replace this record (same name).
  std::string raw_public_key_name;
  std::set<std::string> mef_pinned_keys;
  // The key an EST certificate is requested for (RFC 9148 client-side key generation): empty = a P-256 key
  // generated in memory for each request and sealed in the store with the certificate; else this source, e.g. a
  // key in a PKCS#11 token (crypto::Token::private_key_or_generate: generated there on first use, reused by
  // renewals), which the stored CertificateRecord then names by its private_key_uri.
  std::function<Result<crypto::PrivateKey>()> certificate_key{};
  // The token's user PIN for bootstrap certificates whose key is in a token (CertificateRecord::private_key_uri):
  // the transport logs in with it when the key is first used (transport::TokenKey).
  std::shared_ptr<const SecretBuffer> token_pin{};
  UnixClock clock = system_unix_clock();
  LogSink log = stderr_log_sink();
  JitterSource jitter = random_jitter();
};

// How long an MEF's "KeID accepted" answer (Enrolee::confirm_enrolment) stands before the MEF is asked again.
inline constexpr std::chrono::seconds kConfirmationValidity{60};

enum class EnroleeState : std::uint8_t { idle, enrolling, enrolled, failed };
std::string_view to_string(EnroleeState state) noexcept;

// The credential for a DTLS-PSK session to an Enrolment Target (PROTOCOL.md §4): psk_identity = ke_id, psk = key.
// The same derivation with SUID 23 is the pairwiseESPrimKey for that target (PROTOCOL.md §7).
struct TargetKey {
  std::string ke_id;
  SecretBuffer key;  // HMAC-SHA-256(Ke, label || decimal(SUID) || target AE-ID), all 32 bytes
};

class Enrolee {
 public:
  // Errors: no BootstrapKeyRecord for config.kpm_id, or an FQDN that does not match the KpmID's; with
  // certificate_name: no such CertificateRecord, one without an AE-ID, no mef_fqdn or no trust anchors; with
  // raw_public_key_name: no such record, one with a certificate chain or a key that does not parse, a name that is
  // not an AE-ID, no mef_fqdn, no pinned MEF key, request_certificate, or a TLS backend without raw public keys
  // (Errc::unsupported); more than one bootstrap credential.
  // Picks up a still-valid enrolment of this AE from the store (state enrolled) so that a restart keeps it.
  static Result<std::unique_ptr<Enrolee>> create(transport::Node& node, crypto::KeyStore& store,
                                                 EnroleeConfig config);
  ~Enrolee();
  Enrolee(const Enrolee&) = delete;
  Enrolee& operator=(const Enrolee&) = delete;

  using DoneCallback = std::function<void(Result<void>)>;
  // Runs the RSPF: DTLS-PSK (KpmID, Kpm, SNI = MEF FQDN), DTLS with our certificate or with our raw public key ->
  // POST /mef/enrolment -> derive Ke/KeID from our own
  // exporter, check the MEF's keId equals ours, store the EnrolmentKeyRecord; then, if the MEF instructs it and we
  // asked, EST simple enrolment on the same session and store the CertificateRecord. done runs exactly once, on
  // the loop thread. While enrolling, a second call fails at once with Errc::limit. A failure keeps the previous
  // still-valid enrolment in use (PROTOCOL.md §3.7).
  void enrol(DoneCallback done);

  EnroleeState state() const;
  const std::string& ae_id() const;
  // The current KeID, if enrolled (also in state failed while an earlier enrolment is still valid).
  std::optional<std::string> ke_id() const;
  // The usage-constrained key for target_ae_id with suid: 22 (rspf_key_for_saef) the DTLS-PSK key, 23
  // (rspf_key_for_esprim) the pairwiseESPrimKey. Errors: another SUID (invalid_argument), not enrolled (not_found),
  // enrolment expired (expired) or revoked in this store (denied: a dauthd whose MEF role revoked the KeID), target
  // not among the MEF's Enrolment Targets (denied).
  // Each key is derived once per (KeID, target, SUID) and kept, wiped, until the KeID is replaced by an enrolment or
  // found expired, revoked or gone; each call checks the stored record first. const: that memo is no state a
  // caller can observe (the same key comes back either way).
  Result<TargetKey> key_for_target(std::string_view target_ae_id,
                                   crypto::Suid suid = crypto::Suid::rspf_key_for_saef) const;
  // (KeID, target AE-ID) of each key key_for_target keeps (once per pair, whichever SUIDs it holds), for status
  // output and tests; never the keys.
  std::vector<std::pair<std::string, std::string>> cached_target_keys() const;
  // The credential to re-authenticate to our MEF (PROTOCOL.md §3.5): psk(KeID, Ker, sni = MEF FQDN). Used for key
  // retrieval when this AE is itself an Enrolment Target. Errors as key_for_target (not enrolled, expired, revoked).
  Result<transport::ClientCredentials> mef_credentials() const;
  const transport::Peer& mef_address() const;
  const std::string& mef_fqdn() const;

  // The KpmID a PSK-bootstrapped Enrolee authenticates with ("" for certificate or raw-public-key bootstrap).
  const std::string& kpm_id() const;
  // Switches a PSK-bootstrapped Enrolee to another BootstrapKeyRecord of the same AE and MEF (dauthctl credentials
  // add at run time); the next enrol() uses it. Errors: not PSK-bootstrapped (invalid_argument), enrolling (limit),
  // a KpmID naming another MEF (invalid_argument), no such record or one for another AE (not_found).
  Result<void> use_bootstrap_key(const std::string& kpm_id);
  // use_bootstrap_key()'s rules without the store lookup, for a key about to be stored (dauthctl credentials add):
  // PSK-bootstrapped, not enrolling, and the KpmID names this Enrolee's MEF (check_kpm_id_names_mef).
  Result<void> check_bootstrap_key(const std::string& kpm_id) const;

  // Asks the MEF whether it still accepts the current KeID: a fresh DTLS-PSK session with it (mef_credentials()) and
  // GET /mef/revoked. done: ok (accepted and not listed; remembered for kConfirmationValidity, so that repeated
  // calls do not load the MEF); denied (refused in the handshake or listed as revoked: the record is then marked
  // revoked in the store, key_for_target refuses it, and the caller should enrol() again); limit (enrolling, or a
  // check is running); not_found (not enrolled); anything else: the MEF could not be asked (timeout, io).
  void confirm_enrolment(DoneCallback done);

  // When to call enrol() next: enrolled -> at 2/3 of the lifetime (± 10 %) counted from the enrolment;
  // failed -> the next backoff step (1 s doubling to 5 min, ± 10 %); idle -> 0; enrolling -> 1 s (wait for done). Each call in state failed
  // advances the backoff.
  std::chrono::milliseconds next_attempt_delay();

  struct Impl;

 private:
  explicit Enrolee(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace dauth::rspf
