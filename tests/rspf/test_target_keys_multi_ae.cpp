// TargetKeys serving two local AEs on one gateway node: the handshake's SNI names the target AE (PROTOCOL.md §2), each
// AE fetches its own key as itself, and the fetches start from the loop (Node::post).
#include <catch2/catch.hpp>


#include "dauth/crypto/onem2m.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace std::chrono_literals;

namespace {

constexpr const char* kPumpKpmId = "pump@mef.example.net";

transport::Request get_temp() {
  transport::Request request;
  request.method = transport::Method::get;
  request.path = {"temp"};
  return request;
}


Result<transport::Response> call(test::World& world, const transport::ClientCredentials& credentials) {
  std::optional<Result<transport::Response>> outcome;
  world.meter_node->request(world.valve_address(), credentials, get_temp(),
                            [&](Result<transport::Response> r, const transport::Session*) { outcome.emplace(std::move(r)); });
  if (!world.pump([&] { return outcome.has_value(); })) {
    return make_error(Errc::timeout, "test: no answer");
  }
  return std::move(*outcome);
}

}  // namespace

TEST_CASE("TargetKeys: two local AEs on one node, chosen by SNI, each with its own retrieved key") {
  test::World world;
  // The meter may talk to both AEs of the gateway; the pump is a second enrolled AE on the valve's node.
  auto pump = world.add_second_target(kPumpKpmId, "CAE-pump");
  REQUIRE(world.valve_keys->add_mef(test::kMefFqdn, rspf::MefContact{}, "not an AE-ID").error().code ==
          Errc::invalid_argument);

  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  REQUIRE(world.enrol(*pump).ok());

  auto to_valve_key = world.meter->key_for_target("CAE-valve");
  auto to_pump_key = world.meter->key_for_target("CAE-pump");
  REQUIRE(to_valve_key.ok());
  REQUIRE(to_pump_key.ok());
  REQUIRE_FALSE(to_valve_key->key.equals(to_pump_key->key));  // one KeID, a different key per target
  const std::string ke_id = to_valve_key->ke_id;
  const auto to_pump = transport::ClientCredentials::psk(ke_id, to_pump_key->key.clone(), "CAE-pump");
  const auto to_valve = transport::ClientCredentials::psk(ke_id, to_valve_key->key.clone(), "CAE-valve");

  // Pump first: refused, retrieval (as CAE-pump) posted to the loop, then the retry succeeds.
  auto first = call(world, to_pump);
  REQUIRE_FALSE(first.ok());
  REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
  const auto* record = world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-pump"));
  REQUIRE(record != nullptr);
  CHECK(record->local_ae_id == "CAE-pump");
  CHECK(record->key.equals(to_pump_key->key));
  auto second = call(world, to_pump);
  INFO((second.ok() ? std::string("ok") : second.error().to_string()));
  REQUIRE(second.ok());
  CHECK(second->code == 205);
  CHECK(world.log.contains("target CAE-pump key retrieval KeID " + ke_id));

  // The same KeID towards the valve: the pump's record does not answer for it; the valve fetches its own key.
  auto valve_first = call(world, to_valve);
  REQUIRE_FALSE(valve_first.ok());
  REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
  record = world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve"));
  REQUIRE(record != nullptr);
  CHECK(record->local_ae_id == "CAE-valve");
  CHECK(world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-pump")) != nullptr);
  CHECK(record->key.equals(to_valve_key->key));
  auto valve_second = call(world, to_valve);
  REQUIRE(valve_second.ok());
  CHECK(valve_second->code == 205);

  // With two AEs served, an SNI naming neither is refused at once, without a retrieval.
  REQUIRE(world.valve_keys->lookup_psk(transport::PskRequest{ke_id, "CAE-boiler", "127.0.0.1:1"}).error().code ==
          Errc::denied);
  REQUIRE(world.valve_keys->lookup_psk(transport::PskRequest{ke_id, "gateway.example.net", "127.0.0.1:1"})
              .error()
              .code == Errc::denied);
  CHECK(world.valve_keys->fetches_pending() == 0);
  // No SNI: the default AE (CAE-valve), whose key is stored now.
  auto no_sni = world.valve_keys->lookup_psk(transport::PskRequest{ke_id, "", "127.0.0.1:1"});
  REQUIRE(no_sni.ok());
  CHECK(no_sni->key.equals(to_valve_key->key));
  CHECK(no_sni->local_ae_id == "CAE-valve");
  CHECK(no_sni->peer_ae_id == "CAE-meter");
  // By SNI: the pump's key, granting the pump.
  auto by_pump = world.valve_keys->lookup_psk(transport::PskRequest{ke_id, "CAE-pump", "127.0.0.1:1"});
  REQUIRE(by_pump.ok());
  CHECK(by_pump->key.equals(to_pump_key->key));
  CHECK(by_pump->local_ae_id == "CAE-pump");
  CHECK(by_pump->peer_ae_id == "CAE-meter");
}

TEST_CASE("TargetKeys: with one local AE, an SNI that is not its AE-ID (e.g. the gateway FQDN) still selects it") {
  test::World world;
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  auto key = world.meter->key_for_target("CAE-valve");
  REQUIRE(key.ok());
  const auto credentials = transport::ClientCredentials::psk(key->ke_id, key->key.clone(), "gateway.example.net");
  REQUIRE_FALSE(call(world, credentials).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
  auto retry = call(world, credentials);
  INFO((retry.ok() ? std::string("ok") : retry.error().to_string()));
  REQUIRE(retry.ok());
  CHECK(retry->code == 205);
}
