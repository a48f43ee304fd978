// An Enrolment Target whose AE-ID is SP-relative (/in-cse/CAE-sp-valve) served next to CAE-valve on one gateway
// node: the client names it by crypto::server_name_for_ae_id (docs/PROTOCOL.md §2; the AE-ID itself is no DNS name
// and a GnuTLS server refuses it as SNI), TargetKeys maps that name back to the AE, fetches the key as that AE
// and the PSK handshake succeeds with the key derived for it.
#include <catch2/catch.hpp>

#include <cctype>


#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace std::chrono_literals;

namespace {

constexpr const char* kSpValveKpmId = "sp-valve@mef.example.net";
const std::string kSpValve = "/in-cse/CAE-sp-valve";


Result<transport::Response> get_temp(test::World& world, const transport::ClientCredentials& credentials) {
  transport::Request request;
  request.method = transport::Method::get;
  request.path = {"temp"};
  std::optional<Result<transport::Response>> outcome;
  world.meter_node->request(
      world.valve_address(), credentials, std::move(request),
      [&](Result<transport::Response> r, const transport::Session*) { outcome.emplace(std::move(r)); });
  if (!world.pump([&] { return outcome.has_value(); })) {
    return make_error(Errc::timeout, "test: no answer");
  }
  return std::move(*outcome);
}

}  // namespace

TEST_CASE("TargetKeys: an SP-relative AE-ID is reached over PSK by its mapped server name") {
  test::World world;
  SecretBuffer sp_valve_kpm = SecretBuffer::random(32);
  test::World::put(*world.mef_store, test::World::enrolee_row(test::kMeterKpmId, world.meter_kpm, "CAE-meter",
                                                              {"CAE-valve", kSpValve}, test::kMeterLifetime, false));
  test::World::put(*world.mef_store, test::World::enrolee_row(kSpValveKpmId, sp_valve_kpm, kSpValve, {},
                                                              test::kValveLifetime, false));
  test::World::put(*world.valve_store, crypto::BootstrapKeyRecord{kSpValveKpmId, sp_valve_kpm.clone(), kSpValve});
  auto sp_valve = world.make_enrolee(*world.valve_node, *world.valve_store, kSpValveKpmId, false);
  rspf::Enrolee* sp_valve_enrolee = sp_valve.get();
  REQUIRE(world.valve_keys->add_mef(test::kMefFqdn, rspf::MefContact{world.mef_address(), [sp_valve_enrolee] {
                                                                       return sp_valve_enrolee->mef_credentials();
                                                                     }},
                                    kSpValve)
              .ok());
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*sp_valve).ok());

  auto key = world.meter->key_for_target(kSpValve);
  REQUIRE(key.ok());
  const std::string server_name = crypto::server_name_for_ae_id(kSpValve);
  REQUIRE(server_name == "ae-hmcy3sydfhrarmgwkin7datqpozvciyc");  // tests/crypto/test_identifiers.cpp
  const auto credentials = transport::ClientCredentials::psk(key->ke_id, key->key.clone(), server_name);

  // First use: refused while the key is retrieved as /in-cse/CAE-sp-valve; then the handshake succeeds.
  REQUIRE_FALSE(get_temp(world, credentials).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
  const auto* record =
      world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(key->ke_id, kSpValve));
  REQUIRE(record != nullptr);
  CHECK(record->key.equals(key->key));
  auto answer = get_temp(world, credentials);
  INFO((answer.ok() ? std::string("ok") : answer.error().to_string()));
  REQUIRE(answer.ok());
  CHECK(answer->code == 205);
  CHECK(world.log.contains("target " + kSpValve + " key retrieval KeID " + key->ke_id));

  // The lookup matches the mapped name only: the AE-ID itself (which no TLS server accepts as SNI anyway) and a
  // different case of the mapped name name no served AE (two are served, so no fallback).
  CHECK(world.valve_keys->lookup_psk(transport::PskRequest{key->ke_id, kSpValve, "127.0.0.1:1"}).error().code ==
        Errc::denied);
  std::string upper = server_name;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  CHECK(world.valve_keys->lookup_psk(transport::PskRequest{key->ke_id, upper, "127.0.0.1:1"}).error().code ==
        Errc::denied);
  auto by_name = world.valve_keys->lookup_psk(transport::PskRequest{key->ke_id, server_name, "127.0.0.1:1"});
  REQUIRE(by_name.ok());
  CHECK(by_name->key.equals(key->key));
  // The grant names the AE the SNI mapped to and the requester the MEF vouched for (the record's peer).
  CHECK(by_name->local_ae_id == kSpValve);
  CHECK(by_name->peer_ae_id == "CAE-meter");
}
