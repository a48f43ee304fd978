// Enrolee::key_for_target keeps each usage-constrained key (docs/PROTOCOL.md §4) for the life of its KeID instead
// of deriving it per proxied request: the kept key must equal a fresh derivation, and a renewal, a revocation in
// the store, the record's removal or expiry must make the old key unreachable and drop it.
#include <catch2/catch.hpp>

#include <algorithm>

#include "dauth/crypto/onem2m.hpp"
#include "network_world.hpp"

using namespace dauth;

namespace {

constexpr const char* kPumpKpmId = "pump@mef.example.net";

SecretBuffer uncached_key(const crypto::KeyStore& store, const std::string& ke_id, const std::string& target) {
  const auto* record = store.find<crypto::EnrolmentKeyRecord>(ke_id);
  REQUIRE(record != nullptr);
  return crypto::derive_usage_constrained_key(record->ke, crypto::Suid::rspf_key_for_saef, target).value();
}

using Cached = std::vector<std::pair<std::string, std::string>>;

Cached sorted(Cached cached) {
  std::sort(cached.begin(), cached.end());
  return cached;
}

}  // namespace

TEST_CASE("key_for_target keeps the derived key per KeID and target and forgets it with its KeID",
          "[rspf][network][enrolee]") {
  test::World world;
  auto pump = world.add_second_target(kPumpKpmId, "CAE-pump");  // the meter's targets: CAE-valve and CAE-pump
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string first_ke_id = *world.meter->ke_id();
  CHECK(world.meter->cached_target_keys().empty());

  // The kept key is the derivation itself, per target, and the same on every call.
  auto to_valve = world.meter->key_for_target("CAE-valve");
  REQUIRE(to_valve.ok());
  CHECK(to_valve->ke_id == first_ke_id);
  CHECK(to_valve->key.equals(uncached_key(*world.meter_store, first_ke_id, "CAE-valve")));
  auto to_pump = world.meter->key_for_target("CAE-pump");
  REQUIRE(to_pump.ok());
  CHECK(to_pump->key.equals(uncached_key(*world.meter_store, first_ke_id, "CAE-pump")));
  CHECK_FALSE(to_pump->key.equals(to_valve->key));
  for (int i = 0; i < 3; ++i) {
    auto again = world.meter->key_for_target("CAE-valve");
    REQUIRE(again.ok());
    CHECK(again->key.equals(to_valve->key));
  }
  CHECK(sorted(world.meter->cached_target_keys()) == Cached{{first_ke_id, "CAE-pump"}, {first_ke_id, "CAE-valve"}});

  // Not a target: refused, and nothing kept for it.
  CHECK(world.meter->key_for_target("CAE-other").error().code == Errc::denied);
  CHECK(world.meter->cached_target_keys().size() == 2);

  // Renewal: a new KeID, new keys; the old KeID's keys are dropped as the enrolment is stored, before any call.
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string second_ke_id = *world.meter->ke_id();
  REQUIRE(second_ke_id != first_ke_id);
  CHECK(world.meter->cached_target_keys().empty());
  auto renewed = world.meter->key_for_target("CAE-valve");
  REQUIRE(renewed.ok());
  CHECK(renewed->ke_id == second_ke_id);
  CHECK_FALSE(renewed->key.equals(to_valve->key));
  CHECK(renewed->key.equals(uncached_key(*world.meter_store, second_ke_id, "CAE-valve")));
  CHECK(world.meter->cached_target_keys() == Cached{{second_ke_id, "CAE-valve"}});

  // Revoked in this store (what the MEF role of the same dauthd does to a shared store): refused at the next
  // call, and the kept key is dropped.
  {
    const auto* record = world.meter_store->find<crypto::EnrolmentKeyRecord>(second_ke_id);
    REQUIRE(record != nullptr);
    crypto::EnrolmentKeyRecord revoked{record->ke_id, record->ke.clone(), record->enrolee_id, record->targets,
                                       record->expires_at, world.clock.now};
    test::World::put(*world.meter_store, std::move(revoked));
  }
  auto refused = world.meter->key_for_target("CAE-valve");
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().code == Errc::denied);
  CHECK(refused.error().message.find("revoked") != std::string::npos);
  CHECK(world.meter->cached_target_keys().empty());
  (void)pump;
}

TEST_CASE("key_for_target refuses and forgets once the enrolment expires or its record is gone",
          "[rspf][network][enrolee]") {
  test::World world;
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string ke_id = *world.meter->ke_id();
  REQUIRE(world.meter->key_for_target("CAE-valve").ok());
  CHECK(world.meter->cached_target_keys().size() == 1);

  SECTION("expiry") {
    world.clock.now += test::kMeterLifetime;  // expires_at is now: no longer valid
    auto expired = world.meter->key_for_target("CAE-valve");
    REQUIRE_FALSE(expired.ok());
    CHECK(expired.error().code == Errc::expired);
    CHECK(world.meter->cached_target_keys().empty());
  }
  SECTION("record removed from the store") {
    REQUIRE(world.meter_store->remove(crypto::RecordKind::enrolment_key, ke_id).ok());
    auto gone = world.meter->key_for_target("CAE-valve");
    REQUIRE_FALSE(gone.ok());
    CHECK(gone.error().code == Errc::not_found);
    CHECK(world.meter->cached_target_keys().empty());
  }
}
