// Enrolment over a network that loses datagrams (dauth_impair_relay between the Enrolee and the MEF): an enrolment
// the MEF stored is always known to its Enrolee. Real Mef and Enrolee objects on loopback DTLS.
#include <catch2/catch.hpp>

#include <set>

#include "impair_relay_process.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

std::set<std::string> stored_ke_ids_of(const crypto::KeyStore& store, const std::string& enrolee_id) {
  std::set<std::string> ids;
  store.for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& record) {
    const auto& key = std::get<crypto::EnrolmentKeyRecord>(record);
    if (key.enrolee_id == enrolee_id) ids.insert(key.ke_id);
  });
  return ids;
}

}  // namespace

// The MEF answers an enrolment with a separate CON response once the record is durable. It used to close the
// session right after it: one lost datagram and the MEF held an enrolment its Enrolee never learnt of.
TEST_CASE("enrolment: the MEF's answer lost on the way is sent again and the Enrolee stores the same KeID",
          "[rspf][network][impaired]") {
  World world;
  ImpairProfile profile = ImpairProfile::none();
  profile.down.delay_ms = 200;  // MEF -> Enrolee: time for the test to cut the path while the answer is in flight
  ImpairRelay relay(world.mef_node->secure_port(), /*seed=*/12, profile);
  world.meter = world.make_enrolee(*world.meter_node, *world.meter_store, kMeterKpmId, false, relay.port());

  std::optional<Result<void>> outcome;
  world.meter->enrol([&](Result<void> result) { outcome.emplace(std::move(result)); });
  REQUIRE(world.pump([&] { return world.log.contains("stored -> answered"); }));
  world.mef_node->process_ready();  // the answer goes out to the relay ...
  relay.partition(true);            // ... and is lost there, with everything else for the next 600 ms
  world.pump([] { return false; }, 600ms);
  relay.partition(false);
  REQUIRE(world.pump([&] { return outcome.has_value(); }, 15000ms));
  INFO((outcome->ok() ? std::string("enrolled") : outcome->error().to_string()));
  REQUIRE(outcome->ok());
  REQUIRE(world.meter->ke_id().has_value());
  CHECK(stored_ke_ids_of(*world.mef_store, "CAE-meter") == std::set<std::string>{*world.meter->ke_id()});
  CHECK(relay.stats().at("down_dropped_partition") >= 1);
}
