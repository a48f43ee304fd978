// The MEF answers an enrolment only once its EnrolmentKeyRecord is durable, and concurrent enrolments share the key
// store's flushes (group commit: KeyStore::put_when_durable, docs/keystore-format.md).
#include <catch2/catch.hpp>

#include "network_world.hpp"

using namespace dauth;

TEST_CASE("MEF group commit: concurrent enrolments are each answered after their record is durable",
          "[rspf][network][keystore]") {
  test::World world;
  constexpr int kEnrolees = 8;
  std::vector<std::unique_ptr<rspf::Enrolee>> enrolees;
  for (int i = 0; i < kEnrolees; ++i) {
    const std::string kpm_id = "sensor" + std::to_string(i) + "@" + test::kMefFqdn;
    const std::string ae_id = "CAE-sensor" + std::to_string(i);
    SecretBuffer kpm = SecretBuffer::random(32);
    test::World::put(*world.mef_store,
                     test::World::enrolee_row(kpm_id, kpm, ae_id, {"CAE-valve"}, test::kMeterLifetime, false));
    test::World::put(*world.meter_store, crypto::BootstrapKeyRecord{kpm_id, kpm.clone(), ae_id});
    enrolees.push_back(world.make_enrolee(*world.meter_node, *world.meter_store, kpm_id, false));
  }
  const auto before = world.mef_store->sync_stats();
  // Every answer must find its record durable: the entries the MEF's store has fdatasync'ed since the start cover
  // every enrolment answered so far.
  std::vector<std::optional<Result<void>>> outcomes(kEnrolees);
  std::vector<std::uint64_t> durable_at_answer(kEnrolees);
  for (int i = 0; i < kEnrolees; ++i) {
    enrolees[static_cast<std::size_t>(i)]->enrol([&, i](Result<void> outcome) {
      durable_at_answer[static_cast<std::size_t>(i)] = world.mef_store->sync_stats().entries - before.entries;
      outcomes[static_cast<std::size_t>(i)].emplace(std::move(outcome));
    });
  }
  REQUIRE(world.pump([&] {
    return std::all_of(outcomes.begin(), outcomes.end(), [](const auto& o) { return o.has_value(); });
  }));
  std::vector<std::string> ke_ids;
  std::vector<std::uint64_t> answered_order = durable_at_answer;
  std::sort(answered_order.begin(), answered_order.end());
  for (int i = 0; i < kEnrolees; ++i) {
    const auto& enrolee = *enrolees[static_cast<std::size_t>(i)];
    INFO("enrolee " << i << ": " << (outcomes[static_cast<std::size_t>(i)]->ok()
                                         ? std::string("ok")
                                         : outcomes[static_cast<std::size_t>(i)]->error().to_string()));
    REQUIRE(outcomes[static_cast<std::size_t>(i)]->ok());
    REQUIRE(enrolee.ke_id());
    ke_ids.push_back(*enrolee.ke_id());
    // The k-th answer (in answer order) saw at least k durable entries.
    CHECK(answered_order[static_cast<std::size_t>(i)] >= static_cast<std::uint64_t>(i + 1));
  }
  std::sort(ke_ids.begin(), ke_ids.end());
  CHECK(std::adjacent_find(ke_ids.begin(), ke_ids.end()) == ke_ids.end());
  const auto after = world.mef_store->sync_stats();
  CHECK(after.entries - before.entries == static_cast<std::uint64_t>(kEnrolees));
  CHECK(after.syncs - before.syncs <= after.entries - before.entries);

  // Every KeID an enrolee holds is in the MEF's files.
  world.mef_slot.unbind();
  world.mef.reset();
  world.mef_store.reset();
  crypto::KeyStore reopened = test::open_store(world.dir / "mef", world.master_key);
  for (const auto& ke_id : ke_ids) {
    INFO("KeID " << ke_id);
    const auto* record = reopened.find<crypto::EnrolmentKeyRecord>(ke_id);
    REQUIRE(record != nullptr);
    CHECK(record->targets == std::vector<std::string>{"CAE-valve"});
  }
}
