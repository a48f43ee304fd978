#include "dauth/rspf/mef_policy.hpp"

#include <algorithm>
#include <string>

namespace dauth::rspf {

namespace {
// TS-0008 §6.2.4: oneM2M response status codes and their CoAP mapping.
constexpr unsigned kRscOriginatorNotAuthenticated = 4106;
constexpr std::string_view kCertificateEnrolmentUri = "/.well-known/est";  // RFC 9148 EST-coaps
}  // namespace

Result<EnrolmentResponse> decide_enrolment(const crypto::EnroleeRecord& enrolee, const EnrolmentRequest& request,
                                           const crypto::KeId& ke_id, std::int64_t now) {
  if (request.maf_enrolment) {
    return make_error(Errc::denied, "enrolee '" + enrolee.enrolee_id + "' asked for MAF enrolment, which this MEF "
                                    "does not offer");
  }
  if (request.remote_mgmt) {
    return make_error(Errc::denied, "enrolee '" + enrolee.enrolee_id + "' asked for remote management, which this "
                                    "MEF does not offer");
  }
  if (request.cert_enrolment && !enrolee.certificate_enrolment) {
    return make_error(Errc::denied, "enrolee '" + enrolee.enrolee_id + "' asked for certificate enrolment, which "
                                    "its policy does not offer");
  }
  if (enrolee.enrolment_lifetime_s <= 0) {
    return make_error(Errc::internal, "enrolee '" + enrolee.enrolee_id + "' has no enrolment lifetime");
  }
  EnrolmentResponse response;
  response.ke_id = ke_id.text();
  response.enrolee_id = enrolee.enrolee_id;
  response.targets = enrolee.targets;
  response.expiry = now + enrolee.enrolment_lifetime_s;
  if (request.cert_enrolment) {
    response.instructions.push_back({"certEnrolment", std::string(kCertificateEnrolmentUri)});
  }
  return response;
}

Result<void> authorize_fetch(const crypto::EnrolmentKeyRecord& key, std::string_view requester,
                             std::string_view originator, crypto::Suid suid, std::int64_t now) {
  if (originator != requester) {
    return make_error(Errc::unauthenticated, "oneM2M-FR '" + std::string(originator) +
                                                 "' differs from the authenticated identity '" +
                                                 std::string(requester) + "'");
  }
  if (key.revoked_at != 0) return make_error(Errc::denied, "KeID " + key.ke_id + " is revoked");
  if (key.expires_at <= now) return make_error(Errc::denied, "KeID " + key.ke_id + " has expired");
  // Both are keys of one Enrolee for one Enrolment Target (PROTOCOL.md §4, §7): the same rules decide.
  if (suid != crypto::Suid::rspf_key_for_saef && suid != crypto::Suid::rspf_key_for_esprim) {
    return make_error(Errc::denied, "SUID " + std::to_string(static_cast<int>(suid)) +
                                        " is not served for an RSPF-provisioned key (only 22, SAEF, and 23, ESPrim)");
  }
  if (std::find(key.targets.begin(), key.targets.end(), requester) == key.targets.end()) {
    return make_error(Errc::denied, "'" + std::string(requester) + "' is not an Enrolment Target of KeID " +
                                        key.ke_id);
  }
  return ok_result();
}

CoapRefusal coap_code_for(Errc code) {
  switch (code) {
    case Errc::invalid_argument:
    case Errc::parse:
      return {400, 0};
    case Errc::unauthenticated:
      return {403, kRscOriginatorNotAuthenticated};
    case Errc::denied:
    case Errc::permission:
    case Errc::expired:
      return {403, 0};
    case Errc::not_found:
      return {404, 0};
    case Errc::limit:
      return {413, 0};
    case Errc::unsupported:
      return {415, 0};
    case Errc::timeout:
      return {504, 0};
    case Errc::exists:
      return {409, 0};  // 4.09 Conflict (RFC 8132)
    case Errc::crypto:
    case Errc::io:
    case Errc::corrupt:
    case Errc::internal:
      return {500, 0};
  }
  return {500, 0};
}

}  // namespace dauth::rspf
