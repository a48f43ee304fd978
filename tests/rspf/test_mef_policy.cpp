// The MEF's decisions (PROTOCOL.md §3.4, §4): each rule on its own, with the refusal reason and the CoAP mapping.
#include <catch2/catch.hpp>

#include "dauth/rspf/mef_policy.hpp"

namespace crypto = dauth::crypto;
namespace rspf = dauth::rspf;
using dauth::Errc;
using dauth::SecretBuffer;

namespace {
crypto::EnroleeRecord enrolee(bool offers_certificates) {
  crypto::EnroleeRecord record;
  record.credential_id = "meter@mef.example.net";
  record.kpm = SecretBuffer::random(32);
  record.enrolee_id = "CAE-meter";
  record.targets = {"CAE-valve", "CAE-pump"};
  record.enrolment_lifetime_s = 86400;
  record.certificate_enrolment = offers_certificates;
  return record;
}
crypto::EnrolmentKeyRecord enrolment_key() {
  crypto::EnrolmentKeyRecord key;
  key.ke_id = "00112233445566778899AABBCCDDEEFF@mef.example.net";
  key.ke = SecretBuffer::random(32);
  key.enrolee_id = "CAE-meter";
  key.targets = {"CAE-valve"};
  key.expires_at = 2000;
  return key;
}
const crypto::KeId kKeId = crypto::parse_ke_id("00112233445566778899AABBCCDDEEFF@mef.example.net").value();
}  // namespace

TEST_CASE("an enrolee gets its KeID, targets and expiry", "[mef-policy]") {
  auto response = rspf::decide_enrolment(enrolee(false), {}, kKeId, 1000);
  REQUIRE(response.ok());
  REQUIRE(response->ke_id == kKeId.text());
  REQUIRE(response->enrolee_id == "CAE-meter");
  REQUIRE(response->targets == std::vector<std::string>{"CAE-valve", "CAE-pump"});
  REQUIRE(response->expiry == 1000 + 86400);
  REQUIRE(response->instructions.empty());
}

TEST_CASE("certificate enrolment is instructed only when the policy offers it", "[mef-policy]") {
  rspf::EnrolmentRequest asks_cert{true, false, false};
  auto offered = rspf::decide_enrolment(enrolee(true), asks_cert, kKeId, 0);
  REQUIRE(offered.ok());
  REQUIRE(offered->instructions.size() == 1);
  REQUIRE(offered->instructions[0].type == "certEnrolment");
  REQUIRE(offered->instructions[0].uri == "/.well-known/est");
  auto refused = rspf::decide_enrolment(enrolee(false), asks_cert, kKeId, 0);
  REQUIRE(refused.error().code == Errc::denied);
  REQUIRE_THAT(refused.error().message, Catch::Contains("certificate enrolment"));
  REQUIRE_THAT(rspf::decide_enrolment(enrolee(true), {false, true, false}, kKeId, 0).error().message,
               Catch::Contains("MAF enrolment"));
  REQUIRE_THAT(rspf::decide_enrolment(enrolee(true), {false, false, true}, kKeId, 0).error().message,
               Catch::Contains("remote management"));
}

TEST_CASE("only the registered target, under its own name, gets the key", "[mef-policy]") {
  const auto key = enrolment_key();
  REQUIRE(rspf::authorize_fetch(key, "CAE-valve", "CAE-valve", crypto::Suid::rspf_key_for_saef, 1000).ok());

  auto impersonation = rspf::authorize_fetch(key, "CAE-valve", "CAE-pump", crypto::Suid::rspf_key_for_saef, 1000);
  REQUIRE(impersonation.error().code == Errc::unauthenticated);
  REQUIRE(rspf::coap_code_for(impersonation.error().code).code == 403);
  REQUIRE(rspf::coap_code_for(impersonation.error().code).onem2m_rsc == 4106);

  auto not_target = rspf::authorize_fetch(key, "CAE-pump", "CAE-pump", crypto::Suid::rspf_key_for_saef, 1000);
  REQUIRE(not_target.error().code == Errc::denied);
  REQUIRE_THAT(not_target.error().message, Catch::Contains("not an Enrolment Target"));

  auto wrong_suid = rspf::authorize_fetch(key, "CAE-valve", "CAE-valve", crypto::Suid::certificate_for_saef, 1000);
  REQUIRE_THAT(wrong_suid.error().message, Catch::Contains("SUID 42"));

  auto expired = rspf::authorize_fetch(key, "CAE-valve", "CAE-valve", crypto::Suid::rspf_key_for_saef, 2000);
  REQUIRE_THAT(expired.error().message, Catch::Contains("expired"));

  auto revoked_key = enrolment_key();
  revoked_key.revoked_at = 500;
  auto revoked = rspf::authorize_fetch(revoked_key, "CAE-valve", "CAE-valve", crypto::Suid::rspf_key_for_saef, 1000);
  REQUIRE_THAT(revoked.error().message, Catch::Contains("revoked"));
  REQUIRE(rspf::coap_code_for(Errc::denied).code == 403);
  REQUIRE(rspf::coap_code_for(Errc::not_found).code == 404);
  REQUIRE(rspf::coap_code_for(Errc::limit).code == 413);
}

TEST_CASE("the ESPrim key (SUID 23) follows the rules of the SAEF key (SUID 22) and no other SUID is served",
          "[mef-policy]") {
  const auto key = enrolment_key();
  for (const auto suid : {crypto::Suid::rspf_key_for_saef, crypto::Suid::rspf_key_for_esprim}) {
    INFO("SUID " << static_cast<int>(suid));
    REQUIRE(rspf::authorize_fetch(key, "CAE-valve", "CAE-valve", suid, 1000).ok());
    CHECK(rspf::authorize_fetch(key, "CAE-valve", "CAE-pump", suid, 1000).error().code == Errc::unauthenticated);
    auto not_target = rspf::authorize_fetch(key, "CAE-pump", "CAE-pump", suid, 1000);
    CHECK(not_target.error().code == Errc::denied);
    CHECK_THAT(not_target.error().message, Catch::Contains("not an Enrolment Target"));
    auto expired = rspf::authorize_fetch(key, "CAE-valve", "CAE-valve", suid, 2000);
    CHECK(expired.error().code == Errc::denied);
    CHECK_THAT(expired.error().message, Catch::Contains("expired"));
    auto revoked_key = enrolment_key();
    revoked_key.revoked_at = 500;
    auto revoked = rspf::authorize_fetch(revoked_key, "CAE-valve", "CAE-valve", suid, 1000);
    CHECK(revoked.error().code == Errc::denied);
    CHECK_THAT(revoked.error().message, Catch::Contains("revoked"));
  }
  for (const auto suid : {crypto::Suid::preprovisioned_with_mef, crypto::Suid::certificate_with_mef,
                          crypto::Suid::certificate_for_saef}) {
    auto refused = rspf::authorize_fetch(key, "CAE-valve", "CAE-valve", suid, 1000);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().code == Errc::denied);
    CHECK_THAT(refused.error().message, Catch::Contains("SUID " + std::to_string(static_cast<int>(suid))));
  }
}
