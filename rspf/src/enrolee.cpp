// The Enrolee: RSPF bootstrapped by a pre-provisioned symmetric key, a certificate or a raw public key (PROTOCOL.md
// §3.1–3.4), EST-coaps certificate enrolment (§3.6), renewal schedule (§3.7) and the keys for Enrolment Targets (§4).
#include "dauth/rspf/enrolee.hpp"

#include <algorithm>
#include <array>
#include <map>
#include <utility>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/rspf/credential_rules.hpp"
#include "dauth/rspf/mef.hpp"
#include "dauth/rspf/messages.hpp"

namespace dauth::rspf {

transport::Request enrolment_request(const std::string& ae_id, const EnrolmentRequest& body) {
  transport::Request request;
  request.method = transport::Method::post;
  request.path = {"mef", "enrolment"};
  request.content_format = static_cast<std::uint16_t>(ContentFormat::cbor);
  request.accept = static_cast<std::uint16_t>(ContentFormat::cbor);
  request.originator = ae_id;
  request.payload = encode(body, ContentFormat::cbor);
  return request;
}

namespace {

constexpr std::string_view kCertificateEnrolmentInstruction = "certEnrolment";  // PROTOCOL.md §3.4

std::vector<std::string> path_segments(std::string_view uri) {
  std::vector<std::string> segments;
  std::size_t start = 0;
  while (start <= uri.size()) {
    const std::size_t slash = uri.find('/', start);
    const std::size_t end = slash == std::string_view::npos ? uri.size() : slash;
    if (end > start) segments.emplace_back(uri.substr(start, end - start));
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  return segments;
}
}  // namespace

// A switch without default: -Wswitch (an error here) names any state left without a name.
std::string_view to_string(EnroleeState state) noexcept {
  switch (state) {
    case EnroleeState::idle: return "idle";
    case EnroleeState::enrolling: return "enrolling";
    case EnroleeState::enrolled: return "enrolled";
    case EnroleeState::failed: return "failed";
  }
  return "?";
}

struct Enrolee::Impl : std::enable_shared_from_this<Enrolee::Impl> {
  transport::Node& node;
  crypto::KeyStore& store;
  EnroleeConfig config;
  std::string ae_id;
  EnroleeState state = EnroleeState::idle;
  Backoff backoff;
  std::string current_ke_id;           // "" = none
  std::int64_t renewal_due_ms = 0;     // unix milliseconds
  // The usage-constrained keys handed out by key_for_target, derived once per (KeID, target, SUID) instead of per
  // proxied request. Only keys of target_keys_ke_id (the current KeID) are held, at most one per Enrolment Target
  // of its record and SUID; forget_target_keys() wipes them (SecretBuffer) whenever that KeID stops being the usable
  // one.
  std::string target_keys_ke_id;
  std::map<std::pair<std::string, crypto::Suid>, SecretBuffer, std::less<>> target_keys;
  // confirm_enrolment(): one check at a time, and a KeID the MEF accepted is not asked about again for a while
  // (a target refusing it for its own reasons must not turn each proxied request into an MEF handshake).
  bool confirming = false;
  std::string confirmed_ke_id;
  std::int64_t confirmed_at = 0;

  Impl(transport::Node& n, crypto::KeyStore& s, EnroleeConfig c, std::string ae)
      : node(n), store(s), config(std::move(c)), ae_id(std::move(ae)), backoff(config.jitter) {}

  std::int64_t now() const { return config.clock(); }
  std::string peer_text() const {
    return config.mef_fqdn + "(" + config.mef_address.host + ":" + std::to_string(config.mef_address.port) + ")";
  }

  void set_state(EnroleeState next, const std::string& reason) {
    config.log(next == EnroleeState::failed ? LogKind::failed : LogKind::progress, ae_id, "enrolee " + ae_id + " mef=" + peer_text() + " " + std::string(to_string(state)) + " -> " +
               std::string(to_string(next)) + ": " + reason);
    state = next;
  }

  const crypto::EnrolmentKeyRecord* current_record() const {
    if (current_ke_id.empty()) return nullptr;
    return store.find<crypto::EnrolmentKeyRecord>(current_ke_id);
  }

  // The current enrolment, if there is one and it has not expired: what key_for_target and mef_credentials use.
  Result<const crypto::EnrolmentKeyRecord*> unexpired_record() const {
    const auto* record = current_record();
    if (record == nullptr) return make_error(Errc::not_found, "'" + ae_id + "' is not enrolled");
    if (record->expires_at <= now()) {
      return make_error(Errc::expired, "enrolment " + record->ke_id + " of '" + ae_id + "' has expired");
    }
    return record;
  }

  void forget_target_keys() {
    target_keys.clear();
    target_keys_ke_id.clear();
  }

  // docs/PROTOCOL.md §4. The record is read from the store on every call, so that whatever changed it (a renewal
  // here, a revocation by the MEF role of the same dauthd in a shared store, expiry) is seen at once; only the HMAC
  // is saved.
  Result<TargetKey> key_for_target(std::string_view target_ae_id, crypto::Suid suid) {
    if (suid != crypto::Suid::rspf_key_for_saef && suid != crypto::Suid::rspf_key_for_esprim) {
      return make_error(Errc::invalid_argument, "SUID " + std::to_string(static_cast<int>(suid)) +
                                                    " is not a key for an Enrolment Target (22 SAEF, 23 ESPrim)");
    }
    auto usable = unexpired_record();
    if (!usable.ok()) {
      forget_target_keys();
      return std::move(usable).error();
    }
    const crypto::EnrolmentKeyRecord* record = *usable;
    if (record->revoked_at != 0) {
      forget_target_keys();
      return make_error(Errc::denied, "enrolment " + record->ke_id + " of '" + ae_id + "' was revoked at " +
                                          std::to_string(record->revoked_at));
    }
    if (std::find(record->targets.begin(), record->targets.end(), target_ae_id) == record->targets.end()) {
      return make_error(Errc::denied, "'" + std::string(target_ae_id) + "' is not an Enrolment Target of '" + ae_id +
                                          "' (the MEF named " + std::to_string(record->targets.size()) + ")");
    }
    if (target_keys_ke_id != record->ke_id) {
      forget_target_keys();
      target_keys_ke_id = record->ke_id;
    }
    auto memo_key = std::make_pair(std::string(target_ae_id), suid);
    auto cached = target_keys.find(memo_key);
    if (cached == target_keys.end()) {
      auto key = crypto::derive_usage_constrained_key(record->ke, suid, target_ae_id);
      if (!key.ok()) return std::move(key).error();
      cached = target_keys.emplace(std::move(memo_key), std::move(*key)).first;
    }
    return TargetKey{record->ke_id, cached->second.clone()};
  }

  void schedule_renewal(std::int64_t lifetime_s) {
    renewal_due_ms = now() * 1000 + renewal_delay(lifetime_s, config.jitter).count();
  }

  // What the MEF's refusal of our handshake most likely means, and where to look: the MEF's reason is only in the
  // MEF's log (a DTLS alert carries none).
  std::string handshake_diagnosis(Errc code) const {
    if (code != Errc::unauthenticated && code != Errc::timeout) return {};
    const std::string refused = code == Errc::unauthenticated ? "the MEF refused the handshake" : "no handshake "
                                "with the MEF completed (a key that differs also shows as a timeout)";
    if (!config.raw_public_key_name.empty()) {
      return "; likely: " + refused + ": it does not pin our raw public key (check `dauthctl enrolees list` on the "
             "MEF for rpk:" + config.raw_public_key_name + "), or its key is not in mef_pinned_keys";
    }
    if (!config.certificate_name.empty()) {
      return "; likely: " + refused + ": its device_ca does not sign certificate " + config.certificate_name +
             ", it has no certificate_ae_id row for " + ae_id + " (check `dauthctl enrolees list` on the MEF), "
             "or enrolee.mef_trust_anchor does not hold the CA of its certificate for " + config.mef_fqdn;
    }
    return "; likely: " + refused + " for PSK identity " + config.kpm_id + ": the MEF does not know this KpmID "
           "(check `dauthctl enrolees list` on the MEF: removed, or never added?) or its Kpm differs from ours "
           "(compare the fingerprint of `dauthctl credentials list` here with the MEF's), or " + peer_text() +
           " is not the MEF " + config.mef_fqdn;
  }

  void fail(const DoneCallback& done, Error error) {
    error.message = "enrol '" + ae_id + "' with MEF " + peer_text() + " failed: " + error.message;
    set_state(EnroleeState::failed, error.message);
    warn_if_expiring();
    done(std::move(error));
  }

  // A renewal that failed while the enrolment (and the AE-ID certificate issued with it) it was to replace runs
  // out: at expiry the AE loses its targets, and peers refuse the certificate it presents.
  void warn_if_expiring() const {
    const auto* record = current_record();
    const std::int64_t at = now();
    if (record == nullptr || record->revoked_at != 0 || record->expires_at <= at || renewal_due_ms > at * 1000) {
      return;
    }
    const std::string retry = " (see the failure above; `dauthctl enrol " + ae_id + "` retries now)";
    config.log(LogKind::expiring, ae_id,
               "enrolee " + ae_id + ": KeID " + record->ke_id + " expires in " +
                   std::to_string(record->expires_at - at) + " s (at " + std::to_string(record->expires_at) +
                   ") and its renewal failed; " + ae_id + " cannot reach its Enrolment Targets after that unless "
                   "an enrolment succeeds" + retry);
    if (!config.request_certificate) return;
    const auto* certificate = store.find<crypto::CertificateRecord>(ae_id);  // EST's, named by the AE-ID
    if (certificate == nullptr || certificate->chain_der.empty() || certificate->expires_at <= at) return;
    config.log(LogKind::expiring, ae_id,
               "enrolee " + ae_id + ": its AE-ID certificate expires in " +
                   std::to_string(certificate->expires_at - at) + " s (at " +
                   std::to_string(certificate->expires_at) + ") and its renewal failed" + retry);
  }

  void succeed(const DoneCallback& done, const std::string& reason) {
    backoff.reset();
    set_state(EnroleeState::enrolled, reason);
    done(ok_result());
  }

  std::string bootstrap_text() const {
    if (!config.raw_public_key_name.empty()) return "DTLS with raw public key " + config.raw_public_key_name;
    return config.certificate_name.empty() ? "DTLS-PSK as " + config.kpm_id
                                           : "DTLS with certificate " + config.certificate_name;
  }

  // A record whose key is in a PKCS#11 token (a device certificate configured so, or an EST certificate requested
  // with config.certificate_key) bootstraps as a transport token key: the handshake signs in the token.
  std::optional<transport::TokenKey> token_key_of(const crypto::CertificateRecord& record) const {
    if (record.private_key_uri.empty()) return std::nullopt;
    return transport::TokenKey{record.private_key_uri, config.token_pin};
  }

  // The bootstrap credential of PROTOCOL.md §3.1, read from the store at each attempt (an EST renewal replaces the
  // certificate record).
  Result<transport::ClientCredentials> bootstrap_credentials() const {
    if (!config.raw_public_key_name.empty()) {
      const auto* record = store.find<crypto::CertificateRecord>(config.raw_public_key_name);
      if (record == nullptr) {
        return make_error(Errc::not_found, "bootstrap raw public key " + config.raw_public_key_name +
                                               " is not in the store");
      }
      // The MEF proves itself by a pinned key, as the PSK case proves it by knowing Kpm.
      if (auto token = token_key_of(*record)) {
        return transport::ClientCredentials::raw_public_key(
            transport::RpkCredentials{SecretBuffer(), config.mef_pinned_keys, std::move(token)}, config.mef_fqdn);
      }
      auto key = crypto::PrivateKey::parse(record->private_key_der);
      if (!key.ok()) return std::move(key).error();
      auto key_pem = key->to_pem();  // SEC1 "EC PRIVATE KEY": the form libcoap 4.3.1 takes for RPK
      if (!key_pem.ok()) return std::move(key_pem).error();
      return transport::ClientCredentials::raw_public_key(
          transport::RpkCredentials{std::move(*key_pem), config.mef_pinned_keys}, config.mef_fqdn);
    }
    if (config.certificate_name.empty()) {
      const auto* bootstrap = store.find<crypto::BootstrapKeyRecord>(config.kpm_id);
      if (bootstrap == nullptr) {
        return make_error(Errc::not_found, "bootstrap credential " + config.kpm_id + " is not in the store");
      }
      return transport::ClientCredentials::psk(config.kpm_id, bootstrap->kpm.clone(), config.mef_fqdn);
    }
    const auto* record = store.find<crypto::CertificateRecord>(config.certificate_name);
    if (record == nullptr) {
      return make_error(Errc::not_found, "bootstrap certificate " + config.certificate_name + " is not in the store");
    }
    transport::X509Credentials x509;
    for (const auto& der : record->chain_der) {
      auto certificate = crypto::Certificate::parse(ByteView(der));
      if (!certificate.ok()) return std::move(certificate).error();
      x509.certificate_chain_pem += certificate->pem();
    }
    if (auto token = token_key_of(*record)) {
      x509.token_key = std::move(token);
    } else {
      auto key = crypto::PrivateKey::parse(record->private_key_der);
      if (!key.ok()) return std::move(key).error();
      auto key_pem = key->to_pem();
      if (!key_pem.ok()) return std::move(key_pem).error();
      x509.private_key_pem = std::move(*key_pem);
    }
    x509.trust_anchors_pem = config.mef_trust_anchors_pem;
    // The MEF proves its FQDN (dNSName), as the PSK case proves it by knowing Kpm.
    return transport::ClientCredentials::certificate(std::move(x509), config.mef_fqdn, config.mef_fqdn);
  }

  void enrol(DoneCallback done) {
    if (state == EnroleeState::enrolling) {
      done(make_error(Errc::limit, "enrol '" + ae_id + "': an enrolment with MEF " + peer_text() +
                                       " is already in progress"));
      return;
    }
    set_state(EnroleeState::enrolling, bootstrap_text() + ", POST /mef/enrolment");
    auto bootstrap = bootstrap_credentials();
    if (!bootstrap.ok()) return fail(done, std::move(bootstrap).error());
    // Every enrolment needs a fresh DTLS session: Ke/KeID come from its exporter, and a cached session would give
    // the same KeID again. Only that one cached session is closed; other sessions of the Node stay.
    node.close_client_session(config.mef_address, *bootstrap);
    // One shared credential for both requests, so that EST goes over the same (cached) session (PROTOCOL.md §3.6).
    auto credentials = std::make_shared<transport::ClientCredentials>(std::move(*bootstrap));
    // The Enrolee, not the MEF, ends the enrolment session, once it holds the answer (and the certificate, when
    // EST follows): the MEF's answer is a separate CON response that it retransmits until we acknowledge it, and a
    // session the MEF closed at once would lose that answer with its first datagram (PROTOCOL.md §3.4).
    std::weak_ptr<Impl> weak = weak_from_this();
    DoneCallback done_with_session = [weak, credentials, done](Result<void> outcome) {
      if (auto self = weak.lock()) self->node.close_client_session(self->config.mef_address, *credentials);
      done(std::move(outcome));
    };
    node.request(config.mef_address, *credentials,
                 enrolment_request(ae_id, EnrolmentRequest{config.request_certificate, false, false}),
                 [weak, credentials, done = std::move(done_with_session)](Result<transport::Response> response,
                                                                          const transport::Session* session) {
                   if (auto self = weak.lock()) self->on_enrolment_answer(std::move(response), session, credentials, done);
                 });
  }

  void on_enrolment_answer(Result<transport::Response> answer, const transport::Session* session,
                           const std::shared_ptr<transport::ClientCredentials>& credentials, const DoneCallback& done) {
    if (!answer.ok()) {
      Error error = std::move(answer).error();
      error.message += handshake_diagnosis(error.code);
      return fail(done, std::move(error));
    }
    if (answer->code != 204) return fail(done, error_from_response("MEF", *answer));
    if (session == nullptr) return fail(done, make_error(Errc::internal, "answer without its client session"));
    // TS-0003 §10.3.1: our own Ke/KeID from our side of the exporter; never taken from the MEF's word.
    auto key = crypto::derive_enrolment_key(*session, config.mef_fqdn);
    if (!key.ok()) return fail(done, std::move(key).error());
    auto format = content_format_from(answer->content_format.value_or(static_cast<std::uint16_t>(ContentFormat::cbor)));
    if (!format.ok()) return fail(done, std::move(format).error());
    auto message = decode_enrolment_response(ByteView(answer->payload), *format);
    if (!message.ok()) return fail(done, std::move(message).error());
    auto their_ke_id = crypto::parse_ke_id(message->ke_id);
    const std::string ours = key->ke_id.text();
    if (!their_ke_id.ok() || their_ke_id->text() != ours) {
      return fail(done, make_error(Errc::crypto, "the MEF's keId " + crypto::quote_for_error(message->ke_id) +
                                                     " differs from the KeID derived on our side, " + ours +
                                                     ": the two ends did not export the same keying material; "
                                                     "nothing stored"));
    }
    if (message->enrolee_id != ae_id) {
      return fail(done, make_error(Errc::denied, "the MEF enrolled us as '" + message->enrolee_id +
                                                     "', but this credential is for '" + ae_id + "'; nothing stored"));
    }
    const std::int64_t at = now();
    if (message->expiry <= at) {
      return fail(done, make_error(Errc::expired, "the MEF's enrolment expiry " + std::to_string(message->expiry) +
                                                      " is not in the future (now " + std::to_string(at) + ")"));
    }
    crypto::EnrolmentKeyRecord record;
    record.ke_id = ours;
    record.ke = std::move(key->ke);
    record.enrolee_id = message->enrolee_id;
    record.targets = message->targets;
    record.expires_at = message->expiry;
    if (auto stored = store.put(std::move(record)); !stored.ok()) return fail(done, std::move(stored).error());
    current_ke_id = ours;
    forget_target_keys();  // the keys of the previous KeID are of no further use: wiped now, not at the next call
    schedule_renewal(message->expiry - at);
    config.log(LogKind::progress, ae_id, "enrolee " + ae_id + " stored KeID " + ours + " (expiry " + std::to_string(message->expiry) + ")");

    const auto instruction =
        std::find_if(message->instructions.begin(), message->instructions.end(),
                     [](const Instruction& i) { return i.type == kCertificateEnrolmentInstruction; });
    if (!config.request_certificate || instruction == message->instructions.end()) {
      return succeed(done, "KeID " + ours);
    }
    enrol_certificate(path_segments(instruction->uri), credentials, done);
  }

  void confirm_enrolment(const DoneCallback& done) {
    const auto* record = current_record();
    if (record == nullptr) return done(make_error(Errc::not_found, "'" + ae_id + "' is not enrolled"));
    if (record->revoked_at != 0) {
      return done(make_error(Errc::denied, "KeID " + record->ke_id + " of '" + ae_id + "' is marked revoked"));
    }
    if (state == EnroleeState::enrolling) {
      return done(make_error(Errc::limit, "'" + ae_id + "' is enrolling: its KeID is being replaced"));
    }
    if (confirming) return done(make_error(Errc::limit, "a check of " + record->ke_id + " is running"));
    if (confirmed_ke_id == record->ke_id && now() - confirmed_at < kConfirmationValidity.count()) {
      return done(ok_result());
    }
    const std::string ke_id = record->ke_id;
    auto credentials = std::make_shared<transport::ClientCredentials>(transport::ClientCredentials::psk(
        ke_id, crypto::derive_reauthentication_key(record->ke), config.mef_fqdn));
    // A fresh handshake: a session cached from before the revocation would still carry requests.
    node.close_client_session(config.mef_address, *credentials);
    confirming = true;
    transport::Request request;
    request.path = {"mef", "revoked"};
    request.accept = static_cast<std::uint16_t>(ContentFormat::cbor);
    request.originator = ae_id;
    std::weak_ptr<Impl> weak = weak_from_this();
    node.request(config.mef_address, *credentials, std::move(request),
                 [weak, credentials, ke_id, done](Result<transport::Response> answer, const transport::Session*) {
                   auto self = weak.lock();
                   if (!self) return;
                   self->confirming = false;
                   self->node.close_client_session(self->config.mef_address, *credentials);
                   done(self->on_confirmation(ke_id, std::move(answer)));
                 });
  }

  Result<void> on_confirmation(const std::string& ke_id, Result<transport::Response> answer) {
    const std::string mef = "MEF " + config.mef_fqdn;
    if (!answer.ok()) {
      if (answer.error().code != Errc::unauthenticated) {
        return make_error(answer.error().code, "cannot ask " + mef + " about KeID " + ke_id + ": " +
                                                   answer.error().message);
      }
      return mark_revoked(ke_id, mef + " refuses it in the handshake (revoked, expired or unknown there)");
    }
    if (answer->code != 205) return error_from_response(mef, *answer);
    auto format = content_format_from(answer->content_format.value_or(static_cast<std::uint16_t>(ContentFormat::cbor)));
    auto list = format.ok() ? decode_revocation_list(ByteView(answer->payload), *format)
                            : Result<RevocationList>(std::move(format).error());
    if (!list.ok()) return make_error(list.error().code, mef + " revocation list: " + list.error().message);
    if (std::find(list->ke_ids.begin(), list->ke_ids.end(), ke_id) != list->ke_ids.end()) {
      return mark_revoked(ke_id, mef + " lists it as revoked");
    }
    confirmed_ke_id = ke_id;
    confirmed_at = now();
    return ok_result();
  }

  // Our record of a KeID the MEF no longer accepts: key_for_target refuses it from now on, and the credential
  // listing shows when we learnt it. Errors: denied (always: the KeID is unusable), with why.
  Result<void> mark_revoked(const std::string& ke_id, const std::string& why) {
    const std::string message = "KeID " + ke_id + " of " + ae_id + ": " + why;
    if (const auto* record = store.find<crypto::EnrolmentKeyRecord>(ke_id); record != nullptr && record->revoked_at == 0) {
      crypto::EnrolmentKeyRecord revoked{record->ke_id,      record->ke.clone(), record->enrolee_id,
                                         record->targets,    record->expires_at, now()};
      if (auto stored = store.put(std::move(revoked)); !stored.ok()) {
        config.log(LogKind::failed, ae_id, "enrolee " + ae_id + ": cannot mark " + message + ": " +
                                               stored.error().to_string());
      }
    }
    if (ke_id == target_keys_ke_id) forget_target_keys();
    config.log(LogKind::revoked, ae_id, "enrolee " + message + "; it must enrol again");
    return make_error(Errc::denied, message);
  }

  // EST-coaps simple enrolment (RFC 9148 §5) with client-side key generation: the private key stays here.
  void enrol_certificate(std::vector<std::string> est_path, const std::shared_ptr<transport::ClientCredentials>& credentials,
                         const DoneCallback& done) {
    auto key = config.certificate_key ? config.certificate_key() : crypto::PrivateKey::generate_p256();
    if (!key.ok()) return fail(done, std::move(key).error());
    auto csr = crypto::CertificateRequest::create(*key, ae_id);
    if (!csr.ok()) return fail(done, std::move(csr).error());
    auto key_holder = std::make_shared<crypto::PrivateKey>(std::move(*key));
    est_path.emplace_back("sen");
    transport::Request request;
    request.method = transport::Method::post;
    request.path = std::move(est_path);
    request.content_format = kContentFormatPkcs10;
    request.accept = kContentFormatPkixCert;
    request.originator = ae_id;
    request.payload = csr->der();
    config.log(LogKind::progress, ae_id, "enrolee " + ae_id + " requests a certificate: POST " + request.path_text());
    std::weak_ptr<Impl> weak = weak_from_this();
    node.request(config.mef_address, *credentials, std::move(request),
                 [weak, key_holder, done](Result<transport::Response> response, const transport::Session*) {
                   if (auto self = weak.lock()) self->on_certificate_answer(std::move(response), *key_holder, done);
                 });
  }

  void on_certificate_answer(Result<transport::Response> answer, const crypto::PrivateKey& key,
                             const DoneCallback& done) {
    auto certificate_failed = [&](Error error) {
      error.message = "certificate enrolment: " + error.message + " (the enrolment key " + current_ke_id +
                      " is stored and stays in use)";
      fail(done, std::move(error));
    };
    if (!answer.ok()) return certificate_failed(std::move(answer).error());
    if (answer->code != 204) return certificate_failed(error_from_response("MEF EST", *answer));
    if (answer->content_format != kContentFormatPkixCert) {
      return certificate_failed(make_error(Errc::parse, "answer is not application/pkix-cert (287)"));
    }
    auto certificate = crypto::Certificate::parse(ByteView(answer->payload));
    if (!certificate.ok()) return certificate_failed(std::move(certificate).error());
    auto named = certificate->ae_id();
    if (!named.ok() || *named != ae_id) {
      return certificate_failed(make_error(Errc::denied, "issued certificate does not name '" + ae_id + "'"));
    }
    if (certificate->public_key_der() != key.public_key_der()) {
      return certificate_failed(make_error(Errc::denied, "issued certificate is not for the key we generated"));
    }
    crypto::CertificateRecord record;
    record.name = ae_id;
    record.chain_der = certificate->chain_der();
    if (key.in_token()) {
      record.private_key_uri = key.token_uri();  // the key stays in its token; the store keeps its name
    } else {
      auto private_der = key.to_der();
      if (!private_der.ok()) return certificate_failed(std::move(private_der).error());
      record.private_key_der = std::move(*private_der);
    }
    record.expires_at = static_cast<std::int64_t>(certificate->not_after());
    if (auto stored = store.put(std::move(record)); !stored.ok()) return certificate_failed(std::move(stored).error());
    succeed(done, "KeID " + current_ke_id + ", certificate serial " + certificate->serial_hex());
  }
};

Enrolee::Enrolee(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
Enrolee::~Enrolee() = default;

Result<std::unique_ptr<Enrolee>> Enrolee::create(transport::Node& node, crypto::KeyStore& store,
                                                 EnroleeConfig config) {
  if (!config.clock) config.clock = system_unix_clock();
  if (!config.log) config.log = stderr_log_sink();
  if (!config.jitter) config.jitter = random_jitter();
  std::string local_ae_id;
  if (!config.raw_public_key_name.empty()) {
    if (!config.kpm_id.empty() || !config.certificate_name.empty()) {
      return make_error(Errc::invalid_argument, "enrolee: raw public key " + config.raw_public_key_name +
                                                    " and a kpm_id or certificate both given; an Enrolee has one "
                                                    "bootstrap credential");
    }
    if (!transport::backend_supports_rpk()) {
      return make_error(Errc::unsupported, "enrolee: raw public key bootstrap (" + config.raw_public_key_name +
                                               ") needs the GnuTLS build of libcoap (RFC 7250)");
    }
    if (config.mef_fqdn.empty() || config.mef_pinned_keys.empty()) {
      return make_error(Errc::invalid_argument, "enrolee: raw public key bootstrap (" + config.raw_public_key_name +
                                                    ") needs mef_fqdn and at least one of mef_pinned_keys");
    }
    if (config.request_certificate) {
      return make_error(Errc::invalid_argument, "enrolee: raw public key bootstrap (" + config.raw_public_key_name +
                                                    ") cannot request a certificate: the issued certificate would "
                                                    "replace the raw key record of the same name");
    }
    if (auto valid = crypto::validate_fqdn(config.mef_fqdn); !valid.ok()) return std::move(valid).error();
    if (auto valid = crypto::validate_ae_id(config.raw_public_key_name); !valid.ok()) {
      return make_error(Errc::invalid_argument, "enrolee: raw public key record " + config.raw_public_key_name +
                                                    " must be named by our AE-ID: " + valid.error().message);
    }
    const auto* record = store.find<crypto::CertificateRecord>(config.raw_public_key_name);
    if (record == nullptr) {
      return make_error(Errc::not_found, "enrolee: no raw public key " + config.raw_public_key_name +
                                             " in the key store");
    }
    if (!record->chain_der.empty()) {
      return make_error(Errc::invalid_argument, "enrolee: " + config.raw_public_key_name +
                                                    " holds a certificate; use certificate_name for it");
    }
    auto key = crypto::PrivateKey::parse(record->private_key_der);
    if (!key.ok()) return std::move(key).error();
    config.log(LogKind::progress, config.raw_public_key_name, "enrolee " + config.raw_public_key_name + " bootstraps with raw public key " + key->public_key_id());
    local_ae_id = config.raw_public_key_name;
  } else if (!config.certificate_name.empty()) {
    if (!config.kpm_id.empty()) {
      return make_error(Errc::invalid_argument, "enrolee: kpm_id " + config.kpm_id + " and certificate " +
                                                    config.certificate_name +
                                                    " both given; an Enrolee has one bootstrap credential");
    }
    if (config.mef_fqdn.empty() || config.mef_trust_anchors_pem.empty()) {
      return make_error(Errc::invalid_argument, "enrolee: certificate bootstrap (" + config.certificate_name +
                                                    ") needs mef_fqdn and mef_trust_anchors_pem");
    }
    if (auto valid = crypto::validate_fqdn(config.mef_fqdn); !valid.ok()) return std::move(valid).error();
    const auto* record = store.find<crypto::CertificateRecord>(config.certificate_name);
    if (record == nullptr || record->chain_der.empty()) {
      return make_error(Errc::not_found, "enrolee: no bootstrap certificate " + config.certificate_name +
                                             " in the key store");
    }
    auto leaf = crypto::Certificate::parse(ByteView(record->chain_der.front()));
    if (!leaf.ok()) return std::move(leaf).error();
    auto named = leaf->ae_id();  // TS-0003 §8.1.2.5: the AE-ID the MEF will read from it
    if (!named.ok()) return std::move(named).error();
    local_ae_id = *named;
  } else {
    if (auto valid = crypto::validate_kpm_id(config.kpm_id); !valid.ok()) return std::move(valid).error();
    auto issuer = crypto::issuer_fqdn_of(config.kpm_id);
    if (!issuer.ok()) return std::move(issuer).error();
    if (config.mef_fqdn.empty()) config.mef_fqdn = *issuer;
    if (auto valid = crypto::validate_fqdn(config.mef_fqdn); !valid.ok()) return std::move(valid).error();
    const auto* bootstrap = store.find<crypto::BootstrapKeyRecord>(config.kpm_id);
    if (bootstrap == nullptr) {
      return make_error(Errc::not_found, "enrolee: no bootstrap credential " + config.kpm_id + " in the key store");
    }
    local_ae_id = bootstrap->ae_id;
  }
  // The SNI sent to the MEF, the KeID's FQDN and every comparison use one spelling (PROTOCOL.md §1).
  config.mef_fqdn = crypto::canonical_fqdn(config.mef_fqdn);
  auto impl = std::make_shared<Impl>(node, store, std::move(config), std::move(local_ae_id));
  // A restart keeps a still-valid enrolment of this AE with this MEF (the latest one).
  // KeID text is canonical (identifiers.hpp), as config.mef_fqdn is by now.
  const std::string suffix = "@" + impl->config.mef_fqdn;
  const crypto::EnrolmentKeyRecord* best = nullptr;
  const std::int64_t now = impl->now();
  store.for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& r) {
    const auto& record = std::get<crypto::EnrolmentKeyRecord>(r);
    const bool ours = record.enrolee_id == impl->ae_id && record.ke_id.size() > suffix.size() &&
                      record.ke_id.compare(record.ke_id.size() - suffix.size(), suffix.size(), suffix) == 0;
    if (ours && record.revoked_at == 0 && record.expires_at > now && (best == nullptr || record.expires_at > best->expires_at)) {
      best = &record;
    }
  });
  if (best != nullptr) {
    impl->current_ke_id = best->ke_id;
    impl->schedule_renewal(best->expires_at - now);
    impl->set_state(EnroleeState::enrolled, "KeID " + best->ke_id + " from the key store");
  }
  return std::unique_ptr<Enrolee>(new Enrolee(std::move(impl)));
}

void Enrolee::enrol(DoneCallback done) { impl_->enrol(std::move(done)); }
EnroleeState Enrolee::state() const { return impl_->state; }
const std::string& Enrolee::ae_id() const { return impl_->ae_id; }
const transport::Peer& Enrolee::mef_address() const { return impl_->config.mef_address; }
const std::string& Enrolee::mef_fqdn() const { return impl_->config.mef_fqdn; }

std::optional<std::string> Enrolee::ke_id() const {
  if (impl_->current_ke_id.empty()) return std::nullopt;
  return impl_->current_ke_id;
}

void Enrolee::confirm_enrolment(DoneCallback done) { impl_->confirm_enrolment(done); }

Result<TargetKey> Enrolee::key_for_target(std::string_view target_ae_id, crypto::Suid suid) const {
  return impl_->key_for_target(target_ae_id, suid);
}

std::vector<std::pair<std::string, std::string>> Enrolee::cached_target_keys() const {
  std::vector<std::pair<std::string, std::string>> cached;
  for (const auto& [memo_key, key] : impl_->target_keys) {
    const std::string& target = memo_key.first;
    if (cached.empty() || cached.back().second != target) cached.emplace_back(impl_->target_keys_ke_id, target);
  }
  return cached;
}

Result<transport::ClientCredentials> Enrolee::mef_credentials() const {
  auto record = impl_->unexpired_record();
  if (!record.ok()) return std::move(record).error();
  if ((*record)->revoked_at != 0) {  // known refused: offering it would only be refused again
    return make_error(Errc::denied, "enrolment " + (*record)->ke_id + " of '" + impl_->ae_id + "' was revoked at " +
                                        std::to_string((*record)->revoked_at));
  }
  return transport::ClientCredentials::psk((*record)->ke_id, crypto::derive_reauthentication_key((*record)->ke),
                                           impl_->config.mef_fqdn);
}

const std::string& Enrolee::kpm_id() const { return impl_->config.kpm_id; }

Result<void> Enrolee::check_bootstrap_key(const std::string& kpm_id) const {
  const Impl& s = *impl_;
  if (s.config.kpm_id.empty()) {
    return make_error(Errc::invalid_argument, "enrolee " + s.ae_id + " bootstraps with " + s.bootstrap_text() +
                                                  ", not with a pre-provisioned key");
  }
  if (auto named = check_kpm_id_names_mef(kpm_id, s.config.mef_fqdn); !named) return named;
  if (s.state == EnroleeState::enrolling) {
    return make_error(Errc::limit, "enrolee " + s.ae_id + " is enrolling; retry when the attempt has finished");
  }
  return ok_result();
}

Result<void> Enrolee::use_bootstrap_key(const std::string& kpm_id) {
  Impl& s = *impl_;
  if (auto acceptable = check_bootstrap_key(kpm_id); !acceptable) return acceptable;
  const auto* bootstrap = s.store.find<crypto::BootstrapKeyRecord>(kpm_id);
  if (bootstrap == nullptr || bootstrap->ae_id != s.ae_id) {
    return make_error(Errc::not_found, "no bootstrap credential " + kpm_id + " for " + s.ae_id + " in the key store");
  }
  s.config.log(LogKind::progress, s.ae_id, "enrolee " + s.ae_id + ": bootstrap credential " + s.config.kpm_id + " -> " + kpm_id);
  s.config.kpm_id = kpm_id;
  return ok_result();
}

std::chrono::milliseconds Enrolee::next_attempt_delay() {
  switch (impl_->state) {
    case EnroleeState::idle: return std::chrono::milliseconds(0);
    case EnroleeState::enrolling: return kBackoffInitial;  // done() comes first; a call now would be refused
    case EnroleeState::enrolled:
      return std::chrono::milliseconds(std::max<std::int64_t>(0, impl_->renewal_due_ms - impl_->now() * 1000));
    case EnroleeState::failed: return impl_->backoff.next();
  }
  return std::chrono::milliseconds(0);
}

}  // namespace dauth::rspf
