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

// mef.session_key_lifetime (MefConfig::session_key_lifetime_s): a target keeps the key it retrieved for
// min(that, the KeID's remaining enrolment), then retrieves it again at the next handshake, not the whole
// enrolment long (before, the MEF answered the remaining enrolment: 2,591,987 s with the default 30 days).
TEST_CASE("a target keeps a retrieved key for the MEF's session key lifetime and then fetches it again",
          "[rspf][network][keystore]") {
  constexpr std::int64_t kSessionKeyLifetime = 120;  // below the meter's enrolment (test::kMeterLifetime)
  static_assert(kSessionKeyLifetime < test::kMeterLifetime, "the session key lifetime must be the shorter one");
  test::World world(/*with_ca=*/false, /*observe_feed=*/false, kSessionKeyLifetime);
  std::size_t fetched = 0;
  world.valve_keys->set_fetch_observer([&](const std::string&, const Result<void>& outcome) {
    if (outcome.ok()) ++fetched;
  });
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  auto to_valve_key = world.meter->key_for_target("CAE-valve");
  REQUIRE(to_valve_key.ok());
  const std::string ke_id = to_valve_key->ke_id;
  const auto to_valve = transport::ClientCredentials::psk(ke_id, to_valve_key->key.clone(), "CAE-valve");
  transport::Request temp;
  temp.path = {"temp"};
  auto handshake = [&] {
    world.meter_node->close_client_sessions();
    return world.call(*world.meter_node, world.valve_address(), to_valve, temp);
  };

  REQUIRE_FALSE(handshake().ok());  // unknown KeID: refused while its key is fetched
  REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
  REQUIRE(fetched == 1);
  const auto* record = world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve"));
  REQUIRE(record != nullptr);
  CHECK(record->expires_at == world.clock.now + kSessionKeyLifetime);
  CHECK(world.log.contains("lifetime " + std::to_string(kSessionKeyLifetime) + " s"));
  REQUIRE(handshake().ok());

  // Just before the key's end: still answered from the store.
  world.clock.now += kSessionKeyLifetime - 1;
  REQUIRE(handshake().ok());
  CHECK(fetched == 1);

  // At its end (the enrolment still has 480 s): refused once, fetched again, then accepted with the same key.
  world.clock.now += 1;
  REQUIRE_FALSE(handshake().ok());
  REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
  CHECK(fetched == 2);
  auto answer = handshake();
  INFO((answer.ok() ? std::string("ok") : answer.error().to_string()));
  REQUIRE(answer.ok());
  CHECK(answer->code == 205);

  // Near the enrolment's end the remaining enrolment is the shorter one.
  world.clock.now += test::kMeterLifetime - kSessionKeyLifetime - 30;
  REQUIRE_FALSE(handshake().ok());
  REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
  CHECK(fetched == 3);
  record = world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve"));
  REQUIRE(record != nullptr);
  CHECK(record->expires_at == world.clock.now + 30);
}
