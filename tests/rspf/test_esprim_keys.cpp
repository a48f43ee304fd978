// The pairwiseESPrimKey (SUID 23, docs/PROTOCOL.md §7) on both sides: the Enrolee derives it, the MEF serves it to
// the target under the rules of the SUID 22 key, and the target's TargetKeys::esprim_key() fetches it once, keeps it
// next to the SUID 22 key of the same KeID and answers from the store afterwards. Real Mef, Enrolee and TargetKeys
// objects on loopback DTLS (network_world.hpp).
#include <catch2/catch.hpp>

#include <optional>

#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/messages.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

constexpr crypto::Suid kSaef = crypto::Suid::rspf_key_for_saef;
constexpr crypto::Suid kEsprim = crypto::Suid::rspf_key_for_esprim;

// One esprim_key() call: whether it answered before returning, and its answer once there is one.
struct EsprimAnswer {
  bool answered_at_once = false;
  std::optional<Result<rspf::EsprimKey>> result;
};

std::shared_ptr<EsprimAnswer> ask_esprim_key(rspf::TargetKeys& keys, const std::string& ke_id,
                                             const std::string& local_ae_id = {}) {
  auto answer = std::make_shared<EsprimAnswer>();
  keys.esprim_key(ke_id, local_ae_id, [answer](Result<rspf::EsprimKey> result) { answer->result.emplace(std::move(result)); });
  answer->answered_at_once = answer->result.has_value();
  return answer;
}

std::string describe(const std::optional<Result<rspf::EsprimKey>>& result) {
  if (!result) return "no answer";
  return result->ok() ? std::string("ok") : result->error().to_string();
}

SecretBuffer derived(const crypto::KeyStore& store, const std::string& ke_id, crypto::Suid suid,
                     const std::string& target) {
  const auto* record = store.find<crypto::EnrolmentKeyRecord>(ke_id);
  REQUIRE(record != nullptr);
  return crypto::derive_usage_constrained_key(record->ke, suid, target).value();
}

}  // namespace

TEST_CASE("Enrolee::key_for_target derives the SUID 23 key next to the SUID 22 one and refuses other SUIDs",
          "[rspf][network][enrolee][esprim]") {
  World world;
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string ke_id = *world.meter->ke_id();
  auto saef = world.meter->key_for_target("CAE-valve");
  auto esprim = world.meter->key_for_target("CAE-valve", kEsprim);
  REQUIRE(saef.ok());
  REQUIRE(esprim.ok());
  CHECK(esprim->ke_id == ke_id);
  CHECK(saef->key.equals(derived(*world.meter_store, ke_id, kSaef, "CAE-valve")));
  CHECK(esprim->key.equals(derived(*world.meter_store, ke_id, kEsprim, "CAE-valve")));
  CHECK_FALSE(esprim->key.equals(saef->key));
  // Each is kept on its own: asking again in either order gives each its own key back.
  for (int i = 0; i < 2; ++i) {
    CHECK(world.meter->key_for_target("CAE-valve", kEsprim)->key.equals(esprim->key));
    CHECK(world.meter->key_for_target("CAE-valve", kSaef)->key.equals(saef->key));
  }
  CHECK(world.meter->cached_target_keys() ==
        std::vector<std::pair<std::string, std::string>>{{ke_id, "CAE-valve"}});

  for (const auto suid : {crypto::Suid::preprovisioned_with_mef, crypto::Suid::certificate_with_mef,
                          crypto::Suid::certificate_for_saef}) {
    auto refused = world.meter->key_for_target("CAE-valve", suid);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().code == Errc::invalid_argument);
    CHECK_THAT(refused.error().message, Catch::Contains("SUID " + std::to_string(static_cast<int>(suid))));
  }
  // The target rule holds for SUID 23 as for 22.
  CHECK(world.meter->key_for_target("CAE-pump", kEsprim).error().code == Errc::denied);
}

TEST_CASE("the MEF answers GET /fetchCredentials/<KeID>/23 to a target and refuses a non-target and other SUIDs",
          "[rspf][network][mef][esprim]") {
  World world;
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  const auto ke_id = crypto::parse_ke_id(*world.meter->ke_id()).value();
  auto fetch = [&](rspf::Enrolee& as, crypto::Suid suid) {
    transport::Request request;
    request.method = transport::Method::get;
    request.path = rspf::fetch_credentials_path(ke_id, suid);
    request.accept = static_cast<std::uint16_t>(rspf::ContentFormat::cbor);
    request.originator = as.ae_id();
    request.answer_is_secret = true;
    auto& node = &as == world.meter.get() ? *world.meter_node : *world.valve_node;
    return world.call(node, world.mef_address(), as.mef_credentials().value(), std::move(request));
  };

  auto esprim = fetch(*world.valve, kEsprim);
  INFO((esprim.ok() ? std::string("ok") : esprim.error().to_string()));
  REQUIRE(esprim.ok());
  REQUIRE(esprim->code == 205);
  REQUIRE(esprim->secret_payload);
  auto answer = rspf::decode_fetch_credentials_response(esprim->secret_payload->view());
  REQUIRE(answer.ok());
  CHECK(answer->enrolee_id == "CAE-meter");
  CHECK(answer->credential.equals(world.meter->key_for_target("CAE-valve", kEsprim)->key));
  CHECK_FALSE(answer->credential.equals(world.meter->key_for_target("CAE-valve", kSaef)->key));
  CHECK(world.log.contains("SUID 23 key for CAE-valve"));

  auto other_suid = fetch(*world.valve, crypto::Suid::certificate_for_saef);
  REQUIRE(other_suid.ok());
  CHECK(other_suid->code == 403);
  auto not_target = fetch(*world.meter, kEsprim);  // the meter is no Enrolment Target of its own KeID
  REQUIRE(not_target.ok());
  CHECK(not_target->code == 403);
}

TEST_CASE("TargetKeys::esprim_key fetches the SUID 23 key once, stores it next to the SUID 22 key and then answers "
          "at once",
          "[rspf][network][target][esprim]") {
  World world;
  std::vector<std::string> fetched;
  world.valve_keys->set_fetch_observer([&](const std::string& ke_id, const Result<void>& outcome) {
    if (outcome.ok()) fetched.push_back(ke_id);
  });
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  const std::string ke_id = *world.meter->ke_id();
  const auto meter_esprim = world.meter->key_for_target("CAE-valve", kEsprim);
  const auto meter_saef = world.meter->key_for_target("CAE-valve", kSaef);
  REQUIRE(meter_esprim.ok());
  REQUIRE(meter_saef.ok());

  // First call: nothing stored, so a retrieval; a second call meanwhile waits for the same one.
  auto first = ask_esprim_key(*world.valve_keys, ke_id);
  auto joined = ask_esprim_key(*world.valve_keys, ke_id, "CAE-valve");
  CHECK_FALSE(first->answered_at_once);
  CHECK_FALSE(joined->answered_at_once);
  CHECK(world.valve_keys->fetches_pending() == 1);
  REQUIRE(world.pump([&] { return first->result.has_value() && joined->result.has_value(); }));
  INFO(describe(first->result));
  REQUIRE(first->result->ok());
  REQUIRE(joined->result->ok());
  CHECK((*first->result)->key->equals(meter_esprim->key));
  CHECK((*first->result)->peer_ae_id == "CAE-meter");
  CHECK((*joined->result)->key->equals(meter_esprim->key));
  CHECK(fetched == std::vector<std::string>{ke_id});
  CHECK(world.log.contains("ESPrim (SUID 23) key retrieval KeID " + ke_id));
  const auto* esprim_record =
      world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve", 23));
  REQUIRE(esprim_record != nullptr);
  CHECK(esprim_record->suid == 23);
  CHECK(esprim_record->key.equals(meter_esprim->key));
  CHECK(world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve")) == nullptr);

  // Second call: answered from the store before esprim_key returns, nothing fetched.
  auto second = ask_esprim_key(*world.valve_keys, ke_id);
  CHECK(second->answered_at_once);
  REQUIRE(second->result->ok());
  CHECK((*second->result)->key->equals(meter_esprim->key));
  CHECK(world.valve_keys->fetches_pending() == 0);
  CHECK(fetched.size() == 1);

  // A handshake with the SUID 22 key fetches that one; both records stay, each with its own key.
  transport::Request temp;
  temp.path = {"temp"};
  const auto to_valve = transport::ClientCredentials::psk(ke_id, meter_saef->key.clone(), "CAE-valve");
  REQUIRE_FALSE(world.call(*world.meter_node, world.valve_address(), to_valve, temp).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
  auto handshake = world.call(*world.meter_node, world.valve_address(), to_valve, temp);
  INFO((handshake.ok() ? std::string("ok") : handshake.error().to_string()));
  REQUIRE(handshake.ok());
  CHECK(handshake->code == 205);
  CHECK(fetched.size() == 2);
  const auto* saef_record = world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve"));
  esprim_record = world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve", 23));
  REQUIRE(saef_record != nullptr);
  REQUIRE(esprim_record != nullptr);
  CHECK(saef_record->suid == 22);
  CHECK(saef_record->key.equals(meter_saef->key));
  CHECK(esprim_record->key.equals(meter_esprim->key));
  auto third = ask_esprim_key(*world.valve_keys, ke_id);
  REQUIRE(third->answered_at_once);
  CHECK((*third->result)->key->equals(meter_esprim->key));

  // Both survive a restart of the store.
  world.valve_keys.reset();
  world.valve_store.reset();
  auto reopened = open_store(world.dir / "valve", world.master_key);
  CHECK(reopened.size(crypto::RecordKind::session_key) == 2);
}

TEST_CASE("TargetKeys::esprim_key refuses a revoked KeID and drops its stored SUID 23 key",
          "[rspf][network][target][feed][esprim]") {
  World world(/*with_ca=*/false, /*observe_feed=*/true);
  REQUIRE(world.enrol(*world.valve).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->feeds_live() == 1; }));
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string ke_id = *world.meter->ke_id();
  auto before = ask_esprim_key(*world.valve_keys, ke_id);
  REQUIRE(world.pump([&] { return before->result.has_value(); }));
  REQUIRE(before->result->ok());
  REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));  // the feed's SUID 22 retrieval
  const std::string esprim_id = crypto::session_key_id(ke_id, "CAE-valve", 23);
  REQUIRE(world.valve_store->find<crypto::SessionKeyRecord>(esprim_id) != nullptr);
  REQUIRE(world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve")) != nullptr);

  REQUIRE(world.mef->revoke(ke_id).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->is_revoked(ke_id); }));
  CHECK(world.valve_store->find<crypto::SessionKeyRecord>(esprim_id) == nullptr);
  CHECK(world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve")) == nullptr);
  auto after = ask_esprim_key(*world.valve_keys, ke_id);
  REQUIRE(after->answered_at_once);
  REQUIRE_FALSE(after->result->ok());
  CHECK(after->result->error().code == Errc::denied);
  CHECK_THAT(after->result->error().message, Catch::Contains("revoked"));
  CHECK(world.valve_keys->fetches_pending() == 0);
}

TEST_CASE("TargetKeys::esprim_key refuses a KeID revoked at the MEF that the target did not hear of",
          "[rspf][network][target][esprim]") {
  World world;  // no feed: the MEF's refusal of the retrieval is what tells
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  const std::string ke_id = *world.meter->ke_id();
  REQUIRE(world.mef->revoke(ke_id).ok());
  auto refused = ask_esprim_key(*world.valve_keys, ke_id);
  CHECK_FALSE(refused->answered_at_once);
  REQUIRE(world.pump([&] { return refused->result.has_value(); }));
  REQUIRE_FALSE(refused->result->ok());
  CHECK(refused->result->error().code == Errc::denied);
  CHECK(world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve", 23)) == nullptr);
  // While the backoff lasts the refusal is answered at once, with its code, without asking the MEF again.
  auto again = ask_esprim_key(*world.valve_keys, ke_id);
  REQUIRE(again->answered_at_once);
  CHECK(again->result->error().code == Errc::denied);
  CHECK(world.valve_keys->fetches_pending() == 0);
}

TEST_CASE("TargetKeys::esprim_key denies a KeID of an MEF without a contact and refuses what is not a KeID",
          "[rspf][network][target][esprim]") {
  World world;
  std::vector<std::string> refused_ids;
  world.valve_keys->set_fetch_observer([&](const std::string& ke_id, const Result<void>& outcome) {
    if (!outcome.ok()) refused_ids.push_back(ke_id);
  });
  const std::string foreign = "00112233445566778899AABBCCDDEEFF@other-mef.example.net";
  auto unknown_mef = ask_esprim_key(*world.valve_keys, foreign);
  REQUIRE(unknown_mef->answered_at_once);
  CHECK(unknown_mef->result->error().code == Errc::denied);
  CHECK_THAT(unknown_mef->result->error().message, Catch::Contains("other-mef.example.net"));
  CHECK(refused_ids == std::vector<std::string>{foreign});

  // A served AE needs a contact for that MEF: another AE-ID has none.
  const std::string known_mef = "00112233445566778899AABBCCDDEEFF@" + std::string(kMefFqdn);
  auto unserved = ask_esprim_key(*world.valve_keys, known_mef, "CAE-elsewhere");
  REQUIRE(unserved->answered_at_once);
  CHECK(unserved->result->error().code == Errc::denied);

  auto not_a_ke_id = ask_esprim_key(*world.valve_keys, "CAE-meter");
  REQUIRE(not_a_ke_id->answered_at_once);
  CHECK(not_a_ke_id->result->error().code == Errc::not_found);
  CHECK(world.valve_keys->fetches_pending() == 0);
}

TEST_CASE("SUID 22 and 23 retrievals share max_fetches_in_flight",
          "[rspf][network][target][esprim]") {
  World world;
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  const std::string ke_id = *world.meter->ke_id();
  rspf::TargetKeysConfig config;
  config.local_ae_id = "CAE-valve";
  config.max_fetches_in_flight = 1;
  config.observe_feed = false;
  config.clock = world.clock.function();
  config.log = world.log.sink();
  config.jitter = [] { return 0.0; };
  auto keys = rspf::TargetKeys::create(*world.valve_node, *world.valve_store, std::move(config)).value();
  rspf::Enrolee* valve = world.valve.get();
  REQUIRE(keys->add_mef(kMefFqdn, rspf::MefContact{world.mef_address(), [valve] { return valve->mef_credentials(); }})
              .ok());

  CHECK(keys->lookup_psk(ke_id).error().code == Errc::not_found);  // the SUID 22 retrieval takes the one slot
  auto over_limit = ask_esprim_key(*keys, ke_id);
  REQUIRE(over_limit->answered_at_once);
  CHECK(over_limit->result->error().code == Errc::limit);
  REQUIRE(world.pump([&] { return keys->fetches_pending() == 0; }));

  auto with_slot = ask_esprim_key(*keys, ke_id);
  CHECK_FALSE(with_slot->answered_at_once);
  CHECK(keys->lookup_psk(ke_id).ok());  // the stored SUID 22 key needs no slot
  REQUIRE(world.pump([&] { return with_slot->result.has_value(); }));
  INFO(describe(with_slot->result));
  REQUIRE(with_slot->result->ok());
  CHECK((*with_slot->result)->key->equals(world.meter->key_for_target("CAE-valve", kEsprim)->key));
}

TEST_CASE("TargetKeys::esprim_key reports an unreachable MEF and answers with that failure during its backoff",
          "[rspf][network][target][esprim]") {
  World world;
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  const std::string ke_id = *world.meter->ke_id();
  // The MEF goes away: the valve's retrieval finds nobody at its address.
  world.mef_slot.unbind();
  world.mef.reset();
  world.mef_node.reset();
  auto unreachable = ask_esprim_key(*world.valve_keys, ke_id);
  CHECK_FALSE(unreachable->answered_at_once);
  REQUIRE(pump_nodes({world.valve_node.get()}, [&] { return unreachable->result.has_value(); }));
  INFO(describe(unreachable->result));
  REQUIRE_FALSE(unreachable->result->ok());
  // The transport's error as it came (a refused port fails the handshake: unauthenticated; silence: timeout), not
  // one of the refusals esprim_key makes itself.
  const Errc code = unreachable->result->error().code;
  CHECK((code == Errc::timeout || code == Errc::io || code == Errc::unauthenticated));
  CHECK_THAT(unreachable->result->error().message, Catch::Contains("127.0.0.1"));
  auto during_backoff = ask_esprim_key(*world.valve_keys, ke_id);
  REQUIRE(during_backoff->answered_at_once);
  CHECK(during_backoff->result->error().code == code);
  CHECK_THAT(during_backoff->result->error().message, Catch::Contains("next try in"));
  CHECK(world.valve_keys->fetches_pending() == 0);
}
