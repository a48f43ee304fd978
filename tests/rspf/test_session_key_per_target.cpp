// Session keys are stored per (KeID, target AE) (crypto::session_key_id): two local AEs of one gateway that are both
// Enrolment Targets of one KeID each keep their own usage-constrained key, so alternating handshakes to them never
// refetch (before, the second retrieval replaced the first AE's record and the pair fetched in turn).
#include <catch2/catch.hpp>

#include "dauth/crypto/onem2m.hpp"
#include "network_world.hpp"

using namespace dauth;

namespace {

constexpr const char* kPumpKpmId = "pump@mef.example.net";

}  // namespace

TEST_CASE("session keys per target AE: one KeID towards two local AEs keeps both keys and never refetches",
          "[rspf][network][keystore]") {
  test::World world;
  auto pump = world.add_second_target(kPumpKpmId, "CAE-pump");
  std::vector<std::string> fetched;
  world.valve_keys->set_fetch_observer([&](const std::string& ke_id, const Result<void>& outcome) {
    if (outcome.ok()) fetched.push_back(ke_id);
  });
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  REQUIRE(world.enrol(*pump).ok());
  auto to_valve_key = world.meter->key_for_target("CAE-valve");
  auto to_pump_key = world.meter->key_for_target("CAE-pump");
  REQUIRE(to_valve_key.ok());
  REQUIRE(to_pump_key.ok());
  const std::string ke_id = to_valve_key->ke_id;
  const auto to_valve = transport::ClientCredentials::psk(ke_id, to_valve_key->key.clone(), "CAE-valve");
  const auto to_pump = transport::ClientCredentials::psk(ke_id, to_pump_key->key.clone(), "CAE-pump");
  transport::Request temp;
  temp.path = {"temp"};

  // First use towards each AE: refused once while that AE's key is fetched.
  for (const auto* credentials : {&to_valve, &to_pump}) {
    REQUIRE_FALSE(world.call(*world.meter_node, world.valve_address(), *credentials, temp).ok());
    REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
  }
  REQUIRE(fetched.size() == 2);
  const auto* valve_record = world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve"));
  const auto* pump_record = world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-pump"));
  REQUIRE(valve_record != nullptr);
  REQUIRE(pump_record != nullptr);
  CHECK(valve_record->key.equals(to_valve_key->key));
  CHECK(pump_record->key.equals(to_pump_key->key));

  // Alternating new handshakes (fresh sessions each time): every one succeeds at once, nothing is fetched again.
  for (int round = 0; round < 2; ++round) {
    for (const auto* credentials : {&to_valve, &to_pump}) {
      world.meter_node->close_client_sessions();
      auto answer = world.call(*world.meter_node, world.valve_address(), *credentials, temp);
      INFO((answer.ok() ? std::string("ok") : answer.error().to_string()));
      REQUIRE(answer.ok());
      CHECK(answer->code == 205);
    }
  }
  CHECK(fetched.size() == 2);

  // The store reopens with both records under their (KeID, AE) ids.
  world.valve_keys.reset();
  world.valve_store.reset();
  auto reopened = test::open_store(world.dir / "valve", world.master_key);
  CHECK(reopened.find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve")) != nullptr);
  CHECK(reopened.find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-pump")) != nullptr);
  CHECK(reopened.find<crypto::SessionKeyRecord>(ke_id) == nullptr);
}
