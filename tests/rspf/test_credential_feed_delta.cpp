// The versioned credential feed (PROTOCOL.md §4, "The versioned feed"): GET /fetchCredentials?delta answers the
// whole state at version n first, then only what changed since the version the observer was last answered; a
// target that finds a gap reads the whole state with GET /fetchCredentials?full. Real Mef, Enrolee and TargetKeys
// objects on loopback DTLS; the gap is made by a second client of the target's own identity, which takes an answer
// the target's subscription then never sees (what a lost notification looks like to the MEF).
#include <catch2/catch.hpp>

#include <sys/epoll.h>
#include <unistd.h>

#include "dauth/rspf/messages.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

transport::Request feed_request(const std::string& originator, std::vector<std::string> query) {
  transport::Request request;
  request.method = transport::Method::get;
  request.path = {"fetchCredentials"};
  request.query = std::move(query);
  request.originator = originator;
  return request;
}

rspf::CredentialFeed body_of(const transport::Response& response) {
  REQUIRE(response.code == 205);
  auto feed = rspf::decode_credential_feed(ByteView(response.payload), rspf::ContentFormat::cbor);
  REQUIRE(feed.ok());
  return *feed;
}

}  // namespace

TEST_CASE("versioned feed: the whole state on subscription, then only what changed", "[rspf][network][feed]") {
  World world;
  REQUIRE(world.enrol(*world.valve).ok());
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string first_ke_id = *world.meter->ke_id();
  auto valve_credentials = world.valve->mef_credentials();
  REQUIRE(valve_credentials.ok());

  std::vector<Result<transport::Response>> calls;
  auto observation = world.valve_node->observe(
      world.mef_address(), *valve_credentials, feed_request("CAE-valve", {"delta"}),
      [&](Result<transport::Response> n, const transport::Session*) { calls.push_back(std::move(n)); });
  REQUIRE(world.pump([&] { return calls.size() == 1; }));
  REQUIRE(calls.back().ok());
  CHECK(calls.back()->observe.has_value());
  const auto whole = body_of(*calls.back());
  REQUIRE(whole.version.has_value());
  CHECK_FALSE(whole.since.has_value());
  CHECK(whole.issued == std::vector<std::string>{first_ke_id});
  CHECK(whole.revoked.empty());

  // A new enrolment naming the valve: only the new KeID, since the version of the whole state.
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string second_ke_id = *world.meter->ke_id();
  REQUIRE(world.pump([&] { return calls.size() == 2; }));
  REQUIRE(calls.back().ok());
  const auto added = body_of(*calls.back());
  REQUIRE(added.version.has_value());
  CHECK(added.since == whole.version);
  CHECK(*added.version > *whole.version);
  CHECK(added.issued == std::vector<std::string>{second_ke_id});
  CHECK(added.revoked.empty());

  // A revocation: only the revoked KeID, since the version of the last notification.
  REQUIRE(world.mef->revoke(first_ke_id).ok());
  REQUIRE(world.pump([&] { return calls.size() == 3; }));
  REQUIRE(calls.back().ok());
  const auto revoked = body_of(*calls.back());
  CHECK(revoked.since == added.version);
  CHECK(revoked.issued.empty());
  CHECK(revoked.revoked == std::vector<std::string>{first_ke_id});

  // "full" is always the whole state, and a request without query is the unversioned form of earlier releases.
  auto full = world.call(*world.valve_node, world.mef_address(), *valve_credentials, feed_request("CAE-valve", {"full"}));
  REQUIRE(full.ok());
  const auto full_body = body_of(*full);
  CHECK(full_body.version == revoked.version);
  CHECK_FALSE(full_body.since.has_value());
  CHECK(full_body.issued == std::vector<std::string>{second_ke_id});
  CHECK(full_body.revoked == std::vector<std::string>{first_ke_id});
  auto plain = world.call(*world.valve_node, world.mef_address(), *valve_credentials, feed_request("CAE-valve", {}));
  REQUIRE(plain.ok());
  const auto plain_body = body_of(*plain);
  CHECK_FALSE(plain_body.version.has_value());
  CHECK(plain_body.issued == std::vector<std::string>{second_ke_id});

  // Any other query is refused, naming what is allowed.
  auto odd = world.call(*world.valve_node, world.mef_address(), *valve_credentials,
                        feed_request("CAE-valve", {"since=3"}));
  REQUIRE(odd.ok());
  CHECK(odd->code == 400);
  CHECK(rspf::error_from_response("MEF", *odd).message.find("\"delta\" or \"full\"") != std::string::npos);
}

TEST_CASE("versioned feed: the target applies deltas, drops a revoked key from one, and reads the whole state "
          "after a gap",
          "[rspf][network][feed]") {
  World world(/*with_ca=*/false, /*observe_feed=*/true);
  REQUIRE(world.enrol(*world.valve).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->feeds_live() == 1; }));
  CHECK(world.valve_keys->feed_stats().full_states == 1);  // the subscription's first answer

  // A delta announces the meter's KeID: fetched ahead of the first handshake.
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string first_ke_id = *world.meter->ke_id();
  const auto key_held = [&](const std::string& ke_id) {
    return world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve")) != nullptr;
  };
  REQUIRE(world.pump([&] { return key_held(first_ke_id); }));
  CHECK(world.valve_keys->feed_stats().deltas == 1);

  // A delta revokes it: key removed, later handshakes refused.
  REQUIRE(world.mef->revoke(first_ke_id).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->is_revoked(first_ke_id); }));
  CHECK_FALSE(key_held(first_ke_id));
  CHECK(world.valve_keys->feed_stats().deltas == 2);
  CHECK(world.valve_keys->feed_stats().full_states == 1);
  CHECK(world.valve_keys->feed_stats().gaps == 0);

  // The gap. The valve is paused while the meter enrols again: the MEF's notification (changes since v) waits in
  // the valve's socket, unacknowledged, so the next change is held back at the MEF for the valve's subscription.
  auto thief_node = make_node(std::nullopt, &world.failures);
  const std::vector<transport::Node*> without_valve = {world.mef_node.get(), world.meter_node.get(), thief_node.get()};
  std::optional<Result<void>> enrolled;
  world.meter->enrol([&](Result<void> r) { enrolled.emplace(std::move(r)); });
  REQUIRE(pump_nodes(without_valve, [&] { return enrolled.has_value(); }));
  REQUIRE(enrolled->ok());
  const std::string second_ke_id = *world.meter->ke_id();
  // Another change, then a client with the valve's own identity takes an answer of the feed: the MEF now counts the
  // valve as answered up to the newest version, and the valve's next notification starts there.
  enrolled.reset();
  world.meter->enrol([&](Result<void> r) { enrolled.emplace(std::move(r)); });
  REQUIRE(pump_nodes(without_valve, [&] { return enrolled.has_value(); }));
  REQUIRE(enrolled->ok());
  const std::string third_ke_id = *world.meter->ke_id();
  auto valve_credentials = world.valve->mef_credentials();
  REQUIRE(valve_credentials.ok());
  std::optional<Result<transport::Response>> taken;
  thief_node->request(world.mef_address(), *valve_credentials, feed_request("CAE-valve", {"delta"}),
                      [&](Result<transport::Response> r, const transport::Session*) { taken.emplace(std::move(r)); });
  REQUIRE(pump_nodes(without_valve, [&] { return taken.has_value(); }));
  REQUIRE(taken->ok());
  REQUIRE(body_of(**taken).since.has_value());

  // The valve resumes: the waiting notification applies, the next one does not follow on (gap), the whole state is
  // read, and both new KeIDs end up fetched; the revoked one stays revoked.
  REQUIRE(world.pump([&] { return key_held(second_ke_id) && key_held(third_ke_id); }));
  const auto stats = world.valve_keys->feed_stats();
  CHECK(stats.gaps >= 1);
  CHECK(stats.full_reads == 1);
  CHECK(stats.full_states == 2);
  CHECK(world.log.contains("(a notification was missed); reading the whole state"));
  CHECK(world.valve_keys->is_revoked(first_ke_id));
  CHECK_FALSE(key_held(first_ke_id));

  // After the recovery the feed goes on with deltas.
  REQUIRE(world.mef->revoke(third_ke_id).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->is_revoked(third_ke_id); }));
  CHECK(world.valve_keys->feed_stats().deltas > stats.deltas);
  CHECK(world.valve_keys->feed_stats().full_reads == 1);
}

TEST_CASE("versioned feed: after an MEF restart a delta of its new epoch is a gap, so a revocation made meanwhile "
          "reaches the target", "[rspf][network][feed]") {
  // Without the epoch the valve, holding version 4 of the first run, took the new run's "changes since 1" as
  // following on and never learnt of the revocation (its key stayed usable).
  World world(false, true);
  REQUIRE(world.enrol(*world.valve).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->feeds_live() == 1; }));
  const auto key_held = [&](const std::string& ke_id) {
    return world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(ke_id, "CAE-valve")) != nullptr;
  };
  std::string ids[4];
  for (int i = 0; i < 4; ++i) {  // versions 1..4 in the first epoch
    REQUIRE(world.enrol(*world.meter).ok());
    ids[i] = *world.meter->ke_id();
    REQUIRE(world.pump([&] { return key_held(ids[i]); }));
  }
  // The MEF restarts on the same port with the same store: its feed versions count from 0 again.
  const auto port = world.mef_node->secure_port();
  world.mef.reset();
  world.mef_slot.unbind();
  world.mef_node.reset();
  transport::NodeConfig config;
  config.secure_addresses = {"127.0.0.1"};
  config.secure_port = port;
  config.psk_lookup = world.mef_slot.lookup();
  config.limits = quick_limits();
  world.mef_node = transport::Node::create(std::move(config)).value();
  rspf::MefConfig mc;
  mc.fqdn = kMefFqdn;
  mc.clock = world.clock.function();
  mc.log = world.log.sink();
  world.mef = rspf::Mef::create(*world.mef_node, *world.mef_store, std::move(mc)).value();
  world.mef_slot.bind(world.mef->psk_lookup());
  // New epoch: revoke the newest meter KeID (version 1), then another client of the valve's identity reads ?delta.
  REQUIRE(world.mef->revoke(ids[3]).ok());
  auto other = make_node(std::nullopt, &world.failures);  // a second client under the valve's identity
  transport::Request request;
  request.method = transport::Method::get;
  request.path = {"fetchCredentials"};
  request.query = {"delta"};
  request.originator = "CAE-valve";
  std::optional<Result<transport::Response>> taken;
  other->request(world.mef_address(), world.valve->mef_credentials().value(), request,
                 [&](Result<transport::Response> r, const transport::Session*) { taken.emplace(std::move(r)); });
  REQUIRE(pump_nodes({world.mef_node.get(), other.get()}, [&] { return taken.has_value(); }));
  REQUIRE(taken->ok());
  // The valve re-subscribes (its old session died with the MEF) and settles.
  const auto before = world.valve_keys->feed_stats();
  REQUIRE(world.pump([&] { return world.valve_keys->feed_stats().deltas > before.deltas ||
                                  world.valve_keys->feed_stats().full_states > before.full_states; }, 15000ms));
  // The revocation of the new epoch arrives by the whole state the gap asks for.
  REQUIRE(world.pump([&] { return world.valve_keys->is_revoked(ids[3]); }, 10000ms));
  CHECK_FALSE(key_held(ids[3]));
  const auto after = world.valve_keys->feed_stats();
  CHECK(after.gaps > before.gaps);
  CHECK(after.full_reads > before.full_reads);
}
