// The MEF's decisions, separate from the network so that each rule is tested on its own (PROTOCOL.md §3.4, §4).
// Every refusal is an Error whose message says why; the caller maps it to a CoAP answer (coap_code_for).
#pragma once

#include <cstdint>
#include <string_view>

#include "dauth/crypto/keystore.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/error.hpp"
#include "dauth/rspf/messages.hpp"

namespace dauth::rspf {

// What the MEF answers an authenticated enrolee (step 4 of PROTOCOL.md §3): Errc::denied when the request asks
// for more than the enrolee's policy offers (certificate enrolment not offered, MAF enrolment or remote
// management, which dauth does not provide).
Result<EnrolmentResponse> decide_enrolment(const crypto::EnroleeRecord& enrolee, const EnrolmentRequest& request,
                                           const crypto::KeId& ke_id, std::int64_t now);

// Whether `requester` (the identity the DTLS session authenticated) may fetch the key of `key` for `suid`, with
// oneM2M-FR `originator`. Errc::unauthenticated when originator differs from requester (RSC 4106), Errc::denied
// when the requester is not a target, the SUID is neither the symmetric SAEF one (22) nor the ESPrim one (23), or
// the key is revoked or expired.
Result<void> authorize_fetch(const crypto::EnrolmentKeyRecord& key, std::string_view requester,
                             std::string_view originator, crypto::Suid suid, std::int64_t now);

// The CoAP response code (class*100 + detail, e.g. 403) and oneM2M-RSC (0 = none) for a refusal.
struct CoapRefusal {
  unsigned code;
  unsigned onem2m_rsc;
};
CoapRefusal coap_code_for(Errc code);

}  // namespace dauth::rspf
