// Enrolee::confirm_enrolment: the gateway side of a revocation. The MEF's word on the current KeID (a fresh session
// with it and GET /mef/revoked): accepted, or refused and then marked revoked here, so that the gateway enrols
// again; and a subscription whose credentials the MEF refuses tells their owner (MefContact::refused).
#include <catch2/catch.hpp>

#include "dauth/rspf/mef_subscription.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

Result<void> confirm(World& world, rspf::Enrolee& enrolee) {
  std::optional<Result<void>> outcome;
  enrolee.confirm_enrolment([&](Result<void> r) { outcome.emplace(std::move(r)); });
  if (!world.pump([&] { return outcome.has_value(); })) return make_error(Errc::timeout, "test: no outcome");
  return std::move(*outcome);
}

}  // namespace

TEST_CASE("confirm_enrolment: accepted while valid, marked revoked and refused once the MEF revoked the KeID",
          "[rspf][network]") {
  World world;
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string ke_id = *world.meter->ke_id();
  CHECK(confirm(world, *world.meter).ok());

  REQUIRE(world.mef->revoke(ke_id).ok());
  // Still "accepted" from memory for kConfirmationValidity: a target's refusal alone does not load the MEF.
  CHECK(confirm(world, *world.meter).ok());
  world.clock.now += rspf::kConfirmationValidity.count();
  const auto refused = confirm(world, *world.meter);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().code == Errc::denied);
  CHECK(refused.error().message.find("refuses it in the handshake") != std::string::npos);
  const auto* record = world.meter_store->find<crypto::EnrolmentKeyRecord>(ke_id);
  REQUIRE(record != nullptr);
  CHECK(record->revoked_at == world.clock.now);
  CHECK(world.meter->key_for_target("CAE-valve").error().code == Errc::denied);
  CHECK(world.meter->mef_credentials().error().code == Errc::denied);  // not offered to the MEF again
  CHECK(world.log.contains("enrolee KeID " + ke_id + " of CAE-meter: MEF"));

  // A new enrolment replaces it.
  REQUIRE(world.enrol(*world.meter).ok());
  CHECK(*world.meter->ke_id() != ke_id);
  CHECK(confirm(world, *world.meter).ok());
}

TEST_CASE("a subscription whose credentials the MEF refuses in the handshake tells their owner", "[rspf][network]") {
  World world;
  int refused = 0;
  rspf::MefContact contact{world.mef_address(),
                           [] {
                             return Result<transport::ClientCredentials>(transport::ClientCredentials::psk(
                                 "00000000000000000000000000000000@" + std::string(kMefFqdn), SecretBuffer::random(32),
                                 kMefFqdn));
                           },
                           [&refused] { ++refused; }};
  transport::Request request;
  request.path = {"mef", "revoked"};
  rspf::MefSubscription subscription(*world.meter_node, "test subscription", std::move(contact), std::move(request),
                                     rspf::random_jitter(), world.log.sink(), [](const transport::Response&) {});
  subscription.start(std::chrono::milliseconds(0));
  CHECK(world.pump([&] { return refused >= 1; }));
  CHECK_FALSE(subscription.live());
}

TEST_CASE("a renewal that fails within the renewal window warns that the enrolment runs out", "[rspf][network]") {
  World world;
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string ke_id = *world.meter->ke_id();
  // A failure before the renewal is due (an operator's extra attempt) is no such warning.
  REQUIRE(world.mef_store->remove(crypto::RecordKind::enrolee, kMeterKpmId).ok());
  const auto refused = world.enrol(*world.meter);
  REQUIRE_FALSE(refused.ok());
  // The failing side's diagnosis: what the MEF's refusal most likely means, and where to check it.
  CHECK(refused.error().message.find("likely: the MEF refused the handshake for PSK identity " +
                                     std::string(kMeterKpmId) + ": the MEF does not know this KpmID (check "
                                     "`dauthctl enrolees list` on the MEF") != std::string::npos);
  CHECK_FALSE(world.log.contains("and its renewal failed"));

  world.clock.now += kMeterLifetime * 9 / 10;  // past 2/3 (± 10 %) of the lifetime, before the expiry
  REQUIRE_FALSE(world.enrol(*world.meter).ok());
  CHECK(world.log.contains("enrolee CAE-meter: KeID " + ke_id + " expires in "));
  CHECK(world.log.contains("and its renewal failed"));
}
